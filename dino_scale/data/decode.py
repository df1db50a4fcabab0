"""Image decoding: any PIL-readable bytes -> RGB uint8 (H, W, 3), EXIF orientation applied.

Grayscale, CMYK (incl. Adobe-inverted JPEG), RGBA/LA (alpha dropped, as the reference
``convert("RGB")``), palette (with or without transparency) and 16-bit grayscale all
come out as 3-channel RGB. EXIF orientation: the image is turned upright, unless the
annotation was clearly made on the raw pixel grid (the raw size agrees with the annotated
size, as a uniform rescale of it or exactly (:func:`sizes_agree`), and the upright size does
not). The orientation tag is read for every format (phone cameras write JPEGs that PIL opens
as ``MPO``).

Pixels may differ from the annotated size by a uniform rescale (a downsized copy of a
dataset: the boxes are scaled with the pixels); any other difference, e.g. width and height
swapped, is the reason ``size_mismatch`` (:func:`sizes_agree`).
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageDecodeError", "decode_image", "verify_image_bytes", "read_image_size", "sizes_agree"]

_ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
    """A record the loaders skip (and count): bytes that are empty, truncated or not an image, an
    image above PIL's pixel limit (``too_large``), a missing or unreadable file, or a record that
    disagrees with its annotation or manifest (``size_mismatch``, ``unknown_category``); ``reason``
    is that short tag."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


def sizes_agree(pixels: tuple[int, int], annotated: tuple[int, int]) -> bool:
    """Whether ``pixels`` (w, h) is ``annotated`` (w, h) rescaled uniformly, within the
    rounding of each side to whole pixels: ``|w*ah - h*aw| <= max(aw, ah)``."""
    (w, h), (aw, ah) = pixels, annotated
    return abs(w * ah - h * aw) <= max(aw, ah)


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_ORIENTATION, 1) or 1)
    except Exception:  # a malformed EXIF block: leave the pixels as stored
        return 1


def _too_large(e: Exception) -> ImageDecodeError:
    """PIL's refusal of an image above twice ``Image.MAX_IMAGE_PIXELS`` (a possible decompression
    bomb): the file is intact, so not ``corrupt``."""
    return ImageDecodeError("too_large", f"{e} (PIL.Image.MAX_IMAGE_PIXELS); tile or downscale such images")


def _open(data: Optional[bytes]) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty_file", "zero bytes")
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise _too_large(e) from None
    except UnidentifiedImageError:  # its text names the BytesIO's memory address: new each run
        raise ImageDecodeError("corrupt", "UnidentifiedImageError: not an image format PIL can read") from None
    except Exception as e:  # PIL raises OSError, SyntaxError...
        raise ImageDecodeError("corrupt", f"{type(e).__name__}: {e}") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.int64)
        peak = 65535 if mode.startswith("I;16") else max(1, int(arr.max()))
        arr = np.clip(arr * 255 // peak, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def decode_image(data: Optional[bytes], expected_size: Optional[tuple[int, int]] = None,
                 draft_size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Decode to RGB uint8 (H, W, 3).

    ``expected_size`` is the annotated (width, height), used only to decide EXIF
    orientation (see module doc). ``draft_size`` (w, h) lets JPEG decode at a reduced
    DCT scale no smaller than that size (faster when the output will be smaller).
    Raises :class:`ImageDecodeError` (reason ``empty_file``, ``corrupt``, or ``too_large`` for
    an image PIL refuses to open: more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels).
    """
    im = _open(data)
    try:
        orientation = _orientation(im)
        if draft_size is not None and im.format in ("JPEG", "MPO") and orientation == 1:
            im.draft("RGB", draft_size)
        im.load()
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            upright = ImageOps.exif_transpose(im)
            # the same rule as verify_image_bytes: a rescaled copy of a raw-grid annotation stays raw
            keep_raw = (expected_size is not None and sizes_agree(tuple(im.size), tuple(expected_size))
                        and not sizes_agree(tuple(upright.size), tuple(expected_size)))
            if not keep_raw:
                im = upright
        return np.array(_to_rgb(im))
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise _too_large(e) from None
    except Exception as e:  # truncated data: OSError("image file is truncated ...")
        raise ImageDecodeError("corrupt", f"{type(e).__name__}: {e}") from None


def verify_image_bytes(data: Optional[bytes], expected_size: Optional[tuple[int, int]] = None) -> Optional[str]:
    """``None`` when the bytes decode completely, else the reason (``empty_file``/``corrupt``/``too_large``,
    or ``size_mismatch`` when neither the stored nor the upright size agrees with the
    annotated ``expected_size`` (w, h); see :func:`sizes_agree`).

    JPEG is checked at 1/8 DCT scale: every entropy-coded byte is still read (so
    truncation is caught) at a fraction of the full decode cost.
    """
    try:
        im = _open(data)
        if expected_size is not None:
            w, h = im.size
            upright = (h, w) if _orientation(im) in (5, 6, 7, 8) else (w, h)
            if not (sizes_agree((w, h), expected_size) or sizes_agree(upright, expected_size)):
                return "size_mismatch"
        if im.format in ("JPEG", "MPO"):
            im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
        im.load()
    except ImageDecodeError as e:
        return e.reason
    except Exception:
        return "corrupt"
    return None


def read_image_size(data: bytes) -> tuple[int, int]:
    """(width, height) as stored (before EXIF orientation) from the header only."""
    return tuple(_open(data).size)  # type: ignore[return-value]

"""Image decoding: any PIL-readable bytes -> RGB uint8 (H, W, 3), EXIF orientation applied.

Grayscale, CMYK (incl. Adobe-inverted JPEG), RGBA/LA (alpha dropped, as the reference
``convert("RGB")``), palette (with or without transparency) and 16-bit grayscale all
come out as 3-channel RGB. EXIF orientation, with an annotated size, follows the setting
``exif_orientation`` (``data.exif_orientation``, :data:`EXIF_ORIENTATION_MODES`): ``"stored"``
keeps the stored pixels (the official DINO reads ``Image.open(...).convert("RGB")`` with no
EXIF transpose, and COCO/Objects365 are annotated on that grid), ``"upright"`` always applies the
tag (labelling tools such as labelme, Label Studio or Roboflow annotate the upright image), and
``"auto"`` lets the sizes decide: upright unless the stored size agrees with the annotated size
(as a uniform rescale of it or exactly, :func:`sizes_agree`) and the upright size does not. An
orientation that keeps the size (2, 3, 4; 5-8 on a square image) cannot be decided by size: a
tie (:func:`exif_tie`), which ``"auto"`` turns upright. Without an annotated size (predict) the
image is always turned upright, as it is displayed. The orientation tag is read for every format
(phone cameras write JPEGs that PIL opens as ``MPO``).

Pixels may differ from the annotated size by a uniform rescale (a downsized copy of a
dataset: the boxes are scaled with the pixels); any other difference, e.g. width and height
swapped, is the reason ``size_mismatch`` (:func:`sizes_agree`).
"""
from __future__ import annotations

import io
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dino_scale.config_checks import EXIF_ORIENTATION_MODES, check_exif_orientation

__all__ = ["ImageDecodeError", "decode_image", "verify_image_bytes", "read_size_and_orientation", "sizes_agree",
           "EXIF_ORIENTATION_MODES", "check_exif_orientation", "exif_tie"]

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


def _upright_size(stored: tuple[int, int], orientation: int) -> tuple[int, int]:
    w, h = stored
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def exif_tie(stored: tuple[int, int], orientation: int, annotated: tuple[int, int]) -> bool:
    """Whether the annotated (w, h) cannot tell the stored grid from the upright one: the tag turns
    or mirrors the pixels (2..8) and both sizes agree with ``annotated`` (2, 3, 4; 5-8 square)."""
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return False
    annotated = tuple(annotated)
    return sizes_agree(tuple(stored), annotated) and sizes_agree(_upright_size(stored, orientation), annotated)


def _turn_upright(stored: tuple[int, int], orientation: int, expected_size: Optional[tuple[int, int]],
                  mode: str) -> bool:
    """Whether pixels stored as ``stored`` (w, h) with a turning ``orientation`` are turned upright:
    always without an annotated size (predict) or with ``"upright"``, never with ``"stored"``;
    ``"auto"``: unless only the stored size agrees with the annotated one (ties: upright)."""
    if expected_size is None or mode == "upright":
        return True
    if mode == "stored":
        return False
    expected = tuple(expected_size)
    return not (sizes_agree(tuple(stored), expected) and not sizes_agree(_upright_size(stored, orientation), expected))


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


def _integer_peak(mode: str, arr: np.ndarray) -> int:
    """The value shown as white for an integer grayscale image: 65535 for 16-bit modes; for 32-bit
    ``"I"`` the smallest of 255 / 65535 / the image's own maximum that holds every value, so an
    8-bit or 16-bit picture stored as 32-bit keeps its brightness (a dark image is not stretched)."""
    if mode.startswith("I;16"):
        return 65535
    top = int(arr.max()) if arr.size else 0
    return 255 if top <= 255 else 65535 if top <= 65535 else top


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit values times 255 fit int32 (half the memory of int64: a 10000 x 10000 PNG of 194 KB
        # took 2.6 GB); 32-bit "I" ones need int64
        arr = np.asarray(im, dtype=np.int32 if mode.startswith("I;16") else np.int64)
        arr = np.clip(arr * 255 // _integer_peak(mode, arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":  # 32-bit float grey: PIL clips to 0..255, so a [0, 1] image came out black
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = float(arr.max()) if arr.size else 0.0
        peak = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0 if top <= 65535.0 else top
        arr = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def decode_image(data: Optional[bytes], expected_size: Optional[tuple[int, int]] = None,
                 draft_size: Optional[tuple[int, int]] = None, exif_orientation: str = "auto",
                 on_tie: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Decode to RGB uint8 (H, W, 3).

    ``expected_size`` is the annotated (width, height), used only to decide EXIF
    orientation with ``exif_orientation`` (see module doc); ``on_tie(orientation)`` is called
    when that size cannot tell the grids apart (:func:`exif_tie`), whatever the mode. ``draft_size``
    (w, h) lets JPEG decode at a reduced DCT scale no smaller than that size (faster when the output
    will be smaller). Raises :class:`ImageDecodeError` (reason ``empty_file``, ``corrupt``, or
    ``too_large`` for an image PIL refuses to open: more than twice ``PIL.Image.MAX_IMAGE_PIXELS``
    pixels); ``ConfigError`` for an unknown ``exif_orientation``.
    """
    check_exif_orientation(exif_orientation)
    im = _open(data)
    try:
        orientation = _orientation(im)
        if draft_size is not None and im.format in ("JPEG", "MPO") and orientation == 1:
            im.draft("RGB", draft_size)
        im.load()
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            if on_tie is not None and expected_size is not None and exif_tie(im.size, orientation, expected_size):
                on_tie(orientation)
            if _turn_upright(im.size, orientation, expected_size, exif_orientation):
                im = ImageOps.exif_transpose(im)
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
    annotated ``expected_size`` (w, h); see :func:`sizes_agree`). Either size is accepted whatever
    ``data.exif_orientation``: shards serve every reading mode, and the loaders refuse (a counted
    ``size_mismatch``) an image whose annotated size does not fit the mode chosen for training.

    JPEG is checked at 1/8 DCT scale: every entropy-coded byte is still read (so
    truncation is caught) at a fraction of the full decode cost.
    """
    try:
        im = _open(data)
        if expected_size is not None:
            upright = _upright_size(im.size, _orientation(im))
            if not (sizes_agree(im.size, expected_size) or sizes_agree(upright, expected_size)):
                return "size_mismatch"
        if im.format in ("JPEG", "MPO"):
            im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
        im.load()
    except ImageDecodeError as e:
        return e.reason
    except Exception:
        return "corrupt"
    return None


def read_size_and_orientation(data: bytes) -> tuple[tuple[int, int], int]:
    """((width, height) as stored, EXIF orientation 1..8; 1 without a tag) from the header only."""
    im = _open(data)
    return tuple(im.size), _orientation(im)  # type: ignore[return-value]

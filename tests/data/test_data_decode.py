"""Decoding: always RGB uint8 (H, W, 3) whatever the mode; EXIF orientation; bad bytes."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from dino_scale.data.decode import ImageDecodeError, decode_image, sizes_agree, verify_image_bytes


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_data_decode_grayscale():
    arr = decode_image(_encode(Image.new("L", (20, 10), 77), "PNG"))
    assert arr.shape == (10, 20, 3) and arr.dtype == np.uint8 and (arr == 77).all()


def test_data_decode_16bit_grayscale():
    arr = decode_image(_encode(Image.fromarray(np.full((6, 8), 65535, np.uint16)), "PNG"))
    assert arr.shape == (6, 8, 3) and (arr == 255).all()


@pytest.mark.parametrize("values, shown", [(40, 40), (255, 255), (257 * 40, 40), (70000, 255)])
def test_data_decode_32bit_grayscale_keeps_its_brightness(values, shown):
    """A 32-bit ``"I"`` image is scaled by its value range (8-bit, 16-bit, else its own maximum), never
    stretched by its own maximum: a dark 8-bit picture stored as 32-bit stays dark."""
    arr32 = np.zeros((6, 8), np.int32)
    arr32[:, :4] = values
    im = Image.open(io.BytesIO(_encode(Image.fromarray(arr32), "TIFF")))
    assert im.mode == "I"
    arr = decode_image(_encode(Image.fromarray(arr32), "TIFF"))
    assert arr.shape == (6, 8, 3) and (arr[:, :4] == shown).all() and (arr[:, 4:] == 0).all()


@pytest.mark.parametrize("values, shown", [(0.5, 128), (1.0, 255), (40.0, 40), (257.0 * 40, 40), (float("nan"), 0)])
def test_data_decode_float_grayscale_keeps_its_brightness(values, shown):
    """A 32-bit float ``"F"`` image (a [0, 1] TIFF) came out black: PIL's conversion clips to
    0..255. It is scaled by its value range ([0, 1], 8-bit, 16-bit, else its own maximum)."""
    arr32 = np.zeros((6, 8), np.float32)
    arr32[:, :4] = values
    data = _encode(Image.fromarray(arr32), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    arr = decode_image(data)
    assert arr.shape == (6, 8, 3) and (arr[:, :4] == shown).all() and (arr[:, 4:] == 0).all()


def test_data_decode_cmyk_jpeg():
    data = _encode(Image.new("CMYK", (16, 12), (0, 255, 255, 0)), "JPEG", quality=95)  # red in CMYK
    arr = decode_image(data)
    assert arr.shape == (12, 16, 3)
    r, g, b = arr[6, 8].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_data_decode_rgba_and_palette():
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert (decode_image(_encode(rgba, "PNG"))[0, 0] == [10, 20, 30]).all()
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 250, 5, 9] + [0] * 762)
    assert (decode_image(_encode(pal, "PNG"))[0, 0] == [250, 5, 9]).all()
    pal.info["transparency"] = 0
    assert decode_image(_encode(pal, "PNG", transparency=0)).shape == (8, 8, 3)
    assert decode_image(_encode(Image.new("LA", (5, 4), (99, 255)), "PNG")).shape == (4, 5, 3)


def test_data_decode_exif_rotated():
    raw = np.zeros((10, 30, 3), np.uint8)
    raw[:, :5] = 255  # white band on the left of the stored pixels
    im = Image.fromarray(raw)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _encode(im, "JPEG", exif=exif.tobytes(), quality=98)
    up = decode_image(data)
    assert up.shape == (30, 10, 3)  # upright: portrait
    assert up[:5, :, 0].mean() > 200 and up[-5:, :, 0].mean() < 50  # band is now on top
    assert decode_image(data, expected_size=(10, 30)).shape == (30, 10, 3)  # annotated on upright size
    assert decode_image(data, expected_size=(30, 10)).shape == (10, 30, 3)  # annotated on the raw grid


def test_data_decode_exif_rotated_rescaled_copy_of_a_raw_grid_annotation():
    """A 64x48 JPEG with orientation 6 annotated as 128x96: a half-size copy of an image annotated
    on its raw grid. verify_image_bytes accepted it (a uniform rescale), but decoding kept the raw
    grid only for the exact annotated size, turned it upright (48x64) and every load was a
    size_mismatch. Both now apply the same rule."""
    from dino_scale.config import preset
    from dino_scale.data.transforms import DetectionTransform

    raw = np.zeros((48, 64, 3), np.uint8)
    raw[:, :8] = 255  # white band on the left of the stored pixels
    im = Image.fromarray(raw)
    exif = im.getexif()
    exif[0x0112] = 6
    data = _encode(im, "JPEG", exif=exif.tobytes(), quality=98)
    assert verify_image_bytes(data, (128, 96)) is None
    arr = decode_image(data, expected_size=(128, 96))
    assert arr.shape == (48, 64, 3) and arr[:, :8, 0].mean() > 200  # the raw grid
    assert decode_image(data, expected_size=(96, 128)).shape == (64, 48, 3)  # annotated upright: turned
    rec = {"image_id": 1, "image": data, "width": 128, "height": 96, "file_name": "r.jpg",
           "boxes": np.array([[0, 0, 16, 96]], np.float32), "category_ids": np.array([1]),
           "iscrowd": np.array([False])}
    s = DetectionTransform(preset("tiny").data, train=False)(rec)
    assert s["orig_size"].tolist() == [96, 128] and s["size"][1] > s["size"][0]  # landscape, as annotated
    np.testing.assert_allclose(s["boxes"].numpy(), [[1 / 16, 0.5, 1 / 8, 1.0]], atol=1e-6)  # the band


def test_data_decode_bad_bytes():
    good = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(ImageDecodeError) as e:
        decode_image(b"")
    assert e.value.reason == "empty_file"
    with pytest.raises(ImageDecodeError) as e:
        decode_image(b"GIF89a garbage")
    assert e.value.reason == "corrupt"
    with pytest.raises(ImageDecodeError):
        decode_image(good[: len(good) // 2])
    assert verify_image_bytes(good) is None
    assert verify_image_bytes(good[: len(good) // 2]) == "corrupt"
    assert verify_image_bytes(b"") == "empty_file"


def test_data_decode_exif_rotated_mpo():
    """Phone cameras write multi-picture JPEGs that PIL opens as ``MPO``: their EXIF
    orientation is applied too (it was read only for JPEG/TIFF/PNG/WEBP)."""
    raw = np.zeros((10, 30, 3), np.uint8)
    raw[:, :5] = 255
    im = Image.fromarray(raw)
    exif = im.getexif()
    exif[0x0112] = 6
    data = _encode(im, "MPO", exif=exif.tobytes(), quality=98, save_all=True, append_images=[im])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    up = decode_image(data, expected_size=(10, 30))
    assert up.shape == (30, 10, 3) and up[:5, :, 0].mean() > 200
    assert decode_image(data, expected_size=(10, 30), draft_size=(5, 15)).shape[:2] == (30, 10)
    assert verify_image_bytes(data, (10, 30)) is None and verify_image_bytes(data, (30, 10)) is None


def test_data_sizes_agree_accepts_uniform_rescales_only():
    assert sizes_agree((64, 48), (64, 48)) and sizes_agree((600, 400), (1199, 800))
    assert sizes_agree((17, 9), (33, 17))  # each side rounded to whole pixels
    assert not sizes_agree((48, 64), (64, 48)) and not sizes_agree((64, 40), (64, 48))
    jpeg = _encode(Image.new("RGB", (64, 48)), "JPEG")
    assert verify_image_bytes(jpeg, (32, 24)) is None
    assert verify_image_bytes(jpeg, (48, 64)) == "size_mismatch"


def test_data_decode_unidentified_bytes_message_is_the_same_every_time():
    """PIL's 'cannot identify image file <_io.BytesIO object at 0x7f...>' named a memory address,
    so the error written for such a file (predict's predictions.json, a conversion's skip log)
    differed from run to run; the message is now fixed text."""
    messages = set()
    for _ in range(3):
        with pytest.raises(ImageDecodeError) as e:
            decode_image(b"not an image at all")
        assert e.value.reason == "corrupt"
        messages.add(str(e.value))
    (message,) = messages
    assert "0x" not in message and "BytesIO" not in message and "PIL" in message, message


def _tagged(orientation: int, hw: tuple[int, int]) -> tuple[bytes, np.ndarray]:
    """A JPEG stored as ``hw`` (h, w) with a white block at the top left of its stored pixels and
    EXIF ``orientation``; also its upright pixels as displayed."""
    h, w = hw
    raw = np.zeros((h, w, 3), np.uint8)
    raw[:h // 2, :w // 4] = 255
    im = Image.fromarray(raw)
    exif = im.getexif()
    exif[0x0112] = orientation
    data = _encode(im, "JPEG", exif=exif.tobytes(), quality=98)
    return data, np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def _block_box(pixels: np.ndarray) -> list[float]:
    """x, y, w, h of the white block in ``pixels`` (H, W, 3)."""
    ys, xs = np.nonzero(pixels[..., 0] > 127)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


# (orientation, stored h, w); the annotation is made on the stored or the upright pixels
_CASES = [(3, (12, 32)), (6, (12, 32)), (3, (16, 16)), (6, (16, 16))]


@pytest.mark.parametrize("orientation, hw", _CASES)
@pytest.mark.parametrize("annotated_on", ["stored", "upright"])
@pytest.mark.parametrize("mode", ["auto", "stored", "upright"])
def test_data_decode_exif_orientation_setting_decides_the_pixel_grid(mode, annotated_on, orientation, hw):
    """``data.exif_orientation``: ``stored`` never applies the tag (the official DINO's reading, for
    COCO/Objects365), ``upright`` always does (labelling tools), ``auto`` lets the sizes decide and
    turns a tie (orientation 3; 6 on a square image) upright. The annotated box (the white block
    on the grid it was annotated on) lands on the block through DetectionTransform when the mode
    reads that grid; a non-square image annotated on the other grid is a counted size_mismatch.
    Before the setting, decoding always followed ``auto``: a COCO-style orientation-3 image
    annotated on its stored pixels came out rotated 180 degrees, its box on black pixels."""
    from dino_scale.config import preset
    from dino_scale.data.transforms import DetectionTransform

    data, upright = _tagged(orientation, hw)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    truth = stored if annotated_on == "stored" else upright
    H, W = truth.shape[:2]
    square, turns = hw[0] == hw[1], orientation in (5, 6, 7, 8)
    if mode == "auto":
        reads = "stored" if (annotated_on == "stored" and turns and not square) else "upright"
    else:
        reads = mode
    expected_pixels = stored if reads == "stored" else upright
    arr = decode_image(data, expected_size=(W, H), exif_orientation=mode)
    assert np.array_equal(arr, expected_pixels), f"not the {reads} grid"
    assert verify_image_bytes(data, (W, H)) is None  # conversion accepts either grid, whatever the mode
    assert np.array_equal(decode_image(data, exif_orientation=mode), upright)  # predict: as displayed
    rec = {"image_id": 7, "image": data, "width": W, "height": H, "file_name": "r.jpg",
           "boxes": np.array([_block_box(truth)], np.float32), "category_ids": np.array([1]),
           "iscrowd": np.array([False])}
    cfg = preset("tiny", [f"data.exif_orientation={mode}"]).data
    if expected_pixels.shape != truth.shape:
        with pytest.raises(ImageDecodeError, match=f"size_mismatch.*exif_orientation={mode}"):
            DetectionTransform(cfg, train=False)(rec)
        return
    s = DetectionTransform(cfg, train=False)(rec)
    img, (cx, cy, bw, bh) = s["image"], s["boxes"][0].tolist()
    h, w = img.shape[-2:]
    x1, x2 = int(round((cx - bw / 2) * w)), int(round((cx + bw / 2) * w))
    y1, y2 = int(round((cy - bh / 2) * h)), int(round((cy + bh / 2) * h))
    on_block = img[0, y1 + 1:y2 - 1, x1 + 1:x2 - 1].float().mean() > 200
    assert on_block == (reads == annotated_on), "the box is not on the block" if reads == annotated_on else reads


@pytest.mark.parametrize("orientation, hw, tie", [(3, (12, 32), True), (2, (12, 32), True), (6, (16, 16), True),
                                                  (8, (16, 16), True), (6, (12, 32), False), (1, (12, 32), False)])
def test_data_decode_exif_tie_is_counted_once_per_image_and_warned_once(orientation, hw, tie, caplog, monkeypatch):
    """With ``auto``, an image whose tag keeps its size is a tie the sizes cannot decide: it was
    turned upright silently; now its id is counted once (``DetectionTransform.exif_ties``) and the
    first one in the process is a warning naming ``data.exif_orientation``. ``stored``/``upright``
    decide, so nothing is counted."""
    import logging

    from dino_scale.config import preset
    from dino_scale.data import transforms
    from dino_scale.data.decode import exif_tie

    monkeypatch.setattr(transforms, "_tie_warned", False)
    data, _ = _tagged(orientation, hw)
    h, w = hw
    assert exif_tie((w, h), orientation, (w, h)) == tie
    rec = {"image_id": 3, "image": data, "width": w, "height": h, "file_name": "r.jpg",
           "boxes": np.array([[0, 0, 2, 2]], np.float32), "category_ids": np.array([1]),
           "iscrowd": np.array([False])}
    t = transforms.DetectionTransform(preset("tiny").data, train=False)
    with caplog.at_level(logging.DEBUG, logger="dino_scale.data.transforms"):
        for epoch in range(2):
            t(rec, epoch=epoch)
            t({**rec, "image_id": 4}, epoch=epoch)
    assert t.exif_ties == ({3, 4} if tie else set())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == int(tie) and all("data.exif_orientation=stored" in r.getMessage() for r in warnings)
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG and "image id 4" in r.getMessage()]) == int(tie)
    for mode in ("stored", "upright") if tie else ():  # the setting decides a tie: nothing to count
        decided = transforms.DetectionTransform(preset("tiny", [f"data.exif_orientation={mode}"]).data, train=False)
        decided(rec)
        assert decided.exif_ties == set()

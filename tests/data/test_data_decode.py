"""Decoding: always RGB uint8 (H, W, 3) whatever the mode; EXIF orientation; bad bytes."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

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

"""Converter input checks: category ids that can be no class index, images PIL refuses to open."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from dino_scale.data import ConversionError, convert_coco


def _png(w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _dataset(tmp_path, categories, annotations, images=None):
    """(image root, annotation JSON) of PNGs ``images`` {name: bytes} (default: one 64x48 a.png, id 1)."""
    root = tmp_path / "img"
    root.mkdir(exist_ok=True)
    entries = []
    for i, (name, data) in enumerate((images or {"a.png": _png()}).items(), 1):
        (root / name).write_bytes(data)
        w, h = Image.open(io.BytesIO(data)).size
        entries.append({"id": i, "file_name": name, "width": w, "height": h})
    doc = {"images": entries, "categories": categories,
           "annotations": [{"id": k + 1, "iscrowd": 0, **a} for k, a in enumerate(annotations)]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(doc))
    return root, ann


def test_data_negative_category_id_fails_fast(tmp_path):
    """A category id is the class index (DESIGN.md: raw ids); a negative one converted silently,
    passed the class-head check before the run (max id + 1 <= num_classes) and stopped the
    training loop at its first batch ('labels [-1] outside [0, N)'), after Ray, DeepSpeed and
    MLflow had started. Id 0 is a class like any other."""
    cats = [{"id": -1, "name": "background"}, {"id": 0, "name": "zero"}, {"id": 3, "name": "three"}]
    anns = [{"image_id": 1, "category_id": c, "bbox": [1, 1, 20, 20]} for c in (0, 3)]
    root, ann = _dataset(tmp_path, cats, anns)
    with pytest.raises(ConversionError, match=r"-1.*class index"):
        convert_coco(ann, root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    (tmp_path / "fine").mkdir()
    root, ann = _dataset(tmp_path / "fine", cats[1:], anns)
    m = convert_coco(ann, root, tmp_path / "fine" / "out", progress=False)
    assert [c["id"] for c in m["categories"]] == [0, 3] and m["num_boxes"] == 2


def test_data_image_above_pil_pixel_limit_is_too_large_not_corrupt(tmp_path, monkeypatch, caplog):
    """PIL refuses to open an image of more than twice ``Image.MAX_IMAGE_PIXELS`` (178,956,970
    pixels by default: e.g. 15000x12000 aerial tiles) as a possible decompression bomb. Such an
    intact image was skipped as ``corrupt``, at conversion and at read time alike, so a user went
    looking for damaged files; it is now the reason ``too_large``, its message naming the size
    and the limit. (The limit is lowered here so that the test image stays small.)"""
    import logging

    from dino_scale.config import preset
    from dino_scale.data.decode import ImageDecodeError, decode_image, verify_image_bytes
    from dino_scale.data.loader import LocalLoader

    images = {"a.png": _png(), "big.png": _png(160, 120)}
    anns = [{"image_id": i, "category_id": 1, "bbox": [1, 1, 20, 20]} for i in (1, 2)]
    root, ann = _dataset(tmp_path, [{"id": 1, "name": "x"}], anns, images)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48)  # a.png (64x48) opens, big.png (160x120) not
    big = (root / "big.png").read_bytes()
    assert verify_image_bytes(big, (160, 120)) == "too_large"
    with pytest.raises(ImageDecodeError, match=r"too_large: .*19200 pixels.*6144 pixels.*MAX_IMAGE_PIXELS") as ei:
        decode_image(big)
    assert ei.value.reason == "too_large"
    with caplog.at_level(logging.WARNING):
        m = convert_coco(ann, root, tmp_path / "embedded", embed_images=True, progress=False)
    assert m["num_images"] == 1 and m["images_skipped"] == {"too_large": 1}
    assert "skipping image id 2 (too_large)" in caplog.text
    convert_coco(ann, root, tmp_path / "by_path", embed_images=False, progress=False)
    loader = LocalLoader(tmp_path / "by_path", preset("tiny").data, train=False, batch_size=2)
    assert [int(t["image_id"]) for _, _, ts in loader for t in ts] == [1]
    assert loader.skips["by_reason"] == {"too_large": 1} and loader.skips["image_ids"] == [2]

"""Converter input checks: category ids that can be no class index."""
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


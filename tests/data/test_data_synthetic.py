"""Synthetic data: flavours, ids, shared names, negatives, determinism, CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from dino_scale.data.synthetic import categories, generate


def test_data_synthetic_flavours_ids_and_shared_names():
    o365, coco = categories("o365-like"), categories("coco-like")
    assert [c["id"] for c in o365] == list(range(1, len(o365) + 1)) and len(o365) >= 30
    coco_ids = [c["id"] for c in coco]
    assert all(1 <= i <= 90 for i in coco_ids) and max(coco_ids) == 90 and coco_ids != list(range(1, len(coco) + 1))
    shared = {c["name"] for c in o365} & {c["name"] for c in coco}
    assert {"person", "car", "dog", "cat"} <= shared and len(shared) >= 6
    o_look = {c["name"]: (c["shape"], c["colour"]) for c in o365}
    c_look = {c["name"]: (c["shape"], c["colour"]) for c in coco}
    assert all(o_look[n] == c_look[n] for n in shared)  # shared names look the same in both flavours
    assert len(set(o_look.values())) == len(o365) and len(set(c_look.values())) == len(coco)


def test_data_synthetic_content(coco_like, o365_like):
    for root, ann in (coco_like, o365_like):
        doc = json.loads(ann.read_text())
        ids = {c["id"] for c in doc["categories"]}
        per_image = {im["id"]: 0 for im in doc["images"]}
        for a in doc["annotations"]:
            assert a["category_id"] in ids and a["image_id"] in per_image
            per_image[a["image_id"]] += 1
        counts = list(per_image.values())
        assert min(counts) == 0 and max(counts) >= 3  # some negatives, several objects elsewhere
        sides = [min(a["bbox"][2:]) for a in doc["annotations"]]
        assert max(sides) / min(sides) > 3  # varied sizes
        im = doc["images"][0]
        rel = im["file_name"].replace("images/v1/", "")
        with Image.open(root / rel) as pil:
            assert pil.size == (im["width"], im["height"]) and pil.mode == "RGB"
        # an object's box holds its (saturated) colour; the background is grey-ish
        a = next(a for a in doc["annotations"] if a["image_id"] == im["id"] and not a["iscrowd"]) \
            if per_image[im["id"]] else None
        if a is not None:
            arr = np.asarray(Image.open(root / rel)).astype(int)
            x, y, w, h = map(int, a["bbox"])
            patch = arr[y + h // 2 - 1:y + h // 2 + 2, x + w // 2 - 1:x + w // 2 + 2]
            assert (patch.max(-1) - patch.min(-1)).mean() > 60
    assert any(a["iscrowd"] for a in json.loads(coco_like[1].read_text())["annotations"])


def test_data_synthetic_deterministic_and_cli(tmp_path):
    _, a1 = generate(tmp_path / "a", "coco-like", num_images=5, seed=11, image_size=(64, 80))
    _, a2 = generate(tmp_path / "b", "coco-like", num_images=5, seed=11, image_size=(64, 80))
    assert a1.read_bytes() == a2.read_bytes()
    assert (tmp_path / "a/images").exists()
    out = subprocess.run([sys.executable, "-m", "dino_scale.data.synthetic", "--flavour", "o365-like", "--out",
                          str(tmp_path / "cli"), "--num-images", "3", "--seed", "1", "--min-size", "64",
                          "--max-size", "96"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "cli" / "annotations.json").read_text())
    assert len(doc["images"]) == 3 and all(64 <= im["width"] <= 96 for im in doc["images"])
    bad = subprocess.run([sys.executable, "-m", "dino_scale.data.synthetic", "--out", str(tmp_path / "bad"),
                          "--min-size", "300", "--max-size", "200"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--min-size <= --max-size" in bad.stderr and "Traceback" not in bad.stderr

"""Bad input: broken images, bad boxes, unknown categories, malformed JSON; nothing lost silently."""
from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from dino_scale.config import preset
from dino_scale.data import ConversionError, MalformedJSONError, convert_coco, iter_records
from dino_scale.data.loader import LocalLoader


def _jpeg(w=64, h=48, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _dataset(tmp_path, images: dict, annotations: list, categories=None, sizes=None):
    root = tmp_path / "img"
    root.mkdir(exist_ok=True)
    imgs = []
    for i, (name, data) in enumerate(images.items(), 1):
        if data is not None:
            (root / name).write_bytes(data)
        w, h = (sizes or {}).get(i, (64, 48))
        imgs.append({"id": i, "file_name": name, "width": w, "height": h})
    doc = {"images": imgs, "annotations": [{"id": k + 1, "iscrowd": 0, **a} for k, a in enumerate(annotations)],
           "categories": categories or [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(doc))
    return root, ann


def test_data_bad_images_skipped_counted_logged(tmp_path, caplog):
    good = _jpeg()
    images = {"ok.jpg": good, "corrupt.jpg": b"\xff\xd8not a jpeg at all" * 10, "trunc.jpg": good[: len(good) // 2],
              "missing.jpg": None, "empty.jpg": b"", "nobox.jpg": good}
    anns = [{"image_id": i, "category_id": 1, "bbox": [1, 2, 10, 10]} for i in (1, 2, 3, 4, 5)]
    root, ann = _dataset(tmp_path, images, anns)
    with caplog.at_level(logging.WARNING):
        m = convert_coco(ann, root, tmp_path / "out", embed_images=True, progress=False)
    assert m["num_images"] == 2 and m["images_in"] == 6
    assert m["images_skipped"] == {"corrupt": 2, "missing_file": 1, "empty_file": 1}
    assert sorted((s["image_id"], s["reason"]) for s in m["skipped_images"]) == [
        (2, "corrupt"), (3, "corrupt"), (4, "missing_file"), (5, "empty_file")]
    assert m["boxes_dropped"]["skipped_image"] == 4 and m["num_boxes"] == 1
    assert m["boxes_in"] == m["num_boxes"] + sum(m["boxes_dropped"].values())
    assert "image id 3" in caplog.text and "image id 4" in caplog.text
    assert sorted(r["image_id"] for r in iter_records(tmp_path / "out")) == [1, 6]  # 6 has no boxes: kept
    # reference mode: missing and empty files are found by stat
    m2 = convert_coco(ann, root, tmp_path / "ref", embed_images=False, progress=False)
    assert m2["images_skipped"] == {"missing_file": 1, "empty_file": 1} and m2["num_images"] == 4


def test_data_decode_time_skips_counted(tmp_path, caplog):
    good = _jpeg()
    root, ann = _dataset(tmp_path, {"a.jpg": good, "b.jpg": good, "c.jpg": good},
                         [{"image_id": i, "category_id": 1, "bbox": [1, 2, 10, 10]} for i in (1, 2, 3)])
    convert_coco(ann, root, tmp_path / "out", embed_images=False, progress=False)
    (root / "b.jpg").write_bytes(good[:100])  # broken after conversion
    (root / "c.jpg").unlink()
    loader = LocalLoader(tmp_path / "out", preset("tiny").data, train=True, batch_size=2)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert sum(len(t) for _, _, t in batches) == 1
    assert loader.skips["count"] == 2 and sorted(loader.skips["image_ids"]) == [2, 3]
    assert loader.skips["by_reason"] == {"corrupt": 1, "missing_file": 1}
    assert "image id 2" in caplog.text


def test_data_bad_boxes_clipped_or_dropped(tmp_path):
    anns = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},  # fine
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 20]},  # w = 0
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 5, -3]},  # h < 0
        {"image_id": 1, "category_id": 5, "bbox": [10, None, 5, 5]},  # NaN written as null
        {"image_id": 1, "category_id": 5, "bbox": [50, 40, 30, 30]},  # partly outside 64x48: clipped
        {"image_id": 1, "category_id": 5, "bbox": [-10, -10, 15, 15]},  # partly outside: clipped
        {"image_id": 1, "category_id": 5, "bbox": [100, 100, 5, 5]},  # wholly outside
        {"image_id": 1, "category_id": 5, "bbox": [1, 2, 3]},  # malformed
        {"image_id": 99, "category_id": 5, "bbox": [1, 2, 3, 4]},  # unknown image
    ]
    root, ann = _dataset(tmp_path, {"a.jpg": _jpeg()}, anns)
    m = convert_coco(ann, root, tmp_path / "out", embed_images=True, progress=False)
    assert m["boxes_in"] == 9 and m["num_boxes"] == 3 and m["boxes_clipped"] == 2
    assert m["boxes_dropped"] == {"malformed": 1, "nonfinite": 1, "degenerate": 2, "orphan": 1, "outside": 1,
                                  "skipped_image": 0}
    rec = next(iter_records(tmp_path / "out"))
    np.testing.assert_allclose(rec["boxes"], [[10, 10, 20, 20], [50, 40, 14, 8], [0, 0, 5, 5]])
    np.testing.assert_allclose(rec["area"], [400, 14 * 8, 25])  # given area absent: w*h of the clipped box


def test_data_unknown_category_fails_fast(tmp_path):
    anns = [{"image_id": 1, "category_id": c, "bbox": [1, 1, 5, 5]} for c in (1, 7, 7, 12)]
    root, ann = _dataset(tmp_path, {"a.jpg": _jpeg()}, anns)
    with pytest.raises(ConversionError, match=r"not in 'categories': \[7, 12\]"):
        convert_coco(ann, root, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("shard-*")) and not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("text,needle", [
    ('{"images": [{"id": 1,, "file_name": "a.jpg"}], "annotations": [], "categories": []}', ",,"),
    ('{"images": [], "annotations": [{"bbox": [1, NaN, 2, 3]}], "categories": []}', "NaN"),
])
def test_data_malformed_json_names_byte_position(tmp_path, text, needle):
    ann = tmp_path / "bad.json"
    ann.write_text(text)
    with pytest.raises(MalformedJSONError) as ei:
        convert_coco(ann, None, tmp_path / "out", progress=False)
    expected = text.index(needle) + (1 if needle == ",," else 0)
    assert ei.value.position == expected, str(ei.value)
    assert f"at byte {expected}" in str(ei.value) and "bad.json" in str(ei.value)
    if needle == "NaN":
        assert "write null" in str(ei.value)


def test_data_truncated_json_reports_end_of_file(tmp_path):
    text = json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}] * 3,
                       "categories": [{"id": 1, "name": "a"}]})
    ann = tmp_path / "cut.json"
    ann.write_text(text[:-20])
    with pytest.raises(MalformedJSONError, match=f"at byte {len(text) - 20} "):
        convert_coco(ann, None, tmp_path / "out", progress=False)

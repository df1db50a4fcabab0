"""Bad input, the ids: an image id listed twice (for one file, under two spellings of its name, or
for two files), ids beyond float precision, category ids outside int32, an annotation listed
twice; each kept, counted or refused by rule, nothing lost silently."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from dino_scale.data import ConversionError, MalformedJSONError, convert_coco, iter_records
from test_data_bad_input import _dataset, _jpeg


def test_data_bad_image_entries_and_duplicate_ids(tmp_path):
    """A bad entry takes no id from a later usable one with the same id; a file listed twice
    under its id keeps the first entry (one id for two files: test_data_one_id_for_two_files_keeps_neither);
    boxes of skipped entries are ``skipped_image``, not ``orphan``; sizes that are not int32 pixel counts are
    read from the file; an id on both sides of the Objects365 val split is in neither."""
    good = _jpeg()
    root = tmp_path / "img"
    root.mkdir()
    for name in "abcde":
        (root / f"{name}.jpg").write_bytes(good)
    imgs = [{"id": 1, "file_name": "", "width": 64, "height": 48},  # bad: no file name
            {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},  # keeps id 1
            {"id": 2, "file_name": "b.jpg", "width": 3_000_000_000, "height": 48},  # size from the file
            {"id": 3, "file_name": "c.jpg", "width": 64.9, "height": True},  # size from the file
            {"id": 4, "file_name": "d.jpg"},
            {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48}]  # the same file listed again
    doc = {"images": imgs, "categories": [{"id": 1, "name": "a"}],
           "annotations": [{"id": k, "image_id": i, "category_id": 1, "bbox": [1, 2, 10, 10]}
                           for k, i in enumerate((1, 2, 3, 4, 4), 1)]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(doc))
    m = convert_coco(ann, root, tmp_path / "out", embed_images=False, progress=False)
    assert m["images_skipped"] == {"bad_metadata": 1, "duplicate_id": 1}
    recs = {r["image_id"]: r for r in iter_records(tmp_path / "out")}
    assert sorted(recs) == [1, 2, 3, 4] and recs[1]["file_name"] == "a.jpg"
    assert {(r["width"], r["height"]) for r in recs.values()} == {(64, 48)}
    assert m["num_boxes"] == 5 and m["boxes_dropped"]["orphan"] == 0
    # val = the first 3 entries (ids 1, 1, 2), train_extra = the rest (ids 3, 4, 2): id 2 is on both sides
    split = convert_coco(ann, root, tmp_path / "split", embed_images=False, o365_val_split=3, progress=False)
    val_ids = sorted(r["image_id"] for r in iter_records(tmp_path / "split" / "val"))
    extra_ids = sorted(r["image_id"] for r in iter_records(tmp_path / "split" / "train_extra"))
    assert val_ids == [1] and extra_ids == [3, 4]
    assert split["val"]["images_skipped"]["duplicate_id"] == 1
    assert split["train_extra"]["images_skipped"]["duplicate_id"] == 1
    for part in split.values():
        assert part["boxes_in"] == part["num_boxes"] + sum(part["boxes_dropped"].values())
    # the same file under another spelling of its name: the first entry kept (both were skipped as
    # an id given to two files, the image and its boxes lost)
    doc["images"] = [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
                     {"id": 1, "file_name": "./a.jpg", "width": 64, "height": 48},
                     {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48}]
    ann.write_text(json.dumps(doc))
    m = convert_coco(ann, root, tmp_path / "spelled", embed_images=False, progress=False)
    assert m["images_skipped"] == {"duplicate_id": 1} and m["num_images"] == 2
    assert sorted(r["file_name"] for r in iter_records(tmp_path / "spelled")) == ["a.jpg", "b.jpg"]


def test_data_image_ids_beyond_float_precision_keep_their_boxes(tmp_path):
    """Image ids are int64: two ids 1 apart above 2**53 (equal as float64) keep their own boxes;
    an annotation's id given as an integral float is accepted only where float64 holds it
    exactly (below 2**53); fractional, boolean or text ids are malformed (counted). An integer beyond int64 is a
    JSON parse error that names its position."""
    good = _jpeg()
    root = tmp_path / "img"
    root.mkdir()
    big = 2 ** 53
    ids = (big, big + 1, 2 ** 63 - 1, 7)
    for k in range(len(ids)):
        (root / f"{k}.jpg").write_bytes(good)
    imgs = [{"id": i, "file_name": f"{k}.jpg", "width": 64, "height": 48} for k, i in enumerate(ids)]
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3, 4)]
    anns = [{"image_id": big, "category_id": 1, "bbox": [1, 2, 10, 10]},
            {"image_id": big + 1, "category_id": 2, "bbox": [3, 4, 20, 20]},
            {"image_id": 2 ** 63 - 1, "category_id": 3, "bbox": [5, 6, 30, 30]},
            {"image_id": 7.0, "category_id": 4, "bbox": [1, 1, 5, 5]},  # integral float: image 7
            {"image_id": float(big + 2), "category_id": 1, "bbox": [1, 1, 5, 5]},  # inexact: malformed
            {"image_id": float(big), "category_id": 1, "bbox": [1, 1, 5, 5]},  # may be a rounded 2**53 + 1
            {"image_id": 7.5, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"image_id": True, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"image_id": "7", "category_id": 1, "bbox": [1, 1, 5, 5]}]
    doc = {"images": imgs, "categories": cats,
           "annotations": [{"id": k, "iscrowd": 0, **a} for k, a in enumerate(anns, 1)]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(doc))
    m = convert_coco(ann, root, tmp_path / "out", embed_images=False, progress=False)
    recs = {r["image_id"]: r for r in iter_records(tmp_path / "out")}
    assert sorted(recs) == sorted(ids)
    assert {i: recs[i]["category_ids"].tolist() for i in ids} == {big: [1], big + 1: [2], 2 ** 63 - 1: [3], 7: [4]}
    np.testing.assert_allclose(recs[big + 1]["boxes"], [[3, 4, 20, 20]], atol=1e-3)
    assert m["num_boxes"] == 4 and m["boxes_dropped"]["malformed"] == 5
    assert m["boxes_in"] == m["num_boxes"] + sum(m["boxes_dropped"].values())
    doc["annotations"][0]["image_id"] = 2 ** 64
    ann.write_text(json.dumps(doc))
    with pytest.raises(MalformedJSONError, match=r"outside the JSON parser's range") as ei:
        convert_coco(ann, root, tmp_path / "out2", embed_images=False, progress=False)
    assert ei.value.position > 0


def test_data_category_id_outside_int32_fails_fast(tmp_path):
    root, ann = _dataset(tmp_path, {"a.jpg": _jpeg()}, [], categories=[{"id": 2 ** 31 + 5, "name": "big"}])
    with pytest.raises(ConversionError, match="int32"):
        convert_coco(ann, root, tmp_path / "out", progress=False)


def test_data_an_annotation_listed_twice_is_counted_and_said(tmp_path, caplog):
    """The same annotation listed twice (a merged export) became two identical boxes, unsaid.
    It is kept as the file lists it (the official recipe trains on the file as it is), counted in
    the manifest (``boxes_repeated``) and warned about."""
    anns = [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]},
            {"image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]},  # the same again
            {"image_id": 1, "category_id": 5, "bbox": [1, 2, 10, 10]},  # another category: not a repeat
            {"image_id": 2, "category_id": 1, "bbox": [1, 2, 10, 10]}]  # another image: not a repeat
    root, ann = _dataset(tmp_path, {"a.jpg": _jpeg(), "b.jpg": _jpeg()}, anns)
    with caplog.at_level(logging.WARNING):
        m = convert_coco(ann, root, tmp_path / "out", progress=False)
    assert m["num_boxes"] == 4 and m["boxes_repeated"] == 1
    assert "1 annotation(s) repeat another's image, category and box exactly" in caplog.text

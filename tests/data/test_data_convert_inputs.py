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


def test_data_image_ids_written_as_integral_floats_are_kept(tmp_path, caplog):
    """A JSON written through numpy/pandas floats holds every id as ``1.0``. The annotations'
    ``image_id`` 1.0 (and category ids, widths, heights) were taken, but an image entry's ``id``
    1.0 was bad metadata: every image was skipped (logged as 'image id -1') and its boxes counted
    as orphans, an empty dataset. An image id now follows the annotations' rule: an int, or an
    integral float below 2**53 (where float64 holds it exactly); fractional or larger floats
    stay bad metadata, on both sides of an Objects365 val split."""
    import logging

    from dino_scale.data import iter_records

    images = {f"{n}.png": _png() for n in "abcd"}
    root, ann = _dataset(tmp_path, [{"id": 1, "name": "x"}], [], images)
    doc = json.loads(ann.read_text())
    for img, iid in zip(doc["images"], (1.0, 2.0, 2.5, 2.0 ** 53)):
        img["id"] = iid
    doc["annotations"] = [{"id": k, "image_id": iid, "category_id": 1.0, "bbox": [1.0, 1.0, 20.0, 20.0],
                           "iscrowd": 0.0} for k, iid in enumerate((1.0, 2.0, 2.0, 2.5), 1)]
    ann.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        m = convert_coco(ann, root, tmp_path / "out", progress=False)
    assert {r["image_id"]: len(r["category_ids"]) for r in iter_records(tmp_path / "out")} == {1: 1, 2: 2}
    assert m["images_skipped"] == {"bad_metadata": 2} and m["num_boxes"] == 3
    assert m["boxes_dropped"]["malformed"] == 1  # image_id 2.5 names no image
    assert "file_name 'c.png'" in caplog.text and "file_name 'd.png'" in caplog.text
    split = convert_coco(ann, root, tmp_path / "split", o365_val_split=1, progress=False)
    assert [r["image_id"] for r in iter_records(tmp_path / "split" / "val")] == [1]
    assert [r["image_id"] for r in iter_records(tmp_path / "split" / "train_extra")] == [2]
    # the val split's boxes are its own: image 2's two boxes belong to the other split, not orphans
    assert split["val"]["boxes_dropped"]["orphan"] == 0 and split["val"]["num_boxes"] == 1


def test_data_one_id_for_two_files_keeps_neither(tmp_path, caplog):
    """Two files under one image id (two annotation files merged whose ids collide): the
    annotations name the id only, so which boxes are whose cannot be told. The first entry kept
    the id and silently got the other file's boxes too (the manifest said the second was skipped
    and that its boxes were not written). Now neither is kept and all their boxes count as
    ``skipped_image``; an id listed twice for the same file keeps its first entry as before."""
    import logging

    from dino_scale.data import iter_records

    images = {"a.png": _png(), "b.png": _png(), "c.png": _png()}
    root, ann = _dataset(tmp_path, [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}], [], images)
    doc = json.loads(ann.read_text())
    doc["images"] = [{"id": 7, "file_name": "a.png", "width": 64, "height": 48},
                     {"id": 7, "file_name": "b.png", "width": 64, "height": 48},  # another file, id 7 again
                     {"id": 8, "file_name": "c.png", "width": 64, "height": 48},
                     {"id": 8, "file_name": "c.png", "width": 64, "height": 48}]  # the same file listed twice
    doc["annotations"] = [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 20, 20]},  # a's
                          {"id": 2, "image_id": 7, "category_id": 2, "bbox": [30, 20, 20, 20]},  # b's
                          {"id": 3, "image_id": 8, "category_id": 1, "bbox": [5, 5, 10, 10]}]
    ann.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        m = convert_coco(ann, root, tmp_path / "out", progress=False)
    recs = {r["image_id"]: r for r in iter_records(tmp_path / "out")}
    assert sorted(recs) == [8] and recs[8]["category_ids"].tolist() == [1]
    assert m["images_skipped"] == {"duplicate_id": 3}
    assert m["num_boxes"] == 1 and m["boxes_dropped"]["skipped_image"] == 2
    assert "file_name 'a.png'" in caplog.text and "file_name 'b.png'" in caplog.text


def test_data_unreadable_crowd_flag_is_malformed_not_a_plain_box(tmp_path):
    """An ``iscrowd`` the converter cannot read as a number (``"true"``, a list) was taken as 0:
    a crowd region (an ignore region for COCO evaluation, never a training target) became a
    plain box, silently. Such an annotation is now dropped and counted as ``malformed``, like a
    malformed ``bbox``; numbers, booleans, numeric text and a missing or null flag read as before."""
    from dino_scale.data import iter_records

    flags = [1, True, "1", 0, None, "true", [1]]
    anns = [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 10 + k, 10]} for k in range(len(flags) + 1)]
    for a, flag in zip(anns, flags):
        a["iscrowd"] = flag  # the last annotation has none: not a crowd region
    root, ann = _dataset(tmp_path, [{"id": 1, "name": "x"}], [])
    doc = json.loads(ann.read_text())
    doc["annotations"] = anns
    ann.write_text(json.dumps(doc))
    m = convert_coco(ann, root, tmp_path / "out", progress=False)
    rec = next(iter_records(tmp_path / "out"))
    assert rec["boxes"][:, 2].tolist() == [10, 11, 12, 13, 14, 17]
    assert rec["iscrowd"].tolist() == [True, True, True, False, False, False]
    assert m["boxes_dropped"]["malformed"] == 2 and m["num_crowd_boxes"] == 3


def test_data_category_ids_of_another_type_are_refused_not_read_as_numbers(tmp_path):
    """An annotation's ``category_id`` of ``true`` converted as category 1 and ``"3"`` as category 3
    (numpy reads both as numbers), while a category list holding them was refused. Such ids now
    stop the conversion like any id missing from 'categories'; an integral float (2.0) is the
    integer it holds, as for image ids."""
    from dino_scale.data import iter_records

    cats = [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}, {"id": 3, "name": "three"}]
    box = {"image_id": 1, "bbox": [1, 1, 10, 10]}
    root, ann = _dataset(tmp_path, cats, [{**box, "category_id": c} for c in (True, "3", 2, 3)])
    with pytest.raises(ConversionError, match=r"not in 'categories': \[\"'3'\", 'True'\]"):
        convert_coco(ann, root, tmp_path / "out", progress=False)

    root, ann = _dataset(tmp_path, cats, [{**box, "category_id": c} for c in (2.0, 3, 1)])
    convert_coco(ann, root, tmp_path / "out2", progress=False)
    assert next(iter_records(tmp_path / "out2"))["category_ids"].tolist() == [2, 3, 1]


def _jpeg_turned(orientation: int, w: int = 64, h: int = 48) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 120, 200)).save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_data_sizes_read_from_exif_turned_files_are_warned_about(tmp_path, caplog):
    """An image without width/height gets its size from the file header, as stored. For a file
    whose EXIF tag turns it (5-8) that size makes data.exif_orientation=auto decode it as stored,
    while its boxes may have been drawn upright (labelling tools apply EXIF): a silent quarter turn
    of every label. The conversion says how many such images there are (in the manifest too) and
    what to do; the advice works: with the upright size written in, auto decodes them upright."""
    import logging

    from dino_scale.data import iter_records
    from dino_scale.data.decode import decode_image

    images = {"turned.jpg": _jpeg_turned(6), "mirrored.jpg": _jpeg_turned(2), "square.jpg": _jpeg_turned(6, 48, 48),
              "sized.jpg": _jpeg_turned(6)}
    root, ann = _dataset(tmp_path, [{"id": 1, "name": "x"}],
                         [{"image_id": i, "category_id": 1, "bbox": [1, 1, 10, 10]} for i in range(1, 5)], images)
    doc = json.loads(ann.read_text())
    for entry in doc["images"][:3]:  # sized.jpg keeps the width/height of the file: nothing to guess
        del entry["width"], entry["height"]
    ann.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="dino_scale.data.convert"):
        m = convert_coco(ann, root, tmp_path / "out", progress=False)
    assert m["num_images"] == 4
    assert m["image_checks"]["turned_sizes_read"] == {"images": 1, "examples": ["turned.jpg"]}
    size = {r["file_name"]: (r["width"], r["height"]) for r in iter_records(tmp_path / "out")}["turned.jpg"]
    assert size == (64, 48)
    warned = [r.getMessage() for r in caplog.records if "EXIF orientation that turns" in r.getMessage()]
    assert len(warned) == 1 and "1 images" in warned[0] and "'turned.jpg'" in warned[0], warned
    assert "write their upright width/height (swapped)" in warned[0]
    data = (root / "turned.jpg").read_bytes()
    assert decode_image(data, expected_size=size, exif_orientation="auto").shape == (48, 64, 3)  # as stored
    # the advice: the upright size in the entry; auto then turns the pixels upright, and no warning
    doc["images"][0].update(width=48, height=64)
    ann.write_text(json.dumps(doc))
    m = convert_coco(ann, root, tmp_path / "out2", progress=False)
    assert m["image_checks"]["turned_sizes_read"]["images"] == 0
    size = {r["file_name"]: (r["width"], r["height"]) for r in iter_records(tmp_path / "out2")}["turned.jpg"]
    assert decode_image(data, expected_size=size, exif_orientation="auto").shape == (64, 48, 3)


def test_data_one_file_under_several_ids_is_warned_about(tmp_path, caplog):
    """Two image entries with different ids naming one file were converted as two images, each with
    its own boxes: the file was trained on twice per epoch, each time with the other entry's
    objects as background, and nothing said so. The conversion counts and names such files, in its
    log and manifest, however a name is spelled ('./b.png' is b.png). Ids it skips as duplicate_id
    are not counted: an id listed twice for the same file (kept once), an id that names two files
    (kept by neither)."""
    import logging

    pngs = {name: _png() for name in ("a.png", "b.png", "c.png", "d.png")}
    root, ann = _dataset(tmp_path, [{"id": 1, "name": "x"}],
                         [{"image_id": i, "category_id": 1, "bbox": [1, 1, 10 + i, 10]} for i in (1, 2, 3)], pngs)
    doc = json.loads(ann.read_text())  # a.png 1, b.png 2, c.png 3, d.png 4
    doc["images"].append({"id": 5, "file_name": "a.png", "width": 64, "height": 48})  # a.png under a 2nd id
    doc["images"].append({"id": 7, "file_name": "./b.png", "width": 64, "height": 48})  # b.png, spelled otherwise
    doc["images"].append(dict(doc["images"][0]))  # id 1 listed again for a.png: a duplicate_id skip
    doc["images"] += [{"id": 6, "file_name": "c.png", "width": 64, "height": 48},  # id 6: c.png and d.png,
                      {"id": 6, "file_name": "d.png", "width": 64, "height": 48}]  # skipped: c.png is once
    ann.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="dino_scale.data.convert"):
        m = convert_coco(ann, root, tmp_path / "out", progress=False)
    assert m["num_images"] == 6 and m["images_skipped"] == {"duplicate_id": 3} and m["num_boxes"] == 3
    assert m["image_checks"]["shared_files"] == {"files": 2, "entries": 4, "examples": ["a.png", "b.png"]}
    warned = [r.getMessage() for r in caplog.records if "named by" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "2 image files are named by 4 image entries" in warned[0] and "'a.png'" in warned[0], warned


@pytest.mark.parametrize("case", ["misspelled_key", "not_a_list", "crowd_only", "fine"])
def test_data_a_dataset_without_a_box_to_train_on_is_said(tmp_path, caplog, case):
    """A misspelled ``annotations`` key, an ``annotations`` object instead of a list, or crowd boxes
    only (which training removes) converted with exit 0 and not a word: a model trained on nothing."""
    import logging

    box = {"image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20]}
    root, ann = _dataset(tmp_path, [{"id": 1, "name": "x"}], [box])
    doc = json.loads(ann.read_text())
    if case == "misspelled_key":
        doc["annotation"] = doc.pop("annotations")
    elif case == "not_a_list":
        doc["annotations"] = {"1": doc["annotations"][0]}
    elif case == "crowd_only":
        doc["annotations"][0]["iscrowd"] = 1
    ann.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        m = convert_coco(ann, root, tmp_path / "out", progress=False)
    assert m["num_images"] == 1
    assert ("no box to train on" in caplog.text) == (case != "fine"), caplog.text


def test_data_convert_arguments_are_checked_before_the_scan(tmp_path):
    """A numpy integer (a value read from a config array) for ``max_images_per_shard`` or
    ``o365_val_split`` went into the plan, whose JSON write then failed after the whole scan,
    leaving ``.convert-work`` behind; numpy ints are taken as ints, other values refused before
    any work. An annotation path that is a folder was "annotation file not found"."""
    import numpy as np

    from dino_scale.data import iter_records

    images = {f"{n}.png": _png() for n in "abc"}
    anns = [{"image_id": i, "category_id": 1, "bbox": [1, 1, 20, 20]} for i in (1, 2, 3)]
    root, ann = _dataset(tmp_path, [{"id": 1, "name": "x"}], anns, images)
    m = convert_coco(ann, root, tmp_path / "out", max_images_per_shard=np.int64(2), o365_val_split=np.int32(1),
                     shuffle_seed=np.int64(3), progress=False)
    assert m["val"]["num_images"] == 1 and m["train_extra"]["num_images"] == 2
    assert len(m["train_extra"]["shards"]) == 1 and sorted(
        r["image_id"] for r in iter_records(tmp_path / "out" / "train_extra")) == [2, 3]
    for kw, words in (({"max_images_per_shard": 0}, "max_images_per_shard must be an int >= 1"),
                      ({"max_images_per_shard": 2.5}, "max_images_per_shard must be an int >= 1"),
                      ({"o365_val_split": True}, "o365_val_split must be an int >= 1"),
                      ({"shuffle_seed": -1}, "shuffle_seed must be an int >= 0 or None"),
                      ({"shard_size_mb": float("nan")}, "shard_size_mb must be a number > 0"),
                      ({"shard_size_mb": 0}, "shard_size_mb must be a number > 0")):
        with pytest.raises(ValueError, match=words):
            convert_coco(ann, root, tmp_path / "refused", progress=False, **kw)
        assert not (tmp_path / "refused").exists()
    with pytest.raises(IsADirectoryError, match="is a folder: give the JSON file in it"):
        convert_coco(root, root, tmp_path / "refused", progress=False)


def test_data_boxes_clipped_at_conversion_are_reported_with_the_other_losses(tmp_path):
    """A box across the image's border is held clipped to it, so the AP scores another box than the
    annotation file's (0.5 against pycocotools' 1.0 on the file, for a detector that finds the
    file's boxes exactly), and no warning or metric said so: it is counted beside the losses now
    (the pipelines' note: test_pipelines_evaluate.py)."""
    from dino_scale.data.manifest import conversion_losses

    root, ann = _dataset(tmp_path, [{"id": 1, "name": "x"}],
                         [{"image_id": 1, "category_id": 1, "bbox": [40, 30, 40, 40]},  # 64x48: clipped
                          {"image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]}])
    convert_coco(ann, root, tmp_path / "out", progress=False)
    assert conversion_losses(tmp_path / "out") == {"images_skipped": 0, "boxes_dropped": 0, "boxes_clipped": 1}

"""Bad input: broken images, bad boxes, unknown categories, malformed annotations; nothing lost silently.

The annotation file's format and encoding: test_data_bad_json.py; the folders: test_data_bad_folders.py;
the ids: test_data_bad_ids.py."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino_scale.config import preset
from dino_scale.data import ConversionError, convert_coco, iter_records
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


def drop_manifest_category(out: Path, category_id: int) -> None:
    """Make a converted folder inconsistent: its manifest no longer lists ``category_id``
    while its records still hold it (a shard written by another tool, a hand-edited manifest)."""
    from dino_scale.data.manifest import MANIFEST_NAME

    path = out / MANIFEST_NAME
    m = json.loads(path.read_text())
    m["categories"] = [c for c in m["categories"] if c["id"] != category_id]
    path.write_text(json.dumps(m))


def test_data_unknown_category_records_skipped_in_training(tmp_path, caplog):
    """A record holding a category id its manifest does not list is a counted, logged skip for
    training (the class head is sized from the manifest: its label would reach the loss out of
    range, a device-side assert on a GPU); evaluation keeps it (labels never reach a loss)."""
    from dino_scale.data.transforms import DetectionTransform

    good = _jpeg()
    root, ann = _dataset(tmp_path, {"a.jpg": good, "b.jpg": good, "c.jpg": good},
                         [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]},
                          {"image_id": 2, "category_id": 1, "bbox": [1, 2, 10, 10]},
                          {"image_id": 2, "category_id": 5, "bbox": [20, 2, 10, 10]},
                          {"image_id": 3, "category_id": 1, "bbox": [1, 2, 10, 10]}])
    convert_coco(ann, root, tmp_path / "out", embed_images=True, progress=False)
    drop_manifest_category(tmp_path / "out", 5)
    cfg = preset("tiny").data
    loader = LocalLoader(tmp_path / "out", cfg, train=True, batch_size=2)
    with caplog.at_level(logging.WARNING):
        targets = [t for _, _, ts in loader for t in ts]
    assert sorted(int(t["image_id"]) for t in targets) == [1, 3]
    assert loader.skips == {"count": 1, "by_reason": {"unknown_category": 1}, "image_ids": [2]}
    assert "image id 2" in caplog.text and "category ids [5]" in caplog.text
    evaluated = [t for _, _, ts in LocalLoader(tmp_path / "out", cfg, train=False, batch_size=2) for t in ts]
    assert sorted(int(t["image_id"]) for t in evaluated) == [1, 2, 3]
    assert sorted(next(t for t in evaluated if int(t["image_id"]) == 2)["labels"].tolist()) == [1, 5]
    # the transform checks only when given the ids; a record without boxes always passes
    rec = next(r for r in iter_records(tmp_path / "out") if r["image_id"] == 2)
    assert sorted(DetectionTransform(cfg, train=False)(rec)["labels"].tolist()) == [1, 5]
    empty = {**rec, "boxes": np.zeros((0, 4), np.float32), "category_ids": np.zeros(0, np.int64),
             "iscrowd": np.zeros(0, bool), "labels_crc32": None}  # a new record: not the shard's
    assert DetectionTransform(cfg, train=True, category_ids=[1])(empty)["labels"].numel() == 0


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


def test_data_same_base_name_elsewhere_is_not_the_image(tmp_path):
    """``sub/x.jpg`` missing while ``x.jpg`` (another image) exists: a missing file, not that
    other image with this one's boxes (a base-name fallback picked it before)."""
    root, ann = _dataset(tmp_path, {"x.jpg": _jpeg(colour=(250, 0, 0)), "sub/x.jpg": None},
                         [{"image_id": i, "category_id": 1, "bbox": [1, 2, 10, 10]} for i in (1, 2)])
    for embed in (True, False):
        m = convert_coco(ann, root, tmp_path / f"out{embed}", embed_images=embed, progress=False)
        assert m["images_skipped"] == {"missing_file": 1} and m["skipped_images"][0]["image_id"] == 2


def test_data_unreadable_and_size_mismatch_skipped(tmp_path, caplog, monkeypatch):
    """A file that raises OSError on read and pixels that are not a uniform rescale of the
    annotated size (width/height swapped) are counted skips, at conversion and at load time."""
    good = _jpeg()
    images = {"ok.jpg": good, "half.jpg": _jpeg(32, 24), "swapped.jpg": good, "locked.jpg": good}
    root, ann = _dataset(tmp_path, images, [{"image_id": i, "category_id": 1, "bbox": [1, 2, 10, 10]}
                                            for i in (1, 2, 3, 4)], sizes={3: (48, 64)})
    read_bytes = Path.read_bytes

    def failing_read(path):  # what a permission or network-filesystem error looks like (root ignores chmod)
        if path.name == "locked.jpg":
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", failing_read)
    m = convert_coco(ann, root, tmp_path / "out", embed_images=False, check_files=False, progress=False)
    assert m["num_images"] == 4  # nothing read at conversion: checked when loading
    loader = LocalLoader(tmp_path / "out", preset("tiny").data, train=False, batch_size=4)
    with caplog.at_level(logging.WARNING):
        (images_, masks, targets), = list(loader)
    assert loader.skips["by_reason"] == {"size_mismatch": 1, "unreadable": 1}
    assert sorted(loader.skips["image_ids"]) == [3, 4]
    assert [int(t["image_id"]) for t in targets] == [1, 2]  # a uniformly half-size copy follows its pixels
    np.testing.assert_allclose(targets[1]["boxes"].numpy(), targets[0]["boxes"].numpy(), atol=1e-6)
    m = convert_coco(ann, root, tmp_path / "emb", embed_images=True, progress=False)
    assert m["images_skipped"] == {"size_mismatch": 1, "unreadable": 1}
    assert m["boxes_dropped"]["skipped_image"] == 2
    assert "image id 4 (unreadable)" in caplog.text and "'locked.jpg'" in caplog.text


def test_data_name_the_os_refuses_is_a_counted_skip(tmp_path):
    """A 300-character file name: looking it up raises ENAMETOOLONG (not "absent"), which
    crashed conversion and the decode tasks; it is an ``unreadable`` skip, at conversion and at load
    time. (In a sub-folder that is not there, the lookup stops at the folder: ``missing_file``;
    where the size had to come from that file, it was ``bad_metadata``.)"""
    long = "x" * 296 + ".jpg"
    root, ann = _dataset(tmp_path, {"ok.jpg": _jpeg(), long: None, "sub/" + long: None},
                         [{"image_id": i, "category_id": 1, "bbox": [1, 2, 10, 10]} for i in (1, 2, 3)])
    doc = json.loads(ann.read_text())
    del doc["images"][2]["width"]  # the size must be read from the file's header
    ann.write_text(json.dumps(doc))
    for embed in (True, False):
        m = convert_coco(ann, root, tmp_path / f"out{embed}", embed_images=embed, progress=False)
        assert m["images_skipped"] == {"unreadable": 1, "missing_file": 1} and m["num_images"] == 1
        assert sorted((s["image_id"], s["reason"]) for s in m["skipped_images"]) == [
            (2, "unreadable"), (3, "missing_file")]
    # records kept without file checks: the lookup fails when loading, a counted skip
    convert_coco(ann, root, tmp_path / "unchecked", embed_images=False, check_files=False, progress=False)
    loader = LocalLoader(tmp_path / "unchecked", preset("tiny").data, train=True, batch_size=4)
    (_, _, targets), = list(loader)
    assert [int(t["image_id"]) for t in targets] == [1]
    assert loader.skips["by_reason"] == {"unreadable": 1} and loader.skips["image_ids"] == [2]


def test_data_a_file_whose_labels_all_drop_or_that_lists_no_image_is_an_error(tmp_path, caplog):
    """An annotation file whose every bbox or image_id is of another format (an object, a string
    id), or with no 'images' list, converted to a dataset of no box or no image with exit 0 and not
    a log line. Now a ConversionError that says what was dropped; box drops are logged too."""
    images = {"a.jpg": _jpeg(), "b.jpg": _jpeg(), "c.jpg": _jpeg()}
    boxes = [{"image_id": str(i), "category_id": 1, "bbox": [1, 2, 10, 12]} for i in (1, 2, 3)]
    root, ann = _dataset(tmp_path, images, boxes)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"every one of the 3 annotations of .* was dropped \(malformed: 3\)"):
        convert_coco(ann, root, out, progress=False)
    assert not (out / "manifest.json").exists() and not list(out.glob("shard-*"))
    doc = json.loads(ann.read_text())
    ann.write_text(json.dumps({"annotations": doc["annotations"], "categories": doc["categories"]}))
    with pytest.raises(ConversionError, match=r"lists no image \(its 'images' must be a list"):
        convert_coco(ann, root, out, progress=False)
    # the same file as an Objects365 split: its val part was "empty, said" and both parts were
    # written empty (exit 0); the split of a file with images past N still makes an empty train_extra
    with pytest.raises(ConversionError, match=r"lists no image \(its 'images' must be a list"):
        convert_coco(ann, root, tmp_path / "split", o365_val_split=2, progress=False)
    assert not (tmp_path / "split").exists()
    # one good box among bad ones: converted, and the drops are said, not only counted
    root, ann = _dataset(tmp_path, images, boxes[:2] + [{"image_id": 3, "category_id": 1, "bbox": [1, 2, 10, 12]}])
    with caplog.at_level(logging.WARNING, logger="dino_scale.data.convert"):
        m = convert_coco(ann, root, out, progress=False)
    assert m["num_boxes"] == 1 and "dropped 2 of 3 boxes (malformed: 2)" in caplog.text


def test_data_files_read_for_their_size_are_skipped_for_what_is_wrong_with_the_file(tmp_path):
    """An entry without width/height has its size read from its file. A missing, empty or corrupt
    file was counted as ``bad_metadata``: a wrong image folder was blamed on the entries, and once
    the files were there the same command answered "already converted" with the images still
    dropped. Such skips carry the file's reason, and the images come back once the files do."""
    root, ann = _dataset(tmp_path, {"ok.jpg": _jpeg(), "gone.jpg": None, "empty.jpg": b"", "junk.jpg": b"not"},
                         [{"image_id": i, "category_id": 1, "bbox": [1, 2, 10, 10]} for i in (1, 2, 3, 4)])
    doc = json.loads(ann.read_text())
    for img in doc["images"]:
        del img["width"], img["height"]
    ann.write_text(json.dumps(doc))
    for embed in (True, False):
        m = convert_coco(ann, root, tmp_path / f"out{embed}", embed_images=embed, progress=False)
        assert sorted((s["image_id"], s["reason"]) for s in m["skipped_images"]) == [
            (2, "missing_file"), (3, "empty_file"), (4, "corrupt")]
    (root / "gone.jpg").write_bytes(_jpeg())  # the file is there now: converted again, kept
    m = convert_coco(ann, root, tmp_path / "outTrue", embed_images=True, progress=False)
    assert m["num_images"] == 2 and sorted(r["image_id"] for r in iter_records(tmp_path / "outTrue")) == [1, 2]
    (tmp_path / "elsewhere").mkdir()  # a wrong image folder: the files are named, not the entries
    with pytest.raises(ConversionError, match="is it the folder that holds the files"):
        convert_coco(ann, tmp_path / "elsewhere", tmp_path / "wrong_root", progress=False)


def test_data_file_names_leaving_the_image_root_are_counted_skips(tmp_path, caplog):
    """An annotation ``file_name`` of ``../outside/x.jpg``, ``/abs/x.jpg`` or (once its Objects365
    prefix was cut) ``images/v1/../outside/x.jpg`` read a file outside the image root: with
    ``--embed-images`` its bytes went into the shards (any image the user could read; without
    verification any file at all). Such names are ``unreadable`` skips, at
    conversion and at load time; names inside the root, also through a symbolic link, still work."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private.jpg").write_bytes(_jpeg(colour=(1, 2, 3)))
    root, ann = _dataset(tmp_path, {"ok.jpg": _jpeg(), "sub/../ok2.jpg": None},
                         [{"image_id": i, "category_id": 1, "bbox": [1, 2, 10, 10]} for i in (1, 2, 3, 4, 5)])
    (root / "ok2.jpg").write_bytes(_jpeg())
    (root / "sub").mkdir()  # "sub/../ok2.jpg" stays inside the root
    (root / "linked").symlink_to(outside)  # a folder of the root that links elsewhere: the user's own layout
    doc = json.loads(ann.read_text())
    for i, name in ((3, "../outside/private.jpg"), (4, str(outside / "private.jpg")), (5, "linked/private.jpg"),
                    (6, str(root / "ok.jpg")),  # an absolute name inside the root is fine
                    (7, "images/v1/../outside/private.jpg")):  # inside, until the Objects365 prefix is cut
        doc["images"].append({"id": i, "file_name": name, "width": 64, "height": 48})
    ann.write_text(json.dumps(doc))
    for embed, verify in ((True, True), (True, False)):
        with caplog.at_level(logging.WARNING):
            m = convert_coco(ann, root, tmp_path / f"out{embed}{verify}", embed_images=embed, verify_images=verify,
                             progress=False)
        assert m["images_skipped"] == {"unreadable": 3} and m["num_images"] == 4, m["images_skipped"]
        assert sorted(s["image_id"] for s in m["skipped_images"]) == [3, 4, 7]
    assert "lies outside the image root" in caplog.text  # said (once a conversion), not only counted
    convert_coco(ann, root, tmp_path / "unchecked", embed_images=False, check_files=False, progress=False)
    loader = LocalLoader(tmp_path / "unchecked", preset("tiny").data, train=False, batch_size=8)
    (_, _, targets), = list(loader)
    assert sorted(int(t["image_id"]) for t in targets) == [1, 2, 5, 6]
    assert loader.skips["by_reason"] == {"unreadable": 3} and sorted(loader.skips["image_ids"]) == [3, 4, 7]


def test_data_malformed_annotations_are_named_with_the_field_at_fault(tmp_path, caplog):
    """"dropped 2 of 9 boxes (malformed: 2)" said how many, never which or why: a
    segmentation-only annotation, an iscrowd of "true" and a string image_id look alike in the
    count. A bbox holding booleans or text is malformed too (numpy read true as 1.0, "5" as 5.0:
    kept as a box, not a word). The first few are logged with their position in the file and the field at fault."""
    anns = [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]},
            {"image_id": 1, "category_id": 1, "segmentation": [[1, 2, 3, 4, 5, 6]]},
            {"image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10], "iscrowd": "true"},
            {"image_id": "1", "category_id": 1, "bbox": [1, 2, 10, 10]},
            {"image_id": 1, "category_id": 1, "bbox": [True, False, 10, 10]},  # was the box [1, 0, 10, 10]
            {"image_id": 1, "category_id": 1, "bbox": ["5", "5", 20, 20]}]  # was [5, 5, 20, 20]: text is no number
    root, ann = _dataset(tmp_path, {"a.jpg": _jpeg()}, [])
    doc = json.loads(ann.read_text())
    doc["annotations"] = [{"id": k, **a} for k, a in enumerate(anns, 1)]
    ann.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        m = convert_coco(ann, root, tmp_path / "out", progress=False)
    assert m["boxes_dropped"]["malformed"] == 5 and m["num_boxes"] == 1
    assert "annotation #2 dropped as malformed: bbox None is not [x, y, w, h] numbers" in caplog.text
    assert "annotation #5 dropped as malformed: bbox [True, False, 10, 10] is not [x, y, w, h] numbers" in caplog.text
    assert "annotation #6 dropped as malformed: bbox ['5', '5', 20, 20] is not" in caplog.text
    assert "annotation #3 dropped as malformed: iscrowd 'true' is not 0/1" in caplog.text
    assert "annotation #4 dropped as malformed: image_id '1' is not an integer" in caplog.text

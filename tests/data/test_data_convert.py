"""Conversion: schema, manifest counts, Objects365 specifics, determinism, resume (converting again
into a folder: test_data_convert_again.py)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from dino_scale.data import SCHEMA, convert_coco, iter_records, read_manifest, to_coco_gt


def _shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.parquet"))}


def test_data_convert_coco_like_roundtrip(coco_like, tmp_path):
    root, ann = coco_like
    src = json.loads(ann.read_text())
    m = convert_coco(ann, root, tmp_path / "out", embed_images=True, progress=False)
    assert m["num_images"] == len(src["images"]) and m["num_boxes"] == len(src["annotations"])
    assert m["images_in"] == m["num_images"] + sum(m["images_skipped"].values())
    assert m["boxes_in"] == m["num_boxes"] + sum(m["boxes_dropped"].values())
    assert [c["id"] for c in m["categories"]] == sorted(c["id"] for c in src["categories"])
    assert read_manifest(tmp_path / "out")["num_images"] == m["num_images"]
    assert pq.read_schema(tmp_path / "out" / m["shards"][0]["file"]).equals(SCHEMA)
    recs = {r["image_id"]: r for r in iter_records(tmp_path / "out")}
    by_image = {}
    for a in src["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for img in src["images"]:
        r = recs[img["id"]]
        assert (r["width"], r["height"]) == (img["width"], img["height"])
        assert r["image"] == (root / img["file_name"]).read_bytes()
        anns = by_image.get(img["id"], [])
        np.testing.assert_allclose(r["boxes"], np.array([a["bbox"] for a in anns]).reshape(-1, 4), atol=1e-3)
        assert r["category_ids"].tolist() == [a["category_id"] for a in anns]
        assert r["iscrowd"].tolist() == [bool(a["iscrowd"]) for a in anns]
    assert any(len(r["category_ids"]) == 0 for r in recs.values()), "negatives (no boxes) are kept"
    gt = to_coco_gt(tmp_path / "out")
    assert len(gt["images"]) == len(src["images"]) and len(gt["annotations"]) == len(src["annotations"])
    assert sum(a["iscrowd"] for a in gt["annotations"]) == sum(a["iscrowd"] for a in src["annotations"]) > 0
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    assert len(coco.getImgIds()) == len(src["images"])


def test_data_convert_o365_nested_names_and_val_split(o365_like, tmp_path):
    root, ann = o365_like
    src = json.loads(ann.read_text())
    assert src["images"][0]["file_name"].startswith("images/v1/patch0/") and "isfake" in src["annotations"][0]
    res = convert_coco(ann, root, tmp_path / "o365", embed_images=True, o365_val_split=10, progress=False)
    val, extra = res["val"], res["train_extra"]
    assert val["num_images"] == 10 and extra["num_images"] == len(src["images"]) - 10
    val_ids = {r["image_id"] for r in iter_records(tmp_path / "o365" / "val")}
    assert val_ids == {im["id"] for im in src["images"][:10]}
    n_val_boxes = sum(1 for a in src["annotations"] if a["image_id"] in val_ids)
    assert val["num_boxes"] == n_val_boxes and extra["num_boxes"] == len(src["annotations"]) - n_val_boxes
    for m in (val, extra):  # boxes of the sibling split are not counted as input of this one
        assert m["boxes_in"] == m["num_boxes"] and sum(m["boxes_dropped"].values()) == 0
    # both folders read as one training set
    both = list(iter_records(f"{tmp_path / 'o365' / 'val'},{tmp_path / 'o365' / 'train_extra'}"))
    assert len(both) == len(src["images"])
    # check-data of both folders as one dataset string (each folder's manifest counts its shards)
    from dino_scale.data.integrity import check_dataset

    report = check_dataset(f"{tmp_path / 'o365' / 'val'},{tmp_path / 'o365' / 'train_extra'}")
    assert report["images"] == len(src["images"]) and not report["unreadable"] and not report["damaged"]
    # a split past the file's images is empty, not an error (a file that lists no image at all is)
    res = convert_coco(ann, root, tmp_path / "all-val", o365_val_split=len(src["images"]) + 5, progress=False)
    assert res["val"]["num_images"] == len(src["images"]) and res["train_extra"]["num_images"] == 0


def test_data_convert_deterministic_and_parallel(coco_like, tmp_path):
    root, ann = coco_like
    a = convert_coco(ann, root, tmp_path / "a", embed_images=True, shard_size_mb=0.05, progress=False)
    convert_coco(ann, root, tmp_path / "b", embed_images=True, shard_size_mb=0.05, progress=False,
                 parallel=True)
    assert len(a["shards"]) > 2
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")
    for s in a["shards"]:  # bounded: a shard exceeds the limit only when it holds a single image
        assert s["bytes"] <= 0.05 * (1 << 20) * 1.1 or s["num_images"] == 1


@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_data_convert_resume_after_interrupt(coco_like, tmp_path, monkeypatch, chunk_bytes, cut_short_after):
    """An interrupted conversion resumes to the bytes of an uninterrupted one. ``chunk_bytes=1``:
    a bucket's rows are handed on image by image (``_CHUNK_IMAGE_BYTES``; a bucket held all its
    images at once, ~3.4x their size, before it wrote any): the same shards and manifest, resumed too."""
    from dino_scale.data import convert_write

    root, ann = coco_like
    ref = convert_coco(ann, root, tmp_path / "ref", embed_images=True, shard_size_mb=0.05, progress=False)
    if chunk_bytes is not None:
        monkeypatch.setattr(convert_write, "_CHUNK_IMAGE_BYTES", chunk_bytes)
        whole = convert_coco(ann, root, tmp_path / "chunked", embed_images=True, shard_size_mb=0.05, progress=False)
        assert _shard_bytes(tmp_path / "chunked") == _shard_bytes(tmp_path / "ref")
        assert {k: v for k, v in whole.items() if k != "source"} == {k: v for k, v in ref.items() if k != "source"}
    out = tmp_path / "run"
    with cut_short_after(2):
        convert_coco(ann, root, out, embed_images=True, shard_size_mb=0.05, progress=False)
    finished = sorted(out.glob("shard-*.parquet"))
    assert len(finished) == 2 and not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="its conversion did not finish"):  # check-data, training: said so
        read_manifest(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in finished}
    m = convert_coco(ann, root, out, embed_images=True, shard_size_mb=0.05, progress=False)
    assert {p: (out / p).stat().st_mtime_ns for p in stamps} == stamps, "finished shards were rewritten"
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "ref")
    assert {k: v for k, v in m.items() if k != "signature"} == {k: v for k, v in ref.items() if k != "signature"}
    assert not (out / ".convert-work").exists()
    # a third run with the same arguments is a no-op
    assert convert_coco(ann, root, out, embed_images=True, shard_size_mb=0.05, progress=False) == m


def test_data_convert_reference_mode_and_cli(coco_like, tmp_path, capsys):
    root, ann = coco_like
    from pipelines.prepare_data import main
    assert main(["--annotations", str(ann), "--images", str(root), "--out", str(tmp_path / "ref"), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = read_manifest(tmp_path / "ref")
    assert summary["num_images"] == m["num_images"] == 24 and not m["embed_images"]
    assert summary["dataset"] == str(tmp_path / "ref")  # was "out" for every conversion
    assert m["image_root"] == str(root.resolve())
    assert all(r["image"] is None for r in iter_records(tmp_path / "ref"))
    # images reached through a link (/data -> /mnt/nfs-a): the root is recorded as given, so the images
    # are found once the link points at their new place (was the link's target: "missing" after the move)
    import shutil

    from dino_scale.data.preflight import check_image_files

    (tmp_path / "nfs-a").mkdir()
    shutil.copytree(root, tmp_path / "nfs-a" / "images")
    (tmp_path / "data").symlink_to(tmp_path / "nfs-a")
    assert main(["--annotations", str(ann), "--images", str(tmp_path / "data" / "images"), "--out",
                 str(tmp_path / "linked"), "--quiet"]) == 0
    assert read_manifest(tmp_path / "linked")["image_root"] == str(tmp_path / "data" / "images")
    (tmp_path / "nfs-a").rename(tmp_path / "nfs-b")
    (tmp_path / "data").unlink()
    (tmp_path / "data").symlink_to(tmp_path / "nfs-b")
    assert check_image_files(tmp_path / "linked", None)["missing"] == 0


def test_data_convert_cli_names_each_split_folder(coco_like, tmp_path, capsys):
    # the summaries said "dataset": "out" (or the bare split name), and both splits' header lines
    # said "N images, <every annotation of the file> annotations read" as if each split held them all
    root, ann = coco_like
    from pipelines.prepare_data import main
    out = tmp_path / "o365"
    assert main(["--annotations", str(ann), "--images", str(root), "--out", str(out), "--o365-val-split", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summaries = [json.loads(ln) for ln in lines if ln.startswith("{")]
    assert [(s["dataset"], s["num_images"]) for s in summaries] == [(str(out / "val"), 3),
                                                                      (str(out / "train_extra"), 21)]
    headers = [ln for ln in lines if "annotations in the file" in ln]
    assert len(headers) == 2 and "3 images for val," in headers[0] and "21 images for train_extra," in headers[1]
    assert headers[0].endswith(f"writing shards to {out / 'val'}"), headers


def _small_dataset(tmp_path, num_images: int, annotations: list) -> tuple:
    """(image root, annotation json) of ``num_images`` 64x48 PNGs with ids 1.. and ``annotations``."""
    import io

    from PIL import Image

    root = tmp_path / "img"
    root.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, format="PNG")
    images = []
    for i in range(1, num_images + 1):
        (root / f"{i}.png").write_bytes(buf.getvalue())
        images.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 48})
    doc = {"images": images, "categories": [{"id": 1, "name": "a"}],
           "annotations": [{"id": k, "category_id": 1, "iscrowd": 0, **a} for k, a in enumerate(annotations, 1)]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(doc))
    return root, ann


def test_data_convert_val_split_counts_its_own_dropped_boxes(tmp_path):
    """The annotation pass's drops (malformed, non-finite, degenerate) were counted for the whole
    file in both split manifests. Each split counts those of its own images; boxes naming no
    image of either split (an unusable id, an unknown one) are counted in both, as before."""
    anns = [{"image_id": 1, "bbox": [1, 2, 10, 10]},
            {"image_id": 1, "bbox": [1, 2, 0, 10]},  # degenerate, val
            {"image_id": 2, "bbox": [1, None, 10, 10]},  # non-finite, val
            {"image_id": 4, "bbox": [1, 2, 10, 10]},
            {"image_id": 4, "bbox": [1, 2, 10, -1]},  # degenerate, train_extra
            {"image_id": 5, "bbox": [1, 2, 3]},  # malformed, train_extra
            {"image_id": "x", "bbox": [1, 2, 10, 10]},  # malformed, no image: both
            {"image_id": 99, "bbox": [1, 2, 10, 10]}]  # unknown image: both
    root, ann = _small_dataset(tmp_path, 5, anns)
    res = convert_coco(ann, root, tmp_path / "split", o365_val_split=3, progress=False)
    val, extra = res["val"], res["train_extra"]
    assert val["boxes_dropped"] == {"malformed": 1, "nonfinite": 1, "degenerate": 1, "orphan": 1, "outside": 0,
                                    "skipped_image": 0}
    assert extra["boxes_dropped"] == {"malformed": 2, "nonfinite": 0, "degenerate": 1, "orphan": 1, "outside": 0,
                                      "skipped_image": 0}
    assert val["num_boxes"] == extra["num_boxes"] == 1
    assert val["boxes_in"] == 5 and extra["boxes_in"] == 5
    assert val["source"]["boxes_of_other_split"] == 3 and extra["source"]["boxes_of_other_split"] == 3
    whole = convert_coco(ann, root, tmp_path / "whole", progress=False)  # no split: every drop counted once
    assert whole["boxes_dropped"] == {"malformed": 2, "nonfinite": 1, "degenerate": 2, "orphan": 1, "outside": 0,
                                      "skipped_image": 0}
    assert whole["boxes_in"] == 8 and whole["source"]["boxes_of_other_split"] == 0


def test_data_convert_crowd_count_only_written_images(tmp_path, cut_short_after):
    """num_crowd_boxes counted the crowd boxes of images skipped afterwards (a missing file):
    it counts what the shards hold, also after a resume from progress records that lack it."""
    crowd = {"bbox": [1, 2, 10, 10], "iscrowd": 1}
    anns = [{"image_id": 1, "bbox": [1, 2, 10, 10]}, {"image_id": 1, **crowd},
            {"image_id": 2, **crowd}, {"image_id": 2, **crowd}, {"image_id": 3, **crowd}]
    root, ann = _small_dataset(tmp_path, 3, anns)
    (root / "2.png").unlink()
    m = convert_coco(ann, root, tmp_path / "out", max_images_per_shard=1, progress=False)
    assert m["images_skipped"] == {"missing_file": 1} and m["boxes_dropped"]["skipped_image"] == 2
    assert m["num_crowd_boxes"] == 2 == sum(int(r["iscrowd"].sum()) for r in iter_records(tmp_path / "out"))
    # interrupted after the first shard; its progress record written without the count
    with cut_short_after(1):
        convert_coco(ann, root, tmp_path / "run", max_images_per_shard=1, progress=False)
    (progress_file,) = (tmp_path / "run" / ".convert-work").glob("shard-*.json")
    record = json.loads(progress_file.read_text())
    del record["num_crowd_boxes"]
    progress_file.write_text(json.dumps(record))
    assert convert_coco(ann, root, tmp_path / "run", max_images_per_shard=1, progress=False)["num_crowd_boxes"] == 2


def test_data_coco_gt_refuses_an_image_id_of_two_folders(tmp_path):
    """Detections are matched to ground truth by image id: with image id 1 in two val folders,
    the ground truth held both images' boxes under one id, and a detection of each image's
    object in the OTHER image scored AP 1.0 (truth: 0.0). Such folders are refused now."""
    from PIL import Image

    from dino_scale.engine.evaluate import coco_evaluate

    def folder(name, box):
        root = tmp_path / f"images_{name}"
        root.mkdir()
        Image.new("RGB", (64, 48), (200, 0, 0)).save(root / "a.png")
        doc = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
               "categories": [{"id": 1, "name": "x"}],
               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": box}]}
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
        convert_coco(tmp_path / f"{name}.json", root, tmp_path / name, progress=False)
        return tmp_path / name

    a, b = folder("a", [2, 2, 20, 20]), folder("b", [30, 20, 20, 20])
    # each folder alone is fine, and an object found in the wrong image scores nothing
    assert coco_evaluate(to_coco_gt(a), [{"image_id": 1, "category_id": 1, "bbox": [30, 20, 20, 20],
                                          "score": 0.9}])["AP"] == 0.0
    with pytest.raises(ValueError, match="image id 1 is in .* and in .*distinct ids"):
        to_coco_gt(f"{a},{b}")
    with pytest.raises(ValueError, match="dataset folder given twice"):  # one folder twice: refused first
        to_coco_gt([a, a])


def test_data_convert_val_split_counts_the_boxes_of_an_id_both_splits_list(tmp_path):
    """An image id listed in both --o365-val-split parts (a duplicate_id skip in each): its boxes
    were taken as the sibling split's in both manifests, so no manifest counted them as dropped.
    Each split now counts them (skipped_meta for the kept ones, their reason for the annotation
    pass's drops), and every manifest's counts add up."""
    anns = [{"image_id": 1, "bbox": [1, 2, 10, 10]}, {"image_id": 2, "bbox": [1, 2, 10, 10]},
            {"image_id": 2, "bbox": [1, 2, 0, 10]},  # degenerate, on the id both list
            {"image_id": 3, "bbox": [1, 2, 10, 10]}]
    root, ann = _small_dataset(tmp_path, 4, anns)
    doc = json.loads(ann.read_text())
    doc["images"][3] = {**doc["images"][3], "id": 2}  # the 4th image (train_extra) takes id 2 of the val part
    ann.write_text(json.dumps(doc))
    res = convert_coco(ann, root, tmp_path / "split", o365_val_split=2, progress=False)
    for part in ("val", "train_extra"):
        m = res[part]
        assert m["images_skipped"].get("duplicate_id") == 1, (part, m["images_skipped"])
        assert m["boxes_dropped"]["skipped_image"] == 1 and m["boxes_dropped"]["degenerate"] == 1, (part, m)
        assert m["boxes_in"] == m["num_boxes"] + sum(m["boxes_dropped"].values()), (part, m)

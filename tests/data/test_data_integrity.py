"""Record checksums: a shard changed after conversion without changing its size (a bad disk, a
faulty copy) is found where its records are read, never trained or scored on silently."""
from __future__ import annotations

import io
import json
import logging
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dino_scale.config import preset
from dino_scale.data import SCHEMA, ShardError, convert_coco, iter_records, read_manifest, to_coco_gt
from dino_scale.data.integrity import CHECKSUMS, check_dataset, describe, labels_crc32, record_damage
from dino_scale.data.decode import ImageDecodeError
from dino_scale.data.loader import LocalLoader
from dino_scale.data.transforms import DetectionTransform

BOX = 17.25  # a coordinate only image 2 holds: found in the shard's bytes to change it


def _noise_jpeg(seed: int, w: int = 64, h: int = 48) -> bytes:
    """A JPEG of random pixels: changing a byte of its entropy-coded data still decodes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _convert(tmp_path, embed: bool = True, name: str = "out", per_shard: int = 10000, extra_boxes: bool = False):
    """A converted folder of 4 noise images, one box each (``extra_boxes``: image i holds i boxes)."""
    root = tmp_path / "img"
    root.mkdir(parents=True, exist_ok=True)
    images = {i: _noise_jpeg(i) for i in (1, 2, 3, 4)}
    for i, data in images.items():
        (root / f"{i}.jpg").write_bytes(data)
    boxes = [(i, [BOX if i == 2 else 3.0, 4.0, 20.0, 10.0]) for i in images]
    boxes += [(i, [5.0 + k, 6.0, 8.0, 9.0]) for i in images for k in range(1, i)] if extra_boxes else []
    doc = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in images],
           "annotations": [{"id": n, "image_id": i, "category_id": 1, "iscrowd": 0, "bbox": bbox}
                           for n, (i, bbox) in enumerate(boxes, 1)],
           "categories": [{"id": 1, "name": "a"}]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(doc))
    out = tmp_path / name
    # file order (no shuffle): the tests name records by their shard and row
    convert_coco(ann, root, out, embed_images=embed, max_images_per_shard=per_shard, progress=False,
                 shuffle_seed=None)
    return out, images


def _replace_in_shard(folder, old: bytes, new: bytes) -> None:
    """Change bytes of a shard of ``folder`` in place: same size, so the manifest agrees."""
    paths = [folder / s["file"] for s in read_manifest(folder)["shards"]]
    hits = [(p, p.read_bytes()) for p in paths if old in p.read_bytes()]
    assert len(hits) == 1 and hits[0][1].count(old) == 1, "the bytes to change must occur once in the folder"
    hits[0][0].write_bytes(hits[0][1].replace(old, new))


def test_data_checksums_written_at_conversion_match_on_read(tmp_path):
    out, images = _convert(tmp_path)
    assert read_manifest(out)["checksums"] == CHECKSUMS
    shard = out / read_manifest(out)["shards"][0]["file"]
    assert pq.read_schema(shard).equals(SCHEMA)
    records = list(iter_records(out, verify=True))
    assert [r["image_id"] for r in records] == [1, 2, 3, 4]
    assert all(r["labels_crc32"] is not None and record_damage(r) is None for r in records)
    assert [r["image_crc32"] for r in records] == [zlib.crc32(images[i]) for i in (1, 2, 3, 4)]
    report = check_dataset(out)
    assert (report["images"], report["damaged"], report["unreadable"], report["unchecked"]) == (4, [], [], [])
    assert "4 records in 1 shards match their checksums" in describe(report)
    # images read by path: no image checksum, labels still covered
    ref, _ = _convert(tmp_path, embed=False, name="ref")
    assert all(r["image_crc32"] is None and r["labels_crc32"] is not None for r in iter_records(ref))
    assert check_dataset(ref)["damaged"] == []
    # the layout puts each list's length first: moving a value between lists changes the sum
    a = labels_crc32(1, "x", 2, 3, [1.0, 2.0, 3.0, 4.0], [5], [False], [6.0])
    assert a != labels_crc32(1, "x", 2, 3, [1.0, 2.0, 3.0, 4.0], [], [False], [6.0])
    assert a == labels_crc32(np.int64(1), "x", np.int32(2), 3, np.float32([[1, 2, 3, 4]]), np.int64([5]),
                             np.bool_([False]), np.float32([6]))


@pytest.mark.parametrize("column, items", [("category_ids", [None]), ("boxes", [[1.0, None, 3.0, 4.0]]),
                                           ("area", [None])])
def test_data_a_null_list_item_is_a_damaged_record_not_a_crash(tmp_path, column, items):
    """A damaged shard whose list holds a null item: np.asarray raised TypeError for the whole batch
    (check-data wrote no report; a Ray Data task failed mid-run). The record is read, with NaN /
    -1 in place of the null, and no longer matches its labels checksum."""
    from dino_scale.data.records import arrow_rows, record_from_row

    out, _ = _convert(tmp_path)
    row = arrow_rows(pq.read_table(out / read_manifest(out)["shards"][0]["file"]).slice(0, 1))[0]
    assert record_damage(record_from_row(row)) is None
    rec = record_from_row({**row, column: items})
    assert record_damage(rec) == "labels"


def test_data_an_embedded_image_whose_bytes_were_nulled_is_damaged(tmp_path):
    """A record of an embedded set whose image cell became null (its checksum still there) was
    not damaged: it was read by path instead, against no image root, from the worker's working
    folder (a counted missing_file at best, another image if one had that name)."""
    from dino_scale.data.records import arrow_rows, record_from_row

    out, _ = _convert(tmp_path)
    row = arrow_rows(pq.read_table(out / read_manifest(out)["shards"][0]["file"]).slice(0, 1))[0]
    rec = record_from_row({**row, "image": None})
    assert record_damage(rec) == "image"
    with pytest.raises(ImageDecodeError, match="damaged: its image bytes do not match"):
        DetectionTransform(preset("tiny").data, train=False)(rec)
    # a set read by path stores no image checksum: its null cells are as written
    ref, _ = _convert(tmp_path, embed=False, name="ref")
    assert all(record_damage(r) is None for r in iter_records(ref, verify=True))


def test_data_record_changed_after_conversion_is_a_counted_skip(tmp_path, caplog):
    """A changed byte of an embedded JPEG decodes to other pixels and a changed box coordinate
    reads as another box: both were read without a word before the checksums (seen). Now the
    loaders skip such a record (reason ``damaged``, counted, logged with its id), the ground
    truth of an evaluation refuses it, and ``check_dataset`` lists it."""
    out, images = _convert(tmp_path)
    jpeg = images[3]
    middle = len(jpeg) // 2
    _replace_in_shard(out, jpeg[middle - 8: middle + 8], bytes(b ^ 0x10 for b in jpeg[middle - 8: middle + 8]))
    damaged = Image.open(io.BytesIO(next(r["image"] for r in iter_records(out) if r["image_id"] == 3)))
    damaged.load()  # still a decodable image: only the checksum tells
    _replace_in_shard(out, struct.pack("<f", BOX), struct.pack("<f", BOX + 8))
    assert next(r for r in iter_records(out) if r["image_id"] == 2)["boxes"][0, 0] == BOX + 8

    cfg = preset("tiny").data
    for train in (True, False):
        loader = LocalLoader(out, cfg, train=train, batch_size=2)
        with caplog.at_level(logging.WARNING):
            seen = sorted(int(t["image_id"]) for _, _, ts in loader for t in ts)
        assert seen == [1, 4]
        assert loader.skips["count"] == 2 and loader.skips["by_reason"] == {"damaged": 2}
        assert sorted(loader.skips["image_ids"]) == [2, 3]
    assert "image id 2 (damaged: its labels do not match" in caplog.text
    assert "image id 3 (damaged: its image bytes do not match" in caplog.text

    shard = read_manifest(out)["shards"][0]["file"]
    with pytest.raises(ShardError, match=rf"{shard} row 1 \(image id 2\): its labels do not match the checksum"):
        to_coco_gt(out)
    # a reader of some columns only compares what it read
    assert [r["image_id"] for r in iter_records(out, columns=["image_id", "file_name"], verify=True)] == [1, 2, 3, 4]
    report = check_dataset(out)
    assert [(d["row"], d["image_id"], d["what"]) for d in report["damaged"]] == [(1, 2, "labels"), (2, 3, "image")]
    assert report["unreadable"] == []  # the page checksums failed; the records were named on a second read
    text = describe(report)
    assert "2 damaged record(s)" in text and "(image id 3): its image bytes do not match" in text


def test_data_unreadable_shard_structure_is_named(tmp_path):
    """Damage to what Parquet itself reads (here the file's closing magic bytes) is an error
    naming the shard, not a bare ``ArrowInvalid`` from inside a reader."""
    out, _ = _convert(tmp_path)
    shard = read_manifest(out)["shards"][0]["file"]
    data = (out / shard).read_bytes()
    (out / shard).write_bytes(data[:-4] + b"PAR0")
    report = check_dataset(out)
    assert [u["file"] for u in report["unreadable"]] == [shard]
    with pytest.raises(ShardError, match=rf"{shard} cannot be read after 0 records: ArrowInvalid: .*magic bytes"):
        list(iter_records(out))


def _ray_reads(path) -> bool:
    """Whether Ray Data's Parquet reader reads every record of the shard at ``path``: a
    ``ParquetDataset`` fragment read with ``to_batches`` through Ray 2.60's default scan options
    (buffered 8 MiB streams: ray/data/_internal/datasource/parquet_datasource.py)."""
    import pyarrow.dataset as pads

    options = pads.ParquetFragmentScanOptions(use_buffered_stream=True, buffer_size=8 << 20)
    try:
        for fragment in pq.ParquetDataset([str(path)]).fragments:
            for _ in fragment.to_batches(fragment_scan_options=options):
                pass
    except (OSError, pa.ArrowException):
        return False
    return True


def _parquet_file_reads(path) -> bool:
    try:
        for _ in pq.ParquetFile(path).iter_batches():
            pass
    except (OSError, pa.ArrowException):
        return False
    return True


def footer_changes_ray_refuses(path, bits=(0x01, 0x10)) -> tuple[bytes, list[bytes]]:
    """(the shard's bytes, every copy with one bit (of ``bits``) of its footer flipped that Ray
    Data's reader refuses while ``pq.ParquetFile`` reads it in full). Writes each over ``path``
    while it looks; puts the original back."""
    original = path.read_bytes()
    footer_len = struct.unpack("<i", original[-8:-4])[0]
    found = []
    for pos in range(len(original) - 8 - footer_len, len(original) - 8):
        for bit in bits:
            changed = bytearray(original)
            changed[pos] ^= bit
            path.write_bytes(bytes(changed))
            if not _ray_reads(path) and _parquet_file_reads(path):
                found.append(bytes(changed))
    path.write_bytes(original)
    return original, found


def test_data_check_passes_no_footer_change_ray_datas_reader_refuses(tmp_path):
    """check-data read shards with ``ParquetFile.iter_batches``; training reads them through
    Ray Data's ``pyarrow.dataset`` reader, and the two do not refuse the same damage. Of the 9,408
    one-bit changes of this shard's footer, 64 are read in full by the first and refused by the
    second ("ArrowInvalid: Column 6 named category_ids expected length 4 but got length 2",
    "OSError: Negative size"); check-data passed 3 of them (exit 0: every record matched its
    checksums and the manifest's count) and a run failed at that shard. Every record reader now
    reads as Ray Data does: check-data lists each such shard as unreadable, and ``iter_records``
    (the local loaders, the evaluation's ground truth) refuses it by name. Flips of 2 bits per
    byte here (20 such changes), to keep the test short."""
    out, _ = _convert(tmp_path, extra_boxes=True)  # lists of 1-4 values
    path = out / read_manifest(out)["shards"][0]["file"]
    assert check_dataset(out)["unreadable"] == [] and _ray_reads(path)
    original, refused = footer_changes_ray_refuses(path)
    assert refused, "no footer change that only Ray's reader refuses: the readers agree now (pyarrow changed?)"
    for changed in refused:
        path.write_bytes(changed)
        report = check_dataset(out)
        assert [u["file"] for u in report["unreadable"]] == [path.name], report
        with pytest.raises(ShardError, match=f"{path.name} cannot be read after 0 records"):
            list(iter_records(out))
    path.write_bytes(original)
    assert check_dataset(out)["unreadable"] == []


def test_data_a_manifest_that_miscounts_a_shard_fails_the_check(tmp_path):
    """check-data said every record matched when the manifest listed more (or fewer) records for
    a shard than it holds (an edited manifest, a shard of another conversion put in its place):
    training's pre-flight refuses that folder. The check names the shard and both counts."""
    out, _ = _convert(tmp_path, per_shard=2)
    manifest = json.loads((out / "manifest.json").read_text())
    shard = manifest["shards"][1]
    shard["num_images"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    report = check_dataset(out)
    assert report["unreadable"] == [{"file": shard["file"], "error": "2 records where the manifest lists 3"}]
    assert "1 unreadable shard(s) of 2" in describe(report)


def test_data_a_category_the_manifest_does_not_list_fails_the_check(tmp_path):
    """One changed id in ``manifest.json`` (category 1 -> 5): check-data said every record matched
    (exit 0) while training skipped every image (``unknown_category``): the manifest carries no
    checksum. Records holding an id the manifest does not list are named; exit 1."""
    from pipelines.check_data import main as check_data

    out, _ = _convert(tmp_path, per_shard=2)
    assert check_dataset(out)["damaged"] == [] and check_data([str(out), "--no-image-files"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["categories"] = [{"id": 5, "name": "a"}]
    (out / "manifest.json").write_text(json.dumps(manifest))
    report = check_dataset(out)
    assert [(d["file"], d["row"], d["what"]) for d in report["damaged"]] == [
        (f"shard-0000{i}.parquet", row, "category") for i in (0, 1) for row in (0, 1)]
    assert "a category id the manifest does not list" in describe(report)
    assert check_data([str(out), "--no-image-files"]) == 1
    # images with several boxes (an id array of many: the check raised "truth value of an array is
    # ambiguous" on them); one category dropped from the manifest names exactly its images
    from dino_scale.data.records import iter_records
    from dino_scale.data.synthetic import generate

    root, ann = generate(tmp_path / "raw", "coco-like", 12, 3, image_size=((48, 48), (64, 64)), max_objects=4,
                         empty_fraction=0.0)
    many = tmp_path / "many"
    convert_coco(ann, root, many, embed_images=True, progress=False)
    assert check_dataset(many)["damaged"] == [] and check_data([str(many), "--no-image-files"]) == 0
    manifest = json.loads((many / "manifest.json").read_text())
    records = list(iter_records(many))
    assert max(len(r["category_ids"]) for r in records) > 1
    dropped = int(records[0]["category_ids"][0])
    manifest["categories"] = [c for c in manifest["categories"] if c["id"] != dropped]
    (many / "manifest.json").write_text(json.dumps(manifest))
    named = {d["image_id"] for d in check_dataset(many)["damaged"] if d["what"] == "category"}
    assert named == {r["image_id"] for r in records if dropped in set(map(int, r["category_ids"]))}


def test_data_shards_without_checksums_are_read_unchecked(tmp_path):
    """A folder converted by a release without checksums is still read (nothing to compare);
    ``check_dataset`` says which shards it could not check, and converting again adds them."""
    out, _ = _convert(tmp_path)
    m = read_manifest(out)
    path = out / m["shards"][0]["file"]
    pq.write_table(pq.read_table(path).drop_columns(["labels_crc32", "image_crc32"]), path)
    m["shards"][0]["bytes"] = path.stat().st_size
    (out / "manifest.json").write_text(json.dumps(m))
    records = list(iter_records(out, verify=True))
    assert len(records) == 4 and all(r["labels_crc32"] is None for r in records)
    assert len(to_coco_gt(out)["images"]) == 4
    loader = LocalLoader(out, preset("tiny").data, train=False, batch_size=4)
    assert sum(len(ts) for _, _, ts in loader) == 4 and loader.skips["count"] == 0
    report = check_dataset(out)
    assert report["unchecked"] == [path.name] and report["damaged"] == [] and report["images"] == 4
    assert "written without checksums" in describe(report)
    # label lists of different lengths there (nothing to check them against): the ground truth
    # silently lost objects (zip stops at the shortest), and the AP was scored without them
    table = pq.read_table(path)
    rows = table.to_pylist()
    victim = next(r for r in rows if len(r["boxes"]) >= 1)
    victim["area"] = victim["area"][:-1]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    m["shards"][0]["bytes"] = path.stat().st_size
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=rf"image id {victim['image_id']}: its boxes, category ids, iscrowd flags "
                                         r"and areas differ in number"):
        to_coco_gt(out)


def test_data_check_dataset_reads_shards_concurrently_and_reports_in_order(tmp_path):
    """Several shards read at a time (threads), the report in shard order whatever finishes first."""
    out, images = _convert(tmp_path, per_shard=1)
    names = [s["file"] for s in read_manifest(out)["shards"]]
    assert len(names) == 4
    _replace_in_shard(out, struct.pack("<f", BOX), struct.pack("<f", BOX + 8))  # image 2: the second shard
    jpeg, mid = images[4], len(images[4]) // 2
    _replace_in_shard(out, jpeg[mid: mid + 16], bytes(b ^ 1 for b in jpeg[mid: mid + 16]))  # image 4: the fourth
    seen = []
    report = check_dataset(out, on_shard=lambda name, done, total: seen.append((done, total)), workers=3)
    assert [(d["file"], d["image_id"], d["what"]) for d in report["damaged"]] == [
        (names[1], 2, "labels"), (names[3], 4, "image")]
    assert report["images"] == 4 and seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert check_dataset(out, workers=1)["damaged"] == report["damaged"]


def _content(rec) -> tuple:
    return (rec["image_id"], rec["file_name"], rec["width"], rec["height"], rec["image"], rec["boxes"].tobytes(),
            rec["category_ids"].tobytes(), rec["iscrowd"].tobytes(), rec["area"].tobytes())


@pytest.mark.parametrize("embed", [True, False], ids=["embedded", "by-path"])
def test_data_random_byte_damage_is_never_read_silently(tmp_path, embed):
    """One byte changed anywhere in a shard (150 positions): the read either stops with a
    ShardError naming the shard (Parquet's own structure) or yields records of which the
    loaders skip the changed ones (``damaged``); no changed record passes as intact. Before,
    such flips also raised a bare ``UnicodeDecodeError`` (a file name no longer UTF-8) or
    ``ValueError: cannot reshape`` (list lengths) out of the reader, naming no file (seen)."""
    out, _ = _convert(tmp_path, embed=embed)
    path = out / read_manifest(out)["shards"][0]["file"]
    original = path.read_bytes()
    intact = {r["image_id"]: _content(r) for r in iter_records(out)}
    check = DetectionTransform(preset("tiny").data, train=False)
    outcomes = {"stopped": 0, "skipped": 0, "unchanged": 0}
    for pos in np.random.default_rng(0).integers(0, len(original), 150):
        damaged = bytearray(original)
        damaged[pos] ^= 0xFF
        path.write_bytes(bytes(damaged))
        try:
            records = list(iter_records(out))
        except ShardError as e:
            assert path.name in str(e)
            outcomes["stopped"] += 1
            continue
        for rec in records:
            try:
                check.check_integrity(rec)
                check.check_lists(rec)
            except ImageDecodeError as e:
                assert e.reason == "damaged"
                outcomes["skipped"] += 1
                continue
            assert intact.get(rec["image_id"]) == _content(rec), f"byte {pos}: a changed record read as intact"
            outcomes["unchanged"] += 1
    assert outcomes["skipped"] and outcomes["stopped"], outcomes


def test_data_labels_fingerprint_names_the_data_not_the_copy(tmp_path):
    """A resumed run must train on the data its checkpoint was trained on: another set of the
    same size (same steps per epoch) was resumed silently, its epoch position continuing in other
    images. The fingerprint is the same for a moved copy or another shard layout and row order,
    and differs when a box or an image differs."""
    import shutil

    from dino_scale.data.integrity import labels_fingerprint

    out, _ = _convert(tmp_path)
    base = labels_fingerprint(out)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    assert labels_fingerprint(moved) == base
    split, _ = _convert(tmp_path / "again", name="split", per_shard=1)  # 4 shards of 1 row
    assert len(read_manifest(split)["shards"]) == 4 and labels_fingerprint(split) == base
    doc = json.loads((tmp_path / "ann.json").read_text())
    doc["annotations"][0]["bbox"][2] = 21.0  # one box 1 pixel wider
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    convert_coco(tmp_path / "ann.json", tmp_path / "img", tmp_path / "changed", progress=False, shuffle_seed=None)
    assert labels_fingerprint(tmp_path / "changed") != base
    assert labels_fingerprint(f"{out},{tmp_path / 'changed'}") not in (base, labels_fingerprint(tmp_path / "changed"))

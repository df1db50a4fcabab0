"""Conversion order (convert_buckets): a training conversion writes its images in a seeded
random order, so every shard samples the whole id range; same seed, same bytes; resume and
'already converted' follow the seed."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from dino_scale.data import convert as convert_mod
from dino_scale.data import convert_passes, convert_write
from dino_scale.data import convert_coco, read_manifest
from pipelines import prepare_data

N = 120  # image ids 1..N, listed in id order (as Objects365 / COCO files roughly are)


def _box(iid: int, k: int) -> list[float]:
    return [float(iid % 50 + k), float(k), float(5 + iid % 7), 4.0]


@pytest.fixture
def ann(tmp_path):
    """An annotation JSON of N images (ids 1..N in id order; image ``i`` holds ``i % 3`` boxes
    that name it: :func:`_box`, category ``i % 4 + 1``); no image files (reference mode)."""
    images = [{"id": i, "file_name": f"img_{i:04d}.jpg", "width": 100, "height": 80} for i in range(1, N + 1)]
    anns = [{"id": 1000 * i + k, "image_id": i, "category_id": i % 4 + 1, "bbox": _box(i, k), "iscrowd": 0}
            for i in range(1, N + 1) for k in range(i % 3)]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 5)]}))
    return path


def _convert(ann, out, **kw):
    kw.setdefault("max_images_per_shard", 40)
    return convert_coco(ann, None, out, progress=False, check_files=False, **kw)


def _shard_ids(out) -> list[list[int]]:
    """Image ids of each shard, in row order."""
    return [pq.read_table(p, columns=["image_id"])["image_id"].to_pylist() for p in sorted(out.glob("shard-*.parquet"))]


def _shard_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.parquet"))}


def _check_records(out) -> None:
    """Every image exactly once, each with its own boxes and categories."""
    rows = [r for p in sorted(out.glob("shard-*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["image_id"] for r in rows) == list(range(1, N + 1))
    for r in rows:
        i = r["image_id"]
        assert r["file_name"] == f"img_{i:04d}.jpg"
        want = np.reshape([_box(i, k) for k in range(i % 3)], (-1, 4))
        np.testing.assert_allclose(np.reshape(r["boxes"], (-1, 4)), want)
        assert r["category_ids"] == [i % 4 + 1] * (i % 3)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_data_convert_buckets_shards_sample_the_whole_id_range(ann, tmp_path, seed):
    m = _convert(ann, tmp_path / "out", shuffle_seed=seed)
    shards = _shard_ids(tmp_path / "out")
    assert [len(s) for s in shards] == [40, 40, 40] and m["shuffle_seed"] == seed
    _check_records(tmp_path / "out")
    flat = sum(shards, [])
    assert flat != sorted(flat)
    for ids in shards:  # id order would give shard k only the k-th third
        assert {(i - 1) * 3 // N for i in ids} == {0, 1, 2}, ids
        assert ids != sorted(ids)


def test_data_convert_buckets_seed_decides_the_order(ann, tmp_path):
    _convert(ann, tmp_path / "a", shuffle_seed=5)
    _convert(ann, tmp_path / "b", shuffle_seed=5)
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")
    _convert(ann, tmp_path / "c", shuffle_seed=6)
    assert _shard_ids(tmp_path / "c") != _shard_ids(tmp_path / "a")
    m = _convert(ann, tmp_path / "plain", shuffle_seed=None)
    assert sum(_shard_ids(tmp_path / "plain"), []) == list(range(1, N + 1)) and m["shuffle_seed"] is None
    _check_records(tmp_path / "plain")
    # a folder converted with another seed is converted again, not taken as 'already converted'
    m = _convert(ann, tmp_path / "a", shuffle_seed=6)
    assert m["shuffle_seed"] == 6 and _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "c")
    assert read_manifest(tmp_path / "a")["shuffle_seed"] == 6
    with pytest.raises(ValueError, match="shuffle_seed"):
        _convert(ann, tmp_path / "bad", shuffle_seed=-1)


def test_data_convert_buckets_many_buckets_resume(ann, tmp_path, monkeypatch, cut_short_after):
    """Several buckets (written in a seeded order, each shuffled): an interrupted conversion
    resumes to the bytes of an uninterrupted one, every image once."""
    monkeypatch.setattr(convert_mod, "_BUCKET_BYTES", 1500)
    kw = dict(shuffle_seed=3, max_images_per_shard=15)
    ref = _convert(ann, tmp_path / "ref", **kw)
    assert ref["signature"]["buckets"] >= 4
    _check_records(tmp_path / "ref")
    ids = np.array(sum(_shard_ids(tmp_path / "ref"), []))
    nb = ref["signature"]["buckets"]  # rows come bucket by bucket
    buckets = convert_passes.bucket_of(ids, nb)
    runs = np.split(ids, np.flatnonzero(np.diff(buckets)) + 1)
    order = [int(convert_passes.bucket_of(r[:1], nb)[0]) for r in runs]
    assert sorted(order) == list(range(nb)) and order != sorted(order)
    assert all(list(r) != sorted(r) for r in runs)
    out = tmp_path / "run"
    with cut_short_after(3):
        _convert(ann, out, **kw)
    assert len(list(out.glob("shard-*.parquet"))) == 3 and not (out / "manifest.json").exists()
    # progress files cut short by the crash (written in place, they failed every later run with a
    # bare "Expecting value"): such a shard, and those after it, are done again
    progress = sorted(out.rglob("shard-00001.parquet.json")) + sorted(out.rglob("bucket-*.json"))[:1]
    assert len(progress) == 2
    for p in progress:
        p.write_text("")
    m = _convert(ann, out, **kw)
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "ref")
    assert {k: v for k, v in m.items() if k != "source"} == {k: v for k, v in ref.items() if k != "source"}


def test_data_convert_buckets_cli_and_o365_val(ann, tmp_path, capsys):
    base = ["--annotations", str(ann), "--images", str(tmp_path), "--no-check-files", "--quiet",
            "--max-images-per-shard", "40"]
    assert prepare_data.main(base + ["--out", str(tmp_path / "s"), "--shuffle-seed", "4"]) == 0
    assert read_manifest(tmp_path / "s")["shuffle_seed"] == 4
    assert prepare_data.main(base + ["--out", str(tmp_path / "n"), "--no-shuffle"]) == 0
    assert sum(_shard_ids(tmp_path / "n"), []) == list(range(1, N + 1))
    assert prepare_data.main(base + ["--out", str(tmp_path / "x"), "--shuffle-seed", "-2"]) == 2
    assert "--shuffle-seed must be >= 0" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # the paper's Objects365 split: the val part (evaluation) stays in file order, train_extra is shuffled
    res = _convert(ann, tmp_path / "o365", o365_val_split=30, shuffle_seed=2)
    assert res["val"]["shuffle_seed"] is None and res["train_extra"]["shuffle_seed"] == 2
    assert sum(_shard_ids(tmp_path / "o365" / "val"), []) == list(range(1, 31))
    extra = sum(_shard_ids(tmp_path / "o365" / "train_extra"), [])
    assert sorted(extra) == list(range(31, N + 1)) and extra != sorted(extra)


def test_data_convert_buckets_a_folder_of_an_earlier_release_is_kept(ann, tmp_path, capsys):
    """A folder an earlier release converted (rows in file order, no shuffle_seed in its
    manifest) is kept as converted, saying its rows are not shuffled, not converted again: that
    takes hours for Objects365. Another setting still converts again."""
    out = tmp_path / "old"
    _convert(ann, out, shuffle_seed=None)
    manifest_path = out / convert_mod.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    del manifest["signature"]["shuffle_seed"], manifest["signature"]["bucketing"]
    del manifest["shuffle_seed"]
    manifest_path.write_text(json.dumps(manifest))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}
    capsys.readouterr()
    kept = convert_coco(ann, None, out, progress=True, check_files=False, max_images_per_shard=40)
    assert "shuffle_seed" not in kept and {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")} == before
    said = capsys.readouterr()
    assert "earlier release" in said.out + said.err and "not shuffled" in said.out + said.err
    assert sum(_shard_ids(out), []) == list(range(1, N + 1))
    again = _convert(ann, out, max_images_per_shard=30)  # another setting: converted again, shuffled
    assert again["shuffle_seed"] == 0 and sum(_shard_ids(out), []) != list(range(1, N + 1))


def test_data_convert_buckets_image_pass_holds_one_file_at_a_time(ann, tmp_path, monkeypatch):
    """The image pass appends each bucket's rows in frames, so it runs under an open-file limit
    far below the number of buckets (it kept one writer open per bucket: a 4 GB JSON has 256
    buckets) and its many frames give the bytes of one frame per bucket."""
    import os
    import resource

    monkeypatch.setattr(convert_mod, "_BUCKET_BYTES", 1500)
    ref = _convert(ann, tmp_path / "ref", shuffle_seed=3)
    nb = ref["signature"]["buckets"]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(convert_passes, "_IMAGE_FLUSH_ROWS", 7)  # several frames in each bucket file
    nb_many = 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 24, hard))
    try:
        counts = convert_passes.scan_images(ann, None, work, nb_many, (0, None))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert counts["num_images"] == N and sum(counts["bucket_counts"]) == N
    rows = [convert_passes.read_image_rows(work / f"images-{b:05d}.arrow") for b in range(nb_many)]
    ids = sorted(i for t in rows if t is not None for i in t.column("image_id").to_pylist())
    assert ids == list(range(1, N + 1))
    for b, t in enumerate(rows):  # each bucket: its ids (convert_passes.bucket_of), in file order
        want = [i for i in range(1, N + 1) if convert_passes.bucket_of_id(i, nb_many) == b]
        assert (t.column("image_id").to_pylist() if t is not None else []) == want
    first = convert_passes.bucket_of_id(1, nb_many)
    # frames cut short are an error, not rows lost
    path = work / f"images-{first:05d}.arrow"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(convert_passes.ConversionError, match="cut short"):
        convert_passes.read_image_rows(path)
    # a whole conversion with many frames per bucket writes the bytes of one with one frame each
    _convert(ann, tmp_path / "frames", shuffle_seed=3)
    assert nb >= 4 and _shard_bytes(tmp_path / "frames") == _shard_bytes(tmp_path / "ref")


def test_data_convert_buckets_one_conversion_of_a_folder_at_a_time(ann, tmp_path, caplog):
    """Two pipelines sharing a work folder converted the same JSON into one folder at once, both
    deleting and rebuilding its work files (FileNotFoundError in one, or "manifest counts do not
    add up" in both). A conversion now holds the folder's lock: another waits, saying so, and
    converts (or finds the folder converted) once the lock is free."""
    import logging
    import threading
    import time

    from dino_scale.data import convert as convert_module
    from dino_scale.data.shards import folder_lock

    out = tmp_path / "out"
    ref = _convert(ann, tmp_path / "ref", shuffle_seed=3)
    result: dict = {}
    caplog.set_level(logging.INFO, logger="dino_scale.data.convert")
    with folder_lock(out / convert_module.LOCK_NAME, print, "test"):  # another process's conversion
        thread = threading.Thread(target=lambda: result.update(m=_convert(ann, out, shuffle_seed=3)))
        thread.start()
        # the conversion reaches the held lock and says it waits (polled: a loaded machine may
        # take longer than any fixed pause to get there; left before, it would never wait)
        deadline = time.monotonic() + 60
        while not any("another process is writing it; waiting" in r.getMessage() for r in caplog.records):
            assert thread.is_alive() and time.monotonic() < deadline, "the conversion never waited for the lock"
            time.sleep(0.05)
        assert thread.is_alive() and not list(out.glob("shard-*")) and not (out / ".convert-work").exists()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert any("another process is writing it; waiting" in r.getMessage() for r in caplog.records)
    assert result["m"]["num_images"] == N and _shard_bytes(out) == _shard_bytes(tmp_path / "ref")
    assert {k: v for k, v in result["m"].items() if k != "source"} == {
        k: v for k, v in ref.items() if k != "source"}


def test_data_convert_buckets_bucket_of_spreads_ids_at_a_common_step(tmp_path, monkeypatch):
    """Image ids spaced at a common step (here multiples of the bucket count) spread over the
    buckets: ``id % buckets`` sent them all to one, which the write pass holds whole. The numpy
    and per-row rules agree, negative and int64-extreme ids included."""
    rng = np.random.default_rng(0)
    ids = np.r_[rng.integers(-2**63, 2**63 - 1, 500, dtype=np.int64), [-1, 0, 1, 2**63 - 1, -2**63]]
    for nb in (1, 7, 64, 256):
        assert convert_passes.bucket_of(ids, nb).tolist() == [convert_passes.bucket_of_id(int(i), nb) for i in ids]
    n, nb = 400, 16
    images = [{"id": nb * 1000 * i, "file_name": f"i{i}.jpg", "width": 64, "height": 48} for i in range(1, n + 1)]
    anns = [{"id": i, "image_id": nb * 1000 * i, "category_id": 1, "bbox": [1.0, 2.0, 10.0, 12.0], "iscrowd": 0}
            for i in range(1, n + 1)]
    path = tmp_path / "stepped.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    monkeypatch.setattr(convert_mod, "_BUCKET_BYTES", path.stat().st_size // nb + 1)
    joined = []
    real_join = convert_write.join_bucket

    def counting_join(work, b, excluded):
        meta, ann, stats = real_join(work, b, excluded)
        joined.append((0 if meta is None else meta.num_rows, len(ann)))
        return meta, ann, stats

    monkeypatch.setattr(convert_write, "join_bucket", counting_join)  # where the write pass looks it up
    m = _convert(path, tmp_path / "out", max_images_per_shard=50)
    assert m["signature"]["buckets"] == nb and m["num_images"] == n and len(joined) == nb
    assert sum(r for r, _ in joined) == n and sum(a for _, a in joined) == n
    assert max(r for r, _ in joined) <= 3 * n // nb  # (was: all 400 in one bucket)


def test_data_convert_buckets_a_folder_bucketed_by_id_modulo_is_kept(ann, tmp_path, monkeypatch, capsys,
                                                                      cut_short_after):
    """A folder converted before images were bucketed by a hash (its signature lacks
    ``bucketing``) is as usable: kept as converted, not converted again. An unfinished
    conversion of that release (its work folder spilled by ``id % buckets``) is planned again,
    not joined by the new rule, which would lose rows."""
    monkeypatch.setattr(convert_mod, "_BUCKET_BYTES", 1500)
    out = tmp_path / "old"
    _convert(ann, out, shuffle_seed=3)
    manifest_path = out / convert_mod.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    del manifest["signature"]["bucketing"]
    manifest_path.write_text(json.dumps(manifest))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}
    capsys.readouterr()
    convert_coco(ann, None, out, progress=True, check_files=False, max_images_per_shard=40, shuffle_seed=3)
    said = capsys.readouterr().out
    assert "already converted" in said and "earlier release" not in said and "converting again" not in said
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")} == before

    part = tmp_path / "part"
    with cut_short_after(1):
        _convert(ann, part, shuffle_seed=3, max_images_per_shard=15)
    plan_path = part / ".convert-work" / "plan.json"
    plan = json.loads(plan_path.read_text())
    del plan["signature"]["bucketing"]  # as the earlier release planned it
    plan_path.write_text(json.dumps(plan))
    _convert(ann, part, shuffle_seed=3, max_images_per_shard=15)
    _check_records(part)


def test_data_convert_buckets_a_waiting_conversion_locks_anew_after_the_folder_went(tmp_path):
    """A refused conversion removes the folder it made, lock file included, while holding the lock.
    One that waited on that lock held it then on a file no path led to: a third conversion made a
    new lock file and ran beside it, and its writes failed in the removed folder. The waiter now
    finds the path gone and locks the new file (the folder made again)."""
    import fcntl
    import threading
    import time

    from dino_scale.data.shards import folder_lock

    folder = tmp_path / "new"
    lock = folder / ".lock"
    holding, removed, seen = threading.Event(), threading.Event(), []

    def refused_conversion():
        with folder_lock(lock, lambda msg: None, "first"):
            holding.set()
            removed.wait(10)
            lock.unlink()
            folder.rmdir()

    def waiting_conversion():
        with folder_lock(lock, lambda msg: None, "second"):
            seen.append(folder.is_dir() and lock.is_file())
            with open(lock) as other:  # the lock is on the file at the path: a third one must wait
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    seen.append("free")
                except BlockingIOError:
                    seen.append("held")

    first = threading.Thread(target=refused_conversion)
    first.start()
    assert holding.wait(10)
    second = threading.Thread(target=waiting_conversion)
    second.start()
    time.sleep(0.5)  # the second is waiting on the first's lock file
    removed.set()
    first.join(10)
    second.join(10)
    assert seen == [True, "held"], seen

"""Ray Data datasets: same samples as the local path, per-worker splits, decode-skip counts."""
from __future__ import annotations

import numpy as np
import pytest

from dino_scale.config import preset
from dino_scale.data import convert_coco, iter_records
from dino_scale.data.transforms import DetectionTransform

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def ray_session(ray_lock):
    """One local Ray for the whole check (Ray starts once: both parts run in one test)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, o365_like):
    root, ann = o365_like
    out = tmp_path_factory.mktemp("ray_shards")
    convert_coco(ann, root, out, embed_images=False, shard_size_mb=0.002, progress=False)
    return out, root


def test_data_ray_datasets(ray_session, shards, tmp_path, image_folders):
    _footer_reader_pool_sized_to_the_shards(shards)
    _train_rows_match_local_and_split(shards)
    _eval_and_decode_skips(shards, tmp_path)
    _folders_use_their_own_image_roots(image_folders)
    _shard_order_drawn_per_epoch(tmp_path)
    _rows_of_a_block_ordered_per_epoch(tmp_path)
    _train_records_of_unknown_categories_skipped(tmp_path)
    _records_changed_after_conversion_skipped(tmp_path)
    _unreadable_shard_named(tmp_path)
    _footer_change_ray_refuses_is_one_check_data_lists(tmp_path)
    _shard_damaged_at_its_size_refused_when_built(tmp_path)


def _list_files_op(ds):
    op = ds._logical_plan.dag
    while type(op).__name__ != "ListFiles":
        deps = op.input_dependencies
        assert deps, "no ListFiles operator in the plan: Ray's Parquet read path changed"
        op = deps[0]
    return op


def _footer_reader_pool_sized_to_the_shards(shards):
    """Ray's Parquet reader provisions 32 FooterReader actors per pass by default (measured here:
    this test 62 s -> 41 s with the pool sized to the shards); the datasets ask for one per 10
    shards, and a user's own RAY_DATA_PARQUET_FOOTER_NUM_ACTORS wins."""
    import os

    from dino_scale.data import build_eval_dataset, build_train_dataset, shard_paths
    from dino_scale.data.ray_data import footer_reader_count

    out, _ = shards
    n = len(shard_paths(out))
    assert [footer_reader_count(k) for k in (1, 10, 11, 95, 10_000)] == [1, 1, 2, 10, 32]
    cfg = preset("tiny").data
    for ds in (build_train_dataset(out, cfg), build_eval_dataset(out, cfg)):
        assert _list_files_op(ds).file_indexer._num_actors == -(-n // 10)
    assert "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS" not in os.environ  # set only while planning the read
    os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = "3"
    try:
        assert _list_files_op(build_eval_dataset(out, cfg)).file_indexer._num_actors == 3
    finally:
        del os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"]


def _train_rows_match_local_and_split(shards):
    from dino_scale.data import build_train_dataset, collate_numpy_batch, set_epoch

    out, _ = shards
    cfg = preset("tiny").data
    ds = build_train_dataset(out, cfg)  # epoch from the epoch clock, set by the training loop
    set_epoch(2)
    rows = ds.take_all()
    recs = {r["image_id"]: r for r in iter_records(out)}
    assert sorted(int(r["image_id"]) for r in rows) == sorted(recs)
    t = DetectionTransform(cfg, train=True, image_root=None)
    t.image_root = str(shards[1])
    for r in rows[:5]:
        s = t(recs[int(r["image_id"])], epoch=2)
        assert r["image"].dtype == np.uint8 and r["image"].shape[0] == 3
        np.testing.assert_array_equal(r["image"], s["image"].numpy())
        np.testing.assert_allclose(r["boxes"], s["boxes"].numpy())
        assert r["labels"].tolist() == s["labels"].tolist() and int(r["epoch"]) == 2
    set_epoch(3)  # the same dataset object, the next pass: epoch 3's draws
    again = {int(r["image_id"]): r for r in ds.take_all()}
    for r in rows[:5]:
        s3 = t(recs[int(r["image_id"])], epoch=3)
        np.testing.assert_array_equal(again[int(r["image_id"])]["image"], s3["image"].numpy())
        assert int(again[int(r["image_id"])]["epoch"]) == 3
    # per-worker shards: a 2-way streaming split covers every image exactly once
    its = ds.streaming_split(2, equal=False)
    import threading

    seen = [[], []]

    def consume(i):
        for b in its[i].iter_batches(batch_size=4, batch_format="numpy"):
            images, masks, targets = collate_numpy_batch(b)
            assert images.shape[0] == masks.shape[0] == len(targets)
            seen[i].extend(int(t["image_id"]) for t in targets)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    [th.start() for th in threads]
    [th.join(timeout=240) for th in threads]
    assert sorted(seen[0] + seen[1]) == sorted(recs) and not set(seen[0]) & set(seen[1])


def _eval_and_decode_skips(shards, tmp_path):
    from dino_scale.data import build_eval_dataset, decode_skips

    out, root = shards
    # break referenced files after conversion: the dataset drops and counts them; the first
    # 9 records span a whole preprocessing batch (8), so an all-dropped batch is covered too
    recs = list(iter_records(out))
    victims = recs[:9]
    import shutil

    broken_root = tmp_path / "root"
    shutil.copytree(root, broken_root)
    from dino_scale.data.image_paths import resolve_image_path

    p0 = resolve_image_path(broken_root, victims[0]["file_name"])
    p0.write_bytes(p0.read_bytes()[:200])
    resolve_image_path(broken_root, victims[1]["file_name"]).unlink()
    for v in victims[2:]:
        resolve_image_path(broken_root, v["file_name"]).write_bytes(b"")
    cfg = preset("tiny").data
    ds = build_eval_dataset(out, cfg, image_root=str(broken_root), stats_name="eval_skips_test")
    rows = ds.take_all()
    assert len(rows) == len(recs) - len(victims)
    assert all(max(r["size"]) <= cfg.eval_max_size for r in rows)
    stats = decode_skips("eval_skips_test")
    assert stats["count"] == 9 and sorted(stats["image_ids"]) == sorted(v["image_id"] for v in victims)
    assert stats["by_reason"] == {"corrupt": 1, "missing_file": 1, "empty_file": 7}
    # which reasons, not only how many: metrics per reason and one line for the run's end (was a count only)
    from dino_scale.data.ray_data import describe_skips, skip_metrics, skips_at_end

    assert skip_metrics("eval_skips_test") == {"data_skipped": 9, "data_skipped/corrupt": 1,
                                               "data_skipped/empty_file": 7, "data_skipped/missing_file": 1}
    assert skips_at_end("eval_skips_test") == skip_metrics("eval_skips_test")
    text = describe_skips("eval_skips_test")
    assert text.startswith("9 image(s) skipped at decode time (corrupt 1, empty_file 7, missing_file 1); "
                           f"image ids {sorted(v['image_id'] for v in victims)[:10]}"), text
    # a second pass over the same epoch (every worker of a deterministic run reads the whole
    # stream; a resume reads again what it skips) counts nothing new; another epoch does
    import ray

    from dino_scale.data.ray_data import _stats

    ds.take_all()
    assert decode_skips("eval_skips_test")["count"] == 9
    ray.get(_stats("eval_skips_test").record_skip.remote(victims[0]["image_id"], "corrupt", 1))
    assert decode_skips("eval_skips_test")["count"] == 10  # each image once in the ids and the line (were 10)
    assert decode_skips("eval_skips_test")["image_ids"] == sorted(v["image_id"] for v in victims)
    assert describe_skips("eval_skips_test").startswith("10 skips (once per epoch each) of 9 image(s) at decode")
    for image_id in (-5, -5, None, None):  # a negative id is an id (was recounted on every pass); None: no id
        ray.get(_stats("eval_skips_test").record_skip.remote(image_id, "damaged", 1))
    assert decode_skips("eval_skips_test")["count"] == 13
    # another run in this process (a second fit: same session, same actor) counts its own skips:
    # was 10 here with the intact root, and 10 again (not 9) after one more broken run
    clean = build_eval_dataset(out, cfg, image_root=str(root), stats_name="eval_skips_test")
    assert len(clean.take_all()) == len(recs) and decode_skips("eval_skips_test")["count"] == 0
    # (the validation root from data.val_image_root: the recorded root holds every image)
    val_cfg = preset("tiny", [f"data.val_image_root={broken_root}"]).data
    build_eval_dataset(out, val_cfg, stats_name="eval_skips_test").take_all()
    assert decode_skips("eval_skips_test")["count"] == 9


def _folders_use_their_own_image_roots(image_folders):
    """Two folders converted against different image roots with the same file names: every
    row decodes its own folder's image (the second folder's records were resolved against the
    first folder's root: its images missing, or the first's pixels under its boxes)."""
    from dino_scale.data import build_eval_dataset, build_train_dataset, decode_skips

    first, _ = image_folders.convert("first")
    second, _ = image_folders.convert("second")
    cfg = preset("tiny").data
    datasets = {"eval_folders_test": build_eval_dataset(f"{first},{second}", cfg, stats_name="eval_folders_test"),
                "train_folders_test": build_train_dataset([first, second], cfg, epoch=0,
                                                          stats_name="train_folders_test")}
    for name, ds in datasets.items():
        rows = ds.take_all()
        assert sorted(int(r["image_id"]) for r in rows) == [1, 2, 11, 12]
        for r in rows:
            image_folders.check_sample(int(r["image_id"]), r["image"], r["orig_size"].tolist())
        assert decode_skips(name)["count"] == 0


def _find_op(ds, type_name: str):
    ops = [ds._logical_plan.dag]
    while ops:
        op = ops.pop()
        if type(op).__name__ == type_name:
            return op
        ops.extend(op.input_dependencies)
    raise AssertionError(f"no {type_name} operator in the plan: Ray's plan changed")


def _shard_order_drawn_per_epoch(tmp_path):
    """Every epoch reads the shards in a new order, the same one on every pass over that epoch
    (a restarted run replays it) and for a dataset built for that fixed epoch. The order is
    drawn in the read, so the plan has no all-to-all step (``randomize_block_order`` waited for
    every shard to be read before the first row went on: the whole dataset in the object store)."""
    from ray.data._internal.logical.operators import AbstractAllToAll

    from dino_scale.data import build_train_dataset, set_epoch
    from dino_scale.data.synthetic import generate

    root, ann = generate(tmp_path / "raw_blocks", "coco-like", num_images=10, seed=9,
                         image_size=((32, 48), (40, 56)), max_objects=1, empty_fraction=0.0)
    out = tmp_path / "blocks"
    convert_coco(ann, root, out, embed_images=False, max_images_per_shard=1, progress=False)
    cfg = preset("tiny").data
    ds = build_train_dataset(out, cfg, stats_name="order_test")
    ops = [ds._logical_plan.dag]
    while ops:
        op = ops.pop()
        assert not isinstance(op, AbstractAllToAll), f"{type(op).__name__} in the training plan"
        ops.extend(op.input_dependencies)

    def order(dataset):
        dataset.context.execution_options.preserve_order = True  # rows in shard order
        return tuple(int(r["image_id"]) for r in dataset.take_all())

    orders = {}
    for epoch in (0, 1, 2, 1, 0):
        set_epoch(epoch, "order_test")
        orders.setdefault(epoch, set()).add(order(ds))
    assert all(len(o) == 1 for o in orders.values()), orders  # an epoch's order on every pass
    first, second, third = (orders[e].pop() for e in (0, 1, 2))
    assert len(first) == 10 and sorted(first) == sorted(second) == sorted(third)
    assert len({first, second, third}) == 3 and first != tuple(sorted(first))  # a repeat: a 1/10! chance
    assert order(build_train_dataset(out, cfg, epoch=1, stats_name="order_test")) == second


def _rows_of_a_block_ordered_per_epoch(tmp_path):
    """Within a shard (one read block here) the rows came in the conversion's order every epoch:
    now in an order drawn per epoch, the same on every pass over that epoch and for a dataset
    built for that fixed epoch; ``block_order=False`` (deterministic mode) keeps the shard's."""
    from dino_scale.data import build_train_dataset, set_epoch
    from dino_scale.data.synthetic import generate

    root, ann = generate(tmp_path / "raw_rows", "coco-like", num_images=12, seed=4,
                         image_size=((32, 48), (40, 56)), max_objects=1, empty_fraction=0.0)
    out = tmp_path / "rows"
    convert_coco(ann, root, out, embed_images=False, progress=False)
    stored = tuple(int(r["image_id"]) for r in iter_records(out))
    cfg = preset("tiny").data

    def order(dataset):
        dataset.context.execution_options.preserve_order = True
        return tuple(int(r["image_id"]) for r in dataset.take_all())

    ds, kept = build_train_dataset(out, cfg, stats_name="rows_test"), build_train_dataset(
        out, cfg, stats_name="rows_test", block_order=False)
    orders = {}
    for epoch in (0, 1, 0):
        set_epoch(epoch, "rows_test")
        orders.setdefault(epoch, set()).add(order(ds))
        assert order(kept) == stored
    assert all(len(o) == 1 for o in orders.values()), orders
    first, second = orders[0].pop(), orders[1].pop()
    assert sorted(first) == sorted(second) == sorted(stored)
    assert len({first, second, stored}) == 3  # a repeat: a 1/12! chance each
    assert order(build_train_dataset(out, cfg, epoch=1, stats_name="rows_test")) == second


def test_data_ray_epoch_clock_survives_ray_restart(ray_lock):
    """Actor handles are per Ray session: after shutdown + init in the same process the
    epoch clock and skip counter are found again (a stale handle used to raise)."""
    import ray

    from dino_scale.data import current_epoch, decode_skips, set_epoch

    for epoch in (1, 3):
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        try:
            assert current_epoch() == 0  # a fresh session starts at epoch 0
            set_epoch(epoch)
            assert current_epoch() == epoch
            assert decode_skips()["count"] == 0
        finally:
            ray.shutdown()


def test_data_ray_plan_unpickles_without_torch(shards):
    """Ray's SplitCoordinator, DatasetManager and TrainController actors unpickle the
    datasets' plans, never run them: that must not import torch or torchvision (each of those
    actors used to, ~5 s of CPU and a few hundred MB each). The map function builds its
    transform where it runs, and gives the samples of a transform built up front."""
    import pickle
    import subprocess
    import sys

    from dino_scale.data import ray_data
    from dino_scale.data.transforms import DetectionTransform

    cfg = preset("tiny").data
    fn = ray_data._ToSample(cfg, True, str(shards[1]), 2, "train")
    blob = pickle.dumps(fn)
    probe = ("import pickle, sys; fn = pickle.loads(sys.stdin.buffer.read()); "
             "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], input=blob, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().strip() == "[]"

    rec = next(iter_records(shards[0]))
    n = len(rec["category_ids"])
    rec = {**rec, "boxes": np.asarray(rec["boxes"], np.float32).reshape(n, 4),
           "category_ids": np.asarray(rec["category_ids"], np.int64), "iscrowd": np.asarray(rec["iscrowd"], bool)}
    unpickled = pickle.loads(blob)
    assert unpickled._transform is None
    got = unpickled.transform(rec, epoch=2)
    want = DetectionTransform(cfg, train=True, image_root=str(shards[1]))(rec, epoch=2)
    assert np.array_equal(got["image"].numpy(), want["image"].numpy())
    assert np.array_equal(got["boxes"].numpy(), want["boxes"].numpy())


def _train_records_of_unknown_categories_skipped(tmp_path):
    """Training rows whose record holds a category id the manifest does not list are dropped and
    counted (their labels would reach the loss outside the class head sized from the manifest);
    see tests/data/test_data_bad_input.py for the local loader."""
    from test_data_bad_input import drop_manifest_category

    from dino_scale.data import build_train_dataset, decode_skips
    from dino_scale.data.synthetic import generate

    root, ann = generate(tmp_path / "raw_unknown", "coco-like", num_images=6, seed=11,
                         image_size=((32, 48), (40, 56)), max_objects=2, empty_fraction=0.0)
    out = tmp_path / "unknown"
    convert_coco(ann, root, out, embed_images=True, progress=False)
    recs = list(iter_records(out))
    dropped = int(recs[0]["category_ids"][0])
    victims = sorted(int(r["image_id"]) for r in recs if dropped in set(map(int, r["category_ids"])))
    drop_manifest_category(out, dropped)
    rows = build_train_dataset(out, preset("tiny").data, epoch=0, stats_name="train_unknown_test").take_all()
    assert sorted(int(r["image_id"]) for r in rows) == sorted(set(int(r["image_id"]) for r in recs) - set(victims))
    stats = decode_skips("train_unknown_test")
    assert stats["by_reason"] == {"unknown_category": len(victims)} and sorted(stats["image_ids"]) == victims


def _records_changed_after_conversion_skipped(tmp_path):
    """A record whose labels or embedded bytes no longer match the checksums written at
    conversion is dropped and counted (``damaged``) by the Ray datasets too: their rows reach
    the check as Ray's numpy batches, not as iter_records' lists (see
    tests/data/test_data_integrity.py for the local loader)."""
    import struct

    from test_data_integrity import BOX, _convert, _replace_in_shard

    from dino_scale.data import build_eval_dataset, build_train_dataset, decode_skips

    out, images = _convert(tmp_path / "damaged")
    jpeg = images[3]
    mid = len(jpeg) // 2
    _replace_in_shard(out, jpeg[mid - 8: mid + 8], bytes(b ^ 0x10 for b in jpeg[mid - 8: mid + 8]))
    _replace_in_shard(out, struct.pack("<f", BOX), struct.pack("<f", BOX + 8))
    cfg = preset("tiny").data
    train = build_train_dataset(out, cfg, epoch=0, stats_name="train_damaged_test").take_all()
    evaluated = build_eval_dataset(out, cfg, stats_name="eval_damaged_test").take_all()
    for rows, name in ((train, "train_damaged_test"), (evaluated, "eval_damaged_test")):
        assert sorted(int(r["image_id"]) for r in rows) == [1, 4]
        stats = decode_skips(name)
        assert stats["by_reason"] == {"damaged": 2} and stats["image_ids"] == [2, 3]
    # a file name whose bytes are no longer UTF-8 (its column stored uncompressed here, so the byte
    # can be changed in place): Ray's numpy conversion failed the whole batch on it ("Wrapping
    # ...jpg failed", seen); the rows are converted by the map function now, and it is skipped
    import json

    import pyarrow.parquet as pq

    named, _ = _convert(tmp_path / "bad_name")
    manifest = json.loads((named / "manifest.json").read_text())
    shard = named / manifest["shards"][0]["file"]
    pq.write_table(pq.read_table(shard), shard, compression="NONE", use_dictionary=False)
    manifest["shards"][0]["bytes"] = shard.stat().st_size
    (named / "manifest.json").write_text(json.dumps(manifest))
    _replace_in_shard(named, b"3.jpg", b"\xff.jpg")
    rows = build_eval_dataset(named, cfg, stats_name="eval_bad_name_test").take_all()
    assert sorted(int(r["image_id"]) for r in rows) == [1, 2, 4]
    assert decode_skips("eval_bad_name_test")["by_reason"] == {"damaged": 1}


def _unreadable_shard_named(tmp_path):
    """Damage Parquet itself trips over (here a compressed column) fails Ray Data's read; a run
    ended with "WorkerGroupError: Training failed due to worker errors:" and the file's name only
    in Ray's logs (seen, `pipelines.pretrain_o365` on such a folder). ``unreadable_shard`` finds
    the shard in Ray's real error, wrapped as Ray Train wraps it, and names it."""
    import pyarrow.parquet as pq
    import ray.train

    from test_data_integrity import _convert

    from dino_scale.data import ShardError, build_train_dataset
    from dino_scale.data.ray_data import unreadable_shard

    out, _ = _convert(tmp_path / "unreadable")
    path = next(out.glob("shard-*.parquet"))
    chunk = next(c for rg in [pq.ParquetFile(path).metadata.row_group(0)] for c in map(rg.column, range(rg.num_columns))
                 if c.path_in_schema == "file_name")
    data = bytearray(path.read_bytes())
    at = (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size // 2
    data[at: at + 4] = bytes(b ^ 0x5A for b in data[at: at + 4])
    path.write_bytes(bytes(data))
    with pytest.raises(Exception) as raised:
        build_train_dataset(out, preset("tiny").data, epoch=0, stats_name="train_unreadable_test").take_all()
    failed = ray.train.WorkerGroupError("Training failed due to worker errors:", {0: raised.value})
    error = unreadable_shard(failed, [None, str(out)])
    assert isinstance(error, ShardError)
    assert str(error).startswith(f"{out}: {path.name} cannot be read: OSError: ZSTD decompression failed")
    assert f"dino-scale check-data {out}" in str(error)
    assert unreadable_shard(RuntimeError("another failure"), [str(out)]) is None


def _footer_change_ray_refuses_is_one_check_data_lists(tmp_path):
    """A footer bit flip that ``pq.ParquetFile`` reads past and Ray Data's reader refuses (see
    test_data_integrity.py): the real Ray read fails on it, and check-data lists the shard."""
    from test_data_integrity import _convert, footer_changes_ray_refuses

    from dino_scale.data import build_train_dataset
    from dino_scale.data.integrity import check_dataset

    out, _ = _convert(tmp_path / "footer_bit", extra_boxes=True)
    path = next(out.glob("shard-*.parquet"))
    _, refused = footer_changes_ray_refuses(path, bits=(0x10,))
    path.write_bytes(refused[0])
    with pytest.raises(Exception, match="expected length|Negative size"):
        build_train_dataset(out, preset("tiny").data, epoch=0, stats_name="train_footer_bit_test").take_all()
    assert [u["file"] for u in check_dataset(out)["unreadable"]] == [path.name]


def _shard_damaged_at_its_size_refused_when_built(tmp_path):
    """A column renamed in a shard's footer (same size: the manifest agrees) is refused by name
    where the dataset is built (data.preflight), before Ray Data plans a read. Before, the build
    passed and every epoch dropped each record of that shard as ``damaged`` (all 4 here)."""
    from test_data_integrity import _convert

    from dino_scale.data import ShardError, build_eval_dataset, build_train_dataset

    out, _ = _convert(tmp_path / "renamed")
    path = next(out.glob("shard-*.parquet"))
    path.write_bytes(path.read_bytes().replace(b"category_ids", b"category_idz"))
    needle = rf"{path.name} does not hold the record columns \(category_ids is missing"
    with pytest.raises(ShardError, match=needle):
        build_train_dataset(out, preset("tiny").data, epoch=0, stats_name="train_renamed_test")
    with pytest.raises(ShardError, match=needle):
        build_eval_dataset(out, preset("tiny").data, stats_name="eval_renamed_test")


def test_data_ray_exif_ties_counted_once_per_image(ray_session, tmp_path):
    """Under ``data.exif_orientation=auto`` an image whose EXIF tag keeps its size (here 3, rotate
    180) is a tie the annotated size cannot decide: it was turned upright silently; the Ray
    datasets now count each such image once, over passes and tasks (:func:`exif_ties`), apart from
    the decode skips (it is not dropped). ``stored`` decides, so nothing is counted."""
    import io
    import json

    from PIL import Image

    from dino_scale.data import build_eval_dataset, decode_skips, exif_ties

    root = tmp_path / "img"
    root.mkdir()
    images, anns = [], []
    for i in range(1, 6):
        im = Image.new("RGB", (30, 12), (i * 40, 0, 0))
        exif = im.getexif()
        exif[0x0112] = 3 if i <= 3 else 1  # three ties, two untagged images
        buf = io.BytesIO()
        im.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
        (root / f"{i}.jpg").write_bytes(buf.getvalue())
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 30, "height": 12})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 5, 6], "area": 30, "iscrowd": 0})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    out = tmp_path / "shards"
    convert_coco(ann, root, out, embed_images=True, progress=False)
    for mode, expected in (("auto", [1, 2, 3]), ("stored", [])):
        cfg = preset("tiny", [f"data.exif_orientation={mode}"]).data
        name = f"eval_ties_{mode}_test"
        for _ in range(2):  # two passes: each image is counted once
            assert len(build_eval_dataset(out, cfg, stats_name=name).take_all()) == 5
        ties = exif_ties(name)
        assert ties["image_ids"] == expected and ties["count"] == len(expected) and not ties["capped"]
        assert decode_skips(name)["count"] == 0
    # one bookkeeping actor per stats name (epoch, skips and ties; was an actor each), on the
    # driver's node (was: the ties' actor made by the first map task that found one, on its node)
    import ray
    import ray._private.state as ray_state

    actors = [a for a in ray_state.actors().values() if a["Name"].startswith("dino_scale_")
              and a["State"] == "ALIVE" and a["Name"].endswith(("_auto_test", "_stored_test"))]
    assert sorted(a["Name"] for a in actors) == ["dino_scale_data_stats:eval_ties_auto_test",
                                                 "dino_scale_data_stats:eval_ties_stored_test"], actors
    assert {a["Address"]["NodeID"] for a in actors} == {ray.get_runtime_context().get_node_id()}

"""How a training pass over Ray Data shards starts: the shard order drawn by an all-to-all
``randomize_block_order`` step (before) against the order drawn in the Parquet read (now).

For each plan and round: a new process with a fresh local Ray (``--cpus`` logical CPUs), the training dataset of
``dino_scale.data.build_train_dataset`` over shards of embedded 640x480 JPEGs (the shards are
the same for every round), and the time until its first batch of 2 samples reaches the
consumer, with the object store's use and what Ray had spilled to disk by then (its memory
summary). The object store is made smaller than the shards (``--object-store-mb``), as a real
dataset is larger than any node's store. The before-plan is
rebuilt from the same pieces: the read without an order, then ``randomize_block_order``, then
the same augmentation. Rounds alternate the plans; medians are reported.

    python benchmarks/data_stream_start.py                    # 48 shards x 32 images, 3 rounds
    python benchmarks/data_stream_start.py --shards 16 --rounds 1   # a quick check

Results: a table on stdout and JSON in benchmarks/results/data_stream_start.json
(``--results-dir`` elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
PLANS = ("randomize_block_order (before)", "order drawn in the read (now)")


def make_shards(workdir: Path, shards: int, per_shard: int) -> Path:
    from data_pipeline import _jpegs

    from dino_scale.data import convert_coco

    n = shards * per_shard
    root = workdir / "images"
    root.mkdir(parents=True)
    for i, data in enumerate(_jpegs(n, seed=3), 1):
        (root / f"{i}.jpg").write_bytes(data)
    doc = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in range(1, n + 1)],
           "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 20, 100, 80], "iscrowd": 0}
                           for i in range(1, n + 1)], "categories": [{"id": 1, "name": "a"}]}
    (workdir / "ann.json").write_text(json.dumps(doc))
    out = workdir / "shards"
    convert_coco(workdir / "ann.json", root, out, embed_images=True, max_images_per_shard=per_shard, progress=False)
    return out


def _object_store_mib() -> tuple[float, float]:
    """(MiB in the object store, MiB spilled to disk so far) from Ray's memory summary."""
    from ray._private.internal_api import memory_summary

    text = memory_summary(stats_only=True)
    used = re.search(r"Plasma memory usage\s+([\d.]+)\s*MiB", text)
    spilled = re.search(r"Spilled\s+([\d.]+)\s*MiB", text)
    return float(used.group(1)) if used else float("nan"), float(spilled.group(1)) if spilled else 0.0


def _build(plan: str, shards: Path, cfg):
    from dino_scale.data import ray_data

    if plan == PLANS[1]:
        return ray_data.build_train_dataset(shards, cfg)
    ray_data._stats("train")
    ds, root = ray_data._read_records(shards, None, None)  # no order: as listed
    return ds.randomize_block_order(seed=int(cfg.seed)).map_batches(
        ray_data._ToSample(cfg, True, root, None, "train", ray_data.category_ids(shards)),
        batch_size=ray_data._BATCH, batch_format="pyarrow")


def one_round(plan: str, shards: Path, cpus: int, store_mb: int) -> dict:
    import ray

    from dino_scale.config import preset

    cfg = preset("r50_4scale").data
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=store_mb * 1024 * 1024)
    try:
        ds = _build(plan, shards, cfg)
        ds.context.enable_progress_bars = False
        t = time.perf_counter()
        it = iter(ds.iter_batches(batch_size=2, batch_format="numpy", prefetch_batches=0))
        next(it)
        first = time.perf_counter() - t
        used, spilled = _object_store_mib()
        return {"first_batch_s": first, "object_store_mib": used, "spilled_mib": spilled}
    finally:
        ray.shutdown()


def round_in_child(plan: str, shards: Path, cpus: int, store_mb: int) -> dict:
    """:func:`one_round` in a fresh process: a pass left after its first batch keeps threads of
    its own, and the next ``ray.init`` in the same process met them."""
    import subprocess

    cmd = [sys.executable, __file__, "--child-plan", plan, "--child-shards", str(shards), "--cpus", str(cpus),
           "--object-store-mb", str(store_mb)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"round {plan!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child-plan", choices=PLANS, help=argparse.SUPPRESS)
    p.add_argument("--child-shards", help=argparse.SUPPRESS)
    p.add_argument("--shards", type=int, default=48)
    p.add_argument("--per-shard", type=int, default=32, help="images per shard")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--object-store-mb", type=int, default=100,
                   help="the local Ray's object store (default 100 MB: smaller than the shards)")
    p.add_argument("--results-dir", default=str(RESULTS))
    a = p.parse_args(argv)
    if a.child_plan:
        print(json.dumps(one_round(a.child_plan, Path(a.child_shards), a.cpus, a.object_store_mb)), flush=True)
        os._exit(0)  # the abandoned pass's threads would hold the exit
    if min(a.shards, a.per_shard, a.rounds, a.cpus) < 1:
        p.error("--shards, --per-shard, --rounds and --cpus must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        shards = make_shards(Path(tmp), a.shards, a.per_shard)
        mb = sum(f.stat().st_size for f in shards.glob("*.parquet")) / 1e6
        print(f"{a.shards} shards x {a.per_shard} embedded 640x480 JPEGs, {mb:.0f} MB "
              f"(made in {time.perf_counter() - t:.0f} s)", flush=True)
        runs: dict[str, list[dict]] = {k: [] for k in PLANS}
        for r in range(a.rounds):
            for plan in (PLANS if r % 2 == 0 else PLANS[::-1]):
                runs[plan].append(round_in_child(plan, shards, a.cpus, a.object_store_mb))
                print(f"  round {r + 1} {plan}: {runs[plan][-1]}", flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
    print(f"\nfirst batch of a training pass, median of {a.rounds} rounds ({a.cpus} logical CPUs)")
    print(f"(object store {a.object_store_mb} MB; its use and what was spilled to disk when the first batch came)")
    print(f"{'plan':<34}{'first batch (s)':>18}{'object store (MiB)':>20}{'spilled (MiB)':>16}")
    for k in PLANS:
        m = med[k]
        print(f"{k:<34}{m['first_batch_s']:>18.2f}{m['object_store_mib']:>20.0f}{m['spilled_mib']:>16.0f}")
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "shards": a.shards,
           "images_per_shard": a.per_shard, "megabytes": mb, "object_store_mb": a.object_store_mb, "cpus": a.cpus,
           "rounds": runs, "median": med,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_average": os.getloadavg()}
    res = Path(a.results_dir)
    res.mkdir(parents=True, exist_ok=True)
    (res / "data_stream_start.json").write_text(json.dumps(out, indent=2))
    print(f"JSON: {res / 'data_stream_start.json'}")


if __name__ == "__main__":
    main()

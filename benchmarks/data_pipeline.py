"""Data pipeline benchmarks: augmentation throughput and Objects365-scale conversion.

(a) ``throughput``: decode + DINO train augmentation of 640x480 JPEGs on one CPU core
    (``torch.set_num_threads(1)``), this project's pipeline (PIL decode, uint8
    torchvision.transforms.v2 geometry, normalization left to the GPU via
    ``normalize_batch``) side by side with a reference-style pipeline (PIL decode, DINO
    resize, flip, to float, normalize on the CPU). Rounds alternate between the two;
    the median images/s of the rounds is reported.
(c) ``check``: ``dino-scale check-data`` (``data.integrity.check_dataset``) over a folder of
    embedded 640x480 JPEGs at 1, 2 and 4 worker threads, against a plain read of the same
    shards (``pyarrow`` batches to Python, no checks), rounds alternating; MB/s and images/s.
(b) ``conversion``: writes a COCO-format JSON shaped like Objects365 (1.74M images,
    25M boxes, no image files), converts it in a subprocess (peak RSS from
    ``getrusage``), then loads the same file with ``pycocotools.coco.COCO`` in a
    subprocess capped with ``RLIMIT_AS`` (reports "failed at limit" if it runs out).

    python benchmarks/data_pipeline.py                 # all three, full size
    python benchmarks/data_pipeline.py --small         # quick: 20k images / 290k boxes
    python benchmarks/data_pipeline.py --part throughput
    python benchmarks/data_pipeline.py --part check --small
Results: a table on stdout and JSON in benchmarks/results/data_pipeline[_small][_<part>].json
(``--results-dir`` elsewhere).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------- (b)
def write_o365_like_json(path: Path, num_images: int, num_boxes: int, seed: int = 0) -> None:
    """COCO-format JSON with Objects365's shape: nested file names, isfake/isreflected."""
    rng = np.random.default_rng(seed)
    per_image = rng.multinomial(num_boxes, np.full(num_images, 1.0 / num_images))
    with open(path, "w") as fh:
        fh.write('{"info": {"description": "o365-scale synthetic"}, "licenses": [], "images": [')
        step = 100_000
        for s in range(0, num_images, step):
            ids = np.arange(s, min(num_images, s + step))
            w = rng.integers(400, 1025, len(ids)); h = rng.integers(300, 769, len(ids))
            fh.write(("," if s else "") + ",".join(
                f'{{"height": {hh}, "id": {i + 1}, "license": 5, "width": {ww}, '
                f'"file_name": "images/v1/patch{i // 34000}/objects365_v1_{i + 1:08d}.jpg"}}'
                for i, ww, hh in zip(ids.tolist(), w.tolist(), h.tolist())))
        fh.write('], "annotations": [')
        image_of = np.repeat(np.arange(1, num_images + 1), per_image)
        step = 500_000
        for s in range(0, num_boxes, step):
            n = min(step, num_boxes - s)
            xy = rng.uniform(0, 300, (n, 2)).round(2); wh = rng.uniform(1, 200, (n, 2)).round(2)
            cats = rng.integers(1, 366, n); fake = (rng.random(n) < 0.01).astype(int)
            fh.write(("," if s else "") + ",".join(
                f'{{"id": {s + k + 1}, "iscrowd": 0, "isfake": {f}, "isreflected": 0, "bbox": [{x}, {y}, {bw}, {bh}], '
                f'"image_id": {im}, "area": {round(bw * bh, 2)}, "category_id": {c}}}'
                for k, (im, x, y, bw, bh, c, f) in enumerate(zip(
                    image_of[s:s + n].tolist(), xy[:, 0].tolist(), xy[:, 1].tolist(), wh[:, 0].tolist(),
                    wh[:, 1].tolist(), cats.tolist(), fake.tolist()))))
        fh.write('], "categories": [' + ",".join(
            f'{{"id": {i}, "name": "class{i}", "supercategory": "s"}}' for i in range(1, 366)) + "]}")


_CONVERT = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from dino_scale.data import convert_coco
def vmhwm_kb():  # peak RSS of this process image (ru_maxrss would carry the parent's over fork+exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
t = time.time()
m = convert_coco({ann!r}, None, {out!r}, check_files=False, progress=True)
print("RESULT", json.dumps({{"seconds": time.time() - t, "num_images": m["num_images"], "num_boxes": m["num_boxes"],
      "shards": len(m["shards"]), "maxrss_kb": vmhwm_kb(),
      "child_maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
      "cpu_s": sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))}}))
"""

_PYCOCO = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
t = time.time()
try:
    from pycocotools.coco import COCO
    c = COCO({ann!r})
    out = {{"ok": True, "seconds": time.time() - t, "num_anns": len(c.anns)}}
except MemoryError:
    out = {{"ok": False, "error": "MemoryError (failed at limit)", "seconds": time.time() - t}}
out["maxrss_kb"] = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("RESULT", json.dumps(out), flush=True)
"""


def _run_child(code: str, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"ok": False, "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"}


def _meminfo_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / (1 << 20)
    return float("inf")


def run_pycocotools(ann: Path, limit_gb: float, min_free_gb: float = 3.0) -> dict:
    """COCO(ann) in a child capped by RLIMIT_AS; a watchdog stops it (and says so) when the
    machine's available memory drops below ``min_free_gb``, since other work shares it."""
    limit = int(limit_gb * (1 << 30))
    proc = subprocess.Popen([sys.executable, "-c", _PYCOCO.format(limit=limit, ann=str(ann))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_kb, stopped, t = 0, None, time.time()
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        except OSError:
            pass
        if _meminfo_available_gb() < min_free_gb:
            stopped = f"stopped by the watchdog at {peak_kb / (1 << 20):.1f} GB RSS: machine memory low"
            proc.kill()
            break
        time.sleep(0.2)
    out, err = proc.communicate()
    res = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")), None)
    if res is None:
        res = {"ok": False, "error": stopped or f"exit {proc.returncode}: {err.strip().splitlines()[-1:]}",
               "seconds": time.time() - t}
    res["watchdog_peak_rss_mb"] = peak_kb / 1024
    res["peak_rss_mb"] = max(res.get("maxrss_kb", 0), peak_kb) / 1024
    res["limit_gb"] = limit_gb
    return res


def bench_conversion(num_images: int, num_boxes: int, coco_limit_gb: float, keep: bool, workdir: Path) -> dict:
    ann = workdir / f"o365_scale_{num_images}_{num_boxes}.json"
    t = time.time()
    if not ann.is_file():
        write_o365_like_json(ann, num_images, num_boxes)
    gen_s = time.time() - t
    print(f"JSON ready ({ann.stat().st_size / 1e9:.2f} GB, {gen_s:.0f}s); converting", flush=True)
    out = workdir / "shards"
    import shutil
    shutil.rmtree(out, ignore_errors=True)  # a finished manifest would make the converter a no-op
    res = _run_child(_CONVERT.format(root=str(ROOT), ann=str(ann), out=str(out)), timeout=3600)
    result = {"images": num_images, "boxes": num_boxes, "json_bytes": ann.stat().st_size, "generate_s": gen_s,
              "convert_s": res.get("seconds"), "convert_peak_rss_mb": res.get("maxrss_kb", 0) / 1024,
              "image_pass_child_peak_rss_mb": res.get("child_maxrss_kb", 0) / 1024,
              "convert_cpu_s": res.get("cpu_s"), "load_average_after": os.getloadavg(),
              "convert_result": res}
    result["pycocotools"] = run_pycocotools(ann, coco_limit_gb)
    if not keep:
        ann.unlink()
        import shutil
        shutil.rmtree(out, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------- (a)
def _jpegs(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    from dino_scale.data.synthetic import _background
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(_background(rng, 480, 640)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _reference_pipeline(scales, max_size):
    """PIL decode, DINO resize (PIL), flip, to float tensor, normalize: all on the CPU."""
    import random

    import torch
    import torchvision.transforms.functional as TF
    from PIL import Image

    from dino_scale.data.transforms import dino_resize_size
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

    def run(data: bytes, boxes: np.ndarray):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        if random.random() < 0.5:
            img = TF.hflip(img)
            boxes = boxes[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1]) + np.array([img.width, 0, img.width, 0])
        oh, ow = dino_resize_size((img.height, img.width), random.choice(scales), max_size)
        ratio = np.array([ow / img.width, oh / img.height] * 2)
        img = img.resize((ow, oh), Image.BILINEAR)
        t = TF.normalize(TF.to_tensor(img), mean, std)
        return t, torch.as_tensor(boxes * ratio, dtype=torch.float32)
    return run


def bench_throughput(num_images: int, rounds: int) -> dict:
    import torch

    from dino_scale.config import DataConfig
    from dino_scale.data.transforms import DetectionTransform
    torch.set_num_threads(1)
    cfg = DataConfig()
    jpegs = _jpegs(num_images)
    boxes = np.array([[100, 80, 300, 240], [20, 30, 60, 90]], dtype=np.float32)
    ref = _reference_pipeline(cfg.train_scales, cfg.train_max_size)
    ours = DetectionTransform(cfg, train=True)
    recs = [{"image_id": i, "image": b, "width": 640, "height": 480,
             "boxes": np.array([[100, 80, 200, 160], [20, 30, 40, 60]], np.float32),
             "category_ids": np.array([1, 2]), "iscrowd": np.zeros(2, bool), "area": np.ones(2, np.float32)}
            for i, b in enumerate(jpegs)]
    for r in recs[:3]:  # warm up both
        ref(r["image"], boxes); ours(r)
    # images per CPU-second of this (single-threaded) process = images/s on one core, robust
    # to other processes sharing the machine; wall-clock rates are recorded too.
    res = {"reference": [], "ours": [], "reference_wall": [], "ours_wall": []}
    for k in range(rounds):
        for name, fn in (("reference", lambda r: ref(r["image"], boxes)), ("ours", lambda r: ours(r, epoch=k))):
            c, t = time.process_time(), time.perf_counter()
            for r in recs:
                fn(r)
            res[name].append(len(recs) / (time.process_time() - c))
            res[name + "_wall"].append(len(recs) / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in res.items()}
    return {"images_per_round": num_images, "rounds": rounds, "per_round": res,
            "reference_img_s_core": med["reference"], "ours_img_s_core": med["ours"],
            "reference_img_s_wall": med["reference_wall"], "ours_img_s_wall": med["ours_wall"],
            "speedup": med["ours"] / med["reference"], "load_average": os.getloadavg()}


# ----------------------------------------------------------------------------- (c)
def bench_check(num_images: int, rounds: int, workdir: Path) -> dict:
    import pyarrow.parquet as pq

    from dino_scale.data import convert_coco, read_manifest, shard_paths
    from dino_scale.data.integrity import check_dataset

    root = workdir / "images"
    root.mkdir(parents=True)
    for i, data in enumerate(_jpegs(num_images, seed=1), 1):
        (root / f"{i}.jpg").write_bytes(data)
    doc = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480}
                      for i in range(1, num_images + 1)],
           "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 20, 100, 80], "iscrowd": 0}
                           for i in range(1, num_images + 1)], "categories": [{"id": 1, "name": "a"}]}
    (workdir / "ann.json").write_text(json.dumps(doc))
    out = workdir / "shards"
    convert_coco(workdir / "ann.json", root, out, embed_images=True, shard_size_mb=16, progress=False)
    paths = shard_paths(out)
    total_mb = sum(p.stat().st_size for p in paths) / 1e6

    def plain_read():
        for p in paths:
            for batch in pq.ParquetFile(p).iter_batches(batch_size=64):
                batch.to_pylist()

    runs = {"plain read (1 thread)": plain_read}
    for w in (1, 2, 4):
        runs[f"check_dataset workers={w}"] = (lambda w=w: check_dataset(out, workers=w))
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"images": num_images, "shards": len(paths), "megabytes": total_mb, "rounds": rounds,
            "seconds": times, "median_s": med, "mb_per_s": {k: total_mb / v for k, v in med.items()},
            "images_per_s": {k: num_images / v for k, v in med.items()},
            "manifest_images": read_manifest(out)["num_images"], "load_average": os.getloadavg()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "throughput", "conversion", "pycocotools", "check"], default="all",
                   help="pycocotools: only load an existing --json with COCO() (memory-capped)")
    p.add_argument("--json", default=None, help="for --part pycocotools")
    p.add_argument("--small", action="store_true", help="quick run: fewer images, 20k-image conversion")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--coco-limit-gb", type=float, default=12.0, help="address-space cap for pycocotools")
    p.add_argument("--workdir", default=None, help="where the big JSON goes (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated JSON and shards")
    p.add_argument("--results-dir", default=str(RESULTS),
                   help="folder of the JSON results (default benchmarks/results)")
    a = p.parse_args(argv)
    if a.part == "pycocotools" and not a.json:
        p.error("--part pycocotools loads an existing file: give --json FILE")
    if a.rounds is not None and a.rounds < 1:
        p.error("--rounds must be >= 1")
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "small": a.small,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if a.part in ("all", "throughput"):
        n = 40 if a.small else 100
        r = bench_throughput(n, a.rounds or (3 if a.small else 7))
        out["throughput"] = r
        print(f"\n(a) decode + train augmentation, 640x480 JPEG, 1 core ({r['rounds']} rounds x {n} images)")
        print(f"{'pipeline':<44}{'img/s/core (median)':>22}")
        print(f"{'reference (PIL, CPU float normalize)':<44}{r['reference_img_s_core']:>22.1f}")
        print(f"{'dino_scale (uint8 v2, GPU normalize)':<44}{r['ours_img_s_core']:>22.1f}")
        print(f"{'speedup':<44}{r['speedup']:>21.2f}x  (goal >= 2x)")
        print(f"(per CPU-second of the process; wall-clock: reference {r['reference_img_s_wall']:.1f}, "
              f"ours {r['ours_img_s_wall']:.1f} img/s; load average {r['load_average']})")
    if a.part in ("all", "conversion"):
        imgs, boxes = (20_000, 290_000) if a.small else (1_740_000, 25_000_000)
        with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
            work = Path(a.workdir) if (a.workdir and a.keep) else Path(tmp)
            r = bench_conversion(imgs, boxes, a.coco_limit_gb, a.keep, work)
        out["conversion"] = r
        pc = r["pycocotools"]
        print(f"\n(b) conversion of a {r['json_bytes'] / 1e9:.2f} GB COCO-format JSON "
              f"({imgs:,} images, {boxes:,} boxes)")
        print(f"{'loader':<28}{'time (s)':>12}{'peak RSS (MB)':>16}  note")
        print(f"load average {r['load_average_after']}; converter CPU time {r['convert_cpu_s'] or 0:.0f} s "
              f"(both processes)")
        print(f"{'dino_scale convert_coco':<28}{r['convert_s'] or float('nan'):>12.1f}{r['convert_peak_rss_mb']:>16.0f}"
              f"  goal <= 900 s, <= 2048 MB (image-pass child process: "
              f"{r['image_pass_child_peak_rss_mb']:.0f} MB)")
        note = "ok" if pc.get("ok") else f"{pc.get('error')} (RLIMIT_AS {pc['limit_gb']} GB)"
        print(f"{'pycocotools COCO()':<28}{pc.get('seconds') or float('nan'):>12.1f}{pc['peak_rss_mb']:>16.0f}  {note}")
    if a.part in ("all", "check"):
        n = 600 if a.small else 3000
        with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
            r = bench_check(n, a.rounds or 3, Path(tmp))
        out["check"] = r
        print(f"\n(c) check-data over {r['images']} embedded 640x480 JPEGs, {r['shards']} shards, "
              f"{r['megabytes']:.0f} MB (median of {r['rounds']} alternating rounds; load average {r['load_average']})")
        print(f"{'reader':<32}{'s':>8}{'MB/s':>9}{'img/s':>9}")
        for k, v in r["median_s"].items():
            print(f"{k:<32}{v:>8.2f}{r['mb_per_s'][k]:>9.0f}{r['images_per_s'][k]:>9.0f}")
    if a.part == "pycocotools":
        pc = run_pycocotools(Path(a.json), a.coco_limit_gb)
        out["pycocotools"] = {**pc, "json": a.json, "json_bytes": Path(a.json).stat().st_size}
        note = "ok" if pc.get("ok") else f"{pc.get('error')} (RLIMIT_AS {pc['limit_gb']} GB)"
        print(f"pycocotools COCO() on {a.json}: {pc.get('seconds') or float('nan'):.1f} s, "
              f"peak RSS {pc['peak_rss_mb']:.0f} MB, {note}")
    results = Path(a.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    name = "data_pipeline_small.json" if a.small else "data_pipeline.json"
    if a.part != "all":
        name = name.replace(".json", f"_{a.part}.json")
    (results / name).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {results / name}")


if __name__ == "__main__":
    main()

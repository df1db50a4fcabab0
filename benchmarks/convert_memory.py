"""Peak memory of ``convert_coco --embed-images`` as the image bytes grow.

Buckets of the conversion are sized by annotation-file bytes, so a small annotation file of
large images is one bucket. Each size runs in a fresh process (``ru_maxrss`` only grows):
``N`` copies of one 800x800 noise PNG (1.83 MB, so every byte is image data), an annotation
file naming them, one conversion with ``--embed-images`` (no decode check, 64 MB shards,
in-process image pass). ``--chunk-mb`` overrides how many image bytes a bucket holds before
it hands its rows on (``dino_scale.data.convert_write._CHUNK_IMAGE_BYTES``; 0 = the default).

    python benchmarks/convert_memory.py                     # 100, 400, 800 images
    python benchmarks/convert_memory.py --images 100 --repeats 1

Results: a table on stdout and JSON in benchmarks/results/convert_memory.json (``--results-dir``).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

_CHILD = r"""
import io, json, logging, resource, sys
from pathlib import Path
import numpy as np
from PIL import Image
import dino_scale.data.convert_write as cw
from dino_scale.data import convert_coco
logging.disable(logging.WARNING)
work, n, chunk = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if chunk:
    cw._CHUNK_IMAGE_BYTES = chunk
buf = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)).save(buf, "PNG")
data = buf.getvalue()
(work / "img").mkdir(parents=True)
for i in range(n):
    (work / "img" / f"{i}.png").write_bytes(data)
doc = {"images": [{"id": i, "file_name": f"{i}.png", "width": 800, "height": 800} for i in range(n)],
       "annotations": [], "categories": [{"id": 1, "name": "a"}]}
(work / "a.json").write_text(json.dumps(doc))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
m = convert_coco(work / "a.json", work / "img", work / "out", embed_images=True, progress=False,
                 verify_images=False, shard_size_mb=64, parallel=False)
print(json.dumps({"image_mb": n * len(data) / 2**20, "shards": len(m["shards"]), "images": m["num_images"],
                  "rss_before_mb": before, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_once(n: int, chunk_bytes: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="dino_convert_mem_") as tmp:
        out = subprocess.run([sys.executable, "-c", _CHILD, tmp, str(n), str(chunk_bytes)], cwd=ROOT,
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, nargs="+", default=[100, 400, 800])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-mb", type=float, default=0, help="image MB a bucket holds (0: the default)")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    chunk = int(args.chunk_mb * 2**20)
    rows = []
    for n in args.images:
        runs = [run_once(n, chunk) for _ in range(args.repeats)]
        row = {**runs[0], "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
               "peak_rss_runs_mb": [round(r["peak_rss_mb"]) for r in runs], "n": n}
        rows.append(row)
        print(f"{n:5d} images  {row['image_mb']:7.0f} MB of images  {row['shards']:3d} shards  "
              f"peak RSS {row['peak_rss_mb']:6.0f} MB (median of {args.repeats}: {row['peak_rss_runs_mb']})",
              flush=True)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / "convert_memory.json"
    path.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                "python": platform.python_version(), "chunk_mb": args.chunk_mb or None,
                                "rows": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

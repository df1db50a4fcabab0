"""Annotation JSON + images -> Parquet record shards (+ manifest.json).

    python -m pipelines.prepare_data --annotations instances_train2017.json \
        --images train2017 --out data/coco/train [--embed-images] [--shard-size-mb 256]
    # Objects365 val, the paper's recipe: first 5k images -> OUT/val, the rest -> OUT/train_extra
    python -m pipelines.prepare_data --annotations zhiyuan_objv2_val.json --images val \
        --out data/o365 --o365-val-split 5000

Images are written in a random order seeded by --shuffle-seed (default 0; recorded in the
manifest), so that every shard samples the whole file: training reads shards in random order
through a small shuffle buffer. --no-shuffle keeps file order (evaluation does not need the
shuffle; the val part of --o365-val-split is never shuffled).

Prints the manifest summary (images/boxes written, skipped and dropped counts). Rerun the
same command to resume an interrupted conversion. Exit status 2 on bad input
(malformed JSON, unknown category ids, a missing annotation file or folder, no usable image at
all); image files missing or unreadable are counted skips, listed in the manifest.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from dino_scale.data import ConversionError, MalformedJSONError, convert_coco


def _summary(folder: Path, m: dict) -> str:
    """One JSON line: the dataset folder written (was ``"dataset": "out"`` for every conversion) and its counts."""
    return json.dumps({"dataset": str(folder), "num_images": m["num_images"], "num_boxes": m["num_boxes"],
                       "images_in": m["images_in"], "images_skipped": m["images_skipped"],
                       "boxes_in": m["boxes_in"], "boxes_dropped": m["boxes_dropped"],
                       "boxes_clipped": m["boxes_clipped"], "shards": len(m["shards"]),
                       "categories": len(m["categories"])})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m pipelines.prepare_data",
                                description="COCO-format annotations -> dino_scale record shards")
    p.add_argument("--annotations", required=True, help="COCO-format JSON (COCO 2017, Objects365 v1/v2)")
    p.add_argument("--images", required=True, help="image root folder")
    p.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    p.add_argument("--embed-images", action="store_true", help="store image bytes in the shards")
    p.add_argument("--shard-size-mb", type=float, default=256, help="shard size limit (default 256)")
    p.add_argument("--max-images-per-shard", type=int, default=10000,
                   help="images per shard at most, whatever --shard-size-mb allows (default 10000)")
    p.add_argument("--o365-val-split", type=int, default=None, metavar="N",
                   help="val file: first N images -> OUT/val, the rest -> OUT/train_extra (paper: 5000)")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--shuffle-seed", type=int, default=0, metavar="N",
                       help="seed of the images' random order across shards (default 0; an int >= 0)")
    order.add_argument("--no-shuffle", action="store_true", help="write images in file order (evaluation sets)")
    p.add_argument("--no-check-files", action="store_true", help="do not stat image files (reference mode)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    # a limit <= 0 (or NaN) made every image its own shard: 1.7M files for Objects365
    for flag, value in (("--shard-size-mb", a.shard_size_mb), ("--max-images-per-shard", a.max_images_per_shard)):
        if not (value > 0 and math.isfinite(value)):
            print(f"error: {flag} must be > 0 (got {value})", file=sys.stderr)
            return 2
    if a.shuffle_seed < 0:
        print(f"error: --shuffle-seed must be >= 0 (got {a.shuffle_seed})", file=sys.stderr)
        return 2
    if a.o365_val_split is not None and a.o365_val_split < 1:  # 0: an empty val set, on which no AP is measured
        print(f"error: --o365-val-split must be >= 1 (got {a.o365_val_split}): the first N images are the "
              f"validation set", file=sys.stderr)
        return 2
    for flag, path in (("--annotations", a.annotations), ("--images", a.images), ("--out", a.out)):
        if path is not None and not str(path).strip():  # "" was the current folder: --out "" converted into it
            print(f"error: {flag} is empty; give a path", file=sys.stderr)
            return 2
    if "," in str(a.out):  # the pipelines' --data/--val-data read "a,b" as two dataset folders
        print(f"error: --out {a.out}: a dataset folder name cannot hold ',' (the training pipelines read "
              f"--data a,b as two folders); pick another name", file=sys.stderr)
        return 2
    for flag, path in (("--out", a.out), ("--images", a.images)):
        p = Path(path).expanduser()
        if p.exists() and not p.is_dir():  # was "[Errno 17] File exists" / "image folder not found"
            print(f"error: {flag} {path} is a file; {flag} names a folder", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(levelname)s %(message)s")
    try:
        res = convert_coco(a.annotations, a.images, a.out, embed_images=a.embed_images,
                           shard_size_mb=a.shard_size_mb, max_images_per_shard=a.max_images_per_shard,
                           o365_val_split=a.o365_val_split, progress=not a.quiet,
                           check_files=not a.no_check_files, shuffle_seed=None if a.no_shuffle else a.shuffle_seed)
    except (MalformedJSONError, ConversionError, OSError, ValueError) as e:  # OSError: unreadable input, unwritable out
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out).expanduser()
    if a.o365_val_split is not None:
        for name, m in res.items():
            print(_summary(out / name, m))
    else:
        print(_summary(out, res))
    return 0


if __name__ == "__main__":  # one error line and an exit code, as `dino-scale prepare-data` (was: a traceback)
    from pipelines._errors import run_main

    sys.exit(run_main(main))

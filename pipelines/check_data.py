"""Read every record of converted datasets and compare it with the checksums written at conversion.

    python -m pipelines.check_data data/o365/train data/o365/val   # or: dino-scale check-data ...

Run it after copying or syncing a dataset to a cluster's storage, before a long run: it reads
each shard in full (page checksums included) and lists the records whose labels or embedded
image bytes changed after conversion, or that hold a category id the manifest does not list,
and the shards whose structure cannot be read. Training
would skip such records (counted, reason ``damaged``) and an evaluation refuses them; this
finds them up front. A dataset converted without ``--embed-images`` names image files: each
is looked up too (``--no-image-files``: not), under the root recorded at conversion or
``--image-root``. Prints a line per shard (``--quiet``: the summary only) and a summary
per folder; ``--json FILE`` also writes the reports. Exit status 0 when every record matches
(and every image file is there), 1 when any is damaged or unreadable or an image file is
missing, 2 on a missing, truncated or unreadable manifest/shard set (the copy did not finish).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m pipelines.check_data",
                                description="Compare every record of dataset folders with its checksums.")
    p.add_argument("folders", nargs="+", help="dataset folders (shards + manifest.json), or folders holding "
                                               "train/, train_extra/, val/ datasets (as --data takes them)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the reports as JSON")
    p.add_argument("--image-root", default=None, metavar="DIR",
                   help="the images' folder of a dataset converted without --embed-images, where it is not the "
                        "one recorded at conversion (one per folder, comma-separated; as data.image_root; a "
                        "folder holding train/, train_extra/, val/ counts as each of those it holds, in that "
                        "order)")
    p.add_argument("--no-image-files", action="store_true",
                   help="do not look for the image files such a dataset names (a stat per image)")
    p.add_argument("--workers", type=int, default=4,
                   help="shards read at a time (default 4); image files are looked up twice as many at a time")
    p.add_argument("--quiet", action="store_true", help="print the summaries only")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dino_scale.data.readers import reading_datasets

    a = build_parser().parse_args(argv)
    from pipelines._common import UsageError

    a.folders = [os.path.expanduser(f) for f in a.folders]  # '~' the shell left (quoted, after '=')
    if a.workers < 1:
        raise UsageError("--workers must be >= 1")
    for folder in a.folders:
        if not folder.strip():
            raise UsageError("a dataset folder argument is empty; give a path")
        if not Path(folder).exists():  # was "no manifest.json in ...", as for a folder not yet converted
            raise UsageError(f"dataset folder not found: {folder}")
    a.folders = _dataset_folders(a.folders, say=None if a.quiet else print)
    if a.json:  # before the (long) read, not after it
        target = Path(a.json).expanduser()
        if target.is_dir():
            raise UsageError(f"--json {a.json} is a folder; give a file name")
        parent = target.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UsageError(f"--json {a.json}: {parent} is not a folder this user can write to")
    with reading_datasets(a.folders, print):  # a conversion of one of them waits, as for a training job
        reports = _check(a)
    if a.json:
        Path(a.json).expanduser().write_text(json.dumps(reports, indent=1))
    lost = any(r.get("image_files", {}).get("missing") for r in reports)
    return 1 if lost or any(r["damaged"] or r["unreadable"] for r in reports) else 0


def _check(a: argparse.Namespace) -> list[dict]:
    """The report of each folder of ``a.folders``, read while no conversion may rewrite them (a
    conversion run during the read replaced shards under it: "15 unreadable shards", exit 1)."""
    from dino_scale.data.integrity import check_dataset, describe
    from dino_scale.data.manifest import shard_paths

    for folder in a.folders:  # every folder is complete before any is read in full
        shard_paths(folder)
    roots = _image_roots(a)  # an --image-root that does not fit the folders: refused before the read
    reports = []
    for folder, root in zip(a.folders, roots):
        t0 = time.time()

        def progress(name: str, done: int, total: int) -> None:
            if not a.quiet:
                print(f"  {folder}: {done}/{total} shards read ({name}, {time.time() - t0:.0f} s)", flush=True)

        report = check_dataset(folder, on_shard=progress, workers=a.workers)
        print(describe(report), flush=True)
        if not a.no_image_files:
            report["image_files"] = _image_files(folder, root, a, t0)
        reports.append(report)
    return reports


def _dataset_folders(folders: list[str], say=print) -> list[str]:
    """``folders`` with each folder that holds ``train/``, ``train_extra/`` or ``val/`` datasets (the
    form ``--data`` takes) replaced by those, said (``say``; None: not), each folder once (was:
    "no manifest.json ... not a converted dataset", for data the training pipelines read).
    ``--image-root`` then gives one root for all of them, or one per folder of this list."""
    from pipelines._datasets import dataset_parts

    out: list[str] = []
    for folder in folders:
        parts = dataset_parts(Path(folder))
        if parts and say is not None:
            say(f"{folder} holds datasets: checking {', '.join(parts)}")
        out += [f for f in ([str(p) for p in parts.values()] or [folder]) if f not in out]
    return out


def _image_roots(a: argparse.Namespace) -> list:
    """The ``--image-root`` of each folder of ``a.folders`` (``None``: the recorded one): one root
    for every folder, or one per folder in order, checked as training checks ``data.image_root``
    (one root for folders converted against different roots is ambiguous)."""
    from dino_scale.data.image_paths import folder_image_roots
    from pipelines._common import UsageError

    if not a.image_root or a.no_image_files:
        return [None] * len(a.folders)
    try:
        return [root for _, root in folder_image_roots(a.folders, a.image_root)]
    except ValueError as exc:
        raise UsageError(f"--image-root: {exc}") from None


def _image_files(folder: str, root, a: argparse.Namespace, t0: float) -> dict:
    """:func:`~dino_scale.data.preflight.check_image_files` of ``folder`` (its images under
    ``root``, else the recorded root), with its summary printed."""
    from dino_scale.data.preflight import check_image_files

    def progress(done: int, total: int) -> None:
        if not a.quiet:
            print(f"  {folder}: {done}/{total} image files looked up ({time.time() - t0:.0f} s)", flush=True)

    files = check_image_files(folder, root, workers=2 * a.workers, on_progress=progress)
    for name in files["no_root"]:
        print(f"{name}: no image root recorded (converted without one): its image files were not looked up",
              flush=True)
    if files["checked"]:
        if files["missing"]:
            print(f"{folder}: {files['missing']} of {files['checked']} image files are missing (training skips "
                  f"them; copy the images again, or give their folder with --image-root), e.g.", flush=True)
            for name in files["examples"]:
                print(f"  {name}", flush=True)
        else:
            print(f"{folder}: all {files['checked']} image files are there", flush=True)
    return files


if __name__ == "__main__":
    from pipelines._errors import run_main

    sys.exit(run_main(main))

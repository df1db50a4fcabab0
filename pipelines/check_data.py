"""Read every record of converted datasets and compare it with the checksums written at conversion.

    python -m pipelines.check_data data/o365/train data/o365/val   # or: dino-scale check-data ...

Run it after copying or syncing a dataset to a cluster's storage, before a long run: it reads
each shard in full (page checksums included) and lists the records whose labels or embedded
image bytes changed after conversion, and the shards whose structure cannot be read. Training
would skip such records (counted, reason ``damaged``) and an evaluation refuses them; this
finds them up front. Prints a line per shard (``--quiet``: the summary only) and a summary
per folder; ``--json FILE`` also writes the reports. Exit status 0 when every record matches,
1 when any is damaged or unreadable, 2 on a missing, truncated or unreadable manifest/shard
set (the copy did not finish).
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
    p = argparse.ArgumentParser(prog="python -m pipelines.check_data",
                                description="Compare every record of dataset folders with its checksums.")
    p.add_argument("folders", nargs="+", help="dataset folders (shards + manifest.json)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the reports as JSON")
    p.add_argument("--workers", type=int, default=4, help="shards read at a time (default 4)")
    p.add_argument("--quiet", action="store_true", help="print the summaries only")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dino_scale.data.integrity import check_dataset, describe
    from dino_scale.data.records import shard_paths

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
    if a.json:  # before the (long) read, not after it
        target = Path(a.json).expanduser()
        if target.is_dir():
            raise UsageError(f"--json {a.json} is a folder; give a file name")
        parent = target.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UsageError(f"--json {a.json}: {parent} is not a folder this user can write to")
    for folder in a.folders:  # every folder is complete before any is read in full
        shard_paths(folder)
    reports = []
    for folder in a.folders:
        t0 = time.time()

        def progress(name: str, done: int, total: int) -> None:
            if not a.quiet:
                print(f"  {folder}: {done}/{total} shards read ({name}, {time.time() - t0:.0f} s)", flush=True)

        report = check_dataset(folder, on_shard=progress, workers=a.workers)
        print(describe(report), flush=True)
        reports.append(report)
    if a.json:
        Path(a.json).expanduser().write_text(json.dumps(reports, indent=1))
    return 1 if any(r["damaged"] or r["unreadable"] for r in reports) else 0


if __name__ == "__main__":
    from pipelines._errors import run_main

    sys.exit(run_main(main))

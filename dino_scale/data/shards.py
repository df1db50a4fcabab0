"""Bounded-size Parquet shard writer with resumable progress records.

Rows arrive in image order as Arrow tables (one per bucket) with their global image
indices. A shard is cut *before* a row that would push it past ``shard_bytes`` (or
past ``max_rows``), so every shard is at most max(shard_bytes, one row). Each finished
shard is written to a temporary name, renamed, and followed by a small JSON progress
record in the work folder; a rerun reads those records and continues after the last
finished shard. Cut points depend only on the row sequence, so a resumed conversion
writes the same shards as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .records import SCHEMA

__all__ = ["ShardWriter", "shard_name", "shard_files", "load_progress", "crowd_boxes", "folder_lock"]


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


_SHARD_FILE = re.compile(r"shard-(\d{5,})\.parquet(\.tmp)?")


def shard_files(out: Path) -> list[tuple[Path, int]]:
    """The conversion's own shard files in ``out`` (finished, and ``.tmp`` ones a crash left), with
    their index: a ``shard-old.parquet`` or ``shard-00000.parquet.bak`` of the user's is none of them
    (such names were deleted, or stopped every later run with a bare int() error)."""
    out_files = []
    for p in sorted(out.glob("shard-*.parquet*")):
        match = _SHARD_FILE.fullmatch(p.name)
        if match and p.is_file():
            out_files.append((p, int(match.group(1))))
    return out_files


def flock_or_wait(fh, mode: int, on_wait: Callable[[], None]) -> bool:
    """``flock(fh, mode)`` (``LOCK_EX`` / ``LOCK_SH``); when another process holds it, ``on_wait()``
    (say so) and wait. False on a filesystem without ``flock`` (nothing is locked)."""
    try:
        fcntl.flock(fh, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        on_wait()
        fcntl.flock(fh, mode)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def folder_lock(lock_file: Path, say: Callable[[str], None], what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (created with its folder): one process at a time
    converts or generates a dataset folder. Two pipelines sharing a work folder both deleted and
    rebuilt the same work files (one failed with FileNotFoundError, or both with "manifest counts
    do not add up"). The second waits, saying so, and then finds the folder done. ``flock`` locks
    hold on a local disk and on NFS; a process that dies releases its lock. A folder where the lock
    cannot be made (a read-only copy: nothing can be written there anyway) is used unlocked."""
    while True:
        try:
            lock_file.parent.mkdir(parents=True, exist_ok=True)
            fh = open(lock_file, "a")
        except OSError:
            yield
            return
        with fh:
            locked = flock_or_wait(fh, fcntl.LOCK_EX, lambda: say(f"{what}: another process is writing it; "
                                                                  f"waiting for that to finish"))
            if locked and not _still_at(fh, lock_file):  # the holder removed it (and its folder) before it
                fcntl.flock(fh, fcntl.LOCK_UN)           # let go: a lock on a file no path leads to locks
                continue                                  # nothing, so make the folder and lock anew
            try:
                yield
            finally:
                if locked:
                    fcntl.flock(fh, fcntl.LOCK_UN)
            return


def _still_at(fh, path: Path) -> bool:
    """Whether the open file ``fh`` is still the file at ``path`` (not unlinked or replaced)."""
    try:
        here = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(fh.fileno())
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as JSON in ``path`` through a temporary sibling and ``os.replace``: a kill or a full
    disk mid-write leaves the previous file or none, never an empty or cut one (a progress file
    cut short made every later run of the conversion fail with a bare JSON error)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_json_or_none(path: Path) -> Optional[Any]:
    """The JSON document in ``path``, or None when it is absent or not readable JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_progress(out: Path, work: Path) -> list[dict[str, Any]]:
    """Progress records of finished shards, contiguous from 0 (a progress file that does not read,
    and every shard after it, are done again); stale files beyond are removed."""
    done = []
    i = 0
    while (out / shard_name(i)).is_file():
        record = read_json_or_none(work / f"{shard_name(i)}.json")
        if not isinstance(record, dict):
            break
        done.append(record)
        i += 1
    for p, index in shard_files(out):  # partial or orphaned files from a crash
        if not p.name.endswith(".parquet") or index >= i:
            p.unlink()
    return done


def crowd_boxes(table: pa.Table) -> int:
    """Boxes flagged ``iscrowd`` in record rows (``table`` with an ``iscrowd`` list<bool> column)."""
    if not table.num_rows:
        return 0
    return int(pc.sum(pc.list_flatten(table["iscrowd"]).cast(pa.int64())).as_py() or 0)


def _write_parquet(table: pa.Table, path: Path) -> None:
    avg = max(1, table.nbytes // max(1, table.num_rows))
    row_group = int(min(max(16, (32 << 20) // avg), max(16, table.num_rows)))
    compression = {name: ("NONE" if name == "image" else "ZSTD") for name in SCHEMA.names}
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, row_group_size=row_group, compression=compression,  # page checksums: for
                   write_statistics=False, store_schema=False, write_page_checksum=True)  # check_dataset
    os.replace(tmp, path)


class ShardWriter:
    """Accumulates rows and skip events; writes ``shard-NNNNN.parquet`` files."""

    def __init__(self, out: Path, work: Path, shard_bytes: int, max_rows: int,
                 done: Optional[list[dict[str, Any]]] = None):
        self.out, self.work = out, work
        self.shard_bytes, self.max_rows = int(shard_bytes), int(max_rows)
        self.done = list(done or [])
        self.start_index = self.done[-1]["end_index"] if self.done else 0
        self._tables: list[pa.Table] = []
        self._rows = 0
        self._bytes = 0
        self._last_index = -1
        # (global index, image id, reason, boxes, file name)
        self._skips: list[tuple[int, int, str, int, Optional[str]]] = []
        self.tail: Optional[dict[str, Any]] = None

    def add_skip(self, index: int, image_id: int, reason: str, num_boxes: int, file_name: Optional[str] = None) -> None:
        self._skips.append((int(index), int(image_id), reason, int(num_boxes), file_name))

    def add(self, table: pa.Table, indices: np.ndarray, row_bytes: np.ndarray) -> None:
        """Append rows (``table`` in SCHEMA) with global indices and estimated sizes."""
        pos = 0
        n = table.num_rows
        while pos < n:
            room_bytes = self.shard_bytes - self._bytes
            room_rows = self.max_rows - self._rows
            csum = np.cumsum(row_bytes[pos:])
            take = int(np.searchsorted(csum, room_bytes, side="right"))
            take = min(take, room_rows, n - pos)
            if take == 0 and self._rows == 0:
                take = 1  # a single row larger than the limit gets its own shard
            if take > 0:
                self._tables.append(table.slice(pos, take))
                self._rows += take
                self._bytes += int(csum[take - 1])
                self._last_index = int(indices[pos + take - 1])
                pos += take
            if pos < n:
                self._flush(end_index=self._last_index + 1)

    def _flush(self, end_index: int) -> None:
        i = len(self.done)
        table = pa.concat_tables(self._tables) if self._tables else SCHEMA.empty_table()
        if table.num_rows:
            _write_parquet(table, self.out / shard_name(i))
        mine = [s for s in self._skips if s[0] < end_index]
        self._skips = [s for s in self._skips if s[0] >= end_index]
        reasons: dict[str, int] = {}
        for _, _, reason, _, _ in mine:
            reasons[reason] = reasons.get(reason, 0) + 1
        num_boxes = int(pc.sum(pc.list_value_length(table["category_ids"])).as_py() or 0) \
            if table.num_rows else 0
        record = {
            "file": shard_name(i) if table.num_rows else None,
            "start_index": self.start_index, "end_index": int(end_index),
            "num_images": table.num_rows, "num_boxes": num_boxes, "num_crowd_boxes": crowd_boxes(table),
            "bytes": (self.out / shard_name(i)).stat().st_size if table.num_rows else 0,
            "skipped": reasons,
            "skipped_images": [{"image_id": s[1], "reason": s[2], **({"file_name": s[4]} if s[4] else {})}
                               for s in mine],
            "boxes_dropped_skipped_image": sum(s[3] for s in mine),
        }
        if table.num_rows:
            write_json_atomic(self.work / f"{shard_name(i)}.json", record)
            self.done.append(record)
        else:
            self.tail = record
        self.start_index = int(end_index)
        self._tables, self._rows, self._bytes = [], 0, 0

    def finish(self, total_images: int) -> list[dict[str, Any]]:
        """Write the last shard; returns all progress records (plus a tail of skips, if any)."""
        self.tail = None
        if self._rows or self._skips:
            self._flush(end_index=total_images)
        records = list(self.done)
        if self.tail is not None:
            records.append(self.tail)
        return records


# a new conversion of a folder that holds an intact dataset writes its shards and manifest here, so
# the dataset stays whole until the new one is (a rerun with another image folder that turned out
# empty, or a crash, removed it before: hours of conversion lost)
STAGING_DIR = ".next"


def finish_swap(out: Path, manifest_name: str = "manifest.json") -> bool:
    """Replace the dataset in ``out`` by the finished one in ``out/.next`` (a conversion staged
    there: :data:`STAGING_DIR`); False when there is none. Idempotent, so a swap cut
    short (a crash) is finished by calling it again: ``out``'s manifest goes first (``out`` holds
    no dataset from then on), then each shard the new manifest lists is moved in (replacing an old
    one of its name), the old shards it does not list are removed, and its manifest comes last."""
    import shutil

    stage = out / STAGING_DIR
    new_manifest = stage / manifest_name
    if not new_manifest.is_file():
        return False
    listed = {s["file"] for s in json.loads(new_manifest.read_text())["shards"]}
    (out / manifest_name).unlink(missing_ok=True)
    for name in sorted(listed):
        if (stage / name).is_file():
            os.replace(stage / name, out / name)
    for path, _ in shard_files(out):
        if path.name not in listed:
            path.unlink()
    os.replace(new_manifest, out / manifest_name)
    shutil.rmtree(stage, ignore_errors=True)
    return True


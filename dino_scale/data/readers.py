"""Converted dataset folders in use: a job reading one holds a shared lock on it, and a
conversion that would delete and rewrite it (its annotation file or settings changed, or images
it skipped are back) is refused while any job holds one.

A job training on ``<work>/data/<name>`` while a second job converted the same annotation file
again (edited) lost its shards mid-epoch (an unreadable shard), or read new shards part-way
through and registered an AP of data it was not trained or scored on. The lock is a ``flock``
on ``<folder>/.readers.lock`` (shared for readers, exclusive for a rewrite), held by the
job's driver for the run; a process that dies releases it. A folder where the lock file cannot
be made (a read-only copy, where nothing can rewrite it either) is read unlocked.
"""
from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from .shards import flock_or_wait

__all__ = ["READERS_LOCK", "DatasetInUseError", "reading_datasets", "rewriting_dataset"]

READERS_LOCK = ".readers.lock"


class DatasetInUseError(RuntimeError):
    """A conversion would rewrite a dataset folder that a running job reads."""


@contextlib.contextmanager
def reading_datasets(datasets: Iterable[Optional[str | Path]], say: Callable[[str], None]) -> Iterator[None]:
    """A shared lock on each folder of ``datasets`` (converted dataset folders, each a folder or
    ``"a,b"``; None: none) for the block; waits, saying so, while one is being converted again."""
    from .manifest import data_dirs

    folders = [f for d in datasets if d for f in data_dirs(str(d))]
    with contextlib.ExitStack() as held:
        for folder in dict.fromkeys(Path(f).expanduser().resolve() for f in folders):
            fh = None
            for mode in ("a", "r"):  # "r": a folder this user may only read (a teammate's), lock made by its owner
                try:
                    fh = held.enter_context(open(folder / READERS_LOCK, mode))
                    break
                except OSError:
                    continue
            if fh is None:  # no lock file and none can be made here (a read-only copy), or gone (fails later)
                continue
            flock_or_wait(fh, fcntl.LOCK_SH, lambda f=folder: say(f"{f}: being converted again by another "
                                                                  f"process; waiting for it to finish"))
        yield


@contextlib.contextmanager
def rewriting_dataset(folder: Path, why: str) -> Iterator[None]:
    """An exclusive lock on ``folder`` for a conversion that deletes what it holds (``why``:
    what changed); :class:`DatasetInUseError` at once when a job reads it."""
    try:
        fh = open(Path(folder) / READERS_LOCK, "a")
    except OSError:
        yield
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetInUseError(
                f"{folder}: {why}, so it would be converted again, but a running job reads it (its "
                f"shards would change under it). Wait for that job to end, or convert into another "
                f"folder") from None
        except OSError:
            pass
        yield

"""One process at a time per run folder: a second job started under a run name that a live job
is using is refused, instead of both resuming from, writing and pruning the same checkpoints.

Two live jobs with one run name (a job resubmitted while the first still runs, one name given
to two stages) shared everything: the second resumed from the first's checkpoints, each
pruned the other's, checkpoint folders of the same step got files from both, and one job's
final weights could be registered with the other's AP. The lock is an exclusive ``flock`` on
``<run folder>/.run.lock``, held by the driver process for the run and released by the kernel
when the process dies (a killed job never blocks its rerun). It is re-entrant within one
process: a pipeline holds it from its first write into the run's folders, and ``fit`` called
inside takes it again. Hosts sharing a work folder over NFS (v4) see each other's locks; a
Ray storage path shared by work folders on different machines is not covered.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path
from typing import Iterator

__all__ = ["RunInUseError", "LOCK_NAME", "run_lock"]

LOCK_NAME = ".run.lock"
_held: dict[str, list] = {}  # lock path -> [fd, depth, whether the folder was made for it]
_guard = threading.Lock()


class RunInUseError(RuntimeError):
    """Another live process holds the run folder."""


def _take(folder: Path, path: Path, what: str) -> tuple[int, bool]:
    """(descriptor holding the flock of ``path``, whether ``folder`` was made for it). A holder
    that found its folder empty at release unlinks the lock file and removes the folder: a lock
    taken on that unlinked file, or whose folder went between ``mkdir`` and ``open``, is taken
    again on the file now at ``path``, so two live jobs never hold two files of one name."""
    import fcntl

    for _ in range(20):
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed by a holder releasing it empty
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise RunInUseError(f"{what} is in use by another job (process {holder}): its folder {folder} "
                                f"is locked. Wait for that job to end, or use another run name") from None
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            return fd, created
        os.close(fd)  # locked a file its last holder unlinked: take the one at the path now
    raise RunInUseError(f"{what}: its lock {path} kept changing under this job; try again")


@contextlib.contextmanager
def run_lock(folder: str | Path, what: str) -> Iterator[Path]:
    """Hold ``<folder>/.run.lock`` (``folder`` is made) for the block; :class:`RunInUseError`
    naming ``what`` and the holder (pid, host) when another process holds it. A folder made here
    that holds nothing but the lock when the block ends is removed."""
    folder = Path(folder).resolve()
    path = folder / LOCK_NAME
    key = str(path)
    with _guard:
        if key in _held:  # this process holds it already (a pipeline around fit)
            _held[key][1] += 1
        else:
            fd, created = _take(folder, path, what)
            _held[key] = [fd, 1, created]
            try:  # who holds it, for the message of a refused job: best effort (a full disk)
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
            except OSError:
                pass
    try:
        yield path
    finally:
        with _guard:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                fd, _, created = _held.pop(key)
                # a run refused before it wrote anything (bad data, a setting checked after Ray
                # started) left an empty run folder per attempt: one this call made, holding the
                # lock only, goes (the lock file first, while still held)
                emptied = False
                try:
                    if created and os.listdir(folder) == [LOCK_NAME]:
                        os.unlink(path)
                        emptied = True
                except OSError:
                    pass
                os.close(fd)  # closing the only descriptor releases the flock
                if emptied:
                    with contextlib.suppress(OSError):  # another job may have started in it meanwhile
                        folder.rmdir()

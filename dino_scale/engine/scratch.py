"""Scratch folders that worker processes make in the temporary directory, each marked with its
owner (host and process id), and the sweep that removes those of processes that died.

A worker killed mid-checkpoint (SIGKILL, the OOM killer, a node preempted and brought back)
runs no ``finally``: its checkpoint staging folder (``dino_ckpt_*``: the full per-rank
checkpoint) or its universal copy (``dino_universal_*``: fp32 weights and both Adam moments)
stays in ``/tmp`` for good, gigabytes each on a long-lived node. The next worker on that host
sweeps them before it makes its own. A folder whose owner still runs, is on another host
(a shared ``/tmp``) or cannot be told is left alone.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Optional

__all__ = ["OWNER_FILE", "owner_tag", "make_scratch", "write_owner", "sweep_dead"]

log = logging.getLogger(__name__)
OWNER_FILE = ".dino_owner"  # in folders whose name is fixed by others (the universal copy)


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def owner_tag(pid: Optional[int] = None) -> str:
    """``<host hash>-<pid>`` of this process (or of ``pid`` on this host)."""
    return f"{_host()}-{os.getpid() if pid is None else pid}"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id we can judge: keep the folder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def make_scratch(kind: str) -> Path:
    """A fresh folder ``<tmp>/dino_<kind>_<host>-<pid>_<random>`` (its owner in its name)."""
    return Path(tempfile.mkdtemp(prefix=f"dino_{kind}_{owner_tag()}_"))


def write_owner(folder: Path) -> None:
    """Mark ``folder`` (made by this process under a name others chose) with its owner."""
    (Path(folder) / OWNER_FILE).write_text(owner_tag())


def _owner_pid(path: Path, kind: str, host: str) -> Optional[int]:
    """The pid of ``path``'s owner on this host, or None (another host's, or not known)."""
    named = f"dino_{kind}_{host}-"
    if path.name.startswith(named):
        tag = path.name[len(named):].split("_", 1)[0]
    else:
        try:
            owner = (path / OWNER_FILE).read_text().strip()
        except OSError:  # none yet (being made) or unreadable: not ours to judge
            return None
        if not owner.startswith(f"{host}-"):
            return None
        tag = owner[len(host) + 1:]
    return int(tag) if tag.isascii() and tag.isdigit() else None


def sweep_dead(kind: str, tmp_dir: Optional[Path] = None) -> list[Path]:
    """Remove the ``dino_<kind>_*`` folders in ``tmp_dir`` (the temporary directory) whose owner
    on this host is no longer running; returns them. Never raises (a sweep is housekeeping)."""
    tmp_dir = Path(tmp_dir or tempfile.gettempdir())
    host, removed = _host(), []
    try:
        candidates = [p for p in tmp_dir.glob(f"dino_{kind}_*") if p.is_dir()]
    except OSError:
        return removed
    for path in candidates:
        pid = _owner_pid(path, kind, host)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    if removed:
        log.warning("removed %d %s scratch folder(s) of dead processes from %s: %s", len(removed), kind,
                    tmp_dir, ", ".join(p.name for p in removed))
    return removed

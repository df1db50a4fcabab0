"""Scratch folders of worker processes in the temporary directory, and the sweep of those whose
process died (a worker killed mid-checkpoint runs no ``finally``)."""
from __future__ import annotations

import os
import subprocess
import sys

from dino_scale.engine.scratch import OWNER_FILE, make_scratch, owner_tag, sweep_dead, write_owner


def _dead_pid() -> int:
    """The id of a process that ran and exited (reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_workers_scratch_is_swept_and_live_ones_are_kept(tmp_path, monkeypatch):
    # a worker that made its staging folder, then was killed (SIGKILL: no cleanup ran)
    code = ("import os, signal; from dino_scale.engine.scratch import make_scratch; "
            "d = make_scratch('ckpt'); (d / 'model.safetensors').write_bytes(b'x' * 1000); "
            "print(os.getpid(), d, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=120)
    assert proc.returncode == -9, proc.stderr
    pid, folder = proc.stdout.split()
    killed = tmp_path / folder.rsplit("/", 1)[-1]
    assert killed.is_dir() and killed.name.startswith(f"dino_ckpt_{owner_tag(int(pid))}_")

    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = make_scratch("ckpt")  # this process: alive
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = tmp_path / f"dino_ckpt_{owner_tag(sleeper.pid)}_abc"
        alive.mkdir()
        other_host = tmp_path / f"dino_ckpt_0000zzzz-{_dead_pid()}_abc"  # a shared /tmp: not ours to judge
        other_host.mkdir()
        unmarked = tmp_path / "dino_ckpt_made_by_an_older_release"
        unmarked.mkdir()
        other_kind = tmp_path / f"dino_universal_{owner_tag(_dead_pid())}_abc"
        other_kind.mkdir()
        assert sweep_dead("ckpt") == [killed]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not killed.exists()
    assert all(p.is_dir() for p in (mine, alive, other_host, unmarked, other_kind))
    assert sweep_dead("ckpt") == [alive]  # its owner is gone now


def test_folders_named_by_others_are_swept_by_their_owner_file(tmp_path):
    """The universal copy's name comes from its checkpoint (every rank of a node finds it): its
    owner is in a file inside, written by the process that made it."""
    dead, live, unmarked = (tmp_path / f"dino_universal_{n}" for n in ("aaaa", "bbbb", "cccc.tmp-1234"))
    for folder in (dead, live, unmarked):
        folder.mkdir()
    (dead / OWNER_FILE).write_text(owner_tag(_dead_pid()))
    write_owner(live)
    (unmarked / "universal").mkdir()  # being made: no owner file yet
    foreign = tmp_path / "dino_universal_dddd"
    foreign.mkdir()
    (foreign / OWNER_FILE).write_text(f"0000zzzz-{_dead_pid()}")
    odd = tmp_path / "dino_universal_eeee"  # an owner file whose pid is a digit to str.isdigit, not to int()
    odd.mkdir()
    (odd / OWNER_FILE).write_text(owner_tag().rsplit("-", 1)[0] + "-²")
    assert sweep_dead("universal", tmp_path) == [dead]  # was ValueError from int("²")
    assert live.is_dir() and unmarked.is_dir() and foreign.is_dir() and odd.is_dir()
    assert sweep_dead("universal", tmp_path / "missing") == []  # no such folder: nothing, no error

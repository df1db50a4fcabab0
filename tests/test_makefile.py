"""The Makefile's venv target: a disk too full for the venv is refused before anything is made."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_refusing_venv(folder: Path) -> Path:
    """A stand-in for PYTHON: runs the Makefile's `-c` disk check with the real Python and stops
    at `-m venv`, so a test never builds a venv (minutes and ~6.6 GB) whatever the Makefile does."""
    fake = folder / "python3"
    fake.write_text(f'#!/bin/sh\n[ "$1" = "-m" ] && {{ echo "venv step reached" >&2; exit 3; }}\n'
                    f'exec {shutil.which("python3")} "$@"\n')
    fake.chmod(0o755)
    return fake


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_venv_refused_with_the_numbers_when_the_disk_is_too_full(tmp_path):
    venv = tmp_path / "not" / "yet" / ".venv"  # parents missing too, as for a fresh path
    proc = subprocess.run(
        ["make", "-C", str(ROOT), "venv", f"VENV={venv}", "MIN_FREE_GIB=1000000",
         f"PYTHON={_python_refusing_venv(tmp_path)}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "venv step reached" not in proc.stderr
    assert "GiB free under" in proc.stderr and "needs 1000000 GiB" in proc.stderr, proc.stderr
    assert str(tmp_path) in proc.stderr  # the existing folder whose disk was measured
    assert not (tmp_path / "not").exists()  # refused before `python -m venv` made anything


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_venv_disk_check_passes_a_disk_with_room(tmp_path):
    """With room, the check lets the build go on, here to `python -m venv` (refused)."""
    proc = subprocess.run(
        ["make", "-C", str(ROOT), "venv", f"VENV={tmp_path / '.venv'}",
         f"PYTHON={_python_refusing_venv(tmp_path)}",
         "MIN_FREE_GIB=0"], capture_output=True, text=True, timeout=60)
    assert "venv step reached" in proc.stderr, proc.stderr
    assert "GiB free under" not in proc.stderr

"""The files of a run's final Ray checkpoint copied to the work folder: :func:`copy_final` (the
weights, config and detections, to ``<work_dir>/final``) and :func:`copy_ema` (the EMA weights,
to ``<work_dir>/ema``). The checkpoint may be remote (its own pyarrow filesystem)."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from dino_scale.engine.checkpoint import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["copy_final", "copy_ema"]


def copy_final(checkpoint, dest: Path, required: tuple[str, ...] = (WEIGHTS_NAME, CONFIG_NAME)) -> None:
    """Copy the ``required`` files (the final weights and config) and ``detections.json``
    when there is one out of a (possibly remote) Ray checkpoint; a ``detections.json`` left in
    ``dest`` by an earlier run of the work folder is removed when this checkpoint has none (it
    was logged as this run's, computed from other weights). Everything is copied into a staging
    folder beside ``dest`` first and then renamed over the old files, so a copy that fails (a
    full disk, a storage error) leaves the earlier run's files in ``dest`` whole."""
    import pyarrow.fs

    dest.mkdir(parents=True, exist_ok=True)
    fs = checkpoint.filesystem
    for stale in dest.parent.glob(f".{dest.name}.incoming-*"):  # of a copy killed mid-way (the run lock is ours)
        shutil.rmtree(stale, ignore_errors=True)
    staging = dest.with_name(f".{dest.name}.incoming-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        copied = []
        for name in (*required, "detections.json"):
            src = f"{checkpoint.path.rstrip('/')}/{name}"
            if fs.get_file_info(src).type == pyarrow.fs.FileType.NotFound:
                if name in required:
                    raise FileNotFoundError(f"final checkpoint {checkpoint.path} has no {name}")
                continue
            pyarrow.fs.copy_files(src, str(staging / name), source_filesystem=fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
            copied.append(name)
        for name in copied:  # renames within one folder's parent: no space needed, each atomic
            os.replace(staging / name, dest / name)
        if "detections.json" not in copied:
            (dest / "detections.json").unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def copy_ema(checkpoint, dest: Path) -> bool:
    """The final checkpoint's EMA weights (``ema/``: ``train.ema_decay`` set) into ``dest``
    (``<work_dir>/ema``, beside ``final``), as :func:`copy_final` copies the weights; an earlier
    run's ``dest`` is removed when this checkpoint has none. Whether it had them."""
    import types

    import pyarrow.fs

    src = f"{checkpoint.path.rstrip('/')}/ema"
    if checkpoint.filesystem.get_file_info(src).type != pyarrow.fs.FileType.Directory:
        shutil.rmtree(dest, ignore_errors=True)
        return False
    copy_final(types.SimpleNamespace(filesystem=checkpoint.filesystem, path=src), dest)
    return True

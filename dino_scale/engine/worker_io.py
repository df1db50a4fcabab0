"""What a Ray Train worker exchanges with the driver of its run: reports (metrics, and
checkpoints written into a temporary folder), values the driver handed over through Ray's
object store, and rank 0's MLflow logger of the driver's run. Used by the worker loop
(:mod:`dino_scale.engine.loop`); Ray is imported only when they are called.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from dino_scale.engine.scratch import make_scratch, sweep_dead

__all__ = ["report", "from_driver", "rank0_tracker"]


def report(metrics: dict[str, Any], write_fn: Optional[Callable[[Path], None]] = None,
           name: Optional[str] = None) -> None:
    """``ray.train.report(metrics)``; with ``write_fn``, also a checkpoint: ``write_fn(folder)``
    fills a fresh temporary folder, which Ray Train copies to storage as ``name`` (then removed)."""
    import ray.train

    if write_fn is None:
        ray.train.report(metrics)
        return
    sweep_dead("ckpt")  # staging folders of workers killed on this host mid-checkpoint
    tmp = make_scratch("ckpt")
    try:
        write_fn(tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                         checkpoint_dir_name=name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def from_driver(ref_or_value):
    """A value the driver handed over: through Ray's object store (an ``ObjectRef``: readable on
    every node, unlike a file the driver wrote) or inline."""
    import ray

    return ray.get(ref_or_value) if isinstance(ref_or_value, ray.ObjectRef) else ref_or_value


def rank0_tracker(loop_cfg: dict[str, Any], rank: int):
    """Rank 0's MLflow logger of the driver's run (None on other ranks or without a run): the
    driver's relay actor (``fit`` starts one for every run: the store may exist on the driver's
    machine only, and its credentials are the driver's), else a logger of its own."""
    if rank != 0 or not loop_cfg.get("run_id"):
        return None
    if loop_cfg.get("tracking_relay") is not None:
        from dino_scale.tracking.relay import RelayClient

        return RelayClient(loop_cfg["tracking_relay"])
    from dino_scale.tracking.logger import ResilientLogger

    return ResilientLogger(loop_cfg["tracking_uri"], run_id=loop_cfg["run_id"])

"""The start-up notes of the training pipelines: :func:`schedule_text` (the lr schedule, with what
of it the run never reaches) and :func:`work_dir_note` (folders a ``ray job submit`` driver would
lose with the cluster). Re-exported by :mod:`pipelines._common`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

from dino_scale.config import Config
from dino_scale.config_checks import lr_drop_epochs


def schedule_text(cfg: Config) -> str:
    """``lr x0.1 at epoch 24`` (``step``/``multistep``) or ``lr cosine``, for the start-up line,
    with a note for pinned drops past the run and a warmup as long as ``max_steps``."""
    t = cfg.train
    warmup = (f" (warmup {t.warmup_steps} steps, max_steps={t.max_steps}: the lr never reaches its base value)"
              if t.max_steps is not None and t.warmup_steps >= t.max_steps else "")
    if t.schedule == "cosine":
        return "lr cosine" + warmup
    drops = lr_drop_epochs(t)
    text = f"lr x0.1 at epoch {','.join(map(str, drops))}"
    past = [d for d in drops if d >= t.epochs] if t.lr_drop_epochs is not None else []  # pinned, past the run
    if past and len(past) == len(drops):
        text += f" (after this run's {t.epochs} epochs: the lr never drops; set train.lr_drop_epochs)"
    elif past:
        text += f" (epoch {','.join(map(str, past))} is after this run's {t.epochs} epochs: no drop there)"
    return text + warmup


def work_dir_note(args: argparse.Namespace) -> Optional[str]:
    """A note when a job joining a cluster keeps its work folder (data, checkpoints, the sqlite
    store, ``final/``) under a relative ``--work-dir``, or its MLflow store in a relative sqlite
    file (``MLFLOW_TRACKING_URI=sqlite:///mlflow.db``): a ``ray job submit`` driver runs in Ray's
    temporary copy of ``--working-dir``, which goes with the cluster's session."""
    if not os.environ.get("RAY_ADDRESS"):
        return None
    notes = []
    if not Path(args.work_dir).expanduser().is_absolute():
        notes.append(f"note: --work-dir {args.work_dir} is relative to this driver's folder ({Path.cwd()}); under "
                     f"`ray job submit` that is Ray's temporary copy of --working-dir, removed with the cluster: give "
                     f"an absolute --work-dir on storage that outlives the job (and train.storage_path for the "
                     f"checkpoints of a multi-node run)")
    from dino_scale.tracking.clients import sqlite_path

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    db = sqlite_path(uri)
    if db is not None and str(db) not in (".", ":memory:") and not db.expanduser().is_absolute():  # runs, registry
        notes.append(f"note: MLFLOW_TRACKING_URI {uri} names a file relative to this driver's folder "
                     f"({Path.cwd()}), Ray's temporary copy under `ray job submit`: its runs and registry go with "
                     f"the cluster; give an absolute path (sqlite:////shared/mlflow.db, four slashes)")
    return "\n".join(notes) or None

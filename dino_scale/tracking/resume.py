"""Which MLflow run a resumed training run continues (its tag ``resumed_from_run_id``).

Reusing a run name makes Ray Train resume that run's latest checkpoint, under a new MLflow run.
The checkpoint names the MLflow run that wrote it (``mlflow_run_id`` in ``trainer_state.json``):
that run, when this store holds it, is the one continued; a checkpoint that names a run of
another store (the earlier run tracked elsewhere) links to none. A checkpoint written before it
named its run is linked to the newest earlier training run of the same name in the same
experiment.
"""
from __future__ import annotations

import logging
from typing import Optional

from dino_scale.tracking.search import filter_literal, pages

__all__ = ["RESUMED_FROM_TAG", "resumed_from_run_id"]

log = logging.getLogger(__name__)
RESUMED_FROM_TAG = "resumed_from_run_id"


def _by_name(client, experiment: str, run_name: str, current_run_id: Optional[str]) -> Optional[str]:
    """The newest training run named ``run_name`` in ``experiment`` that started before
    ``current_run_id`` (any run when it is None). A name no filter can hold (both ``'`` and
    ``"``) is matched in Python over the experiment's runs, newest first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    current = client.get_run(current_run_id) if current_run_id else None
    literal = filter_literal(run_name)
    runs = pages(client.search_runs, page_size=100, experiment_ids=[exp.experiment_id],
                 filter_string=f"tags.mlflow.runName = {literal}" if literal else "",
                 order_by=["attributes.start_time DESC"])
    for run in runs:
        if run.data.tags.get("mlflow.runName") != run_name:  # the filtered search: already so
            continue
        if run.info.run_id == current_run_id or run.data.tags.get("stage", "train") != "train":
            continue
        if current is None or run.info.start_time <= current.info.start_time:
            return run.info.run_id
    return None


def resumed_from_run_id(client, experiment: str, run_name: str, checkpoint_run_id: Optional[str],
                        current_run_id: Optional[str] = None) -> Optional[str]:
    """The MLflow run that the run ``current_run_id`` (named ``run_name``, in ``experiment``)
    continues, resuming a checkpoint written by run ``checkpoint_run_id`` ("" or None: a
    checkpoint from before checkpoints named their run); None when there is none to name.

    Best effort: a store error is logged, not raised (the link must not stop training)."""
    from mlflow.exceptions import MlflowException

    from dino_scale.tracking.registry import is_not_found

    try:
        if checkpoint_run_id:
            if checkpoint_run_id == current_run_id:
                return None
            try:
                return client.get_run(checkpoint_run_id).info.run_id
            except MlflowException as exc:
                if is_not_found(exc):  # tracked in another store, or deleted for good
                    log.info("run %r resumes a checkpoint of MLflow run %s, which %s does not hold",
                             run_name, checkpoint_run_id, client.tracking_uri)
                    return None
                raise
        return _by_name(client, experiment, run_name, current_run_id)
    except Exception as exc:  # noqa: BLE001 - an outage: the run is tracked, only not linked
        log.warning("run %r: the MLflow run it resumes could not be looked up (%s: %s); no %s tag",
                    run_name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", RESUMED_FROM_TAG)
        return None

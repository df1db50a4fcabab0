"""Which MLflow run a resumed training run continues (its tag ``resumed_from_run_id``).

Reusing a run name makes Ray Train resume that run's latest checkpoint, under a new MLflow run.
The checkpoint names the MLflow run that wrote it (``mlflow_run_id`` in ``trainer_state.json``):
that run, when this store holds it, is the one continued; a checkpoint that names a run of
another store (the earlier run tracked elsewhere) links to none. A checkpoint written before it
named its run is linked to the newest earlier training run of the same name in the same
experiment.

A resumed run keeps the lineage of the run it continues: :func:`check_same_source` refuses to
resume one whose initial weights (``source.*`` tags) differ from the call's, e.g. a fine-tune
resumed after the ``@pretrained`` alias moved to another version.
"""
from __future__ import annotations

import logging
from typing import Optional

from dino_scale.tracking.search import filter_literal, pages

__all__ = ["RESUMED_FROM_TAG", "check_same_source", "resumed_from_run_id", "source_identity"]

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
        # a training run: the engine tags "train", the pipelines "pretrain" / "finetune" (only
        # "train" counted: a pipeline's run was never found)
        if run.info.run_id == current_run_id or run.data.tags.get("stage") == "evaluate":
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


_SOURCE_IDS = ("source.model_name", "source.model_version", "source.run_id")
CLASS_HEADS_TAG = "source.class_heads"  # how fine-tuning made the class heads: "fresh" (else mapped)


def source_identity(tags: dict) -> Optional[tuple[tuple[str, str], ...]]:
    """What the initial weights named by a run's tags are: its registered model name/version and
    run id (``source.*``) when given, else ``source.uri``; None for a run without initial weights.
    A registry alias and the version it points at are the same weights (not the URI text).
    Fresh class heads (``source.class_heads``: ``fresh``, fine-tuning's ``--class-heads fresh``)
    make other initial weights than heads mapped from the same source (no tag)."""
    ids = tuple((k, str(tags[k])) for k in _SOURCE_IDS if tags.get(k) not in (None, ""))
    if not ids:
        ids = (("source.uri", str(tags["source.uri"])),) if tags.get("source.uri") else ()
    if ids and tags.get(CLASS_HEADS_TAG) not in (None, "", "map"):
        ids += ((CLASS_HEADS_TAG, str(tags[CLASS_HEADS_TAG])),)
    return ids or None


def _without_heads(identity):
    return None if identity is None else tuple(kv for kv in identity if kv[0] != CLASS_HEADS_TAG)


def _describe(identity, tags: dict) -> str:
    if identity is None:
        return "no initial weights"
    heads = " with fresh class heads" if dict(identity).get(CLASS_HEADS_TAG) == "fresh" else ""
    if tags.get("source.model_name"):
        return f"models:/{tags['source.model_name']}/{tags.get('source.model_version', '')}{heads}"
    return ", ".join(f"{k}={v}" for k, v in identity if k != CLASS_HEADS_TAG) + heads


def check_same_source(client, experiment: str, run_name: str, checkpoint_run_id: Optional[str],
                      tags: dict) -> Optional[str]:
    """Raise :class:`~dino_scale.config.ConfigError` when the run ``run_name`` resumes (a checkpoint
    written by MLflow run ``checkpoint_run_id``, see :func:`resumed_from_run_id`) an MLflow run
    whose initial weights differ from ``tags``' (:func:`source_identity`): the resumed weights
    come from the checkpoint, so the new run's ``source.*`` tags (and a version registered from
    it) would name weights it never started from. Best effort: a store that cannot say is logged.
    Returns that earlier run's id (None when there is none to name), for its ``resumed_from_run_id`` tag."""
    from dino_scale.config import ConfigError

    earlier = resumed_from_run_id(client, experiment, run_name, checkpoint_run_id)
    if earlier is None:
        return None
    try:
        earlier_tags = dict(client.get_run(earlier).data.tags)
    except Exception as exc:  # noqa: BLE001 - an outage: the lineage is not checked, training goes on
        log.warning("run %r: the initial weights of MLflow run %s could not be read (%s); not compared",
                    run_name, earlier, type(exc).__name__)
        return earlier
    before, now = source_identity(earlier_tags), source_identity(tags)
    if before != now and _without_heads(before) == _without_heads(now):
        choice = dict(before).get(CLASS_HEADS_TAG, "map")
        raise ConfigError(
            f"run name {run_name!r} resumes MLflow run {earlier}, which started from the same weights with "
            f"--class-heads {choice}: pass --class-heads {choice} to resume, or give another run name to start over")
    if before != now:
        raise ConfigError(
            f"run name {run_name!r} resumes MLflow run {earlier}, which started from "
            f"{_describe(before, earlier_tags)}; this call starts from {_describe(now, tags)}. A resumed run "
            f"continues its checkpoint, so its lineage would be wrong: start it from the same weights "
            f"({_describe(before, earlier_tags)}) to resume, or give another run name to start over")
    return earlier

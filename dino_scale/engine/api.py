"""``fit()``: the high-level entry point the pipelines call.

It opens an MLflow run (nested under ``parent_run_id`` if given), builds the Ray Data
datasets, runs the Ray Train ``TorchTrainer``, reads the final metrics (COCO AP from the
distributed evaluation), copies the final weights (``model.safetensors`` + ``config.json`` +
``lineage.json``) to ``<work_dir>/final`` (the EMA weights, with ``train.ema_decay``, to
``<work_dir>/ema``) and logs them as the run's ``model`` artifact (:func:`evaluate_weights`:
the detections, as ``evaluation``). A run that reuses a run name resumes its checkpoint under a
new MLflow run, tagged ``resumed_from_run_id`` (:mod:`dino_scale.tracking.resume`). Ray is
initialized only when it is not already (``ray_address``, else ``RAY_ADDRESS``, else a local
instance), so fit works embedded and on a cluster.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from dino_scale.config import Config, ConfigError, flatten, to_dict
from dino_scale.engine.checkpoint import CONFIG_NAME, WEIGHTS_NAME, atomic_write_text, load_weights
from dino_scale.engine.final_files import copy_ema, copy_final
from dino_scale.data.readers import reading_datasets
from dino_scale.engine.run_checks import (
    _check_data, _check_init_fits, _conversion_losses, _num_images, check_backbone_weights, check_category_ids,
    check_worker_device, resume_note,
)
from dino_scale.engine.run_lock import run_lock
from dino_scale.engine.train_step import BadStepError

__all__ = ["FitResult", "fit", "evaluate_weights", "git_sha", "ensure_ray", "check_category_ids"]

log = logging.getLogger("dino_scale.engine")


@dataclass
class FitResult:
    """What :func:`fit` produced. ``metrics`` are rank 0's final metrics (``AP``, ``AP50``,
    ``AP75``, ``APs``, ``APm``, ``APl`` when evaluated, ``step``, ``bad_steps_total`` ...)."""

    checkpoint_path: str  # final Ray Train checkpoint (storage path or URI)
    weights_path: Path  # <work_dir>/final/model.safetensors (evaluate_weights: the weights evaluated)
    config_path: Path  # <work_dir>/final/config.json
    metrics: dict[str, Any]
    run_id: Optional[str]
    tracking_uri: str
    run_name: str
    history: list[dict[str, Any]] = field(default_factory=list)
    # the run's logger while calls are still buffered (the store was down when the run ended: the
    # final metrics, the checkpoint tag and the end status); None once everything was sent
    pending_tracking: Any = field(default=None, repr=False, compare=False)

    def finish_tracking(self, timeout_s: float = 30.0) -> bool:
        """Send what the run's logger still buffers (the pipelines call it before registering);
        True when nothing is left to send. A run whose end could not be sent stayed RUNNING.
        Calls the store refused (a bad metric key) are dropped, not left: the logger logs them
        as an error and they do not make this False."""
        if self.pending_tracking is None:
            return True
        self.pending_tracking.close(timeout_s=timeout_s)
        if self.pending_tracking.pending == 0:
            self.pending_tracking = None
        return self.pending_tracking is None


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[2],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except Exception:
        return "unknown"


def ensure_ray(address: Optional[str] = None, **init_kwargs) -> None:
    """``ray.init`` unless Ray is already initialized (``address`` or ``RAY_ADDRESS`` if set)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, **init_kwargs)


def quiet_progress_bars(dataset) -> None:
    """Turn off Ray Data's per-operator progress bars for ``dataset`` (its own DataContext,
    not the process's): printed by the split coordinator, or by every worker in deterministic
    mode (~50k lines for a 16-image test run), they drown the engine's progress lines and cost
    CPU in the log monitor. ``DINO_SCALE_RAY_PROGRESS=1`` keeps them."""
    if os.environ.get("DINO_SCALE_RAY_PROGRESS") == "1":
        return
    ctx = dataset.context
    ctx.enable_progress_bars = False
    if hasattr(ctx, "enable_operator_progress_bars"):
        ctx.enable_operator_progress_bars = False


def _drain(relay: Any, timeout_s: float) -> None:
    """Send what the tracking ``relay`` actor (or ``None``) still holds, then end it; ``None``, so
    that ``relay = _drain(relay, ...)`` makes a later call a no-op."""
    if relay is not None:
        from dino_scale.tracking.relay import drain_relay

        drain_relay(relay, timeout_s)


def _run(cfg: Config, *, train_dir: Optional[str], val_dir: Optional[str], work_dir: str | Path, run_name: str,
         init_weights: Optional[str], init_strict: bool, experiment: str, parent_run_id: Optional[str],
         tags: Optional[dict[str, Any]], storage_path: Optional[str], evaluate: bool, train: bool,
         progress: bool, ray_address: Optional[str], test_hooks: Optional[dict], lineage: Optional[dict],
         tracking_close_timeout_s: float, preloaded: Optional[list] = None) -> FitResult:
    from dino_scale.data import build_eval_dataset, build_train_dataset, to_coco_gt
    from dino_scale.data.ray_data import unreadable_shard
    from dino_scale.engine.evaluate import check_eval_config
    from dino_scale.engine.progress import ProgressCallback
    from dino_scale.engine.trainer import (
        build_trainer, check_training_config, loop_config, normalize_storage_path, steps_per_epoch, worker_count,
    )
    import ray

    from dino_scale.engine.elastic import check_restart
    from dino_scale.tracking.logger import ResilientLogger
    from dino_scale.tracking.registry import store_client
    from dino_scale.tracking.relay import start_relay
    from dino_scale.tracking.resume import RESUMED_FROM_TAG, check_same_source
    from dino_scale.tracking.uris import default_tracking_uri

    from dino_scale.data.integrity import labels_fingerprint
    from dino_scale.data.manifest import absolute_data_dirs

    if not (run_name.isascii() and run_name.isprintable()):  # before any work: Ray Train refuses it mid-start
        raise ConfigError(f"run name {run_name!r}: use printable ASCII characters only (Ray Train tags its "
                          f"metrics with it)")
    train_dir, val_dir = absolute_data_dirs(train_dir), absolute_data_dirs(val_dir)  # as read and as recorded
    if evaluate and val_dir:
        check_eval_config(cfg)  # before any data is read: a bad one failed in every worker's evaluation
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    storage = normalize_storage_path(storage_path or cfg.train.storage_path, work / "ray")
    _check_data(train_dir if train else None, val_dir if evaluate else None, cfg)
    check_worker_device(cfg, ray_address, training=train)
    if train:
        check_training_config(cfg)
    else:
        worker_count(cfg, training=False)  # no batch-size arithmetic: evaluation accumulates nothing
    spe = steps_per_epoch(_num_images(train_dir), cfg) if train else 1
    train_data = labels_fingerprint(train_dir) if train else ""  # a resumed run must train on the same data
    resumes = None  # reusing a run name resumes it: on a worker count it can load, with the settings it trained with
    if train:
        resumes = check_restart(storage, run_name, cfg.train.num_workers, cfg.train.zero_stage, config=cfg,
                                steps_per_epoch=spe, train_data=train_data)
        if resumes is not None:
            log.warning("%s", resume_note(run_name, resumes, cfg, spe))
    tracking_uri = default_tracking_uri(work)
    earlier = None  # the MLflow run a resumed run continues: its lineage must be this call's (and it is linked)
    if resumes is not None:
        earlier = check_same_source(store_client(tracking_uri), experiment, run_name, resumes.get("mlflow_run_id"),
                                    tags or {})
    check_backbone_weights(cfg, init_weights, init_strict, ray_address,
                           resumed_world=None if resumes is None else int(resumes.get("world") or 0),
                           resumed_frozen=bool(resumes and resumes.get("frozen")))
    # read before Ray and the MLflow run start: a val record whose labels changed after conversion
    # is refused here (ShardError), as scoring against it would not give the dataset's AP
    coco_gt = to_coco_gt(val_dir) if evaluate and val_dir else None
    # read and fitted here: a file that did not fit failed in every worker, after Ray and the MLflow run started
    # ``preloaded``: [the state dict of init_weights, already read by the caller], emptied here so
    # that once it is in the object store no frame of this driver keeps it
    init_sd = preloaded.pop() if preloaded else (load_weights(init_weights) if init_weights else None)
    if init_sd is not None:
        _check_init_fits(cfg, str(init_weights), init_sd, strict=init_strict)
    ensure_ray(ray_address)
    tracker = ResilientLogger(tracking_uri)
    run_tags = {"preset": cfg.name, "git_sha": git_sha(), "workers": cfg.train.num_workers,
                "gpus": cfg.train.num_workers if cfg.train.use_gpu else 0, "zero_stage": cfg.train.zero_stage,
                "precision": cfg.train.precision, "stage": "train" if train else "evaluate"}
    run_tags.update(tags or {})
    # rank 0 logs to this run: one that cannot be created now (TrackingUnavailable) would track nothing of training
    run_id = tracker.start_run(experiment, run_name, {k: str(v) for k, v in run_tags.items()}, parent_run_id,
                               wait_s=tracking_close_timeout_s)
    if earlier:  # link the MLflow run it continues (the one that wrote the checkpoint)
        tracker.set_tags({RESUMED_FROM_TAG: earlier})
    tracker.log_params(flatten(cfg))
    tracker.log_dict(to_dict(cfg), "config.json")
    lineage = dict(lineage or {})
    lineage.update({"init_weights": str(init_weights) if init_weights else None, "train_dir": train_dir,
                    "val_dir": val_dir, "parent_run_id": parent_run_id, "experiment": experiment})
    if init_weights:
        tracker.set_tags({"init_weights": str(init_weights)})

    def end_run(status: str, error: str) -> None:
        """End the MLflow run early (``FAILED``/``KILLED``), tagged with ``error``."""
        tracker.set_tags({"error": error})
        tracker.end_run(status)
        tracker.close(timeout_s=tracking_close_timeout_s)

    relay = None
    try:  # any failure from here on marks the MLflow run FAILED, an interrupt KILLED
        datasets: dict[str, Any] = {}
        if train:
            # a shard order and an order within each read block per (seed, epoch); the latter's blocks
            # are Ray's choice, so not in deterministic mode (the same order on every cluster)
            datasets["train"] = build_train_dataset(train_dir, cfg.data, block_order=not cfg.train.deterministic)
        # Handed to the workers through Ray's object store: on a cluster they run on other
        # machines than this driver, where a file written here does not exist.
        val_gt = None
        if coco_gt is not None:
            datasets["val"] = build_eval_dataset(val_dir, cfg.data)
            val_gt = ray.put(coco_gt)
        init_state = ray.put(init_sd) if init_sd is not None else None
        del init_sd  # the object store holds it
        # rank 0 logs through an actor on this node whatever the store: a node-local one (sqlite, a
        # loopback server) exists only here, a server's credentials (MLFLOW_TRACKING_TOKEN...) are
        # this process's only (workers do not get the driver's environment: rank 0 was refused,
        # 401, and every step metric lost), and rank 0 never waits on a slow store
        relay = start_relay(tracking_uri, run_id) if run_id else None
        for ds in datasets.values():
            quiet_progress_bars(ds)
        total = min(cfg.train.epochs * spe, cfg.train.max_steps or 10 ** 12) if train else 0
        loop_cfg = loop_config(cfg, steps_per_epoch=spe, datasets=list(datasets), run_id=run_id,
                               tracking_uri=tracking_uri, init_weights=str(init_weights) if init_weights else None,
                               init_strict=init_strict, init_state=init_state, val_gt=val_gt, tracking_relay=relay,
                               evaluate=evaluate, train=train, test_hooks=test_hooks, train_data=train_data)
        loop_cfg["tracking_close_timeout_s"] = tracking_close_timeout_s
        callbacks = [ProgressCallback(total_steps=total)] if progress else []
        trainer = build_trainer(cfg, datasets, run_name=run_name, storage_path=storage,
                                train_loop_config=loop_cfg, callbacks=callbacks)
        result = trainer.fit()
    except Exception as exc:
        shard_error = unreadable_shard(exc, [train_dir if train else None, val_dir if evaluate else None])
        error = shard_error or exc
        relay = _drain(relay, tracking_close_timeout_s)  # what rank 0 logged, before the run ends
        end_run("FAILED", f"{type(error).__name__}: {str(error)[:500]}")
        if shard_error is not None:  # the file's name, not "Training failed due to worker errors:"
            raise shard_error from exc
        raise
    except BaseException as exc:  # Ctrl-C (Ray's ray.get turns it into SystemExit): the run is over, not RUNNING
        # ended first: a SIGTERM to the process group (scancel, systemd, timeout) killed the relay and
        # Ray with the driver, whose drain below then died in Ray's core (SIGABRT): the run stayed RUNNING
        end_run("KILLED", f"{type(exc).__name__}: interrupted before training finished")
        try:  # what rank 0 logged still lands on the ended run (a short wait: interrupted)
            _drain(relay, min(5.0, tracking_close_timeout_s))
        except Exception:  # noqa: BLE001 - the relay went with its node or with Ray: the interrupt goes on
            pass
        relay = None
        raise
    finally:
        # rank 0 flushed it when the run ended; what a timed-out flush left is sent here
        _drain(relay, tracking_close_timeout_s)
    metrics = dict(result.metrics or {})
    if evaluate and val_dir and "AP" in metrics:  # what the AP is not over (to_coco_gt holds converted data only)
        metrics.update(_conversion_losses(val_dir))
    try:  # a failure or interrupt while the results are saved ends the run too (not left RUNNING)
        if metrics.get("abort_reason"):
            raise BadStepError(metrics["abort_reason"])
        if result.checkpoint is None:
            raise RuntimeError(f"run {run_name} finished without a checkpoint")
        final = work / "final"
        if train:
            copy_final(result.checkpoint, final)
        else:  # evaluation only: the weights are the caller's; keep the detections and the config
            copy_final(result.checkpoint, final, required=())
            atomic_write_text(final / CONFIG_NAME, json.dumps(to_dict(cfg), indent=2))
        lineage.update({"run_id": run_id, "checkpoint": result.checkpoint.path, "metrics": {
            k: v if not isinstance(v, float) or math.isfinite(v) else None  # no AP measured: null (NaN is no JSON)
            for k, v in metrics.items() if k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "step")
            or k.endswith("_at_conversion")}})
        atomic_write_text(final / "lineage.json", json.dumps(lineage, indent=2, default=str))
        if train and copy_ema(result.checkpoint, work / "ema"):  # with its lineage: evaluate finds its val set
            ema_lineage = {**{k: v for k, v in lineage.items() if k != "metrics"}, "weights": "ema"}  # AP: final's
            atomic_write_text(work / "ema" / "lineage.json", json.dumps(ema_lineage, indent=2, default=str))
    except Exception as exc:
        end_run("FAILED", str(exc)[:500] if isinstance(exc, BadStepError) else
                f"{type(exc).__name__} after training: {str(exc)[:500]}")
        raise
    except BaseException as exc:
        end_run("KILLED", f"{type(exc).__name__}: interrupted while the results were saved")
        raise
    eval_metrics = {f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))
                    and not isinstance(v, bool)}
    tracker.log_metrics(eval_metrics, step=int(metrics.get("step", 0)))
    tracker.set_tags({"checkpoint": result.checkpoint.path})
    tracker.log_artifacts(str(final), "model" if train else "evaluation")
    tracker.end_run("FINISHED")
    complete = tracker.close(timeout_s=tracking_close_timeout_s)
    if not complete and tracker.pending:
        log.warning("MLflow: %d calls of run %s (its final metrics, checkpoint tag, end status) could not be "
                    "sent yet; the run shows RUNNING until they are (FitResult.finish_tracking, which the "
                    "pipelines call before registering)", tracker.pending, tracker.run_id)
    try:
        history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
    except Exception:
        history = []
    weights = final / WEIGHTS_NAME if train else Path(str(init_weights))
    return FitResult(checkpoint_path=result.checkpoint.path, weights_path=weights,
                     config_path=final / CONFIG_NAME, metrics=metrics, run_id=tracker.run_id,
                     tracking_uri=tracking_uri, run_name=run_name, history=history,
                     pending_tracking=tracker if tracker.pending else None)


def fit(cfg: Config, train_dir: str, val_dir: Optional[str], work_dir: str | Path, run_name: str, *,
        init_weights: Optional[str] = None, init_strict: bool = True, experiment: str = "dino-scale",
        parent_run_id: Optional[str] = None, tags: Optional[dict[str, Any]] = None,
        storage_path: Optional[str] = None, evaluate: bool = True, progress: bool = True,
        ray_address: Optional[str] = None, lineage: Optional[dict] = None, test_hooks: Optional[dict] = None,
        tracking_close_timeout_s: float = 60.0) -> FitResult:
    """Train ``cfg`` on ``train_dir`` (Parquet shards), evaluate on ``val_dir`` (COCO AP),
    log everything to MLflow and return a :class:`FitResult`.

    ``run_name`` names the MLflow run and the Ray Train run (re-using a name with the same
    storage resumes that Ray run). ``init_weights``: a local weights file/folder loaded
    before training (``init_strict=False`` tolerates missing/unexpected keys). Raises
    :class:`BadStepError` when training diverged (too many NaN/Inf steps in a row), and
    :class:`~dino_scale.tracking.TrackingUnavailable` before any training when the MLflow run
    cannot be created (the store does not answer within ``tracking_close_timeout_s``, or
    refuses it): rank 0 logs to that run. The same holds for :func:`evaluate_weights`.
    """
    # a second live job of this run is refused; a conversion rewriting its data waits for it
    with run_lock(work_dir, f"run {run_name!r}"), reading_datasets((train_dir, val_dir), log.warning):
        return _run(cfg, train_dir=train_dir, val_dir=val_dir, work_dir=work_dir, run_name=run_name,
                    init_weights=init_weights, init_strict=init_strict, experiment=experiment,
                    parent_run_id=parent_run_id, tags=tags, storage_path=storage_path, evaluate=evaluate,
                    train=True, progress=progress, ray_address=ray_address, test_hooks=test_hooks, lineage=lineage,
                    tracking_close_timeout_s=tracking_close_timeout_s)


def evaluation_storage(cfg: Config, work_dir: str | Path) -> str:
    """Ray Train storage of an evaluation-only run: ``<train.storage_path>/evaluations`` when the
    config names a storage path (a trained model's config carries its training run's), else
    ``<work_dir>/ray-evaluations`` (beside the training runs' ``<work_dir>/ray``). In the training
    runs' own storage, an evaluation given a training run's name ran in that run's folder: Ray Train
    took the evaluation's result as the run's newest checkpoint and, keeping
    ``checkpoints_to_keep``, deleted the run's older ones; a resume of the training run then failed
    on the evaluation's folder (no ``trainer_state.json``)."""
    path = cfg.train.storage_path
    return f"{str(path).rstrip('/')}/evaluations" if path else str(Path(work_dir).expanduser() / "ray-evaluations")


def evaluate_weights(cfg: Config, weights: str, val_dir: str, work_dir: str | Path, run_name: str, *,
                     experiment: str = "dino-scale-eval", parent_run_id: Optional[str] = None,
                     tags: Optional[dict[str, Any]] = None, ray_address: Optional[str] = None,
                     lineage: Optional[dict] = None, weights_state: Optional[list] = None) -> FitResult:
    """Distributed COCO evaluation of ``weights`` (no training) on ``cfg.train.num_workers``
    workers, in fp32 under ``cfg.train.precision``'s autocast (no DeepSpeed, no optimizer).
    ``metrics`` holds AP... as for :func:`fit`; ``weights_path`` is ``weights`` (nothing is
    copied: the run's ``evaluation`` artifact and ``<work_dir>/final`` hold ``detections.json``,
    ``config.json`` and ``lineage.json``). An elastic range (``train.min_workers``) is ignored:
    evaluation runs one fixed group (:func:`~dino_scale.engine.trainer.worker_count` with
    ``training=False``). ``cfg.model.backbone_weights`` is not read: ``weights`` replace the whole
    model (the ImageNet file a training run started from is often a path on its own cluster).
    ``weights_state``: ``[state dict]`` the caller already read from ``weights`` (not read again);
    the list is emptied, so the driver holds no copy beside Ray's object store."""
    cfg = replace(cfg, model=replace(cfg.model, backbone_weights=None))
    with run_lock(work_dir, f"evaluation run {run_name!r}"), reading_datasets((val_dir,), log.warning):
        return _run(cfg, train_dir=None, val_dir=val_dir, work_dir=work_dir, run_name=run_name,
                    init_weights=weights, init_strict=True, experiment=experiment, parent_run_id=parent_run_id,
                    tags=tags, storage_path=evaluation_storage(cfg, work_dir), evaluate=True, train=False,
                    progress=False, ray_address=ray_address, test_hooks=None, lineage=lineage,
                    tracking_close_timeout_s=60.0,
                    preloaded=weights_state)

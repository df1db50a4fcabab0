"""The Ray Train ``TorchTrainer`` factory for DINO.

:func:`build_trainer` wires a :class:`~dino_scale.config.Config` into Ray Train:
workers / GPUs / resources per worker (``ScalingConfig``; an elastic ``(min, max)``
range when ``train.min_workers`` is set), Ray Data datasets (``train`` split across
workers by ``streaming_split``; in ``train.deterministic`` mode every worker reads the
full order-preserving stream and keeps its slice), ``FailureConfig(max_failures)``
(restarted workers restore the latest reported checkpoint through
``ray.train.get_checkpoint()``), ``CheckpointConfig(num_to_keep)`` and a storage path
(local folder, ``s3://`` or ``gs://``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from dino_scale.config import Config, ConfigError, to_dict
from dino_scale.engine.deepspeed_utils import check_train_config, grad_accum_steps

__all__ = ["worker_count", "check_training_config", "resources_per_worker", "extra_worker_resources",
           "steps_per_epoch", "loop_config", "build_trainer", "normalize_storage_path"]


def worker_count(cfg: Config, training: bool = True) -> int | tuple[int, int]:
    """``num_workers``, or ``(min_workers, num_workers)`` for an elastic run (every count in
    the range must keep the global batch exact). An evaluation-only run (``training`` false)
    accumulates nothing and runs one fixed group: only ``num_workers >= 1`` is checked."""
    tc = cfg.train
    if tc.num_workers < 1:
        raise ConfigError(f"train.num_workers must be >= 1, got {tc.num_workers}")
    if not training:
        return tc.num_workers
    if tc.min_workers is not None and tc.min_workers > tc.num_workers:
        raise ConfigError(f"train.min_workers ({tc.min_workers}) is above train.num_workers ({tc.num_workers}), "
                          "the most workers an elastic run grows to")
    if tc.min_workers is None or tc.min_workers == tc.num_workers:
        grad_accum_steps(tc.global_batch_size, cfg.data.batch_size, tc.num_workers)
        return tc.num_workers
    if tc.min_workers < 1:
        raise ConfigError(f"train.min_workers must be >= 1, got {tc.min_workers}")
    if not tc.elastic_resize_interval_s >= 0:
        raise ConfigError(f"train.elastic_resize_interval_s must be >= 0, got {tc.elastic_resize_interval_s}")
    if cfg.data.batch_size < 1 or tc.global_batch_size < 1:  # a fixed group: grad_accum_steps checks these
        raise ConfigError(f"data.batch_size and train.global_batch_size must be >= 1, got "
                          f"{cfg.data.batch_size} and {tc.global_batch_size}")
    bad = [n for n in range(tc.min_workers, tc.num_workers + 1)
           if tc.global_batch_size % (cfg.data.batch_size * n)]
    if bad:
        raise ConfigError(f"elastic range {tc.min_workers}..{tc.num_workers}: global batch {tc.global_batch_size} "
                          f"is not a multiple of batch_size {cfg.data.batch_size} x workers for {bad}")
    return (tc.min_workers, tc.num_workers)


def check_training_config(cfg: Config) -> None:
    """What a training run checks before anything starts: the worker count or elastic range
    (:func:`worker_count`), the workers' own settings at the largest group
    (:func:`~dino_scale.engine.deepspeed_utils.check_train_config`), the augmentation sizes
    (:func:`~dino_scale.data.transforms.check_augmentation`), the model's settings
    (:func:`~dino_scale.models.check_model_config`) and the evaluation settings
    (:func:`~dino_scale.engine.evaluate.check_eval_config`: the final evaluation runs after all
    of the training), and the extra worker resources (:func:`extra_worker_resources`)."""
    from dino_scale.data.transforms import check_augmentation
    from dino_scale.engine.evaluate import check_eval_config
    from dino_scale.models import check_model_config

    worker_count(cfg)
    check_train_config(cfg.train, cfg.data.batch_size, cfg.train.num_workers)
    extra_worker_resources(cfg.train.worker_resources)
    check_augmentation(cfg.data)  # else a bad size failed in the data pipeline's tasks, mid-run
    try:
        check_model_config(cfg.model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check_eval_config(cfg)


_BUILT_IN_RESOURCES = {"cpu": "train.cpus_per_worker", "gpu": "train.use_gpu (one GPU a worker)",
                       "memory": None, "object_store_memory": None}


def extra_worker_resources(entries: list[str]) -> dict[str, float]:
    """``train.worker_resources`` (``["gpu_h100", "gpu_spot:1"]``) -> ``{"gpu_h100": 1.0, "gpu_spot": 1.0}``.
    :class:`ConfigError` for an empty name, a built-in resource (set by its own key), a name given
    twice, or an amount that is not a finite number > 0 (Ray refused it in the worker group's
    placement, after Ray and the MLflow run had started, or waited for it forever)."""
    out: dict[str, float] = {}
    for entry in entries or []:
        name, _, amount = str(entry).strip().partition(":")
        name = name.strip()
        if not name:
            raise ConfigError(f"train.worker_resources: {entry!r} names no resource (use name or name:amount)")
        if name.lower() in _BUILT_IN_RESOURCES:
            key = _BUILT_IN_RESOURCES[name.lower()]
            raise ConfigError(f"train.worker_resources: {name!r} is Ray's own resource"
                              + (f"; set it with {key}" if key else ""))
        try:
            value = float(amount) if amount.strip() else 1.0
        except ValueError:
            value = float("nan")
        if not 0.0 < value < float("inf"):
            raise ConfigError(f"train.worker_resources: {entry!r} needs an amount > 0 (name or name:amount)")
        if name in out:
            raise ConfigError(f"train.worker_resources names {name!r} twice")
        out[name] = value
    return out


def resources_per_worker(cfg: Config) -> dict[str, float]:
    """What each Ray Train worker asks for: CPUs (``train.cpus_per_worker``; 1 with a GPU, else
    0.5, leaving CPUs to Ray Data), one GPU with ``train.use_gpu``, and ``train.worker_resources``."""
    tc = cfg.train
    cpus = tc.cpus_per_worker if tc.cpus_per_worker is not None else (1.0 if tc.use_gpu else 0.5)
    res = {"CPU": float(cpus)}
    if tc.use_gpu:
        res["GPU"] = 1.0
    res.update(extra_worker_resources(tc.worker_resources))
    return res


def steps_per_epoch(num_images: int, cfg: Config, world_size: Optional[int] = None) -> int:
    """Optimizer steps per epoch when every worker drops its incomplete last micro-batch."""
    world = world_size or cfg.train.num_workers
    micro = cfg.data.batch_size
    accum = grad_accum_steps(cfg.train.global_batch_size, micro, world)
    steps = ((num_images // world) // micro) // accum
    if steps < 1:
        raise ConfigError(f"{num_images} training images are fewer than one global batch "
                          f"({cfg.train.global_batch_size}); lower train.global_batch_size")
    return steps


def normalize_storage_path(path: Optional[str], default: Path) -> str:
    """Absolute local path or an object-store URI (``s3://``, ``gs://``, ...)."""
    if not path:
        return str(Path(default).resolve())
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def loop_config(cfg: Config, *, steps_per_epoch: int, datasets: list[str], run_id: Optional[str] = None,
                tracking_uri: Optional[str] = None, init_weights: Optional[str] = None, init_strict: bool = True,
                init_state: Any = None, val_gt: Any = None, tracking_relay: Any = None, evaluate: bool = True,
                train: bool = True, test_hooks: Optional[dict] = None) -> dict[str, Any]:
    """The plain-dict ``train_loop_config`` read by ``train_loop_per_worker``.

    Workers may run on other machines than the driver, so what the driver prepares travels
    through Ray, never as a path on the driver's disk: ``init_state`` (the state dict to start
    from; ``init_weights`` is then only its name) and ``val_gt`` (COCO ground truth of the
    val set) are ``ObjectRef`` objects (or inline values), ``tracking_relay`` the driver-node
    logging actor of a node-local MLflow store (:mod:`dino_scale.tracking.relay`).
    """
    from dino_scale.engine.checkpoint import evaluation_dir_name

    return {"config": to_dict(cfg), "steps_per_epoch": int(steps_per_epoch), "datasets": list(datasets),
            "run_id": run_id, "tracking_uri": tracking_uri, "init_weights": init_weights,
            "init_strict": init_strict, "init_state": init_state, "val_gt": val_gt,
            "tracking_relay": tracking_relay, "evaluate": evaluate, "train": train, "test_hooks": test_hooks or {},
            # an evaluation's result folder: one name for every worker, new for each call
            "evaluation_dir_name": None if train else evaluation_dir_name()}


def build_trainer(cfg: Config, datasets: dict[str, Any], *, run_name: str, storage_path: str,
                  train_loop_config: dict[str, Any], callbacks: Optional[list] = None,
                  worker_env: Optional[dict[str, str]] = None):
    """A ``ray.train.torch.TorchTrainer`` running :func:`train_loop_per_worker`."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    from dino_scale.engine.data_config import EngineDataConfig
    from dino_scale.engine.loop import train_loop_per_worker

    tc = cfg.train
    workers = worker_count(cfg, training=bool(train_loop_config.get("train", True)))
    elastic = ({"elastic_resize_monitor_interval_s": float(tc.elastic_resize_interval_s)}
               if isinstance(workers, tuple) else {})
    scaling = ray.train.ScalingConfig(num_workers=workers, use_gpu=tc.use_gpu,
                                      resources_per_worker=resources_per_worker(cfg), **elastic)
    env = {"DS_ACCELERATOR": "cuda" if tc.use_gpu else "cpu", "PYTHONHASHSEED": str(tc.seed)}
    env.update(worker_env or {})
    run_config = ray.train.RunConfig(
        name=run_name, storage_path=storage_path,
        failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.checkpoints_to_keep),
        callbacks=callbacks or None, worker_runtime_env={"env_vars": env})
    # val: split with no row dropped (EngineDataConfig); train: split evenly, or in deterministic
    # mode read whole by every worker, which keeps its slice of each global batch
    if tc.deterministic:
        opts = ExecutionOptions()
        opts.preserve_order = True
        data_config = EngineDataConfig(datasets_to_split=[], execution_options=opts)
    else:
        data_config = EngineDataConfig(datasets_to_split="all")
    return TorchTrainer(train_loop_per_worker, train_loop_config=train_loop_config, scaling_config=scaling,
                        run_config=run_config, datasets=datasets, dataset_config=data_config,
                        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo",
                                                 timeout_s=int(tc.collective_timeout_s)))

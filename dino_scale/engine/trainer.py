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
from dino_scale.config_checks import check_training_config, extra_worker_resources, grad_accum_steps, worker_count

__all__ = ["worker_count", "check_training_config", "resources_per_worker", "extra_worker_resources",
           "steps_per_epoch", "loop_config", "build_trainer", "normalize_storage_path"]


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
                train: bool = True, test_hooks: Optional[dict] = None, train_data: str = "") -> dict[str, Any]:
    """The plain-dict ``train_loop_config`` read by ``train_loop_per_worker``.

    Workers may run on other machines than the driver, so what the driver prepares travels
    through Ray, never as a path on the driver's disk: ``init_state`` (the state dict to start
    from; ``init_weights`` is then only its name) and ``val_gt`` (COCO ground truth of the
    val set) are ``ObjectRef`` objects (or inline values), ``tracking_relay`` the driver-node
    logging actor of a node-local MLflow store (:mod:`dino_scale.tracking.relay`); ``train_data``
    the training data's :func:`~dino_scale.data.integrity.labels_fingerprint`, kept in checkpoints.
    """
    from dino_scale.engine.checkpoint import evaluation_dir_name

    return {"config": to_dict(cfg), "steps_per_epoch": int(steps_per_epoch), "datasets": list(datasets),
            "run_id": run_id, "tracking_uri": tracking_uri, "init_weights": init_weights,
            "init_strict": init_strict, "init_state": init_state, "val_gt": val_gt,
            "tracking_relay": tracking_relay, "evaluate": evaluate, "train": train, "test_hooks": test_hooks or {},
            "train_data": train_data,
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

"""What every pipeline shares: arguments, config, Ray connection, MLflow store, errors.

- :func:`add_common_args` / :func:`build_config`: ``--preset`` (default: a GPU preset
  when GPUs are asked for or, unsaid, exist; else ``tiny``), ``--set a.b=c`` (repeatable), ``--workers``,
  ``--min-workers``, ``--gpus``, ``--zero-stage``, ``--max-steps``, ``--epochs``, ``--work-dir``,
  ``--data``, ``--images``, ``--val-data``, ``--val-images``, ``--synthetic-images``, ``--run-name``,
  ``--debug`` (the flag checks and shortcuts: :mod:`pipelines._flags`).
- :func:`connect_ray`: joins a running cluster when ``RAY_ADDRESS`` is set (which
  ``ray job submit`` does for its entrypoint), else starts an embedded local Ray.
- :func:`setup_tracking`: ``MLFLOW_TRACKING_URI`` if set, else
  ``sqlite:///<work-dir>/mlflow.db``; exported so every stage shares one store.
  It and :func:`require_store` live in :mod:`pipelines._store`, re-exported here.
- :class:`UsageError` and :func:`run_main`, the top-level handler, live in
  :mod:`pipelines._errors` and are re-exported here (``common.UsageError``, ``common.run_main``).
- The start-up notes :func:`schedule_text` and :func:`work_dir_note` live in :mod:`pipelines._notes`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from dino_scale.config import PRESETS, Config, ConfigError, apply_overrides, flatten, parse_override, preset
from dino_scale.config_checks import check_training_config
from pipelines._errors import UsageError, run_main  # noqa: F401 - the pipelines' common.UsageError / run_main
from pipelines._flags import (apply_flags, check_backbone_file, check_flag_conflicts, check_flag_values,  # noqa: F401
                             check_run_name)
from pipelines._notes import schedule_text, work_dir_note  # noqa: F401 - the pipelines' common.* names
from pipelines._store import StoreUnreachable, require_store, setup_tracking, tracking_uri  # noqa: F401

GPU_PRESET = "r50_4scale"
CPU_PRESET = "tiny"


# --------------------------------------------------------------------------- arguments

class OverrideAction(argparse.Action):
    """``--set KEY=VALUE``, repeatable: each kept as ``key=value`` with the whitespace around key
    and value stripped. A :class:`ConfigError` naming the override (one ``error:`` line, exit 2,
    before any work) for one that is not ``section.key=value`` (:func:`dino_scale.config.parse_override`)
    and for a key given twice with two values (the last one used to win, silently). Two spellings
    of one value (``1e-4`` and ``0.0001``, ``true`` and ``1``) are one setting, kept once as
    first written."""

    def __call__(self, parser, namespace, values, option_string=None):
        key, value = parse_override(values)
        items = list(getattr(namespace, self.dest, None) or [])
        for earlier in items:
            old_key, old_value = earlier.split("=", 1)
            if old_key != key:
                continue
            if old_value != value and not _same_setting(key, old_value, value):
                raise ConfigError(f"{option_string} {key} given twice ({old_value!r} and {value!r}): give it once")
            break
        else:
            items.append(f"{key}={value}")
        setattr(namespace, self.dest, items)


def _same_setting(key: str, a: str, b: str) -> bool:
    """Whether ``key=a`` and ``key=b`` set the same value (as the config reads them); False when
    either is refused (an unknown key, a bad value: the config check names it later)."""
    try:
        x, y = (flatten(apply_overrides(Config(), [f"{key}={v}"]))[key] for v in (a, b))
    except (ConfigError, KeyError):
        return False
    return x == y


def add_common_args(parser: argparse.ArgumentParser, data_help: str,
                    training: bool = True) -> argparse.ArgumentParser:
    """The shared options; ``training=False`` leaves out the training-only ones and
    ``--synthetic-images``/``--val-*``."""
    g = parser.add_argument_group("configuration")
    g.add_argument("--preset", default=None,
                   help=("" if training else "for a model that carries no config (a .pth file; a model "
                         "saved by dino_scale carries its own): ")
                        + f"config preset: {', '.join(PRESETS)} (default: {GPU_PRESET} with --gpus >= 1, or "
                          f"without --gpus when GPUs are available; else {CPU_PRESET})")
    g.add_argument("--set", dest="overrides", action=OverrideAction, default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.lr=2e-4 (repeatable, once per key)")
    g.add_argument("--workers", type=int, default=None, help="Ray Train workers (train.num_workers)")
    g.add_argument("--gpus", type=int, default=None,
                   help=f"0 {'trains' if training else 'runs'} on CPU, >=1 one GPU per worker (train.use_gpu); "
                        "default: GPUs when the machine or cluster has any")
    if training:
        g.add_argument("--min-workers", type=int, default=None,
                       help="elastic training: run on as few as this many workers and grow back to "
                            "--workers when nodes return (train.min_workers; ZeRO stage <= 2)")
        g.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3],
                       help="DeepSpeed ZeRO stage (train.zero_stage)")
        g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
        g.add_argument("--epochs", type=int, default=None, help="training epochs (train.epochs)")
    g.add_argument("--work-dir", default="./runs",
                   help="folder for data, checkpoints and the default MLflow store "
                        "(<work-dir>/mlflow.db); shared by all pipelines (default ./runs)")
    d = parser.add_argument_group("data")
    d.add_argument("--data", default=None, help=data_help)
    d.add_argument("--images", default=None, help="image root for an annotation JSON given as --data")
    if training:
        d.add_argument("--val-data", default=None,
                       help="validation set: dataset folder(s), comma-separated, or an annotation JSON (with "
                            "--val-images); default: <data>/val when --data is a folder holding train/ and val/")
        d.add_argument("--val-images", default=None, help="image root for --val-data (default: --images)")
        d.add_argument("--synthetic-images", type=int, default=None,
                       help="images in the generated synthetic training set when no --data is given (default 64)")
    parser.add_argument("--run-name", default=None, help="MLflow / Ray Train run name (default: generated)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return parser


def resolve_preset_name(name: Optional[str], gpus_available: Optional[bool] = None) -> str:
    """``name`` if given (validated), else the GPU preset when GPUs exist, else ``tiny``."""
    if name is not None:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return name
    if gpus_available is None:
        gpus_available = _gpus_available()
    return GPU_PRESET if gpus_available else CPU_PRESET


# device files of the drivers torch's GPU builds use (NVIDIA, ROCm, WSL2): without any of them
# torch.cuda sees no GPU, which this host can tell without importing torch (1-2 s)
_GPU_DRIVER_FILES = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")


def local_gpu_count() -> int:
    """The GPUs torch can use on this machine (0 where CUDA cannot start, e.g. a driver older than
    torch's CUDA build); 0 without importing torch when no GPU driver is there."""
    if not any(os.path.exists(p) for p in _GPU_DRIVER_FILES):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _gpus_available() -> bool:
    try:
        if local_gpu_count() > 0:
            return True
    except ImportError:  # pragma: no cover - a broken torch surfaces where a stage needs it
        pass
    ray = sys.modules.get("ray")  # not imported: not initialized either
    try:
        return bool(ray and ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0)
    except Exception:
        return False


def gpus_asked(args: argparse.Namespace) -> Optional[bool]:
    """What the user said of GPUs: ``--gpus N`` (N >= 1: True, 0: False), else the last
    ``--set train.use_gpu=...``; None when neither was given."""
    gpus = getattr(args, "gpus", None)
    if gpus is not None:
        return gpus > 0
    said = [o for o in (getattr(args, "overrides", None) or []) if o.split("=", 1)[0].strip() == "train.use_gpu"]
    return preset(CPU_PRESET, said[-1:]).train.use_gpu if said else None  # read as the config reads it


def build_config(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    """Preset + ``extra`` overrides (pipeline defaults) + ``--set`` + the shortcut flags. Without
    ``--preset``, the GPU preset when GPUs are asked for (``--gpus 1``) or, unsaid, are there; the CPU
    one when ``--gpus 0`` (was: whatever this machine had, so ``--gpus 8`` on a GPU-less head trained
    the CPU demo model on 8 GPUs, and ``--gpus 0`` on a GPU node ResNet-50 on the CPU)."""
    name = resolve_preset_name(args.preset, gpus_asked(args))
    args.preset = name
    return _gpus_by_default(apply_flags(preset(name, list(extra) + list(args.overrides or [])), args), args)


def _gpus_by_default(cfg: Config, args: argparse.Namespace) -> Config:
    """``cfg`` with ``train.use_gpu`` set when GPUs are there and the user did not say otherwise."""
    if not gpu_choice_given(args) and _gpus_available():
        cfg.train.use_gpu = True
    return cfg


def gpu_choice_given(args: argparse.Namespace) -> bool:
    """Whether the user said where to train (``--gpus``, ``--set train.use_gpu=...``)."""
    return gpus_asked(args) is not None


def device_note(cfg: Config, args: argparse.Namespace) -> Optional[str]:
    """A note when a run joining a cluster trains on CPU without being asked to: the cluster has
    no GPU now, and an autoscaler launches GPU nodes only for GPU workers."""
    if cfg.train.use_gpu or gpu_choice_given(args) or not os.environ.get("RAY_ADDRESS"):
        return None
    return ("note: training on CPU: the joined cluster has no GPU now (an autoscaling cluster launches "
            "GPU nodes only when GPU workers ask for them): pass --gpus 1 for one GPU per worker")


def default_run_name(prefix: str) -> str:
    """``<prefix>-<yyyymmdd>-<hhmmss>-<6 hex>``: unique even for jobs started in the same
    second (a reused run name resumes that run and shares its folders)."""
    import uuid

    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def set_eval_resources(cfg: Config, args: argparse.Namespace,
                       log: Optional[Callable[[str], None]] = None) -> Config:
    """Evaluation and prediction run where they are started, not where the model was trained:
    workers from ``--workers`` / ``--set train.num_workers`` else 1, GPUs from ``--gpus`` /
    ``--set train.use_gpu`` else when this machine or the joined cluster has any (call after
    :func:`connect_ray`). Without ``RAY_ADDRESS`` (this machine's Ray) the training cluster's
    ``train.worker_resources``, ``cpus_per_worker`` and ``storage_path`` are dropped too (said
    through ``log``) unless set in this call: a worker asking for a resource no node here has
    (``gpu_h100``) waited for ever, and the evaluation wrote to the training run's bucket."""
    user = {o.split("=", 1)[0].strip() for o in (args.overrides or [])}
    if args.workers is None and "train.num_workers" not in user:
        cfg.train.num_workers = 1
    if "train.min_workers" not in user:
        cfg.train.min_workers = None  # a fixed group: elastic scaling is for training
    if args.gpus is None and "train.use_gpu" not in user:
        cfg.train.use_gpu = _gpus_available()
    if not os.environ.get("RAY_ADDRESS"):
        for key, unset in (("worker_resources", []), ("cpus_per_worker", None), ("storage_path", None)):
            value = getattr(cfg.train, key)
            if f"train.{key}" not in user and value != unset:
                setattr(cfg.train, key, unset)
                if log is not None:
                    log(f"note: train.{key}={value!r} of the training run is not used on this machine's Ray "
                        f"(--set train.{key}=... to use one)")
    return cfg


def validate_config_args(args: argparse.Namespace, extra: Sequence[str] = ()) -> None:
    """Raise :class:`ConfigError` / :class:`UsageError` now for a preset typo, a bad ``--set``,
    a flag out of range or a registry name/alias MLflow would refuse, before any data is
    generated or Ray is started. ``extra``: the pipeline's own overrides known this early
    (applied before ``--set``, as :func:`build_config` applies them)."""
    check_flag_values(args)
    # a training pipeline whose preset is known here also gets the engine's pre-run checks
    # (batch sizes per worker count, an elastic range, ZeRO stage, schedule) before a dataset
    # is converted or Ray starts; otherwise the preset and --set keys are checked
    known = hasattr(args, "zero_stage") and not preset_needs_cluster(args)
    name = resolve_preset_name(args.preset, gpus_asked(args)) if known or args.preset is not None else CPU_PRESET
    check_flag_conflicts(args, preset(name, list(args.overrides or [])))
    cfg = preset(name, list(extra) + list(args.overrides or []))
    if known:
        cfg = apply_flags(cfg, args)
        check_training_config(cfg)
        asks_gpu_only = cfg.model.msda_backend == "cuda" or cfg.train.precision == "fp16"
        if asks_gpu_only and (gpu_choice_given(args) or not os.environ.get("RAY_ADDRESS")):  # else: the cluster's
            check_worker_device(_gpus_by_default(cfg, args))  # GPUs decide, once joined
        check_backbone_file(cfg, args)
        n = getattr(args, "synthetic_images", None)
        if n is not None and args.data is None and n < cfg.train.global_batch_size:
            # the engine refuses a training set smaller than one step, after the set is made
            raise UsageError(f"--synthetic-images {n} is fewer than one global batch "
                             f"({cfg.train.global_batch_size}); give at least that many")
    user_gpu = cfg.train.use_gpu and any(o.split("=", 1)[0].strip() == "train.use_gpu" for o in args.overrides or [])
    if (getattr(args, "gpus", None) or user_gpu) and not os.environ.get("RAY_ADDRESS"):
        # the embedded Ray will see the GPUs torch sees: refuse now, not after the data is made
        # and Ray started (check_gpus_here stays the authoritative check); --set train.use_gpu=true too
        _refuse_missing_gpus(args, cfg.train.num_workers if known else (args.workers or 1), local_gpu_count())


def join_cluster_for_the_preset(args: argparse.Namespace, log: Callable[[str], None],
                                extra: Sequence[str] = ()) -> bool:
    """A training pipeline with no ``--preset`` under ``RAY_ADDRESS`` (:func:`preset_needs_cluster`):
    join the cluster now, before any data is converted, and run the training checks
    :func:`validate_config_args` left for it on the preset the cluster's GPUs pick (``extra``: the
    pipeline's overrides known this early). Was: first checked inside ``fit``, after the conversion
    and, for fine-tuning, the starting model's download. Returns whether it joined."""
    import copy

    if not preset_needs_cluster(args):
        return False
    log(f"Ray: {connect_ray()}")
    if hasattr(args, "zero_stage"):
        cfg = build_config(copy.copy(args), extra)  # a copy: build_config sets its preset
        check_training_config(cfg)
        check_worker_device(cfg)
    return True


def check_worker_device(cfg: Config) -> None:
    """The engine's refusal of what CPU workers cannot run (``model.msda_backend=cuda``, fp16 on a CPU
    without it: :func:`dino_scale.engine.run_checks.check_worker_device`) on ``cfg`` as the run will
    have it (``train.use_gpu`` decided), before any data work. Was: in ``fit`` only, after the
    dataset's conversion and Ray's start. torch is imported only when one of them is asked for."""
    if cfg.train.use_gpu or (cfg.model.msda_backend != "cuda" and cfg.train.precision != "fp16"):
        return
    from dino_scale.engine.run_checks import check_worker_device as engine_check

    engine_check(cfg, None)  # a cluster joined by RAY_ADDRESS: the fp16 check warns there


def check_path(path: Optional[str], what: str) -> Optional[Path]:
    """``Path(path)`` if it exists; a :class:`UsageError` naming ``what`` otherwise."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"{what} not found: {path}")
    return p


# --------------------------------------------------------------------------- Ray, MLflow

def connect_ray(num_cpus: Optional[int] = None) -> str:
    """Join the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``), else start
    an embedded local Ray. Returns a short description for the log."""
    import ray

    if ray.is_initialized():
        return "connected"
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        what = f"joined Ray cluster at {address}"
    else:
        cpus = num_cpus or max(4, 2 * (os.cpu_count() or 1))
        # More logical CPUs than cores: Ray Data inside Ray Train needs CPUs left for its tasks.
        # address="local": never attach to some other `ray start` cluster on this host.
        # The dashboard stays on: Ray Train's placement-group cleaner uses its state API.
        ray.init(address="local", num_cpus=cpus, dashboard_host="127.0.0.1", configure_logging=True,
                 logging_level="WARNING", log_to_driver=True)
        what = f"started embedded local Ray ({cpus} logical CPUs)"
    return what


def check_gpus_here(cfg: Config, args: argparse.Namespace) -> None:
    """:class:`UsageError` when ``cfg`` asks for GPU workers (``--gpus N``, ``train.use_gpu``) the
    embedded local Ray lacks: nothing can join it, so Ray Train would wait for them forever. A
    joined cluster (``RAY_ADDRESS``) may be given GPU nodes (an autoscaler): not checked."""
    import ray

    if not cfg.train.use_gpu or os.environ.get("RAY_ADDRESS"):
        return
    _refuse_missing_gpus(args, cfg.train.num_workers, int(ray.cluster_resources().get("GPU", 0)))


def _refuse_missing_gpus(args: argparse.Namespace, workers: int, have: int) -> None:
    if have < workers:
        asked = f"--gpus {args.gpus}" if getattr(args, "gpus", None) is not None else "train.use_gpu"
        raise UsageError(f"{asked}: {workers} GPU worker(s), but this machine has {have} GPU(s) "
                         "and Ray would wait for them forever; --gpus 0 runs on the CPU")


def preset_needs_cluster(args: argparse.Namespace) -> bool:
    """No ``--preset`` while joining a cluster: connect first, so the default preset can
    look at the cluster's GPUs rather than the (often GPU-less) head node's."""
    return args.preset is None and bool(os.environ.get("RAY_ADDRESS"))


def config_needs_cluster(args: argparse.Namespace) -> bool:
    """Whether a training pipeline joins the cluster before it builds its config: no
    ``--preset`` (:func:`preset_needs_cluster`), or no ``--gpus`` / ``train.use_gpu``, whose
    default also looks at the cluster's GPUs (was: at the head node's only, so a job submitted
    with ``--preset`` and no ``--gpus`` trained on CPU on a GPU cluster)."""
    return bool(os.environ.get("RAY_ADDRESS")) and (args.preset is None or not gpu_choice_given(args))


# --------------------------------------------------------------------------- output

class Progress:
    """Timestamped progress lines: ``[pretrain 00:12] message``."""

    def __init__(self, stage: str):
        self.stage = stage
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        s = int(time.monotonic() - self.t0)
        print(f"[{self.stage} {s // 60:02d}:{s % 60:02d}] {message}", flush=True)

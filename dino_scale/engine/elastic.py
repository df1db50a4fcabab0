"""Resuming a training checkpoint on another worker count (an elastic run shrinking or
growing, or a user changing ``train.num_workers`` between runs).

DeepSpeed (0.19.8, checked on CPU) loads a plain checkpoint across a world-size change only
without ZeRO. ZeRO-1/2 checkpoints hold one optimizer partition per rank, and the loader
refuses another data-parallel size; DeepSpeed's *universal* format (``ds_to_universal``: one
folder per parameter with its fp32 value and Adam moments) loads exactly on any worker count.
:func:`universal_resume` converts once per node into a temporary folder, which the engine then
loads with ``"checkpoint": {"load_universal": true}``. ZeRO-3 checkpoints cannot move: the plain
loader fails, and the universal loader gives every parameter group the first group's lr and
weight decay (DINO's backbone group trains with the wrong settings). :func:`check_resumable`
refuses that with a clear error, and ``check_train_config`` refuses an elastic ZeRO-3 run up
front. :func:`check_restart` checks a rerun under an existing run name on the driver: the
worker count (ZeRO-3) and the settings it must keep (:func:`resume_changes`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from dino_scale.config import Config, ConfigError, flatten, from_dict
from dino_scale.engine.checkpoint import CONFIG_NAME, DS_TAG, FROZEN_NAME, STATE_NAME, UNIVERSAL_TAG
from dino_scale.engine.optim import lr_drop_epochs
from dino_scale.engine.scratch import sweep_dead, write_owner

__all__ = ["saved_world_size", "check_resumable", "resume_restores_every_tensor", "reads_backbone_weights",
           "holds_frozen_tensors",
           "check_restart", "resume_changes", "RESUME_FREE_KEYS",
           "universal_resume", "resume_source", "ResumeSource", "UNIVERSAL_TAG", "zero_checkpoint_layout"]

log = logging.getLogger("dino_scale.engine")


_PARTITION = re.compile(r".*zero_pp_rank_\d+.*_optim_states\.pt")  # one ZeRO optimizer partition per rank


def _read_json(fs, path: str) -> Optional[dict]:
    """The JSON object at ``path`` of the ``pyarrow.fs`` filesystem ``fs``; None when missing
    (pyarrow raises FileNotFoundError, an OSError) or unreadable."""
    try:
        with fs.open_input_stream(path) as fh:
            return json.loads(fh.read().decode())
    except (OSError, ValueError):
        return None


def saved_world_size(folder, filesystem=None) -> int:
    """Workers that wrote the training checkpoint in ``folder``: the state's ``world``, else (a
    checkpoint from before it was recorded) the ZeRO optimizer partitions; 0 when unknown.
    ``filesystem``: a ``pyarrow.fs`` filesystem holding ``folder`` (a Ray ``Checkpoint``'s
    ``filesystem`` and ``path``: read in place, also on an object store); local by default."""
    import pyarrow.fs as pafs

    fs, root = filesystem or pafs.LocalFileSystem(), str(folder).rstrip("/")
    try:
        world = int((_read_json(fs, f"{root}/{STATE_NAME}") or {}).get("world", 0))
    except ValueError:  # a world that is not a number
        world = 0
    if world:
        return world
    try:
        infos = fs.get_file_info(pafs.FileSelector(f"{root}/{DS_TAG}"))
    except OSError:
        return 0
    return sum(1 for info in infos if _PARTITION.fullmatch(info.base_name))


def check_resumable(saved_world: int, world: int, zero_stage: int) -> bool:
    """True when the checkpoint needs the universal conversion (ZeRO-1/2 on another worker
    count); raises :class:`ConfigError` for ZeRO-3 on another worker count."""
    if not saved_world or saved_world == world or zero_stage == 0:
        return False
    if zero_stage >= 3:
        raise ConfigError(
            f"this ZeRO-3 checkpoint was written by {saved_world} workers and cannot resume on {world}: "
            f"DeepSpeed's loaders fail or restore every parameter group with the first group's lr and "
            f"weight decay. Resume on {saved_world} workers, or give another run name to start over (a "
            f"resumed run keeps its ZeRO stage: the checkpoint's layout is ZeRO-3's)")
    return True


def resume_restores_every_tensor(saved_world: int, world: int, zero_stage: int, precision: str,
                                 frozen_saved: bool = False) -> bool:
    """Whether resuming from a training checkpoint written by ``saved_world`` workers (0: unknown)
    restores every tensor of the model, the frozen ones (ResNet stem and layer1, FrozenBN
    statistics) included: only then may a worker skip ``model.backbone_weights`` as it builds the
    model. ``frozen_saved``: the checkpoint holds its frozen parameters and buffers
    (``frozen.safetensors``, :func:`holds_frozen_tensors`), which every resume restores
    (:mod:`~dino_scale.engine.frozen_state`): True on any resume that can load (not ZeRO-3 on
    another worker count, refused by :func:`check_resumable`). A checkpoint written before that
    file was saved (DeepSpeed 0.19.8, checked on CPU): True where DeepSpeed loads the module's
    state dict and every partition: the same worker count (any count without ZeRO), fp32 weights
    (``bf16`` is autocast over them). Not so: a universal load (ZeRO-1/2 on another worker count)
    restores only the optimizer's (trained) parameters and skips the module state dict; under
    ``fp16`` the exact fp32 frozen weights :func:`full_state_dict` saves are taken at engine
    creation, from the build. There the frozen tensors are the build's: the file's."""
    if zero_stage >= 3 and saved_world not in (0, world):
        return False  # refused (check_resumable)
    if frozen_saved:
        return True
    if precision == "fp16":
        return False
    return zero_stage >= 3 or not check_resumable(saved_world, world, zero_stage)


def holds_frozen_tensors(folder, filesystem=None) -> bool:
    """Whether the training checkpoint in ``folder`` (of the ``pyarrow.fs`` ``filesystem``, local
    by default: as :func:`saved_world_size`) holds its frozen parameters and buffers
    (``frozen.safetensors``: checkpoints written since they are saved)."""
    import pyarrow.fs as pafs

    fs, root = filesystem or pafs.LocalFileSystem(), str(folder).rstrip("/")
    try:
        return fs.get_file_info(f"{root}/{FROZEN_NAME}").type == pafs.FileType.File
    except OSError:
        return False


def reads_backbone_weights(cfg: Config, *, init_weights: Optional[str], init_strict: bool,
                           resumed_world: Optional[int], world: Optional[int] = None,
                           resumed_frozen: bool = False) -> bool:
    """Whether a training worker reads ``cfg.model.backbone_weights`` as it builds the model: not
    when none is set, nor when init weights loaded strictly replace every weight, nor when the run
    resumes (``resumed_world``: the worker count that wrote the checkpoint it resumes from, 0 when
    unknown; None when it resumes none) from a checkpoint that restores every tensor
    (:func:`resume_restores_every_tensor`; ``resumed_frozen``: it holds its frozen tensors,
    :func:`holds_frozen_tensors`, so any resume does; not one written before). ``world``: the
    worker's run size; None (the driver, before the run): every size the run may take, where an
    elastic run resized between checkpoints resumes from one of another size."""
    tc = cfg.train
    if not cfg.model.backbone_weights or (init_weights and init_strict):
        return False
    if resumed_world is None:
        return True
    if world is not None:
        worlds = [world]
    elif tc.min_workers is not None and tc.min_workers != tc.num_workers:
        worlds = list(range(tc.min_workers, tc.num_workers + 1))
    else:
        worlds = [tc.num_workers]
    saved = {resumed_world, *worlds} if len(worlds) > 1 else {resumed_world}
    return not all(resume_restores_every_tensor(s, w, tc.zero_stage, tc.precision, resumed_frozen)
                   for s in saved for w in worlds)


# Settings a rerun under the same run name may change: where and how it runs, and its budget
# (train.max_steps, train.epochs; the lr schedule they shape is compared as such; train.zero_stage
# between 1 and 2 only, whose checkpoints DeepSpeed loads into each other). Everything
# else decides what is trained: the resumed optimizer and lr scheduler keep the first run's lr
# and weight decay whatever the new config says, so a change would be silently half-applied.
RESUME_FREE_KEYS = frozenset({
    "name", "model.backbone_weights", "model.msda_backend", "model.backbone_checkpointing",
    "model.encoder_checkpointing", "data.train", "data.val", "data.image_root", "data.val_image_root",
    "train.epochs",
    "train.max_steps", "train.lr_drop_epochs", "train.num_workers", "train.min_workers",
    "train.elastic_resize_interval_s", "train.use_gpu", "train.cpus_per_worker", "train.worker_resources",
    "train.zero_stage", "train.max_failures", "train.max_bad_steps", "train.storage_path", "train.log_every_steps",
    "train.checkpoint_every_steps", "train.checkpoints_to_keep", "train.torch_threads", "train.compile",
    "train.compile_granularity", "train.compile_mode", "train.tf32", "train.deterministic",
    # how long a collective may wait (the README's advice when the final evaluation outlasts it: a
    # rerun that raised it was refused, so only a new run name, trained from scratch, got past it)
    # and the evaluation's image sizes and detections per image (like eval.*: never trained on)
    "train.collective_timeout_s", "data.eval_size", "data.eval_max_size", "model.num_select",
})


def zero_checkpoint_layout(zero_stage: int) -> str:
    """How a DeepSpeed checkpoint of ``zero_stage`` stores the optimizer: ZeRO-1 and ZeRO-2 write
    the same per-rank partitions and load each other's checkpoints exactly; ZeRO-0 (the optimizer
    in the model states file) and ZeRO-3 (partitioned parameters too) load only their own
    (DeepSpeed 0.19.8 on CPU: 0 -> 1/2 FileNotFoundError of 'zero_pp_rank_0_..._optim_states.pt',
    2 -> 0 AttributeError in the optimizer's load_state_dict, 2 <-> 3 an AssertionError in its
    state dict loader, in every worker after the run had started)."""
    return {0: "ZeRO-0", 1: "ZeRO-1/2", 2: "ZeRO-1/2", 3: "ZeRO-3"}.get(int(zero_stage), f"ZeRO-{zero_stage}")


def _resume_settings(cfg: Config) -> dict[str, Any]:
    """The settings of ``cfg`` a resumed run must keep (not :data:`RESUME_FREE_KEYS`, not ``eval.*``),
    with the lr schedule as applied: the drop epochs (``step``/``multistep``) or the cosine's length,
    and the checkpoint layout of ``train.zero_stage`` (:func:`zero_checkpoint_layout`: 1 <-> 2 may change)."""
    out = {k: v for k, v in flatten(cfg).items() if k not in RESUME_FREE_KEYS and not k.startswith("eval.")}
    out["train.zero_stage (checkpoint layout)"] = zero_checkpoint_layout(cfg.train.zero_stage)
    if cfg.train.schedule == "cosine":
        out["train.epochs"] = cfg.train.epochs
    else:
        out["lr drop epochs"] = lr_drop_epochs(cfg.train)
    return out


def resume_changes(saved_config: dict, cfg: Config, saved_steps_per_epoch: int = 0,
                   steps_per_epoch: int = 0, saved_train_data: str = "", train_data: str = "") -> list[str]:
    """``["train.lr 0.0002 -> 0.001", ...]``: how ``cfg`` differs from the config a checkpoint
    was trained with (``saved_config``, a dict) in what a resumed run must keep, the epoch
    length in optimizer steps (training images // global batch) and the training data (their
    :func:`~dino_scale.data.integrity.labels_fingerprint`) when both are known."""
    old, new = _resume_settings(from_dict(saved_config)), _resume_settings(cfg)
    changes = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k)]
    if saved_steps_per_epoch and steps_per_epoch and saved_steps_per_epoch != steps_per_epoch:
        changes.append(f"steps per epoch (training images // global batch) {saved_steps_per_epoch} -> "
                       f"{steps_per_epoch}")
    if saved_train_data and train_data and saved_train_data != train_data:  # same size, other images or labels:
        # the resumed epoch position would continue in another dataset
        changes.append(f"training data (fingerprint of their labelled images) {saved_train_data} -> {train_data}")
    return changes


def check_restart(storage_path: str, run_name: str, world: int, zero_stage: int, config: Optional[Config] = None,
                  steps_per_epoch: int = 0, train_data: str = "") -> Optional[dict]:
    """On the driver, before any worker starts: a run that reuses ``run_name`` at
    ``storage_path`` (Ray Train restores that run's latest checkpoint) must be able to load it
    on ``world`` workers, and (given ``config``, the run's ``steps_per_epoch`` and ``train_data``
    fingerprint) must train what that run trained (:func:`resume_changes`). Raises :class:`ConfigError` for a ZeRO-3
    checkpoint of another worker count, which every worker would otherwise refuse after a
    minute of start-up, and for a changed setting, which the resumed optimizer and schedule
    would silently mix with the first run's; nothing to check for a new run name.

    Returns the trainer state of the checkpoint the run resumes from (``mlflow_run_id``: the
    MLflow run that wrote it, absent for a checkpoint without one; ``world``: the worker count
    that wrote it, :func:`saved_world_size`; ``frozen``: whether it holds its frozen tensors,
    :func:`holds_frozen_tensors`), None when it resumes none."""
    import ray.train

    try:
        previous = ray.train.Result.from_path(f"{str(storage_path).rstrip('/')}/{run_name}")
    except RuntimeError:  # no run of that name there yet (Ray's "folder/snapshot doesn't exist")
        return None
    checkpoint = previous.checkpoint
    if checkpoint is None:
        return None
    where = f"run {run_name!r} at {storage_path} resumes from {checkpoint.path}"
    saved = saved_world_size(checkpoint.path, checkpoint.filesystem)
    root = checkpoint.path.rstrip("/")
    state = {**(_read_json(checkpoint.filesystem, f"{root}/{STATE_NAME}") or {}), "world": saved,
             "frozen": holds_frozen_tensors(root, checkpoint.filesystem)}
    saved_config = _read_json(checkpoint.filesystem, f"{root}/{CONFIG_NAME}") if config is not None else None
    changes: list[str] = []
    if saved_config is not None:  # None: not asked, or a checkpoint written before the config was kept in it
        try:
            changes = resume_changes(saved_config, config, int(state.get("steps_per_epoch") or 0), steps_per_epoch,
                                     str(state.get("train_data") or ""), train_data)
        except ConfigError as exc:  # a config of another release: cannot be compared key by key
            log.warning("%s; its config.json cannot be compared with this run's (%s)", where, exc)
    if changes:  # first: a changed ZeRO stage is said as such, not judged by the new stage's rules below
        raise ConfigError(f"{where}, trained with other settings: {'; '.join(changes)}. A resumed run keeps its "
                          f"optimizer state and lr schedule: rerun with the run's settings, or use another run name")
    try:
        check_resumable(saved, world, zero_stage)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return state


def _convert(folder: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
           "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--input_folder", str(folder / DS_TAG), "--output_folder", str(out / UNIVERSAL_TAG)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {folder / DS_TAG} to DeepSpeed's universal format failed "
                           f"(exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")


def universal_resume(folder: Path, key: str, local_rank: int, barrier) -> Path:
    """The universal copy of the checkpoint in ``folder``, converted by each node's local rank 0
    into a temporary folder named after ``key`` (the checkpoint's storage path) and the host
    name: every rank of a node finds the same folder, and nodes sharing a temporary
    directory do not collide. Collective: every rank calls it; ``barrier()`` waits for all.
    Load it with ``engine.load_checkpoint(root, tag=UNIVERSAL_TAG)``; :func:`resume_source`
    removes it afterwards."""
    node_key = f"{socket.gethostname()}:{key}"  # one folder per node, also where /tmp is shared
    root = Path(tempfile.gettempdir()) / f"dino_universal_{hashlib.sha1(node_key.encode()).hexdigest()[:16]}"
    failure: Optional[BaseException] = None
    if local_rank == 0:  # always afresh: a leftover copy may be of an older checkpoint at this path
        sweep_dead("universal")  # copies (and half-made ones) of workers killed on this host
        tmp = root.with_name(f"{root.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            tmp.mkdir()
            write_owner(tmp)  # kept by the rename: the copy is swept if this process is killed
            _convert(Path(folder), tmp)
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
        except BaseException as exc:  # raised after the barrier, so no rank waits forever
            failure = exc
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    if failure is not None:
        raise failure
    if not (root / UNIVERSAL_TAG).is_dir():
        raise RuntimeError(f"no universal checkpoint at {root}: its conversion failed on this node's local rank 0")
    return root


@dataclass
class ResumeSource:
    """What a worker resumes from: ``folder`` (the checkpoint, None for a fresh start), the
    worker count that wrote it, and ``universal`` (its universal copy, or None)."""

    folder: Optional[Path] = None
    saved_world: int = 0
    universal: Optional[Path] = None


@contextlib.contextmanager
def resume_source(checkpoint, world: int, zero_stage: int, local_rank: int, barrier) -> Iterator[ResumeSource]:
    """Collective: open a Ray Train ``checkpoint`` (or None) for this worker, converting it to
    the universal format when it was written by another worker count (ZeRO-1/2). Set the
    engine's ``"checkpoint": {"load_universal": true}`` when ``universal`` is set, build and
    load it inside the block. On leaving, the universal copy is removed: after ``barrier()``
    when the block succeeded, at once when it failed (a rank that failed alone must not wait
    for ranks stuck in a collective)."""
    if checkpoint is None:
        yield ResumeSource()
        return
    with checkpoint.as_directory() as folder:
        source = ResumeSource(Path(folder), saved_world_size(Path(folder)))
        if check_resumable(source.saved_world, world, zero_stage):
            source.universal = universal_resume(source.folder, checkpoint.path, local_rank, barrier)
        ok = False
        try:
            yield source
            ok = True
        finally:
            if source.universal is not None:
                try:
                    if ok:
                        barrier()  # every rank of the node has read the copy
                finally:  # also when that barrier fails (a peer died): the copy is gigabytes
                    if local_rank == 0:
                        shutil.rmtree(source.universal, ignore_errors=True)

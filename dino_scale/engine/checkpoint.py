"""Checkpoints: atomic writes, exact-resume training state, portable final weights.

A training checkpoint folder holds

* ``ds/``: the DeepSpeed engine state (module, optimizer partitions per rank, lr
  scheduler), written collectively by ``engine.save_checkpoint``;
* ``trainer_state.json``: epoch, micro-batches consumed in that epoch, global step,
  images seen, bad-step counters (data position for exact resume);
* ``rng_rank<r>.pt``: python/numpy/torch RNG states of each rank (:mod:`~dino_scale.engine.state_files`;
  read with ``weights_only``, as ``ema.pt``);
* ``frozen.safetensors``: the frozen parameters and buffers (fp32), which DeepSpeed's universal load
  skips (:mod:`~dino_scale.engine.frozen_state`): every resume restores them from here;
* ``config.json``: the run's :class:`Config` (what a rerun under the same run name must keep:
  :func:`dino_scale.engine.elastic.check_restart`);
* ``ema.pt`` (optional; read with ``weights_only``: a pickled object in it is refused, never
  run) and, in the final checkpoint, ``model.safetensors`` (full fp32 weights).

Atomicity: single files are written through a temporary file + ``os.replace``
(:func:`atomic_write_bytes`); a checkpoint folder becomes a run's checkpoint only once every
rank has reported its part (Ray Train registers it then), so a save that dies midway is never
the one resumed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from dino_scale.engine.frozen_state import FROZEN_NAME, frozen_tensors, restore_frozen
from dino_scale.engine.optim import steps_on_param_devices
from dino_scale.engine.state_files import (  # noqa: F401 (re-exported: this module's interface)
    EMA_NAME, TMP_MARK as _TMP_MARK, load_ema_state, load_rng_state, save_ema_state, save_rng_state,
)
from dino_scale.models.weights_file import read_safetensors

__all__ = [
    "TrainState", "atomic_write_bytes", "atomic_write_text",
    "save_rng_state", "load_rng_state", "save_ema_state", "load_ema_state", "save_weights", "load_weights",
    "load_into", "check_fits", "save_training_checkpoint",
    "load_training_checkpoint", "WEIGHTS_NAME", "CONFIG_NAME", "STATE_NAME", "DS_TAG", "UNIVERSAL_TAG",
    "checkpoint_dir_name", "evaluation_dir_name", "EMA_NAME", "FROZEN_NAME",
]

PathLike = Union[str, Path]
log = logging.getLogger(__name__)
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
STATE_NAME = "trainer_state.json"
DS_TAG = "ds"
UNIVERSAL_TAG = f"{DS_TAG}_universal"  # a universal-format copy of DS_TAG (dino_scale.engine.elastic)


@dataclass
class TrainState:
    """Where training stands; enough to continue exactly where it stopped."""

    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed (incl. skipped)
    global_step: int = 0  # optimizer steps taken
    images_seen: int = 0  # images per worker x workers, successful steps only
    bad_steps: dict = field(default_factory=lambda: {"total": 0, "consecutive": 0})
    finished: bool = False
    resumes: int = 0  # restarts from a checkpoint so far (worker failures, preemptions)
    world: int = 0  # workers that counted ``micro_in_epoch`` (0: unknown, a checkpoint from before)
    steps_per_epoch: int = 0  # optimizer steps per epoch of the run's data (0: unknown, a checkpoint from before)
    mlflow_run_id: str = ""  # the MLflow run that wrote it: a resumed run's resumed_from_run_id ("": untracked)
    train_data: str = ""  # labels_fingerprint of the training data ("": unknown, a checkpoint from before)

    def rescale_to(self, world: int) -> bool:
        """Convert the epoch position to ``world`` workers (an elastic restart on another worker
        count): the samples of the epoch already consumed stay consumed. Checkpoints are taken
        at optimizer steps, where the position is a whole number of global batches, so the
        conversion is exact; returns False when it is not (the position rounds down: a few
        samples are seen again)."""
        world = int(world)
        exact = True
        if self.world and self.world != world:
            samples = self.micro_in_epoch * self.world  # in micro-batches of every worker together
            self.micro_in_epoch, exact = samples // world, samples % world == 0
        self.world = world
        return exact

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half."""
    path = Path(path)
    # the name cut short where the mark would make it longer than a file name may be (255 bytes): a
    # legal 243-255 byte name (predict's copy of an image so named) failed with "File name too long"
    head = path.name if len(path.name.encode()) <= 200 else path.name.encode()[:200].decode(errors="ignore")
    tmp = path.with_name(f"{head}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # named the temporary file, a name the user never chose and cannot find
        if exc.errno is None or exc.filename != str(tmp):
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_weights(folder: PathLike, state_dict: dict[str, torch.Tensor], config: Optional[dict] = None,
                 metadata: Optional[dict[str, str]] = None) -> Path:
    """``model.safetensors`` (+ ``config.json``) in ``folder``, each written atomically."""
    from safetensors.torch import save as st_save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    atomic_write_bytes(folder / WEIGHTS_NAME, st_save(tensors, metadata=metadata or {}))
    if config is not None:
        atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2))
    return folder / WEIGHTS_NAME


def load_weights(path: PathLike) -> dict[str, torch.Tensor]:
    """State dict from a ``.safetensors`` file, a folder holding one, or a torch ``.pt``/``.pth``
    (``model`` entry if present, read with ``weights_only``: ValueError naming the file for other
    pickled objects); :class:`~dino_scale.models.weights_file.WeightsFileError`
    naming the file when it is cut short or not that format."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"no weights at {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    from dino_scale.models.official import load_official_checkpoint

    try:  # weights_only, as predict reads it: a pickle is never run (it was, with weights_only=False)
        return load_official_checkpoint(str(path))
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused by weights_only loading (it holds objects beyond tensors and an "
                         f"argparse.Namespace; re-save its 'model' state dict): {e}") from e


def load_into(model: torch.nn.Module, state: dict, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load ``state`` into ``model`` as predict, the evaluate pre-check and the registry do, so a
    file they accept also loads in every Ray worker: strict goes through
    :func:`~dino_scale.models.official.load_official_state_dict` (official layouts: one copy of a
    shared head, no Swin ``relative_position_index``, ``module.`` prefixes;
    :class:`~dino_scale.models.official.CheckpointMismatch` otherwise) and returns ``([], [])``;
    ``strict=False`` normalizes the keys the same way (was: a plain ``load_state_dict``, to
    which every key of a ``module.``-prefixed official file was unexpected: nothing loaded) and
    returns the ``(missing, unexpected)`` keys it tolerated; a state holding fewer than half of
    the model's tensors is a ``CheckpointMismatch`` naming the counts."""
    from dino_scale.models.official import load_official_state_dict

    return load_official_state_dict(model, state, strict=strict)


def check_fits(model_cfg, state: dict, strict: bool = True) -> None:
    """:class:`~dino_scale.models.official.CheckpointMismatch` unless ``state`` loads (as
    :func:`load_into` loads it in every worker) into the model of ``model_cfg``
    (:class:`~dino_scale.config.ModelConfig`), built on the meta device: no memory, no backbone
    file read. For checks before a run or an evaluation starts."""
    import warnings

    from dino_scale.models import build_model

    with torch.device("meta"):
        model = build_model(dataclasses.replace(model_cfg, backbone_weights=None))
    with warnings.catch_warnings():  # copying into meta tensors is a no-op, and says so per key
        warnings.simplefilter("ignore")
        load_into(model, state, strict=strict)


def save_training_checkpoint(folder: PathLike, engine, state: TrainState, rank: int,
                             ema=None, config: Optional[dict] = None) -> None:
    """Collective: every rank calls it with its own (local) ``folder``. ``config``: the run's
    config as a dict, written by rank 0 as ``config.json``. Rank 0 also writes the frozen
    parameters and buffers (``frozen.safetensors``, fp32: :func:`~dino_scale.engine.frozen_state.frozen_tensors`)."""
    from safetensors.torch import save as st_save

    folder = Path(folder)
    engine.save_checkpoint(str(folder), tag=DS_TAG, client_state={"trainer_state": state.to_dict()})
    frozen = frozen_tensors(engine)  # collective under ZeRO-3
    if rank == 0:
        atomic_write_bytes(folder / FROZEN_NAME, st_save(frozen))
    save_rng_state(folder, rank)
    if ema is not None and rank == 0:
        save_ema_state(folder, ema)
    if rank == 0:
        if config is not None:
            atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2))
        atomic_write_text(folder / STATE_NAME, json.dumps(state.to_dict(), indent=2))


def load_training_checkpoint(folder: PathLike, engine, rank: int, ema=None,
                             universal_root: Optional[PathLike] = None) -> TrainState:
    """Collective: restore engine (module, optimizer, scheduler), RNG and EMA; return the state.
    ``universal_root``: the engine state from the checkpoint's universal copy there
    (:mod:`dino_scale.engine.elastic`, another worker count) in place of ``folder/ds``. The frozen
    parameters and buffers, which a universal load skips, come from ``frozen.safetensors``
    (:func:`~dino_scale.engine.frozen_state.restore_frozen`); a checkpoint written before it was
    saved leaves them as the model was built."""
    folder = Path(folder)
    state_file = folder / STATE_NAME
    if not state_file.is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no {STATE_NAME})")
    source, tag = (folder, DS_TAG) if universal_root is None else (Path(universal_root), UNIVERSAL_TAG)
    load_path, _client = engine.load_checkpoint(str(source), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {source / tag}")
    steps_on_param_devices(getattr(engine, "optimizer", None))  # a universal load leaves them on the host
    if (folder / FROZEN_NAME).is_file():
        restore_frozen(engine, read_safetensors(folder / FROZEN_NAME), str(folder / FROZEN_NAME))
    if not load_rng_state(folder, rank):
        log.info("%s holds no RNG state of rank %d (a rank its run did not have): fresh random streams",
                 folder, rank)
    if ema is not None and (folder / EMA_NAME).is_file():  # rank 0 wrote it from its device: read on the CPU
        ema.load_state_dict(load_ema_state(folder / EMA_NAME))
    elif ema is not None:  # it averaged the weights as built: start over from the resumed ones
        ema.reset(engine)
        log.warning("%s holds no %s (its run kept no EMA): the EMA of the weights starts over from the resumed "
                    "weights", folder, EMA_NAME)
    return TrainState.from_dict(json.loads(state_file.read_text()))


def checkpoint_dir_name(step: int, world: int, epoch: Optional[int] = None, micro_in_epoch: int = 0,
                        resumes: int = 0) -> str:
    """The storage folder of a training checkpoint: ``ckpt_<step>_<epoch>_<micro>_w<workers>``,
    or ``final_<step>_w<workers>`` without ``epoch`` (``final_<step>_w<workers>_r<resumes>`` in a
    resumed run).

    The worker count is part of the name: Ray Train copies a checkpoint into its folder without
    emptying it, so a folder left half-written by a crashed attempt and written again by a
    restart on another worker count (the same step at an epoch's end, or the final one) kept
    the old attempt's ZeRO partitions beside the new ones. The resume count is part of a final
    name: a run resumed from its final checkpoint that takes no step (the same command run again,
    or an abort replayed to the same step) reported its folder a second time, and Ray Train's
    retention, pruning the older of the two entries, deleted the folder both named."""
    if epoch is None:
        return f"final_{int(step):09d}_w{int(world)}" + (f"_r{int(resumes)}" if resumes else "")
    return f"ckpt_{int(step):09d}_{int(epoch)}_{int(micro_in_epoch)}_w{int(world)}"


def evaluation_dir_name() -> str:
    """The storage folder of an evaluation's result (its detections): ``final_000000000_eval_<time>_<id>``,
    new for each call (made on the driver, handed to every worker). A fixed name was reported again
    by each evaluation under a reused run name (Ray Train resumes its checkpoint list), and its
    retention, deleting by path, removed the folder of the latest when it pruned the oldest entry:
    the third evaluation of a run name lost its detections (seen)."""
    return f"final_000000000_eval_{time.strftime('%Y%m%dT%H%M%S')}_{uuid.uuid4().hex[:6]}"

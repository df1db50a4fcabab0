"""The small torch-pickled files of a training checkpoint (:mod:`dino_scale.engine.checkpoint`):
``rng_rank<r>.pt`` (each rank's python/numpy/torch RNG states) and ``ema.pt`` (the weights' moving
average). Checkpoint folders come from shared storage, so both are read with
``torch.load(weights_only=True)``: a pickled object in them is refused with a ValueError naming
the file, never run.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import random
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

__all__ = ["save_rng_state", "load_rng_state", "rng_untouched", "save_ema_state", "load_ema_state", "EMA_NAME",
           "TMP_MARK"]

PathLike = Union[str, Path]
EMA_NAME = "ema.pt"
TMP_MARK = ".tmp-"  # in the name of what is being written: readers ignore it


def save_rng_state(folder: PathLike, rank: int) -> None:
    """This rank's python/numpy/torch RNG states and, on a GPU, its own device's (the current
    one: a rank uses one device; the states of every visible device did not restore where
    fewer devices are visible, e.g. an elastic restart with fewer workers on the node).

    Written so that ``torch.load(weights_only=True)`` reads it: numpy's state goes in as a dict
    whose ``key`` is an int64 tensor (624,) rather than numpy's tuple holding an ndarray."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"bit_generator": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # a CPU run on a GPU node: no context on GPU 0
        state["cuda_device"] = torch.cuda.get_rng_state()
    path = Path(folder) / f"rng_rank{rank}.pt"
    tmp = path.with_name(path.name + TMP_MARK + "w")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _numpy_array_globals() -> list:
    """What unpickling a numpy uint32 array needs (an ``rng_rank<r>.pt`` written before the
    format above held numpy's state tuple with its uint32 key array), under numpy 2's module
    name and numpy 1's, for ``torch.serialization.safe_globals``. Nothing else is allowed (an
    object array's items are unpickled as any other object: refused)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), (_reconstruct, "numpy._core.multiarray._reconstruct"),
            (_reconstruct, "numpy.core.multiarray._reconstruct")]


def _torch_load_safely(path: Path, what: str, fix: str, extra_globals: tuple = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a ValueError naming ``path``, ``what``
    it is and ``fix`` when it holds pickled objects beyond tensors and plain values (which a
    file written by this module never does): such a pickle is refused, never run."""
    allowed = getattr(torch.serialization, "safe_globals", None)  # torch < 2.5: none beyond weights_only's own
    try:
        with allowed(list(extra_globals)) if allowed is not None else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: {what} refused by weights_only loading: it holds pickled objects "
                         f"beyond tensors and plain values, which this project never writes; {fix} ({e})") from e


def _numpy_state(entry: Any) -> Optional[tuple]:
    """numpy's legacy state tuple from the saved ``numpy`` entry (the dict written now, or the
    tuple written before); None when it is neither."""
    if isinstance(entry, dict) and {"bit_generator", "key", "pos", "has_gauss", "cached_gaussian"} <= set(entry) \
            and isinstance(entry["key"], torch.Tensor):
        return (entry["bit_generator"], entry["key"].numpy().astype(np.uint32), int(entry["pos"]),
                int(entry["has_gauss"]), float(entry["cached_gaussian"]))
    if isinstance(entry, tuple) and len(entry) == 5 and isinstance(entry[1], np.ndarray) \
            and entry[1].dtype == np.uint32:
        return entry
    return None


def load_rng_state(folder: PathLike, rank: int) -> bool:
    """Restore this rank's RNG states; False if the file is missing (e.g. new world size).
    Read with ``weights_only`` (files of the earlier format too: numpy arrays are the only
    objects allowed beyond it); ValueError naming the file for anything else in it."""
    path = Path(folder) / f"rng_rank{rank}.pt"
    if not path.is_file():
        return False
    fix = "remove it to resume this rank with fresh random streams"
    state = _torch_load_safely(path, "RNG state", fix, extra_globals=tuple(_numpy_array_globals()))
    numpy_state = _numpy_state(state.get("numpy")) if isinstance(state, dict) else None
    if numpy_state is None or "python" not in state or not isinstance(state.get("torch"), torch.Tensor):
        raise ValueError(f"{path}: not an RNG state file (expected a dict of 'python', 'numpy' and "
                         f"'torch' states); {fix}")
    random.setstate(state["python"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # a GPU run has made its context by now
        if "cuda_device" in state:
            torch.cuda.set_rng_state(state["cuda_device"])  # onto this rank's (current) device
        elif "cuda" in state:  # written before: every visible device's state, indexed by device
            index = torch.cuda.current_device()
            if index < len(state["cuda"]):
                torch.cuda.set_rng_state(state["cuda"][index])
    return True


def rng_states() -> tuple:
    """This process's python/numpy/torch RNG states (and the current CUDA device's, where a
    context exists), for :func:`set_rng_states`. Host-side copies: no device synchronization."""
    return (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)


def set_rng_states(states: tuple) -> None:
    """Put back what :func:`rng_states` returned."""
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    if states[3] is not None:
        torch.cuda.set_rng_state(states[3])


@contextlib.contextmanager
def rng_untouched():
    """Run a block without moving this process's python/numpy/torch RNG streams (and the current
    CUDA device's, where a context exists): their states are restored on exit. For work between
    the last training step and the final checkpoint's RNG file (building and running the
    evaluation model drew from torch's stream, so a finished run extended with more steps went on
    with other noise than one run to the longer length)."""
    states = rng_states()
    try:
        yield
    finally:
        set_rng_states(states)


def save_ema_state(folder: PathLike, ema) -> None:
    """``ema.state_dict()`` (:class:`~dino_scale.engine.deepspeed_utils.ModelEMA`) as ``folder/ema.pt``,
    through a temporary file."""
    path = Path(folder) / EMA_NAME
    tmp = path.with_name(path.name + TMP_MARK + "w")
    torch.save(ema.state_dict(), tmp)
    os.replace(tmp, path)


def load_ema_state(path: PathLike) -> dict[str, Any]:
    """The :meth:`~dino_scale.engine.deepspeed_utils.ModelEMA.state_dict` saved in ``path``
    (``{"decay": float, "updates": int, "shadow": {name: fp32 tensor}}``), read on the CPU with
    ``weights_only``: ValueError naming the file when it holds other pickled objects (never
    run) or another structure."""
    path = Path(path)
    fix = "resume from another checkpoint of the run, or start it again"
    state = _torch_load_safely(path, "EMA state", fix)
    if not (isinstance(state, dict) and isinstance(state.get("shadow"), dict) and "decay" in state
            and "updates" in state and all(isinstance(v, torch.Tensor) for v in state["shadow"].values())):
        raise ValueError(f"{path}: not an EMA state (expected 'decay', 'updates' and a 'shadow' dict of "
                         f"tensors); {fix}")
    return state

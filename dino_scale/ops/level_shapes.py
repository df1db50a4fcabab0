"""Device tensors describing the feature levels, made once per size and device.

The deformable-attention op takes ``spatial_shapes`` (L,2) int64 (H, W) and
``level_start_index`` (L,) int64 as device tensors. Building them every step costs a
host-to-device copy, and reading them back (the PyTorch backend needs the sizes as Python
ints) costs a device-to-host sync per call. :func:`level_index_tensors` caches the pair per
(shapes, device); :func:`level_shapes_of` returns the Python shapes of a cached tensor
without touching the device (any other tensor is read back, once per call, as before), and
:func:`cached_level_shapes` does so for the cached pair only, whose start indices the op then
knows to be consistent with the shapes.
:func:`cached_level_tensors` is the same cache for other per-size constant tables (the
model's per-token grids), built by a caller-given function.

After the first step at a given input size the forward therefore makes neither a host copy
nor a read-back for these tensors, which is what CUDA-graph capture requires (a pageable
host copy cannot be captured, a read-back is a sync).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .transfer import host_to_device

__all__ = ["level_index_tensors", "level_shapes_of", "cached_level_shapes", "cached_level_tensors",
           "clear_level_cache"]

Shapes = Tuple[Tuple[int, int], ...]
_CACHE: "OrderedDict[tuple, Tuple[Tensor, ...]]" = OrderedDict()
# id(spatial_shapes) -> (spatial_shapes, its Python shapes, its level_start_index), "index" kind
_SHAPES_BY_ID: dict[int, Tuple[Tensor, Shapes, Tensor]] = {}
# Entries in all kinds together. An entry of the model's per-token tables is ~16 bytes per token
# (320 KB at 800x1199), so the cache holds at most ~20 MB of device memory; multi-scale
# training with many distinct padded sizes misses more often, and a miss costs what building
# the tables every step cost before (no host sync: see cached_level_tensors).
CACHE_SIZE = 64
# Kinds whose entries are large, kept to fewer entries of their own: the denoising attention mask
# is (pad + queries)^2 bytes, ~8.4 MB with the fine-tuning recipe's dn_number=1000 (pad ~2000),
# and its pad size follows each batch's largest box count (64 masks: ~0.5 GB per GPU).
KIND_LIMITS = {"dn_attn_mask": 8}
# Guards _CACHE and _SHAPES_BY_ID: threads sharing one model (a server) hit and evict at once, and a
# key evicted between another thread's get and move_to_end was a KeyError. Not taken while
# compiling (dynamo cannot trace a lock; traced code only reads the cache).
_LOCK = threading.Lock()


def cache_snapshot() -> tuple:
    """Every cached entry now (strong references). A CUDA graph captured over these tables keeps
    reading their memory at replay, which the cache does not see: the holder of a graph keeps a
    snapshot so that an entry evicted later is not freed (and its memory reused) under it."""
    with _LOCK:
        return tuple(_CACHE.values())


def cached_level_tensors(kind: str, level_shapes: Sequence[Tuple[int, int]], device,
                         build: Callable[[Shapes, torch.device], Tuple[Tensor, ...]]) -> Tuple[Tensor, ...]:
    """``build(shapes, device)``, cached per (kind, shapes, device) (LRU, :data:`CACHE_SIZE`
    entries in all). ``build`` should create its tensors on ``device`` directly, or copy host
    tensors with :func:`host_to_device` (pinned, asynchronous): a plain ``.to(device)`` of host
    memory would make every miss a host sync. Do not write into the returned tensors. They are
    created outside inference mode, so a training step may save them for backward."""
    shapes: Shapes = tuple((int(h), int(w)) for h, w in level_shapes)
    if not shapes:
        raise ValueError("level tensors: no levels")
    key = (kind, shapes, str(torch.device(device)))
    compiling = torch.compiler.is_compiling()
    if compiling:  # traced code only reads the cache
        hit = _CACHE.get(key)
    else:
        with _LOCK:
            hit = _recent(key)
    if hit is not None:
        return hit
    with torch.inference_mode(False), torch.no_grad():  # outside the lock: build may use the cache
        value = tuple(build(shapes, torch.device(device)))
    if compiling:
        return value  # traced code keeps no module-level state
    with _LOCK:
        hit = _recent(key)  # another thread built it meanwhile: one tensor per key, as for a hit
        if hit is None:
            _insert(kind, key, shapes, value)
    return value if hit is None else hit


def _recent(key: tuple) -> Optional[Tuple[Tensor, ...]]:
    """The entry of ``key``, marked most recently used; None if absent (caller holds ``_LOCK``)."""
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
    return hit


def _insert(kind: str, key: tuple, shapes: Shapes, value: Tuple[Tensor, ...]) -> None:
    """Cache ``value`` under ``key``, then evict past the limits (caller holds ``_LOCK``)."""
    _CACHE[key] = value
    if kind == "index":
        _SHAPES_BY_ID[id(value[0])] = (value[0], shapes, value[1])
    limit = KIND_LIMITS.get(kind)
    if limit is not None:
        same = [k for k in _CACHE if k[0] == kind]  # oldest first
        for old_key in same[:max(0, len(same) - limit)]:
            del _CACHE[old_key]
    if len(_CACHE) > CACHE_SIZE:
        (old_kind, _, _), old = _CACHE.popitem(last=False)
        if old_kind == "index":
            _SHAPES_BY_ID.pop(id(old[0]), None)


def _index_tables(shapes: Shapes, device: torch.device) -> Tuple[Tensor, Tensor]:
    host = torch.tensor(shapes, dtype=torch.long).reshape(-1, 2)
    starts = torch.cat((host.new_zeros((1,)), host.prod(1).cumsum(0)[:-1]))
    both = host_to_device(torch.cat((host, starts[:, None]), 1), device)  # one copy: (L, 3)
    return both[:, :2].contiguous(), both[:, 2].contiguous()


def level_index_tensors(level_shapes: Sequence[Tuple[int, int]], device) -> Tuple[Tensor, Tensor]:
    """[(H_l, W_l)] -> (spatial_shapes (L,2) int64, level_start_index (L,) int64) on ``device``,
    cached (see :func:`cached_level_tensors`)."""
    return cached_level_tensors("index", level_shapes, device, _index_tables)


def level_shapes_of(spatial_shapes: Tensor) -> List[Tuple[int, int]]:
    """(L,2) shapes tensor -> [(H, W)] Python ints: free for a tensor from
    :func:`level_index_tensors`, one device read-back for any other tensor."""
    if not torch.compiler.is_compiling():
        known = _SHAPES_BY_ID.get(id(spatial_shapes))
        if known is not None and known[0] is spatial_shapes:
            return list(known[1])
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def cached_level_shapes(spatial_shapes: Tensor, level_start_index: Tensor) -> Optional[List[Tuple[int, int]]]:
    """[(H, W)] when ``spatial_shapes`` (L,2) and ``level_start_index`` (L,) are the very pair
    :func:`level_index_tensors` made (the starts are then the running sum of H*W by
    construction), without touching the device; None for any other pair."""
    if torch.compiler.is_compiling():
        return None
    known = _SHAPES_BY_ID.get(id(spatial_shapes))
    if known is None or known[0] is not spatial_shapes or known[2] is not level_start_index:
        return None
    return list(known[1])


def clear_level_cache() -> None:
    """Drop every cached tensor (tests; freeing device memory is not a reason: it is tiny)."""
    with _LOCK:
        _CACHE.clear()
        _SHAPES_BY_ID.clear()

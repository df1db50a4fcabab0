"""Device tensors describing the feature levels, made once per size and device.

The deformable-attention op takes ``spatial_shapes`` (L,2) int64 (H, W) and
``level_start_index`` (L,) int64 as device tensors. Building them every step costs a
host-to-device copy, and reading them back (the PyTorch backend needs the sizes as Python
ints) costs a device-to-host sync per call. :func:`level_index_tensors` caches the pair per
(shapes, device); :func:`level_shapes_of` returns the Python shapes of a cached tensor
without touching the device (any other tensor is read back, once per call, as before).

After the first step at a given input size the forward therefore makes neither a host copy
nor a read-back for these tensors, which is what CUDA-graph capture requires (a pageable
host copy cannot be captured, a read-back is a sync).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["level_index_tensors", "level_shapes_of", "clear_level_cache"]

_CACHE: "OrderedDict[tuple, Tuple[Tensor, Tensor]]" = OrderedDict()
_SHAPES_BY_ID: dict[int, Tuple[Tensor, Tuple[Tuple[int, int], ...]]] = {}
CACHE_SIZE = 128  # multi-scale training sees tens of sizes; each entry is two tiny tensors


def level_index_tensors(level_shapes: Sequence[Tuple[int, int]], device) -> Tuple[Tensor, Tensor]:
    """[(H_l, W_l)] -> (spatial_shapes (L,2) int64, level_start_index (L,) int64) on ``device``.

    Cached (LRU, :data:`CACHE_SIZE` entries): do not write into the returned tensors. They are
    created outside inference mode, so a training step may save them for backward.
    """
    shapes = tuple((int(h), int(w)) for h, w in level_shapes)
    if not shapes:
        raise ValueError("level_index_tensors: no levels")
    key = (shapes, str(torch.device(device)))
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    with torch.inference_mode(False), torch.no_grad():
        host = torch.tensor(shapes, dtype=torch.long)
        start = torch.cat((host.new_zeros((1,)), host.prod(1).cumsum(0)[:-1]))
        value = (host.to(device), start.to(device))
    if torch.compiler.is_compiling():
        return value  # traced code keeps no module-level state
    _CACHE[key] = value
    _SHAPES_BY_ID[id(value[0])] = (value[0], shapes)
    if len(_CACHE) > CACHE_SIZE:
        _, (old, _) = _CACHE.popitem(last=False)
        _SHAPES_BY_ID.pop(id(old), None)
    return value


def level_shapes_of(spatial_shapes: Tensor) -> List[Tuple[int, int]]:
    """(L,2) shapes tensor -> [(H, W)] Python ints: free for a tensor from
    :func:`level_index_tensors`, one device read-back for any other tensor."""
    if not torch.compiler.is_compiling():
        known = _SHAPES_BY_ID.get(id(spatial_shapes))
        if known is not None and known[0] is spatial_shapes:
            return list(known[1])
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def clear_level_cache() -> None:
    """Drop every cached tensor (tests; freeing device memory is not a reason: it is tiny)."""
    _CACHE.clear()
    _SHAPES_BY_ID.clear()

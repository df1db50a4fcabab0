"""Pure-PyTorch multi-scale deformable attention (the reference and CPU backend).

Semantics of the official op: bilinear sampling of each level's value map at
``sampling_locations`` in [0, 1] (align_corners=False pixel convention, zero padding
outside the map, NaN/inf locations included, an empty (H or W = 0) level contributing zero),
weighted by ``attention_weights`` and summed over levels and points.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .level_shapes import cached_level_shapes, level_shapes_of

# DINO_SCALE_MSDA_CHECK=1: also check the level table's values (see check_levels) for GPU
# tensors not made by level_index_tensors, at one device read-back per call of the CUDA backend
CHECK_DEVICE_LEVELS = os.environ.get("DINO_SCALE_MSDA_CHECK", "0") == "1"


def check_shapes(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                 sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> None:
    """Shape agreement of the five inputs (metadata only: no device sync). Raises ValueError
    naming the offending input, before anything reaches the kernel; TypeError for a dtype no
    backend takes (value, locations and weights floating point; the level table integers: a
    float table was truncated, 4.7 read as 4), and ValueError for inputs on another device than
    value (the level table excepted: the CUDA backend moves it)."""
    for label, tensor in (("value", value), ("sampling_locations", sampling_locations),
                          ("attention_weights", attention_weights)):
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"ms_deform_attn: {label} must be a floating-point tensor, got {tensor.dtype}")
        if tensor.device != value.device:
            raise ValueError(f"ms_deform_attn: {label} is on {tensor.device}, value on {value.device}")
    for label, tensor in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise TypeError(f"ms_deform_attn: {label} must be an integer tensor (int64), got {tensor.dtype}")
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, M, D), got {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[5] != 2:
        raise ValueError("ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got "
                         f"{tuple(sampling_locations.shape)}")
    n, _, m, _ = value.shape
    _, _, m_loc, n_levels, _, _ = sampling_locations.shape
    if sampling_locations.shape[0] != n or m_loc != m:
        raise ValueError(f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} do not "
                         f"match value {tuple(value.shape)} in batch or heads")
    if tuple(attention_weights.shape) != tuple(sampling_locations.shape[:5]):
        raise ValueError(f"ms_deform_attn: attention_weights {tuple(attention_weights.shape)} must be "
                         f"(N, Lq, M, L, P) = {tuple(sampling_locations.shape[:5])}")
    if spatial_shapes.dim() != 2 or tuple(spatial_shapes.shape) != (n_levels, 2):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be (L, 2) with L = {n_levels}, got "
                         f"{tuple(spatial_shapes.shape)}")
    if tuple(level_start_index.shape) != (n_levels,):
        raise ValueError(f"ms_deform_attn: level_start_index must be (L,) with L = {n_levels}, got "
                         f"{tuple(level_start_index.shape)}")


def _read_levels(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor
                 ) -> Tuple[List[Tuple[int, int]], List[int]]:
    """spatial_shapes (L,2), level_start_index (L,) -> Python ints, in one host copy when both
    are on one device (a device sync for GPU tensors)."""
    if spatial_shapes.device == level_start_index.device:
        rows = torch.cat((spatial_shapes.reshape(-1, 2).long(), level_start_index.reshape(-1, 1).long()), 1)
        table = rows.tolist()
        return [(h, w) for h, w, _ in table], [s for _, _, s in table]
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()], [int(s) for s in level_start_index.tolist()]


def check_levels(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                 read_back: bool = False) -> Optional[List[Tuple[int, int]]]:
    """Check the level table's values against value (N,S,M,D): H, W >= 0, S = sum(H_l*W_l),
    and level_start_index (L,) = the running sum of H_l*W_l before each level (0, H_0*W_0, ...).
    Both backends must see one layout: the PyTorch backend splits value by the shapes alone,
    the compiled kernels read each level from its start index. Raises ValueError.

    Returns [(H, W)], or None when the values were not checked. Checked, without a device
    sync: the pair :func:`level_index_tensors` made (the model's: values known on the host),
    and CPU tensors. Other GPU tensors are read back (one sync) only with ``read_back`` (the
    PyTorch backend, which needs the sizes anyway) or ``DINO_SCALE_MSDA_CHECK=1``; the CUDA
    backend otherwise runs unchecked, its kernels zeroing a level that runs past value. Not
    checked while torch.compile traces (the sizes would be data-dependent there)."""
    if torch.compiler.is_compiling():
        return None
    shapes = cached_level_shapes(spatial_shapes, level_start_index)
    if shapes is None:
        on_host = spatial_shapes.device.type == "cpu" and level_start_index.device.type == "cpu"
        if not (on_host or read_back or CHECK_DEVICE_LEVELS):
            return None
        shapes, starts = _read_levels(spatial_shapes, level_start_index)
        if any(h < 0 or w < 0 for h, w in shapes):
            raise ValueError(f"ms_deform_attn: spatial_shapes {shapes} has a negative size")
        expected = [0] if shapes else []  # no levels: no starts
        for h, w in shapes[:-1]:
            expected.append(expected[-1] + h * w)
        if starts != expected:
            raise ValueError(f"ms_deform_attn: level_start_index {starts} does not match spatial_shapes "
                             f"{shapes}: each level starts at the sum of the H*W before it, {expected}")
    total = sum(h * w for h, w in shapes)
    if total != value.shape[1]:
        raise ValueError(f"ms_deform_attn: spatial_shapes {shapes} cover {total} positions but value has "
                         f"S = {value.shape[1]}")
    return shapes


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """value (N,S,M,D); spatial_shapes (L,2) int64 (H,W); level_start_index (L,);
    sampling_locations (N,Lq,M,L,P,2) as (x,y) in [0,1]; attention_weights (N,Lq,M,L,P).
    Returns (N, Lq, M*D) in value's dtype.

    Half-precision (fp16/bf16) values are computed in fp32 and the result cast back: sampling
    locations must not be rounded to half precision (bf16 locations alone give ~15% relative
    error on a 100x150 map), and accumulation stays fp32 as in the CUDA backend.

    Inputs whose shapes disagree raise ValueError (:func:`check_shapes`, metadata only): without
    it, too few levels in ``spatial_shapes`` or weights of another layout broadcast or reshape
    into a full-size, wrong output. So does a level table whose values disagree with value
    (:func:`check_levels`): this backend splits value by the shapes, and would silently
    ignore a ``level_start_index`` the compiled kernels follow."""
    check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    # no device read-back for the model's cached pair; traced: the sizes as before, unchecked
    shapes = check_levels(value, spatial_shapes, level_start_index, read_back=True) \
        or level_shapes_of(spatial_shapes)
    if value.dtype in (torch.float16, torch.bfloat16):
        out = _sample(value.float(), shapes, sampling_locations.float(), attention_weights.float())
        return out.to(value.dtype)
    return _sample(value, shapes, sampling_locations, attention_weights)


def _sample(value: torch.Tensor, shapes: List[Tuple[int, int]], sampling_locations: torch.Tensor,
            attention_weights: torch.Tensor) -> torch.Tensor:
    """value (N,S,M,D) float32/64, shapes [(H_l, W_l)] with sum H_l*W_l = S, locations
    (N,Lq,M,L,P,2), weights (N,Lq,M,L,P) -> (N, Lq, M*D)."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    if all(isinstance(h, int) and isinstance(w, int) and h * w == 0 for h, w in shapes):
        # no level, or only empty ones (S = 0; grid_sample refuses an empty map): zeros connected
        # to every input through sums over empty slices (zero whatever the values, NaN included),
        # so the gradients are zeros, as the kernels give
        nothing = (sampling_locations[..., :0].sum((3, 4, 5)) + attention_weights[..., :0].sum((3, 4)))
        return (value[:, :0].sum(1).unsqueeze(1) + nothing.to(value.dtype).unsqueeze(-1)).reshape(N, Lq, M * D)
    value_list = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample returns NaN for a NaN/inf location; the official op (and our compiled one)
    # treat any location off the map, non-finite ones included, as contributing zero. A sample
    # needs -1 - 1/W < g < 1 + 1/W (within [-2, 2] for every W >= 1), so clamping to [-3, 3]
    # leaves finite in-range coordinates and their gradients unchanged, and +-3 puts every
    # corner off the map even for W = 1 (at -2 a 1-pixel map's pixel still enters with weight
    # 0, and 0 * inf is NaN).
    grids = (2 * sampling_locations.to(value.dtype) - 1).nan_to_num(nan=-3.0).clamp(-3.0, 3.0)
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        if isinstance(h, int) and isinstance(w, int) and h * w == 0:
            # an empty level samples nothing (as in the kernels); grid_sample refuses an empty map
            sampled.append(value.new_zeros(N * M, D, Lq, P))
            continue
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N*M, D, Lq, L, P) weighted by (N*M, 1, Lq, L*P)
    weights = attention_weights.to(value.dtype).transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()

"""Pure-PyTorch multi-scale deformable attention (the reference and CPU backend).

Semantics of the official op: bilinear sampling of each level's value map at
``sampling_locations`` in [0, 1] (align_corners=False pixel convention, zero padding
outside the map, NaN/inf locations included), weighted by ``attention_weights`` and summed
over levels and points.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .level_shapes import level_shapes_of


def check_shapes(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                 sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> None:
    """Shape agreement of the five inputs (metadata only: no device sync). Raises ValueError
    naming the offending input, before anything reaches the kernel."""
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
    into a full-size, wrong output."""
    check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if value.dtype in (torch.float16, torch.bfloat16):
        out = ms_deform_attn_pytorch(value.float(), spatial_shapes, level_start_index,
                                     sampling_locations.float(), attention_weights.float())
        return out.to(value.dtype)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = level_shapes_of(spatial_shapes)  # no device read-back for the model's cached shapes
    # eager only: traced, the sizes may be data-dependent (unbacked) and split checks them anyway
    if not torch.compiler.is_compiling() and sum(h * w for h, w in shapes) != S:
        raise ValueError(f"ms_deform_attn: spatial_shapes {shapes} cover {sum(h * w for h, w in shapes)} "
                         f"positions but value has S = {S}")
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
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N*M, D, Lq, L, P) weighted by (N*M, 1, Lq, L*P)
    weights = attention_weights.to(value.dtype).transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()

"""Multi-scale deformable attention module (Deformable DETR), around ``ops.ms_deform_attn``.

Parameter names and initialization follow the official ``MSDeformAttn``:
``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``.
Sampling locations and attention weights are computed in float32 even under autocast
(the op's accuracy depends on them); the value may be in a lower precision.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino_scale.ops import ms_deform_attn

from .precision import autocast_off

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """d_model features, n_levels levels, n_heads heads, n_points sampling points per level."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 backend: Optional[str] = None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        if backend not in (None, "pytorch", "cuda"):  # here, not in the first forward of a run
            raise ValueError(f"unknown ms_deform_attn backend {backend!r}: use None, 'cuda' or 'pytorch'")
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: offsets start on a ring of directions, one per head, growing per point."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: Tensor, reference_points: Tensor, value_in: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """query (N,Lq,C); reference_points (N,Lq,L,2) as (x,y) or (N,Lq,L,4) as (cx,cy,w,h), in [0,1]
        of each level's valid area scaled by valid ratios; value_in (N,S,C); spatial_shapes (L,2)
        int64 (H,W); level_start_index (L,); padding_mask (N,S) bool True = padding.
        Returns (N,Lq,C)."""
        N, Lq, _ = query.shape
        # another batch's value or padding mask: a raw view error, or a (1,S)/(S,) mask silently
        # applied to every image, before (shapes only: free, and no graph break under compile)
        if value_in.dim() != 3 or value_in.shape[0] != N or value_in.shape[2] != self.d_model:
            raise ValueError(f"value_in {tuple(value_in.shape)} must be ({N}, S, {self.d_model}): the query "
                             f"{tuple(query.shape)} has batch {N}")
        S = value_in.shape[1]
        if padding_mask is not None and tuple(padding_mask.shape) != (N, S):
            raise ValueError(f"padding_mask {tuple(padding_mask.shape)} must be ({N}, {S}) (batch, value tokens), "
                             f"as value_in {tuple(value_in.shape)}")
        M, L, P = self.n_heads, self.n_levels, self.n_points
        # levels of the inputs vs the layer's: a raw broadcast error, or a silent broadcast of one
        # level's reference points to every level, before
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[0] != L:
            raise ValueError(f"spatial_shapes {tuple(spatial_shapes.shape)} must be ({L}, 2): this layer "
                             f"attends over n_levels={L} feature levels")
        if reference_points.dim() != 4 or tuple(reference_points.shape[:3]) != (N, Lq, L):
            raise ValueError(f"reference_points {tuple(reference_points.shape)} must be ({N}, {Lq}, {L}, 2 or 4) "
                             f"(batch, queries, n_levels={L}, coordinates)")
        value = self.value_proj(value_in)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)
        with autocast_off(query.device):
            q = query.float()
            offsets = F.linear(q, self.sampling_offsets.weight.float(), self.sampling_offsets.bias.float())
            offsets = offsets.view(N, Lq, M, L, P, 2)
            weights = F.linear(q, self.attention_weights.weight.float(), self.attention_weights.bias.float())
            weights = F.softmax(weights.view(N, Lq, M, L * P), -1).view(N, Lq, M, L, P)
            ref = reference_points.float()
            if ref.shape[-1] == 2:
                normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(ref.dtype)
                locations = ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
            elif ref.shape[-1] == 4:
                locations = ref[:, :, None, :, None, :2] + offsets / P * ref[:, :, None, :, None, 2:] * 0.5
            else:
                raise ValueError(f"reference_points last dim must be 2 or 4, got {ref.shape[-1]}")
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend=self.backend)
        return self.output_proj(out)

"""Sine position encodings.

- :class:`PositionEmbeddingSine`: the 2-d embedding of feature-map positions used by the
  encoder (official ``PositionEmbeddingSineHW``): cumulative sums of the un-padded mask,
  normalized to ``[0, 2*pi]`` (eps 1e-6, no -0.5 offset), ``num_pos_feats`` features per
  axis with temperature 20 for both H and W, concatenated ``(y, x)``.
- :func:`gen_sineembed_for_position`: the embedding of query reference boxes used by the
  decoder (temperature 10000), over ``(x, y)`` or ``(x, y, w, h)``, concatenated in the
  order ``(y, x[, w, h])``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine", "gen_sineembed_for_position"]


def _interleave_sin_cos(x: Tensor) -> Tensor:
    """(..., F) -> (..., F): sin of even, cos of odd features, interleaved as the official."""
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """mask (B,H,W) bool, True = padding -> pos (B, 2*num_pos_feats, H, W) float32."""

    def __init__(self, num_pos_feats: int = 128, temperature_h: float = 20.0,
                 temperature_w: float = 20.0, normalize: bool = True, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.normalize = normalize
        self.scale = scale

    def forward(self, mask: Tensor) -> Tensor:
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        expo = 2 * torch.div(dim, 2, rounding_mode="floor") / self.num_pos_feats
        pos_x = _interleave_sin_cos(x_embed[..., None] / self.temperature_w ** expo)
        pos_y = _interleave_sin_cos(y_embed[..., None] / self.temperature_h ** expo)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def gen_sineembed_for_position(pos: Tensor, num_pos_feats: int = 128,
                               temperature: float = 10000.0) -> Tensor:
    """pos (..., 2|4) in [0,1] as (x, y[, w, h]) -> (..., 2|4 * num_pos_feats), order (y, x[, w, h]).

    With the official sizes (128 features per coordinate) a 4-d box gives a 512-d embedding.
    All coordinates are embedded in one pass (the same elementwise arithmetic as one pass per
    coordinate, so the values are identical, in about a third of the operator calls).
    """
    n = pos.shape[-1]
    if n not in (2, 4):
        raise ValueError(f"unknown pos_tensor shape(-1): {n} (expected 2 or 4)")
    scale = 2 * math.pi
    dim = torch.arange(num_pos_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim, 2, rounding_mode="floor") / num_pos_feats)
    emb = _interleave_sin_cos((pos * scale)[..., None] / dim_t)  # (..., n, F)
    parts = [emb[..., 1, :], emb[..., 0, :]]                      # (y, x)
    if n == 4:
        parts.append(emb[..., 2:, :].flatten(-2))                 # (w, h)
    return torch.cat(parts, dim=-1)

"""Constant tables of the flattened feature levels and what the transformer derives from
them: token centers and level ids (cached per size and device), the levels' un-padded sizes,
and the two-stage encoder proposals.

Levels are flattened row-major and concatenated (S = sum_l H_l * W_l), as in
:class:`~dino_scale.models.transformer.DeformableTransformer`; padding masks are True where padded.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from dino_scale.ops import level_shapes_of
from dino_scale.ops.level_shapes import cached_level_tensors
from dino_scale.ops.transfer import host_to_device

__all__ = ["token_tables", "valid_counts", "valid_counts_flat", "gen_encoder_output_proposals",
           "proposals_from_tables"]


def level_shape_list(spatial_shapes) -> List[Tuple[int, int]]:
    """(L,2) tensor or sequence of (H, W) -> list of int pairs (a tensor is read back once)."""
    if torch.is_tensor(spatial_shapes):
        return level_shapes_of(spatial_shapes)
    return [(int(h), int(w)) for h, w in spatial_shapes]


def _token_table_build(shapes, device) -> Tuple[Tensor, ...]:
    """Built on the device (the per-level arithmetic the forward used to repeat every step)."""
    centers, levels = [], []
    for lvl, (h, w) in enumerate(shapes):
        gy, gx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device), indexing="ij")
        centers.append(torch.stack((gx.reshape(-1), gy.reshape(-1)), -1))
        levels.append(torch.full((h * w,), lvl, dtype=torch.long, device=device))
    per_level = torch.tensor([[float(w), float(h), 0.05, 0.05] for h, w in shapes])
    per_level[:, 2:] *= torch.tensor([2.0 ** lvl for lvl in range(len(shapes))])[:, None]
    per_level = host_to_device(per_level, device)
    return torch.cat(centers), torch.cat(levels), per_level[:, :2].contiguous(), per_level[:, 2:].contiguous()


def token_tables(level_shapes, device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Constant tables of the flattened levels (S = sum H_l * W_l), cached per size and device:
    ``centers`` (S,2) float32 (x + 0.5, y + 0.5) of each token in its level's pixels, ``level``
    (S,) int64, ``level_sizes`` (L,2) float32 (W_l, H_l), ``level_wh`` (L,2) the proposal size
    0.05 * 2**l."""
    return cached_level_tensors("dino_tokens", level_shapes, device, _token_table_build)


def valid_counts(masks: List[Tensor]) -> Tensor:
    """Per-level masks [(B,H_l,W_l) True = padding] -> (B,L,2) int64 un-padded (width, height)
    (the reference form of :func:`valid_counts_flat`)."""
    return torch.stack([torch.stack([(~m[:, 0, :]).sum(1), (~m[:, :, 0]).sum(1)], -1) for m in masks], 1)


def _edge_table_build(shapes, device) -> Tuple[Tensor, Tensor]:
    """Flat indices of every level's first row, then of its first column, and their bins
    (l for row tokens, L + l for column tokens): built on the device."""
    index, bins, start = [], [], 0
    for lvl, (h, w) in enumerate(shapes):
        index.append(start + torch.arange(w, device=device))
        bins.append(torch.full((w,), lvl, dtype=torch.long, device=device))
        index.append(start + w * torch.arange(h, device=device))
        bins.append(torch.full((h,), len(shapes) + lvl, dtype=torch.long, device=device))
        start += h * w
    return torch.cat(index), torch.cat(bins)


def valid_counts_flat(padding_mask: Tensor, level_shapes) -> Tensor:
    """padding_mask (B,S) True = padding, the levels flattened as in the transformer ->
    (B,L,2) int64 un-padded (width, height) per level: the un-padded tokens of each level's first
    row and first column (:func:`valid_counts` of the per-level masks, in a handful of operator
    calls for all levels: one gather and one ``index_add`` with a cached per-size index table)."""
    shapes = level_shape_list(level_shapes)
    index, bins = cached_level_tensors("dino_edges", shapes, padding_mask.device, _edge_table_build)
    B, L = padding_mask.shape[0], len(shapes)
    edge = (~padding_mask[:, index]).long()  # (B, sum_l W_l + H_l)
    counts = torch.zeros(B, 2 * L, dtype=torch.long, device=padding_mask.device).index_add_(1, bins, edge)
    return counts.view(B, 2, L).transpose(1, 2)


def gen_encoder_output_proposals(memory: Tensor, padding_mask: Tensor, spatial_shapes,
                                 counts: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One proposal per token: center of the token in its level's valid area, wh = 0.05*2**lvl.

    memory (B,S,C), padding_mask (B,S) -> (memory with padded/invalid tokens zeroed (B,S,C),
    proposals in logit space (B,S,4), +inf where padded or any coordinate outside (0.01,0.99)).
    ``counts`` (B,L,2): the levels' un-padded (width, height) (:func:`valid_counts`), read
    from ``padding_mask`` when not given.
    """
    shapes = level_shape_list(spatial_shapes)
    if counts is None:
        counts = valid_counts_flat(padding_mask, shapes)
    centers, level, _, level_wh = token_tables(shapes, memory.device)
    return proposals_from_tables(memory, padding_mask, counts, centers, level, level_wh)


def proposals_from_tables(memory: Tensor, padding_mask: Tensor, counts: Tensor, centers: Tensor,
                          level: Tensor, level_wh: Tensor) -> Tuple[Tensor, Tensor]:
    """:func:`gen_encoder_output_proposals` given the size's tables (:func:`token_tables`) as
    tensors: no Python sizes, so a compiled caller stays shape-generic."""
    B = memory.shape[0]
    grid = centers / counts[:, level]  # (B,S,2) float32: (x + 0.5) / valid width, (y + 0.5) / valid height
    proposals = torch.cat((grid, level_wh[level].expand(B, -1, -1)), -1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
    proposals = proposals.masked_fill(~valid, float("inf"))
    out = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
    return out, proposals

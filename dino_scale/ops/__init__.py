"""Operators. ``ms_deform_attn`` dispatches to the compiled CUDA extension when it is
available and the inputs are on a GPU, else to the pure-PyTorch backend."""
from __future__ import annotations

from typing import Optional

import torch

from .ms_deform_attn_torch import ms_deform_attn_pytorch

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch"]


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, backend: Optional[str] = None) -> torch.Tensor:
    """Multi-scale deformable attention; shapes as in :func:`ms_deform_attn_pytorch`.

    ``backend``: None (automatic), "cuda" or "pytorch". (The CUDA backend arrives with csrc/.)
    """
    if backend not in (None, "pytorch", "cuda"):
        raise ValueError(f"unknown ms_deform_attn backend {backend!r}: use None, 'cuda' or 'pytorch'")
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights)

"""Operators. ``ms_deform_attn`` dispatches to the compiled CUDA extension when the inputs are on
a GPU and the extension builds/loads, else to the pure-PyTorch backend.

Importing this package never compiles anything: the CUDA extension is built (or loaded from the
cache, see ``dino_scale/ops/_build.py``) on the first CUDA call, or ahead of time with
``python -m dino_scale.ops build``.
"""
from __future__ import annotations

import logging
import re
import warnings
from typing import Optional

import torch

from dino_scale.config_checks import MSDA_BACKENDS

from .level_shapes import level_index_tensors, level_shapes_of
from .ms_deform_attn_torch import ms_deform_attn_pytorch

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch", "cuda_backend_available", "level_index_tensors",
           "level_shapes_of"]

_log = logging.getLogger(__name__)
_BACKENDS = MSDA_BACKENDS
_fallback_warned = False


def cuda_backend_available() -> bool:
    """True when the CUDA extension is (or can be) loaded in this process. May build it."""
    if not torch.cuda.is_available():
        return False
    from . import ms_deform_attn_cuda
    try:
        ms_deform_attn_cuda.load()
        return True
    except Exception:  # noqa: BLE001 - the reason is kept by ms_deform_attn_cuda.load_error()
        return False


def failure_reason(text: str) -> str:
    """One line for a build/load failure: its first line, and for a compile failure (whose first
    line ends in the first compiler command ninja ran) the first line that reports an error."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "unknown error"
    first = lines[0]
    detail = next((ln for ln in lines[1:] if re.search(r"\berror\b", ln, re.IGNORECASE)), None)
    if detail is None:
        return first[:300]
    return f"{first.split(': [', 1)[0][:200]} ... {detail[:200]}"


def _warn_fallback(reason: str) -> None:
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    msg = ("dino_scale.ops.ms_deform_attn: CUDA tensors given but the CUDA extension is "
           f"unavailable ({reason}); using the slower pure-PyTorch backend. Build it with "
           "`python -m dino_scale.ops build` or pass backend='pytorch' to silence this.")
    _log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor,
                   level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """Multi-scale deformable attention.

    value (N,S,M,D); spatial_shapes (L,2) int64 (H,W); level_start_index (L,);
    sampling_locations (N,Lq,M,L,P,2) as (x,y) in [0,1]; attention_weights (N,Lq,M,L,P).
    Returns (N, Lq, M*D) in value's dtype.

    ``backend``: None picks "cuda" for CUDA tensors when the extension is available (else
    "pytorch", with one warning per process); "cuda" forces the extension (error on CPU tensors
    or when it cannot be built); "pytorch" always uses the reference implementation.

    Both backends raise ValueError for inputs of disagreeing shapes, and for a level table that
    disagrees with value: S != sum(H_l*W_l), or level_start_index not the running sum of H_l*W_l
    (checked without a device sync for the pair ``level_index_tensors`` makes and for CPU
    tensors; see ``ms_deform_attn_torch.check_levels`` for GPU tensors made elsewhere).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown ms_deform_attn backend {backend!r}: use None, 'cuda' or 'pytorch'")
    if backend == "pytorch" or (backend is None and not value.is_cuda):
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations,
                                      attention_weights)
    from . import ms_deform_attn_cuda
    if backend == "cuda":
        return ms_deform_attn_cuda.ms_deform_attn_cuda(value, spatial_shapes, level_start_index,
                                                       sampling_locations, attention_weights)
    try:
        if not ms_deform_attn_cuda.is_loaded():
            ms_deform_attn_cuda.load()
    except Exception as exc:  # noqa: BLE001 - any build/load failure means: fall back
        _warn_fallback(failure_reason(str(exc)))
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations,
                                      attention_weights)
    return ms_deform_attn_cuda.ms_deform_attn_cuda(value, spatial_shapes, level_start_index,
                                                   sampling_locations, attention_weights)

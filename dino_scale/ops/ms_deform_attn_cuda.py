"""CUDA backend of multi-scale deformable attention: loader and op wrappers.

The compiled library (``csrc/ms_deform_attn``) defines the custom operators
``torch.ops.dino_scale.ms_deform_attn_forward`` / ``ms_deform_attn_backward`` with CUDA kernels
(the fast path), CPU kernels (float32/float64, so the compiled op can be tested without a GPU)
and their autograd formula in C++. After loading it, this module registers their fake
implementations (for ``torch.compile`` and meta tensors) with ``torch.library``. Nothing here compiles at import
time; :func:`load` builds on first use (see ``_build``) unless ``DINO_SCALE_MSDA_NO_JIT=1``, in
which case only an already built library is loaded.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Optional

import torch

from . import _build
from .ms_deform_attn_torch import check_levels, check_shapes  # shared with the PyTorch backend

_log = logging.getLogger(__name__)
_OPS_NS = "dino_scale"
_lock = threading.Lock()
_loaded: Optional[Path] = None
_load_error: Optional[str] = None


def _ops_registered() -> bool:
    return _build.ops_registered()


def is_loaded() -> bool:
    return _loaded is not None


@torch.compiler.disable
def load(build_if_missing: Optional[bool] = None, verbose: bool = False) -> Path:
    """Load the extension (building it first if needed) and register fake + autograd.

    Returns the library path. Raises :class:`_build.BuildError` when it cannot be built/loaded;
    the failure is remembered, so later calls fail fast without recompiling.
    """
    global _loaded, _load_error
    with _lock:
        if _loaded is not None:
            return _loaded
        if _load_error is not None:
            raise _build.BuildError(_load_error)
        if build_if_missing is None:
            build_if_missing = os.environ.get("DINO_SCALE_MSDA_NO_JIT", "0") != "1"
        try:
            arch = _build.default_arch_list()
            lib = _build.find_library(arch)
            if _ops_registered():  # a library of the ops already loaded (from another path): use it
                _register_python_side()
                _loaded = lib
                return lib
            _build.check_runs_on_visible_gpus(lib, arch)  # else: "no kernel image" at the first call
            if not _build.library_complete(lib):  # missing, or truncated: loading that is SIGBUS
                state = "an incomplete (truncated) library" if lib.exists() else "no prebuilt extension"
                if not build_if_missing:
                    raise _build.BuildError(f"{state} at {lib} and JIT disabled "
                                            "(DINO_SCALE_MSDA_NO_JIT=1); run `python -m dino_scale.ops build`")
                _log.warning("building the ms_deform_attn CUDA extension for arch %s into %s "
                             "(first use on this node; takes a minute or more)", arch, lib.parent)
                lib = _build.build_extension(arch_list=arch, verbose=verbose)
            torch.ops.load_library(str(lib))
            _register_python_side()
        except Exception as exc:  # noqa: BLE001 - turned into one clear error/warning
            _load_error = f"{type(exc).__name__}: {exc}"
            raise _build.BuildError(_load_error) from exc
        _loaded = lib
        return lib


def load_error() -> Optional[str]:
    """Why the last :func:`load` failed (None when it did not)."""
    return _load_error


_python_side_done = False


def _register_python_side() -> None:
    """Fake (meta) implementations for the C++ ops (idempotent). Autograd is registered in C++
    (csrc/ms_deform_attn/msda_ops.cpp): no Python runs on the op's forward or backward path."""
    global _python_side_done
    if _python_side_done:
        return
    fwd = f"{_OPS_NS}::ms_deform_attn_forward"
    bwd = f"{_OPS_NS}::ms_deform_attn_backward"

    @torch.library.register_fake(fwd)
    def _fwd_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        n, _, m, d = value.shape
        return value.new_empty((n, sampling_locations.shape[1], m * d))

    @torch.library.register_fake(bwd)
    def _bwd_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                  grad_output):
        return (torch.empty_like(value), torch.empty_like(sampling_locations),
                torch.empty_like(attention_weights))

    _python_side_done = True


def ms_deform_attn_cuda(value: torch.Tensor, spatial_shapes: torch.Tensor,
                        level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                        attention_weights: torch.Tensor) -> torch.Tensor:
    """value (N,S,M,D) fp32/bf16/fp16/fp64 on a GPU; spatial_shapes (L,2); level_start_index (L,);
    sampling_locations (N,Lq,M,L,P,2); attention_weights (N,Lq,M,L,P). Returns (N,Lq,M*D) in
    value's dtype. Locations and weights are computed with in fp32 (fp64 for fp64 value):
    half-precision ones are upcast here (differentiably), and every input is made contiguous."""
    if not value.is_cuda:
        raise ValueError(f"ms_deform_attn backend 'cuda' needs CUDA tensors, got value on {value.device}; "
                         "use backend='pytorch' or None for CPU tensors")
    return call_compiled_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def call_compiled_op(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                     sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """:func:`ms_deform_attn_cuda` without the device check: the library also carries float32 /
    float64 CPU kernels (used by the CPU checks of the compiled operator).

    The level table's values are checked (:func:`check_levels`) where that needs no device
    sync: the model's cached pair, CPU tensors; other GPU tensors with DINO_SCALE_MSDA_CHECK=1."""
    if value.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"ms_deform_attn (cuda): unsupported value dtype {value.dtype}")
    check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    check_levels(value, spatial_shapes, level_start_index)
    if _loaded is None:  # plain global read: keeps the wrapper traceable by torch.compile
        load()
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32
    dev = value.device
    return torch.ops.dino_scale.ms_deform_attn_forward(
        value.contiguous(),
        spatial_shapes.to(device=dev, dtype=torch.int64).contiguous(),
        level_start_index.to(device=dev, dtype=torch.int64).contiguous(),
        sampling_locations.to(device=dev, dtype=acc).contiguous(),
        attention_weights.to(device=dev, dtype=acc).contiguous(),
    )

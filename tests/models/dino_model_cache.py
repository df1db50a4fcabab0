"""Build each preset's DINO (and golden weights) once per test session: Swin-L takes
seconds and ~1 GB. Tests that use a cached model load the weights they need first."""
from __future__ import annotations

import functools

import torch

from dino_scale.config import preset
from dino_scale.models import build_model


@functools.lru_cache(maxsize=None)
def cached_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(preset(name).model).eval()


@functools.lru_cache(maxsize=None)
def meta_model(name: str) -> torch.nn.Module:
    """Structure only (parameters on the meta device): for key and shape checks."""
    with torch.device("meta"):
        return build_model(preset(name).model)


_GOLDEN_SD = {}


def golden_weights(golden, name: str) -> dict:
    """golden.official_state_dict(name), computed once (callers must not modify it in place)."""
    if name not in _GOLDEN_SD:
        _GOLDEN_SD[name] = golden.official_state_dict(name)
    return _GOLDEN_SD[name]

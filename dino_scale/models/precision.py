"""Where the model leaves autocast: parts whose low-precision rounding changes results.

* :func:`autocast_off` - a context with autocast disabled on a device (none where the device
  type has no autocast, e.g. ``"meta"``).
* :func:`class_head_fp32` - a class head (``nn.Linear``, hidden -> classes) computed in the
  weights' precision (fp32 under autocast over fp32 weights). Under bf16 autocast its logits
  were bf16 (8 bits of mantissa, steps of 1/64 near the score threshold): many detections tied
  on score, so COCOeval ranked them by list position, and the two-stage top-k chose among tied
  encoder tokens. One (hidden x classes) product per row: a negligible cost.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

__all__ = ["autocast_off", "class_head_fp32"]


def autocast_off(device: torch.device):
    """``torch.autocast(device.type, enabled=False)``, or a no-op where that type has no autocast."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def class_head_fp32(head: nn.Module, hidden: Tensor) -> Tensor:
    """``head(hidden)`` outside autocast, its input cast to the head's weight dtype: (..., D) ->
    (..., classes) fp32 over fp32 weights (bf16 autocast), fp16 under DeepSpeed's fp16 mode
    (fp16 weights). The module itself is called, so ZeRO-3 gathers its parameters as usual."""
    with autocast_off(hidden.device):
        return head(hidden.to(head.weight.dtype))

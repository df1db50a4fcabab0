"""Host-to-device copies that do not stall the host.

A ``non_blocking`` copy from ordinary (pageable) host memory is staged by the driver and may
wait for the device queue; from page-locked memory it is a true asynchronous DMA. Small
index tensors built on the host each step (matching results, denoising slots) go through
:func:`host_to_device`, which pins them first (PyTorch's caching host allocator makes that
cheap after the first steps and keeps the block alive until the copy has finished).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["host_to_device"]


def host_to_device(host: Tensor, device) -> Tensor:
    """``host`` (CPU tensor, any shape) -> the same values on ``device``. On a CUDA device the
    copy is asynchronous (pinned staging); elsewhere this is ``host.to(device)``."""
    device = torch.device(device)
    if host.device == device:
        return host
    if device.type == "cuda" and host.device.type == "cpu":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)

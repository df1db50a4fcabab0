"""benchmarks/profile_step.py's device-busy time and host-sync counts, on event lists shaped as
``prof.key_averages()`` gives them on a GPU (no GPU here: the profiler records no CUDA events)."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_module import load_benchmark  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _profile_step():
    return load_benchmark("profile_step")


def _ev(key, count=1, device=DeviceType.CPU, self_dev_us=0, annotation=False):
    return SimpleNamespace(key=key, count=count, device_type=device, self_device_time_total=self_dev_us,
                           is_user_annotation=annotation)


# two steps: a GEMM kernel 3 ms under aten::mm (whose self device time is the same kernel again),
# an Optimizer.step range over a 1 ms kernel (a user annotation on the device's timeline), a
# .item() (aten::item -> aten::_local_scalar_dense -> D2H copy + cudaStreamSynchronize), an H2D copy
EVENTS = [
    _ev("aten::mm", 2, self_dev_us=6000),
    _ev("sm90_gemm_kernel", 2, DeviceType.CUDA, 6000),
    _ev("Optimizer.step#AdamW.step", 2, DeviceType.CUDA, 2000, annotation=True),
    _ev("Optimizer.step#AdamW.step", 2, self_dev_us=2000),
    _ev("multi_tensor_apply_kernel", 2, DeviceType.CUDA, 2000),
    _ev("aten::item", 2), _ev("aten::_local_scalar_dense", 2, self_dev_us=10),
    _ev("cudaMemcpyAsync", 4), _ev("cudaStreamSynchronize", 2),
    _ev("Memcpy DtoH (Device -> Pageable)", 2, DeviceType.CUDA, 10),
    _ev("Memcpy HtoD (Pinned -> Device)", 2, DeviceType.CUDA, 20),
    _ev("cudaDeviceSynchronize", 1),  # the script's own, at the end of the profile
]


def test_device_busy_counts_each_device_event_once():
    busy = _profile_step().device_busy_ms(EVENTS, steps=2)
    assert busy == pytest.approx((6000 + 2000 + 10 + 20) / 2 / 1e3)  # was (all self device time) 9.02 ms


def test_syncs_count_each_host_wait_once_and_d2h_copies_apart():
    counts = _profile_step().sync_counts(EVENTS, steps=2, own_syncs=1)
    # was {aten::_local_scalar_dense: 1, aten::item: 1, cudaMemcpyAsync: 2, cudaStreamSynchronize: 1,
    # cudaDeviceSynchronize: 0.5}: one .item() per step counted as 3, an H2D copy as a sync
    assert counts == {"cudaStreamSynchronize": 1, "total": 1, "d2h_copies": 1}


def test_helpers_read_real_profiler_events():
    # the attributes the helpers read exist on key_averages() entries (CPU only here: nothing counted)
    import torch
    from torch.profiler import ProfilerActivity, profile

    module = _profile_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (torch.ones(8, 8) @ torch.ones(8, 8)).sum().item()
    events = prof.key_averages()
    assert module.device_busy_ms(events, steps=1) == 0
    assert module.sync_counts(events, steps=1) == {"total": 0, "d2h_copies": 0}

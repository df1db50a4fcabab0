"""The training loop's loss window (dino_scale.engine.progress.LossWindow): sums stay on the device."""
from __future__ import annotations

import pytest
import torch

from dino_scale.engine.progress import LossWindow

# what torch (2.x) raises when a meta tensor is read back: .tolist()/.cpu() ("Cannot copy out of
# meta tensor; no data!", NotImplementedError) or .item()/int() ("... cannot be called on meta tensors")
META_READ_BACK = r"Cannot copy out of meta tensor; no data!|cannot be called on meta tensors"


def test_add_reads_nothing_back():
    window = LossWindow()
    for _ in range(3):  # meta tensors hold no data: any read-back would raise
        window.add(torch.empty((), device="meta"), {"loss_ce": torch.empty((), device="meta"),
                                                    "loss_bbox": torch.empty((), device="meta")})
    assert window.n == 3
    with pytest.raises((RuntimeError, NotImplementedError), match=META_READ_BACK):
        window.totals()


def test_means_over_the_window_and_reset():
    window = LossWindow()
    window.add(torch.tensor(1.0), {"a": torch.tensor(2.0), "b": torch.tensor(4.0, dtype=torch.bfloat16)})
    window.add(torch.tensor(3.0), {"a": torch.tensor(6.0), "b": torch.tensor(0.0)})
    window.add(torch.tensor(5.0), {"a": torch.tensor(1.0)})  # a step without "b": its own term set
    out = window.reduce()
    assert out == pytest.approx({"loss": 3.0, "train/a": 3.0, "train/b": 4.0 / 3})
    assert window.n == 0 and window.reduce() == {}


class _Collective(Exception):
    pass


def test_reduce_runs_the_collective_on_the_sums_device_before_any_read_back(monkeypatch):
    # The window all-reduced a CPU float64 tensor built from values read back first: Ray Train's
    # GPU process group is NCCL-only, which refuses CPU tensors ("No backend type associated with
    # device type cpu"), so every multi-GPU run would have failed at its first report.
    seen = []

    def all_reduce(t, *args, **kwargs):
        seen.append((t.device, t.dtype, tuple(t.shape)))
        raise _Collective

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    window = LossWindow(device="meta")
    window.add(torch.empty((), device="meta"), {"b": torch.empty((), device="meta"),
                                                "a": torch.empty((), device="meta")})
    with pytest.raises(_Collective):  # meta tensors hold no data: a read-back first would raise otherwise
        window.reduce()
    assert seen == [(torch.device("meta"), torch.float64, (4,))]  # loss, count, a, b
    seen.clear()
    with pytest.raises(_Collective):  # an empty window still joins the collective, on its device
        LossWindow(device="meta").reduce()
    assert seen == [(torch.device("meta"), torch.float64, (2,))]


def test_reduce_sums_over_ranks(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: t.mul_(2))  # a twin rank
    window = LossWindow()
    window.add(torch.tensor(2.0), {"a": torch.tensor(4.0)})
    assert window.reduce() == pytest.approx({"loss": 2.0, "train/a": 4.0})

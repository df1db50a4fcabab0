"""The training loop's loss window (dino_scale.engine.progress.LossWindow): sums stay on the device."""
from __future__ import annotations

import pytest
import torch

from dino_scale.engine.progress import LossWindow


def test_add_reads_nothing_back():
    window = LossWindow()
    for _ in range(3):  # meta tensors hold no data: any read-back would raise
        window.add(torch.empty((), device="meta"), {"loss_ce": torch.empty((), device="meta"),
                                                    "loss_bbox": torch.empty((), device="meta")})
    assert window.n == 3
    with pytest.raises((RuntimeError, NotImplementedError)):
        window.totals()


def test_means_over_the_window_and_reset():
    window = LossWindow()
    window.add(torch.tensor(1.0), {"a": torch.tensor(2.0), "b": torch.tensor(4.0, dtype=torch.bfloat16)})
    window.add(torch.tensor(3.0), {"a": torch.tensor(6.0), "b": torch.tensor(0.0)})
    window.add(torch.tensor(5.0), {"a": torch.tensor(1.0)})  # a step without "b": its own term set
    out = window.reduce()
    assert out == pytest.approx({"loss": 3.0, "train/a": 3.0, "train/b": 4.0 / 3})
    assert window.n == 0 and window.reduce() == {}

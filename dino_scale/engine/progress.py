"""Throughput, data-wait share and the driver-side progress line.

Workers sum the losses of each window between reports with :class:`LossWindow` (on the
device) and time it with :class:`WindowMeter`: wall time, time blocked waiting for the next
batch, images and optimizer steps. The data-wait share
(``data_wait_share`` = wait / wall) shows a starving accelerator; ``img_per_s`` counts
images of all workers. :class:`ProgressCallback` runs in the Ray Train controller and
prints one line per report: step, epoch, loss, lr, img/s, data-wait share and ETA.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional

import torch

__all__ = ["WindowMeter", "LossWindow", "format_progress", "format_eta", "ProgressCallback"]

log = logging.getLogger("dino_scale.progress")


class WindowMeter:
    """Accumulates one reporting window on a worker; :meth:`snapshot` returns and resets."""

    def __init__(self, world_size: int = 1):
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.wait_s = 0.0
        self.images = 0
        self.steps = 0

    def add_wait(self, seconds: float) -> None:
        self.wait_s += max(0.0, seconds)

    def add_images(self, n: int) -> None:
        self.images += n

    def add_step(self) -> None:
        self.steps += 1

    def snapshot(self) -> dict[str, float]:
        wall = max(1e-9, time.perf_counter() - self.start)
        out = {
            "img_per_s": self.images * self.world_size / wall,
            "data_wait_share": min(1.0, self.wait_s / wall),
            "sec_per_step": wall / self.steps if self.steps else float("nan"),
        }
        self.reset()
        return out


class LossWindow:
    """Loss sums over a reporting window, kept on the device: adding a step reads nothing back
    and the window is reduced across ranks on the device (NCCL takes CUDA tensors only), then
    read back once, at report time. ``device``: where an empty window's zeros go (the
    training device), else the device of the losses added."""

    def __init__(self, device: Optional[torch.device] = None):
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self._sums: dict[tuple[str, ...], torch.Tensor] = {}  # term names -> [loss, *terms] sums
        self.n = 0

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        keys = tuple(sorted(terms))
        vec = torch.stack([loss.detach().float().reshape(())] +
                          [terms[k].detach().float().reshape(()) for k in keys])
        acc = self._sums.get(keys)
        self._sums[keys] = vec if acc is None else acc + vec
        self.n += 1

    def _merged(self) -> tuple[torch.Tensor, list[str]]:
        """(loss sum, count, *term sums) as one float64 vector on the device, and the term names."""
        device = next(iter(self._sums.values())).device if self._sums else self.device
        loss = torch.zeros((), dtype=torch.float64, device=device)
        terms: dict[str, torch.Tensor] = {}
        for keys, vec in self._sums.items():
            vec = vec.double()
            loss = loss + vec[0]
            for i, k in enumerate(keys):
                terms[k] = terms[k] + vec[1 + i] if k in terms else vec[1 + i]
        names = sorted(terms)
        count = torch.full((), float(self.n), dtype=torch.float64, device=device)
        return torch.stack([loss, count] + [terms[k] for k in names]), names

    def totals(self) -> tuple[float, dict[str, float]]:
        """(loss sum, {term: sum}) over this rank's window: one read-back."""
        vec, names = self._merged()
        values = vec.cpu().tolist()
        return values[0], dict(zip(names, values[2:]))

    def reduce(self) -> dict[str, float]:
        """Mean loss and terms over the window on all ranks ({} for an empty window): one
        all-reduce on the device, one read-back."""
        vec, names = self._merged()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(vec)
        values = vec.cpu().tolist()
        self.__init__(self.device)
        n = values[1]
        if n == 0:
            return {}
        out = {"loss": values[0] / n}
        out.update({f"train/{k}": values[2 + i] / n for i, k in enumerate(names)})
        return out


def format_eta(seconds: float) -> str:
    if seconds != seconds or seconds < 0:  # NaN
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_progress(metrics: dict[str, Any], total_steps: Optional[int] = None) -> str:
    """One line, e.g. ``step 120/3000 (40%) ep 1 loss 12.345 lr 1.0e-04 9.8 img/s data 3% ETA 1:02:03``."""
    step = int(metrics.get("step", 0))
    parts = [f"step {step}/{total_steps} ({100 * step / total_steps:.0f}%)" if total_steps else f"step {step}"]
    if "epoch" in metrics:
        parts.append(f"ep {int(metrics['epoch'])}")
    if "loss" in metrics:
        parts.append(f"loss {float(metrics['loss']):.4f}")
    if "lr" in metrics:
        parts.append(f"lr {float(metrics['lr']):.1e}")
    if "img_per_s" in metrics:
        parts.append(f"{float(metrics['img_per_s']):.1f} img/s")
    if "data_wait_share" in metrics:
        parts.append(f"data {100 * float(metrics['data_wait_share']):.0f}%")
    if metrics.get("bad_steps_total"):
        parts.append(f"bad {int(metrics['bad_steps_total'])}")
    if total_steps and "sec_per_step" in metrics:
        parts.append(f"ETA {format_eta((total_steps - step) * float(metrics['sec_per_step']))}")
    for key in ("AP", "AP50"):
        if key in metrics:
            parts.append(f"{key} {float(metrics[key]):.3f}")
    return " | ".join(parts)


try:  # the callback needs Ray Train; the helpers above do not
    from ray.train import UserCallback as _UserCallback
except Exception:  # pragma: no cover
    _UserCallback = object


class ProgressCallback(_UserCallback):
    """Prints :func:`format_progress` of rank 0's metrics after every ``ray.train.report``."""

    def __init__(self, total_steps: Optional[int] = None, stream=None, prefix: str = "[dino_scale]"):
        self.total_steps = total_steps
        self.stream = stream
        self.prefix = prefix

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics:
            return
        line = f"{self.prefix} {format_progress(metrics[0], self.total_steps)}" + (" [ckpt]" if checkpoint else "")
        print(line, file=self.stream or sys.stdout, flush=True)

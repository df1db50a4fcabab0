"""Skipped non-finite training steps: :class:`BadStepGuard` counts them and aborts a diverging run
(:class:`BadStepError`); :class:`StepVerdict` carries one step's finiteness, decided on the device,
back to the host without a wait (:func:`~dino_scale.engine.train_step.train_step`)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

__all__ = ["BadStepError", "BadStepGuard", "StepVerdict"]


class BadStepError(RuntimeError):
    """Too many consecutive non-finite (NaN/Inf) loss or gradient steps; training is diverging."""


@dataclass
class BadStepGuard:
    """Counts skipped non-finite steps; aborts after ``max_consecutive`` in a row (non-finite
    losses, or optimizer steps skipped for non-finite gradients: :meth:`update_step`)."""

    max_consecutive: int = 5
    total: int = 0
    consecutive: int = 0
    grad_consecutive: int = 0
    pending: deque = field(default_factory=deque, repr=False, compare=False)  # (step, StepVerdict)

    def update(self, finite: bool, step: int | None = None, loss: float | None = None) -> None:
        if finite:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        if self.max_consecutive > 0 and self.consecutive >= self.max_consecutive:
            where = f" (last at step {step}, loss {loss})" if step is not None else ""
            raise BadStepError(  # micro-batches: with accumulation, several make one optimizer step
                f"{self.consecutive} consecutive micro-batches with a non-finite loss{where}; "
                f"{self.total} skipped in total. Training diverged: lower the learning rate, "
                f"check the data, or raise train.max_bad_steps.")

    def update_step(self, gradients_finite: bool, step: int | None = None) -> None:
        """After an optimizer step over finite losses: ``gradients_finite=False`` when it was
        skipped for non-finite gradients. Such skips count as bad steps, and
        ``max_consecutive`` of them in a row abort too (a finite loss resets ``consecutive``
        at every micro-batch, so without this a run whose gradients stay NaN skipped every
        update to its end)."""
        if gradients_finite:
            self.grad_consecutive = 0
            return
        self.total += 1
        self.grad_consecutive += 1
        if self.max_consecutive > 0 and self.grad_consecutive >= self.max_consecutive:
            where = f" (last at step {step})" if step is not None else ""
            raise BadStepError(
                f"{self.grad_consecutive} consecutive optimizer steps with non-finite gradients under a "
                f"finite loss{where}; {self.total} bad steps in total. Training diverged: lower the "
                f"learning rate, check the data, or raise train.max_bad_steps.")

    def observe(self, verdict: StepVerdict, step: int | None = None, lag: int = 1) -> None:
        """Queue a step whose finiteness was decided on the device, and count every queued step
        (oldest first) whose verdict has reached the host, and all but the newest ``lag``
        whether or not they have: ``lag=1`` waits at most for the previous step's end, which a
        step's matcher copy has already waited for. So an abort comes one step late (that step
        skipped on the device too, when bad)."""
        self.pending.append((step, verdict))
        self.settle(keep=lag)

    def settle(self, keep: int = 0) -> None:
        """Count the queued device verdicts: every one when ``keep=0`` (waits for the last),
        else the ready ones and all but the newest ``keep``. Raises as :meth:`update`."""
        while self.pending and (len(self.pending) > keep or self.pending[0][1].ready()):
            step, verdict = self.pending.popleft()
            loss_finite, grads_finite = verdict.read()
            self.update(loss_finite, step=step, loss=None if loss_finite else verdict.loss_value())
            if loss_finite:
                self.update_step(grads_finite, step=step)

    def state_dict(self) -> dict[str, int]:
        """The counts, every queued device verdict counted first (a wait for the last; raises as
        :meth:`update` when that count aborts)."""
        self.settle()
        return {"total": self.total, "consecutive": self.consecutive, "grad_consecutive": self.grad_consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Back to ``state``; verdicts still queued (steps after it) are dropped, not counted."""
        self.pending.clear()
        self.total = int(state.get("total", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self.grad_consecutive = int(state.get("grad_consecutive", 0))


class StepVerdict:
    """Whether one step's loss and gradients were finite, decided on the device.

    ``flags``: float32 (2,) on the device, 1.0 = finite: [loss, gradients]. On a GPU it is copied
    to pinned host memory without blocking and an event is recorded after the copy: :meth:`ready`
    asks the event (no wait), :meth:`read` waits for this step's copy only."""

    def __init__(self, flags: torch.Tensor, loss: torch.Tensor):
        self.loss = loss.detach()
        self._event = None
        if flags.is_cuda:
            self._host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self._host.copy_(flags, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(flags.device))
        else:
            self._host = flags

    def ready(self) -> bool:
        """Whether :meth:`read` would not wait."""
        return self._event is None or self._event.query()

    def read(self) -> tuple[bool, bool]:
        """``(loss finite, gradients finite)``, on every rank (agreed when distributed)."""
        if self._event is not None:
            self._event.synchronize()
        loss_ok, grads_ok = (bool(v > 0.5) for v in self._host.tolist())
        return loss_ok, loss_ok and grads_ok

    def loss_value(self) -> float:
        return float(self.loss)

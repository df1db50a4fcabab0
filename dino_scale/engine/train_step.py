"""One DINO training step on one device, with no Ray and no DeepSpeed.

``train_step`` = forward with targets, criterion, weighted loss sum, a finiteness
check (agreed across ranks when ``torch.distributed`` is initialized), backward,
gradient clipping, optimizer step. A non-finite loss skips the update and is
counted by :class:`BadStepGuard`, which raises :class:`BadStepError` after
``max_consecutive`` bad steps in a row. With a fused AdamW/Adam (the default on a GPU) the
check is made on the device (:class:`StepVerdict`): the optimizer skips the update itself, and
the host reads the verdict a step later, without waiting for the device; otherwise it is two
host reads (the loss before the backward, the gradient norm before the update). The
skip-counting classes live in :mod:`dino_scale.engine.step_guard`. The Ray/DeepSpeed loop reuses
:func:`compute_loss`, :func:`all_finite`, :func:`window_num_boxes` and :class:`BadStepGuard`.

Shapes: ``images`` float (B,3,H,W) (already normalized), ``masks`` bool (B,H,W) True
on padding, ``targets`` list of B dicts with ``labels`` int64 (N,) and ``boxes``
(N,4) cx,cy,w,h normalized.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from dino_scale.engine.step_guard import BadStepError, BadStepGuard, StepVerdict
from dino_scale.ops.transfer import host_to_device

__all__ = [
    "BadStepError", "BadStepGuard", "StepOutput", "StepVerdict", "autocast_dtype", "autocast_context",
    "compute_loss", "all_finite", "skips_on_device", "train_step", "move_batch", "check_target_labels",
    "window_num_boxes",
]


@dataclass
class StepOutput:
    """What one step did. ``loss`` / ``loss_terms`` are detached 0-d tensors (no host sync).
    ``skipped``: the update was not applied (non-finite loss or gradients); a device-side
    ``verdict`` is read when ``skipped`` is asked for (a wait for this step's end on a GPU)."""

    loss: torch.Tensor
    loss_terms: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_norm: Optional[torch.Tensor] = None
    skipped_on_host: bool = False
    num_images: int = 0
    verdict: Optional[StepVerdict] = None

    @property
    def skipped(self) -> bool:
        if self.verdict is not None:
            loss_ok, grads_ok = self.verdict.read()
            return not (loss_ok and grads_ok)
        return self.skipped_on_host


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """``fp32`` -> None, ``bf16`` -> bfloat16, ``fp16`` -> float16."""
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ValueError(f"unknown precision {precision!r}; choose fp32, bf16 or fp16")
    return table[precision]


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_float(obj: Any) -> Any:
    """Cast floating tensors in nested outputs to float32 (the criterion runs in fp32)."""
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() and obj.dtype != torch.float32 else obj
    if isinstance(obj, dict):
        return {k: _to_float(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_float(v) for v in obj)
    return obj


def move_batch(batch, device: torch.device):
    """Move ``(images, masks, targets)`` to ``device``. To a GPU without stalling the host: every
    copy is asynchronous from pinned memory (:func:`~dino_scale.ops.transfer.host_to_device`), and
    each target field goes in one copy for the whole batch, split on the device (a blocking copy
    per field and image was 2 + 5B host syncs per micro-batch, the first waiting for the previous
    step's kernels)."""
    images, masks, targets = batch
    device = torch.device(device)
    return host_to_device(images, device), host_to_device(masks, device), _targets_to(targets, device)


def _targets_to(targets: list[dict], device: torch.device) -> list[dict]:
    """``targets`` (dicts of tensors, one per image) on ``device``; a field whose tensors share a
    dtype and trailing shape in every image travels packed, as views of one device tensor."""
    if all(not torch.is_tensor(v) or v.device == device for t in targets for v in t.values()):
        return targets
    out = [dict(t) for t in targets]
    for key in dict.fromkeys(k for t in targets for k in t):  # every field, in first-seen order
        values = [t.get(key) for t in targets]
        rows = [v.reshape(1, *v.shape) if v.dim() == 0 else v for v in values if torch.is_tensor(v)]
        if len(rows) < len(values) or len({(r.dtype, r.shape[1:], r.device) for r in rows}) != 1:
            for t, v in zip(out, values):  # missing in some image, or not stackable: one copy each
                if torch.is_tensor(v):
                    t[key] = host_to_device(v, device)
            continue
        packed = host_to_device(torch.cat(rows), device)
        for t, v, part in zip(out, values, packed.split([r.shape[0] for r in rows])):
            t[key] = part.reshape(v.shape)
    return out


def check_target_labels(targets: list[dict], num_classes: int) -> None:
    """ValueError naming the image unless every ``labels`` (N,) of ``targets`` lies in
    [0, num_classes). Meant for host tensors, before :func:`move_batch`: on a GPU an
    out-of-range label reaches the matcher's gather and the focal loss as a device-side
    assert, which ends the process without saying which image or class was at fault.
    A backstop: ``fit`` refuses a manifest whose ids the head cannot hold, and the data layer
    skips (and counts) records holding an id their manifest lacks."""
    for t in targets:
        labels = t["labels"]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            image = int(t["image_id"]) if "image_id" in t else "?"
            bad = sorted({int(x) for x in labels.reshape(-1) if not 0 <= int(x) < num_classes})
            raise ValueError(f"image {image} has labels {bad[:10]} outside [0, {num_classes}): "
                             f"model.num_classes must exceed the data's largest category id")


def window_num_boxes(box_counts: Sequence[int], accum: int, device: torch.device) -> Union[float, torch.Tensor]:
    """The loss normalizer of one optimizer step made of ``accum`` accumulated micro-batches per
    worker: ``box_counts`` the box count of each of this worker's micro-batches of the step ->
    the boxes of the step on every worker / (workers x ``accum``), at least 1 (a float; a 0-d
    tensor on ``device`` when distributed: one all-reduce, no host sync).

    Each micro-batch's loss is divided by it, its gradient by ``accum`` (the accumulation) and by
    the workers (the all-reduce average), so the step's gradient is the summed loss of all its
    boxes divided by their number: the official per-step normalization (boxes averaged over the
    workers of the one batch), whatever the split into workers and micro-batches. Normalizing
    each micro-batch by its own count instead weighs a box by the count of its micro-batch (a
    1-box micro-batch's box counted 4x where the step averages 4 boxes), so the same global batch
    trained differently on another worker count."""
    if accum < 1:
        raise ValueError(f"accum must be >= 1, got {accum}")
    total = float(sum(int(n) for n in box_counts))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        n = torch.full((), total, dtype=torch.float32, device=device)  # a fill: no blocking copy
        dist.all_reduce(n)
        return torch.clamp(n / (dist.get_world_size() * accum), min=1.0)
    return max(total / accum, 1.0)


def compute_loss(model: nn.Module, criterion: nn.Module, images: torch.Tensor, masks: torch.Tensor,
                 targets: list[dict], amp_dtype: Optional[torch.dtype] = None,
                 num_boxes: Union[float, torch.Tensor, None] = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward + criterion. Returns the weighted total (0-d) and the unweighted terms.
    ``num_boxes``: the loss normalizer of the step (:func:`window_num_boxes`) when the batch is
    one of several accumulated micro-batches; None: the batch's own box count."""
    from dino_scale.models.criterion import weighted_loss

    param = next(model.parameters())
    if images.dtype != param.dtype and param.is_floating_point() and amp_dtype is None:
        images = images.to(param.dtype)
    with autocast_context(images.device, amp_dtype):
        outputs = model(images, masks, targets)
    outputs = _to_float(outputs)
    loss_dict = criterion(outputs, targets) if num_boxes is None else criterion(outputs, targets, num_boxes=num_boxes)
    loss = weighted_loss(loss_dict, criterion.weight_dict)
    return loss, loss_dict


def all_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank (one small all-reduce when distributed)."""
    flag = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0.5)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` skips its whole update on the device when given a ``found_inf``
    tensor of 1, as :class:`torch.amp.GradScaler` drives it: torch's fused Adam or AdamW (both named:
    AdamW subclasses Adam only from torch 2.7). Not fused SGD: its first skipped step leaves an
    uninitialized momentum buffer."""
    return (isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
            and bool(getattr(optimizer, "_step_supports_amp_scaling", False))
            and all(g.get("fused") for g in optimizer.param_groups))


def train_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, batch,
               *, clip_max_norm: float = 0.1, amp_dtype: Optional[torch.dtype] = None,
               scaler: Optional[torch.amp.GradScaler] = None, guard: Optional[BadStepGuard] = None,
               scheduler=None, check_finite: bool = True, step: int | None = None,
               device_check: Optional[bool] = None) -> StepOutput:
    """One optimizer step on ``batch = (images, masks, targets)`` (already on the device).

    Gradients are clipped to ``clip_max_norm`` (total L2 norm, skipped when <= 0) and the
    pre-clip norm is returned. With ``check_finite`` a NaN/Inf loss skips the update (``guard``
    counts it, and raises after too many in a row). ``scaler`` enables fp16 loss scaling.
    ``scheduler`` (optional) is stepped once per call, after the update or in place of a
    skipped one: the schedule follows the data position, not the applied steps.

    Where the check happens (``device_check``: None = on the device where it can be, False = on
    the host, True = on the device or a ValueError). With a fused Adam/AdamW
    (:func:`skips_on_device`) and no ``scaler``, on the device: the backward always runs, the
    loss's and the gradient norm's finiteness become the optimizer's ``found_inf`` (it then
    changes no weight, moment or step count), and ``guard`` gets the step's :class:`StepVerdict`
    (:meth:`BadStepGuard.observe`: counted a step later; :meth:`BadStepGuard.settle` counts the
    rest). No host read, so the host queues the backward while the device still runs the loss.
    This also skips a finite loss whose gradients are not (counted as
    :meth:`BadStepGuard.update_step` counts), or whose norm overflows float32 (an element above
    ~1e19: divergence). ``grad_norm`` (pre-clip) is returned whenever it was computed. Otherwise
    two host reads: the loss's finiteness before the backward, which a non-finite loss then skips,
    and the gradient norm's before the update, which non-finite gradients skip.
    """
    on_device = check_finite and scaler is None and skips_on_device(optimizer)
    if device_check and check_finite and not on_device:
        raise ValueError("device_check=True needs a fused Adam/AdamW (fused=True) and no GradScaler")
    on_device = on_device and device_check is not False
    images, masks, targets = batch
    model.train()
    criterion.train()
    optimizer.zero_grad(set_to_none=True)
    loss, loss_dict = compute_loss(model, criterion, images, masks, targets, amp_dtype)
    terms = {k: v.detach() for k, v in loss_dict.items()}
    if on_device:
        return _step_checked_on_device(loss, terms, optimizer, clip_max_norm, guard, scheduler, step,
                                       images.shape[0])
    if check_finite:
        finite = all_finite(loss)
        if guard is not None:
            guard.settle()  # device verdicts of earlier calls first: counted in step order
            guard.update(finite, step=step, loss=float(loss.detach()) if not finite else None)
        if not finite:
            _step_schedule_only(scheduler)
            return StepOutput(loss=loss.detach(), loss_terms=terms, skipped_on_host=True, num_images=images.shape[0])
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    check_grads = check_finite and scaler is None and bool(params)  # (a GradScaler skips such a step itself)
    grad_norm = _clip_or_measure(params, clip_max_norm, measure=check_grads)
    if check_grads:
        grads_finite = all_finite(grad_norm)  # a finite loss with NaN gradients made every weight NaN
        if guard is not None:
            guard.update_step(grads_finite, step=step)
        if not grads_finite:
            _step_schedule_only(scheduler)
            return StepOutput(loss=loss.detach(), loss_terms=terms, grad_norm=grad_norm, skipped_on_host=True,
                              num_images=images.shape[0])
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return StepOutput(loss=loss.detach(), loss_terms=terms, grad_norm=grad_norm, num_images=images.shape[0])


def _clip_or_measure(params: list, clip_max_norm: float, measure: bool) -> Optional[torch.Tensor]:
    """The total gradient norm of ``params`` before clipping (0-d, on the gradients' device): the
    gradients clipped to ``clip_max_norm`` when it is > 0, else only measured, when ``measure``
    (None otherwise)."""
    if clip_max_norm and clip_max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip_max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params]) if measure else None


def _step_schedule_only(scheduler) -> None:
    """A skipped batch still moves the schedule (without optimizer.step: torch's warning muted)."""
    if scheduler is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()


def _step_checked_on_device(loss: torch.Tensor, terms: dict, optimizer: torch.optim.Optimizer,
                            clip_max_norm: float, guard: Optional[BadStepGuard], scheduler, step: Optional[int],
                            num_images: int) -> StepOutput:
    """The rest of :func:`train_step` with its finiteness check on the device (no host read)."""
    loss_finite = torch.isfinite(loss.detach())
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grad_norm = _clip_or_measure(params, clip_max_norm, measure=True) if params else None  # NaN: a NaN gradient
    grads_finite = torch.isfinite(grad_norm).to(loss_finite.device) if grad_norm is not None else loss_finite
    flags = torch.stack([loss_finite, grads_finite]).to(torch.float32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # every rank skips together
    optimizer.found_inf = 1.0 - flags.min()  # read by the fused step: 1 = skip the update
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    if scheduler is not None:
        scheduler.step()
    verdict = StepVerdict(flags, loss)
    if guard is not None:
        guard.observe(verdict, step=step)
    return StepOutput(loss=loss.detach(), loss_terms=terms, grad_norm=grad_norm, num_images=num_images,
                      verdict=verdict)

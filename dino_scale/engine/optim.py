"""Parameter groups, AdamW and learning-rate schedules for DINO training.

Groups (official DINO recipe): the backbone at ``lr_backbone`` (1e-5), the
sampling-offset / reference-point projections of deformable attention at
``lr * lr_linear_proj_mult``, everything else at ``lr`` (1e-4). With
``no_decay_norm_embed`` every group is split again so 1-d tensors (norm weights,
biases) and embedding tables get no weight decay.

Schedules are functions of the data position: the step index of the accumulation window
(one global batch) in the run, skipped windows included (non-finite loss or gradients, fp16
overflow), so the drop lands at the start of its epoch and warmup and cosine follow the data
as in the official per-epoch ``StepLR`` (:func:`seek_schedule`):
``step`` (x0.1 at ``lr_drop_epochs[0]``, the 11-of-12 recipe), ``multistep`` (x0.1 at
each epoch in ``lr_drop_epochs``), ``cosine`` (toward 0, reached at step ``total_steps``, just
after the last step taken). Each may start with a linear warmup of ``warmup_steps``.
``lr_drop_epochs=None`` is the 11-of-12 point of ``epochs`` (:func:`lr_drop_epochs`).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable

import torch
from torch import nn

from dino_scale.config import ConfigError, TrainConfig
from dino_scale.config_checks import check_schedule, lr_drop_epochs  # noqa: F401 - lr_drop_epochs: optim's API

__all__ = [
    "BACKBONE_KEYS", "LINEAR_PROJ_KEYS", "build_param_groups", "build_optimizer",
    "lr_factor_fn", "build_scheduler", "lr_drop_epochs", "applied_lr", "window_position", "seek_schedule",
    "steps_on_param_devices",
]

BACKBONE_KEYS = ("backbone.",)
LINEAR_PROJ_KEYS = ("sampling_offsets", "reference_points")
WARMUP_START_FACTOR = 1e-3


def _matches(name: str, keys: Iterable[str]) -> bool:
    return any(k in name for k in keys)


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Ids of 1-d tensors (norm weights, biases), ``nn.Embedding`` tables and bare
    parameters whose own name ends in ``embed`` (e.g. ``level_embed``)."""
    ids = set()
    for module in model.modules():
        for leaf, p in module.named_parameters(recurse=False):
            if p.ndim <= 1 or isinstance(module, nn.Embedding) or leaf.endswith("embed"):
                ids.add(id(p))
    return ids


def build_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW parameter groups; each dict has ``params``, ``lr``, ``weight_decay``, ``name``.

    Shared parameters (e.g. the decoder's shared box head) appear once. Frozen
    parameters (``requires_grad=False``) are left out. Empty groups are dropped.
    """
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    no_decay_ids = _no_decay_ids(model) if cfg.no_decay_norm_embed else set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if _matches(name, BACKBONE_KEYS):
            kind = "backbone"
        elif _matches(name, LINEAR_PROJ_KEYS):
            kind = "linear_proj"
        else:
            kind = "default"
        no_decay = id(p) in no_decay_ids
        buckets.setdefault((kind, no_decay), []).append(p)
    lrs = {"default": cfg.lr, "backbone": cfg.lr_backbone, "linear_proj": cfg.lr * cfg.lr_linear_proj_mult}
    groups = []
    for kind in ("default", "backbone", "linear_proj"):
        for no_decay in (False, True):
            params = buckets.get((kind, no_decay))
            if params:
                groups.append({
                    "params": params,
                    "lr": lrs[kind],
                    "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                    "name": kind + ("_no_decay" if no_decay else ""),
                })
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`build_param_groups` (the official optimizer).

    ``fused`` (None = auto: when every trainable parameter is on a CUDA device) selects
    torch's fused AdamW: one multi-tensor kernel per step instead of a chain per parameter
    tensor and no per-parameter host work (measured on an H100, r50_4scale: see
    benchmarks/README.md). Same update rule and state keys as the default implementation.
    """
    groups = build_param_groups(model, cfg)
    if fused is None:
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=bool(fused) or None)


def steps_on_param_devices(optimizer) -> int:
    """Put each fused/capturable AdamW state's ``step`` on its parameter's device (float32); returns
    how many moved. DeepSpeed's universal-checkpoint load assigns the step it read from disk (a CPU
    tensor) straight into the torch optimizer's state, bypassing ``load_state_dict``, which would
    move it: the fused CUDA kernel then fails at the first step after a resume on another worker
    count. ``optimizer``: a torch optimizer or DeepSpeed's ZeRO wrapper of one."""
    base = getattr(optimizer, "optimizer", optimizer)
    moved = 0
    for group in getattr(base, "param_groups", []):
        if not (group.get("fused") or group.get("capturable")):
            continue  # the plain implementations keep the step on the host
        for p in group["params"]:
            state = base.state.get(p)
            step = state.get("step") if state else None
            if torch.is_tensor(step) and step.device != p.device:
                state["step"] = step.to(device=p.device, dtype=torch.float32)
                moved += 1
    return moved


def lr_factor_fn(cfg: TrainConfig, steps_per_epoch: int, total_steps: int | None = None) -> Callable[[int], float]:
    """Multiplier of each group's base lr as a function of the data position (0-based step
    index of the global batch in the run, skipped ones included: :func:`window_position`).

    ``total_steps`` defaults to ``epochs * steps_per_epoch`` (cosine needs it).
    """
    if steps_per_epoch < 1:
        raise ConfigError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    total = total_steps or cfg.epochs * steps_per_epoch
    warmup = max(0, int(cfg.warmup_steps))
    drops = check_schedule(cfg)

    def factor(step: int) -> float:
        if step < warmup:
            alpha = step / warmup
            warm = WARMUP_START_FACTOR * (1 - alpha) + alpha
        else:
            warm = 1.0
        epoch = step // steps_per_epoch
        if cfg.schedule == "step":
            base = 0.1 if epoch >= drops[0] else 1.0
        elif cfg.schedule == "multistep":
            base = 0.1 ** sum(epoch >= d for d in drops)
        else:
            span = max(1, total - warmup)
            progress = min(1.0, max(0.0, (step - warmup) / span))
            base = 0.5 * (1.0 + math.cos(math.pi * progress))
        return warm * base

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                    total_steps: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per applied optimizer step (by DeepSpeed) and moved to the data
    position before each step (:func:`seek_schedule`); its state dict resumes exactly."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(cfg, steps_per_epoch, total_steps))


def applied_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, group: int = 0) -> float:
    """The lr of ``group`` in the latest optimizer step (before any step: the first step's).

    After a step the scheduler already holds the next step's lr, which is what
    ``get_last_lr()`` returns: logged as the step's, it showed a drop or the warmup one step early."""
    done = int(scheduler.last_epoch)  # steps taken
    if done < 1:
        return float(scheduler.get_last_lr()[group])
    return float(scheduler.base_lrs[group] * scheduler.lr_lambdas[group](done - 1))


def window_position(epoch: int, micro_in_epoch: int, steps_per_epoch: int, accum: int) -> int:
    """The data position (0-based global step index) of the accumulation window holding the
    epoch's ``micro_in_epoch``-th micro-batch (1-based): ``epoch * steps_per_epoch`` plus the
    window's index in the epoch. A window cut short by the end of the data keeps its index."""
    return int(epoch) * int(steps_per_epoch) + max(0, int(micro_in_epoch) - 1) // int(accum)


def seek_schedule(scheduler, position: int) -> None:
    """Set ``scheduler`` (a ``LambdaLR``) and its optimizer's group lrs to the data ``position``
    before the optimizer step of that window: the step then uses ``base_lr * factor(position)``
    and the scheduler's own ``step()`` after it (DeepSpeed's, on an applied step only) leads to
    ``position + 1``. DeepSpeed does not step the scheduler on a skipped step (fp16 overflow,
    ZeRO's non-finite gradients) and the loop takes none for a window whose gradients or every
    loss were non-finite, so counting applied steps put every later lr (warmup, drop, cosine)
    one window late per skip. In the normal path (no skip so far) the scheduler is already
    there and nothing changes. Other schedulers (no ``lr_lambdas``) are left alone."""
    if getattr(scheduler, "lr_lambdas", None) is None or int(scheduler.last_epoch) == int(position):
        return
    scheduler.last_epoch = int(position) - 1
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": a seek, not a step
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()  # LambdaLR: base_lr * factor(last_epoch), into the groups and get_last_lr()

"""DeepSpeed wiring: a ZeRO config from :class:`TrainConfig`, engine creation, EMA,
full (consolidated) state dicts.

* ZeRO stage 0/1/2/3 (``train.zero_stage``); gradient clipping ``train.clip_max_norm`` (0.1).
* Precision: ``train.precision="bf16"`` is torch autocast (the loop's) over fp32 weights: the
  parameters, gradients and optimizer stay fp32, as in the benchmarks and the bf16 overfit
  test, and saved weights are exact. DeepSpeed's own bf16 mode is not used: it casts the
  module to bf16, so frozen weights and buffers are rounded for good and the module's
  (saved) weights are bf16 copies of the fp32 masters. ``"fp16"`` is DeepSpeed's fp16 mode,
  for its dynamic loss scaling: the module holds fp16 copies of every parameter, and the
  optimizer the fp32 masters of the trained ones. :func:`full_state_dict` saves the masters
  and, for frozen parameters, the fp32 values they had before DeepSpeed cast them, so an
  fp16 run saves exact fp32 weights too (its forward used the fp16 copies).
* The global batch is fixed: ``gradient_accumulation_steps = global_batch_size /
  (batch_size per worker * world_size)``, so a job restarted on fewer workers takes the
  same optimizer steps (it must divide exactly, else :class:`ConfigError`).
* Gradient accumulation is the loop's (DeepSpeed's ``managed_gradient_accumulation: false``):
  :class:`AccumulationWindow` steps at fixed micro-batch positions of the epoch, so a skipped
  (non-finite) micro-batch cannot shift the optimizer steps off the epochs and checkpoints.
* Activation checkpointing is a model feature (``model.backbone_checkpointing``,
  ``model.encoder_checkpointing``); :func:`apply_activation_checkpointing` sets both.
* A torch optimizer (AdamW with the DINO parameter groups) and a ``LambdaLR`` are passed
  in, so DeepSpeed steps the schedule once per applied optimizer step and checkpoints both;
  :meth:`AccumulationWindow.flush` moves it to the window's data position before each step, so
  a skipped step (which DeepSpeed does not count) does not delay the schedule.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Optional

import torch
from torch import nn

from dino_scale.config import Config, ConfigError, TrainConfig
from dino_scale.config_checks import check_train_config, check_zero_and_precision, grad_accum_steps
from dino_scale.engine.optim import seek_schedule

__all__ = [
    "grad_accum_steps", "build_ds_config", "check_train_config", "init_deepspeed", "apply_activation_checkpointing",
    "full_state_dict", "ModelEMA", "AccumulationWindow",
]


def build_ds_config(cfg: TrainConfig, micro_batch_size: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``cfg`` on ``world_size`` workers."""
    check_zero_and_precision(cfg)
    accum = grad_accum_steps(cfg.global_batch_size, micro_batch_size, world_size)
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 2:
        zero.update({"overlap_comm": False, "contiguous_gradients": True,
                     "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7})
    if cfg.zero_stage == 3:
        zero.update({"stage3_param_persistence_threshold": 1e4, "stage3_prefetch_bucket_size": 5e7,
                     "stage3_gather_16bit_weights_on_model_save": True})
    ds: dict[str, Any] = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accum,
        # the loop owns the boundary (AccumulationWindow): backward() accumulates, step() reduces
        # and updates, whatever the number of backward passes since the last step
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(cfg.clip_max_norm) if cfg.clip_max_norm else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    # bf16: autocast over fp32 weights (module docstring), nothing in the DeepSpeed config
    return ds


def apply_activation_checkpointing(cfg: Config, enabled: bool = True) -> Config:
    """Turn activation checkpointing of the backbone and the encoder layers on or off."""
    cfg.model.backbone_checkpointing = enabled
    cfg.model.encoder_checkpointing = enabled
    return cfg


def _prepare_deepspeed_env() -> None:
    # ZeRO-3 + bf16 on CPU crashes at exit in the shared-memory comm op; skip building it.
    try:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    except Exception:  # pragma: no cover - older DeepSpeed layouts
        pass
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _use_device_as_local_rank(device: Optional[torch.device]) -> None:
    """Make ``LOCAL_RANK`` the index of this worker's GPU, the one it trains on: DeepSpeed
    moves the module to ``cuda:LOCAL_RANK`` and ZeRO-3 gathers parameters there. Ray Train
    numbers a node's workers by GPU id as integers (0, 1, 2, ..., 10) but lists their shared
    ``CUDA_VISIBLE_DEVICES`` sorted as strings ("0,1,10,11,2,..."), and ``get_device()`` is
    the GPU's position in that list: on a node with 11 GPUs or more the two differ, and
    DeepSpeed would put a worker's model on another worker's GPU."""
    if device is None or device.type != "cuda" or device.index is None:
        return
    before = os.environ.get("LOCAL_RANK")
    if before != str(device.index):
        os.environ["LOCAL_RANK"] = str(device.index)
        logging.getLogger("dino_scale.engine").info(
            "LOCAL_RANK %s -> %d: the index of this worker's GPU (%s) for DeepSpeed", before, device.index, device)


def init_deepspeed(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, ds_config: dict,
                   device: Optional[torch.device] = None):
    """``deepspeed.initialize`` on an already-initialized process group (Ray Train sets it
    up); returns the engine. The engine owns the optimizer, the lr scheduler, clipping
    and gradient accumulation. ``device``: the worker's training device (the model is on it);
    on a GPU, DeepSpeed is told to use the same one."""
    _prepare_deepspeed_env()
    _use_device_as_local_rank(device)
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
    frozen = None
    if ds_config.get("fp16", {}).get("enabled"):  # DeepSpeed casts them to fp16; keep the originals
        frozen = {id(p): p.detach().float().cpu().clone() for p in model.parameters() if not p.requires_grad}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    engine.dino_fp32_frozen = frozen
    return engine


def _fp32_masters(engine) -> dict[int, torch.Tensor]:
    """``id(param) -> full fp32 master`` of the trained parameters of an fp16 engine: from the
    ZeRO-1/2/3 partitions (collective: every rank calls it, in the same order) or, without
    ZeRO, from DeepSpeed's fp16 optimizer (fp16 group ``i`` <-> fp32 group ``i``)."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters: dict[int, torch.Tensor] = {}
    for p in engine.module.parameters():
        if p.requires_grad and (hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")):
            masters[id(p)] = safe_get_full_fp32_param(p)
    if engine.zero_optimization_stage() > 0:
        return masters
    opt = engine.optimizer
    for i, group in enumerate(opt.fp16_groups):
        if hasattr(opt, "fp32_groups"):  # unfused: one fp32 tensor per parameter
            values = opt.fp32_groups[i]
        else:  # fused: one flat fp32 tensor per group
            values = torch._utils._unflatten_dense_tensors(opt.fp32_groups_flat[i], group)
        masters.update({id(p): v for p, v in zip(group, values) if id(p) not in masters})
    return masters


def full_state_dict(engine_or_model, rank: int = 0, all_ranks: bool = False
                    ) -> Optional[dict[str, torch.Tensor]]:
    """The full fp32 state dict on rank 0 (on every rank with ``all_ranks``; None on the
    others). Gathers ZeRO-3 partitions, so every rank must call it. Of an fp16 engine it
    holds the optimizer's fp32 masters and the frozen weights' pre-cast values, not the
    module's fp16 copies.

    Tensors are cloned CPU fp32, so aliased (shared) heads become separate copies
    (safetensors refuses shared storage).
    """
    model = getattr(engine_or_model, "module", engine_or_model)
    stage = engine_or_model.zero_optimization_stage() if hasattr(engine_or_model, "zero_optimization_stage") else 0
    want = all_ranks or rank == 0
    exact: dict[int, torch.Tensor] = {}
    if getattr(engine_or_model, "dino_fp32_frozen", None) is not None:  # fp16 engine
        exact = {**engine_or_model.dino_fp32_frozen, **_fp32_masters(engine_or_model)}

    def grab() -> Optional[dict[str, torch.Tensor]]:
        if not want:
            return None
        return {k: exact.get(id(v), v).detach().float().cpu().clone()
                for k, v in model.state_dict(keep_vars=True).items()}

    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return grab()
    return grab()


class AccumulationWindow:
    """Gradient accumulation over fixed micro-batch positions, for a DeepSpeed engine built
    with ``managed_gradient_accumulation: false``.

    A window is ``accum`` consecutive micro-batches of an epoch, skipped (non-finite) ones
    included. ``backward(loss)`` accumulates ``loss / accum``'s gradients (DeepSpeed scales by
    its ``gradient_accumulation_steps``); ``flush()`` at the window's end applies one optimizer
    step over them. A skipped micro-batch adds no gradient (its samples weigh zero in that
    step), a window with none backpropagated takes no step, and an epoch ending mid-window
    (the data ran out) is flushed. So no gradient is ever pending at an epoch end or a
    checkpoint: a resumed run continues exactly. ``step_applied`` says whether the last flush
    changed the weights, ``grad_norm`` the global gradient norm (before clipping) DeepSpeed
    computed for it (``None``: none computed, as without ZeRO in fp32 when clipping is off), and
    ``skip_reason`` why not: ``"fp16 overflow"`` (fp16 loss scaling
    found one and lowered the scale) or ``"non-finite gradients"`` (a finite loss whose
    gradients are not: DeepSpeed's ZeRO-1/2/3 optimizers skip such a step; without ZeRO and
    fp16 DeepSpeed applied it and every weight became NaN, so the window checks the gradients
    itself there, with one scalar all-reduce).
    DeepSpeed's own counter counted successful micro-batches only: one skip shifted every later
    step, steps spanned epochs, and the gradients pending at a checkpoint were lost on resume.
    """

    def __init__(self, engine, accum: int):
        self.engine, self.accum, self.pending = engine, int(accum), 0
        self.step_applied = False  # whether the last flush updated the weights (fp16: not on overflow)
        self.skip_reason: Optional[str] = None  # why the last flush with gradients did not
        self._fp16 = bool(engine.fp16_enabled())
        self._check_grads = engine.zero_optimization_stage() == 0 and not self._fp16
        self._grad_norm = None  # of the last flush with gradients: a tensor, or what DeepSpeed keeps
        self._clip_norm = None
        if self._check_grads and not engine.bfloat16_enabled() and hasattr(engine, "clip_fp32_gradients"):
            self._keep_fp32_clip_norm()

    def _keep_fp32_clip_norm(self) -> None:
        """Without ZeRO in fp32 DeepSpeed clips the gradients after their all-reduce with the
        global norm, and drops the norm (``get_global_grad_norm()`` stays ``None``): the engine's
        clipping is replaced by torch's, which keeps it. The gradients are already the same on
        every rank, so their norm is too: torch's clipping needs no all-reduce, and it reads
        nothing back to the host (DeepSpeed's made two blocking host-to-device copies and one
        norm kernel per parameter each step). A model-parallel ``mpu`` keeps DeepSpeed's."""
        engine = self.engine
        if engine.mpu is not None:
            from deepspeed.runtime.utils import clip_grad_norm_ as ds_clip

            def clip_and_keep_norm() -> None:
                self._clip_norm = ds_clip(parameters=engine.module.parameters(),
                                          max_norm=engine.gradient_clipping(), mpu=engine.mpu)
        else:
            def clip_and_keep_norm() -> None:
                self._clip_norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(),
                                                                 engine.gradient_clipping())

        engine.clip_fp32_gradients = clip_and_keep_norm

    @property
    def grad_norm(self) -> Optional[float]:
        """The global gradient norm, before clipping, of the last flush with gradients (not finite
        where the step was skipped for it); ``None``: not known (no such flush yet, a skip found
        by the window's own check, or DeepSpeed computed none)."""
        return None if self._grad_norm is None else float(self._grad_norm)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.pending += 1

    def ends_at(self, micro_in_epoch: int) -> bool:
        """Whether the window ends after the epoch's ``micro_in_epoch``-th micro-batch (1-based)."""
        return micro_in_epoch % self.accum == 0

    def flush(self, position: Optional[int] = None) -> int:
        """One optimizer step over the pending micro-batches; returns how many there were
        (0: no step taken). ``position``: the window's data position (global step index,
        skipped windows included: :func:`~dino_scale.engine.optim.window_position`); the engine's
        lr scheduler is moved there before the step (:func:`~dino_scale.engine.optim.seek_schedule`),
        so the step's lr follows the data, not the count of applied steps, and back to where it
        was when the step is skipped (it then holds the last applied step's position + 1)."""
        n, self.pending = self.pending, 0
        self.step_applied, self.skip_reason = False, None
        if not n:
            return 0
        self._grad_norm = None
        if self._check_grads and not self._gradients_finite():
            self.engine.zero_grad()  # as DeepSpeed's ZeRO optimizers drop a non-finite step's gradients
            if hasattr(self.engine, "_unmanaged_backward_count"):  # its sample counter: no step was taken
                self.engine._unmanaged_backward_count = 0
            self.skip_reason = "non-finite gradients"
            return n
        self._clip_norm = None
        scheduler = getattr(self.engine, "lr_scheduler", None) if position is not None else None
        before = int(scheduler.last_epoch) if scheduler is not None else None
        if scheduler is not None:
            seek_schedule(scheduler, position)
        self.engine.step()  # DeepSpeed steps the scheduler when the step is applied
        self.step_applied = bool(self.engine.was_step_applied())
        if scheduler is not None and not self.step_applied:
            seek_schedule(scheduler, before)
        norm = self.engine.get_global_grad_norm()
        self._grad_norm = self._clip_norm if norm is None else norm
        if not self.step_applied:
            self.skip_reason = "fp16 overflow" if self._fp16 else "non-finite gradients"
        return n

    def _gradients_finite(self) -> bool:
        """Whether every rank's accumulated (not yet reduced) gradients are finite."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        device = grads[0].device if grads else next(self.engine.module.parameters()).device
        norms = torch._foreach_norm(grads) if grads else []
        flag = (torch.isfinite(torch.stack(norms)).all() if norms else torch.tensor(True, device=device))
        flag = flag.to(device=device, dtype=torch.float32).reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item() > 0.5)


class ModelEMA:
    """Exponential moving average of the weights, kept in fp32 on the model's device.

    ``update`` is called after each optimizer step with the (possibly DeepSpeed-wrapped)
    model; under ZeRO-3 every rank must call it (parameters are gathered). Of an fp16 engine
    it averages the module's fp16 copies (the fp32 masters would cost a collective per
    parameter and step).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        self._gather(model, init=True)

    def _gather(self, model: nn.Module, init: bool) -> None:
        module = getattr(model, "module", model)
        params = [p for p in module.parameters()]
        ctx = None
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            ctx.__enter__()
        try:
            with torch.no_grad():
                d = self.decay
                averages, values = [], []
                for name, value in module.state_dict().items():
                    if not value.is_floating_point():
                        continue
                    v = value.detach().float()
                    if init or name not in self.shadow:
                        self.shadow[name] = v.clone()
                    else:
                        averages.append(self.shadow[name])
                        values.append(v)
                if averages:  # a few multi-tensor kernels, not two launches per tensor
                    torch._foreach_mul_(averages, d)
                    torch._foreach_add_(averages, values, alpha=1 - d)
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)

    def update(self, model: nn.Module) -> None:
        self._gather(model, init=False)
        self.updates += 1

    def reset(self, model: nn.Module) -> None:
        """Start the averages over from ``model``'s weights (collective under ZeRO-3, as ``update``)."""
        self._gather(model, init=True)
        self.updates = 0

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the averages go to this EMA's device (the model's),
        whatever device they were saved from (rank 0's GPU, for every rank that resumes)."""
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        default = next(iter(self.shadow.values())).device if self.shadow else None
        self.shadow = {k: v.to(self.shadow[k].device if k in self.shadow else default or v.device, copy=True)
                       for k, v in state["shadow"].items()}

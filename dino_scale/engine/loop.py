"""``train_loop_per_worker``: the Ray Train worker loop (DeepSpeed step, reports,
checkpoints, resume at the epoch's position (the very samples not yet seen with
``train.deterministic``; as many samples otherwise: the split across workers follows the read's
timing), NaN/Inf guard, final weights and distributed evaluation); what it
exchanges with the driver (reports, object-store values, rank 0's MLflow logger) is
:mod:`dino_scale.engine.worker_io`.

Driven by a plain dict (``loop_config``) built by :func:`dino_scale.engine.trainer.loop_config`:
``config`` (Config as dict), ``steps_per_epoch`` (optimizer steps), ``run_id`` /
``tracking_uri`` (MLflow, rank 0 logs), ``init_weights`` (path), ``val_gt`` (path of a
COCO-format JSON or None), ``evaluate`` (bool), ``train`` (bool; false: evaluate the
initial weights only, without DeepSpeed) and ``test_hooks`` (fault injection for tests:
``nan_micro_steps``, ``pid_file``/``pid_after_step``/``pid_rank``/``pid_world``/``pause_s``,
``pauses``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dino_scale.config import from_dict, to_dict
from dino_scale.engine.batches import agreed_window, iter_micro_batches, read_window
from dino_scale.engine.checkpoint import (
    TrainState, atomic_write_text, checkpoint_dir_name, load_into, load_training_checkpoint,
    load_weights, save_training_checkpoint, save_weights,
)
from dino_scale.engine.state_files import rng_states, rng_untouched, set_rng_states
from dino_scale.engine.deepspeed_utils import (
    AccumulationWindow, ModelEMA, build_ds_config, full_state_dict, grad_accum_steps, init_deepspeed,
)
from dino_scale.engine.elastic import holds_frozen_tensors, reads_backbone_weights, resume_source, saved_world_size
from dino_scale.engine.loop_eval import evaluate_only, evaluate_val, wants_eval
from dino_scale.engine.optim import applied_lr, build_optimizer, build_scheduler, window_position
from dino_scale.engine.progress import LossWindow, WindowMeter
from dino_scale.data.run_stats import set_epoch as set_data_epoch
from dino_scale.engine.train_step import (
    BadStepError, BadStepGuard, all_finite, autocast_dtype, check_target_labels, compute_loss, move_batch,
    window_num_boxes,
)
from dino_scale.engine.worker_io import from_driver, rank0_tracker, report

__all__ = ["train_loop_per_worker"]

log = logging.getLogger("dino_scale.engine")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _prepare_images(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """uint8 -> ImageNet-normalized float (padding zeroed), on the input's device."""
    from dino_scale.data.transforms import normalize_batch

    return normalize_batch(images, masks) if images.dtype == torch.uint8 else images


def _test_pid_hook(hooks: dict, rank: int, world: int, step: int) -> None:
    """Test fault injection: after ``pid_after_step``, the worker of rank ``pid_rank`` (of a
    group of ``pid_world`` workers, when given) writes its pid to ``pid_file`` once and pauses
    ``pause_s`` so a test can kill it or change the cluster. ``hooks["pauses"]`` lists further
    such points (dicts with the same keys)."""
    for point in (hooks, *hooks.get("pauses", ())):
        path = point.get("pid_file")
        if (not path or rank != int(point.get("pid_rank", 1)) or step < int(point.get("pid_after_step", 0))
                or world != int(point.get("pid_world", world)) or os.path.exists(path)):
            continue
        atomic_write_text(path, str(os.getpid()))
        deadline = time.monotonic() + float(point.get("pause_s", 0))
        while time.monotonic() < deadline:
            time.sleep(0.05)


def train_loop_per_worker(loop_cfg: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from dino_scale.models import build_dino, build_model

    cfg = from_dict(loop_cfg["config"])
    tc = cfg.train
    hooks = loop_cfg.get("test_hooks") or {}
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if tc.torch_threads:
        torch.set_num_threads(int(tc.torch_threads))
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = ray.train.torch.get_device()
    seed_everything(tc.seed)  # identical initial weights on every rank
    # the ImageNet backbone file is not read (nor needed) where strict init weights, or a checkpoint
    # this run resumes from that restores every tensor (frozen ones saved in it), replace all it holds
    restored = ray.train.get_checkpoint() if loop_cfg.get("train", True) else None
    reads = reads_backbone_weights(
        cfg, init_weights=loop_cfg.get("init_weights"), init_strict=bool(loop_cfg.get("init_strict", True)),
        world=world, resumed_world=None if restored is None else saved_world_size(restored.path, restored.filesystem),
        resumed_frozen=restored is not None and holds_frozen_tensors(restored.path, restored.filesystem))
    model, criterion, postprocessor = build_dino(cfg.model if reads else replace(cfg.model, backbone_weights=None))
    seed_everything(tc.seed + 1000 * (rank + 1))  # per-rank streams (denoising noise)
    if loop_cfg.get("init_weights"):
        state = from_driver(loop_cfg["init_state"]) if loop_cfg.get("init_state") is not None else \
            load_weights(loop_cfg["init_weights"])
        missing, unexpected = load_into(model, state, strict=bool(loop_cfg.get("init_strict", True)))
        if rank == 0 and (missing or unexpected):
            log.warning("init weights (init_strict=False): %d model tensors missing from them, left as built "
                        "(first: %s); %d of their keys unknown to the model, ignored (first: %s)", len(missing),
                        ", ".join(missing[:3]), len(unexpected), ", ".join(unexpected[:3]))
    model.to(device)  # before the optimizer: on a GPU, build_optimizer picks fused AdamW
    criterion.to(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(tc.tf32)
    if not loop_cfg.get("train", True):
        evaluate_only(model, postprocessor, cfg, loop_cfg, device, rank)
        return
    if tc.compile:
        from dino_scale.models.compile import compile_criterion, compile_regions
        compiled = compile_regions(model, granularity=tc.compile_granularity, mode=tc.compile_mode)
        compiled += compile_criterion(criterion)  # default mode: the match count varies every step
        if rank == 0:
            log.info("regional torch.compile: %d regions (first steps compile)", len(compiled))
    micro = cfg.data.batch_size
    accum = grad_accum_steps(tc.global_batch_size, micro, world)
    steps_per_epoch = int(loop_cfg["steps_per_epoch"])
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, int(tc.max_steps))
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc, steps_per_epoch, tc.epochs * steps_per_epoch)
    ds_config = build_ds_config(tc, micro, world)
    state = TrainState(world=world)
    with resume_source(restored, world, tc.zero_stage, ctx.get_local_rank(), torch.distributed.barrier) as source:
        if source.universal is not None:  # ZeRO-1/2 written by another worker count
            ds_config["checkpoint"] = {"load_universal": True}
        engine = init_deepspeed(model, optimizer, scheduler, ds_config, device)
        ema = ModelEMA(engine, tc.ema_decay) if tc.ema_decay else None
        if source.folder is not None:
            state = load_training_checkpoint(source.folder, engine, rank, ema, universal_root=source.universal)
            state.resumes += 1
            state.world = source.saved_world  # the state's own, or counted for a checkpoint from before it
            exact = state.rescale_to(world)
            if rank == 0:
                log.warning("resumed from %s at epoch %d, step %d%s", restored.path, state.epoch, state.global_step,
                            f" ({source.saved_world} -> {world} workers{'' if exact else ', position rounded down'})"
                            if source.saved_world not in (0, world) else "")
    guard = BadStepGuard(tc.max_bad_steps)
    guard.load_state_dict(state.bad_steps)

    tracker = rank0_tracker(loop_cfg, rank)

    amp = autocast_dtype(tc.precision)
    pad_multiple = getattr(cfg.data, "pad_multiple", None)
    train_shard = ray.train.get_dataset_shard("train")
    meter, window = WindowMeter(world), LossWindow(device)
    abort: Optional[str] = None
    last_ckpt_step = -1

    def write_state(folder: Path) -> None:
        state.bad_steps, state.steps_per_epoch = guard.state_dict(), steps_per_epoch
        state.mlflow_run_id = loop_cfg.get("run_id") or ""  # the run a run resuming from it continues
        state.train_data = loop_cfg.get("train_data") or ""  # what a run resuming from it must train on
        save_training_checkpoint(folder, engine, state, rank, ema, config=to_dict(cfg))

    def metrics_now() -> dict[str, Any]:
        m = {"step": state.global_step, "epoch": state.epoch, "images_seen": state.images_seen,
             "lr": applied_lr(scheduler), "bad_steps_total": guard.total,
             "bad_steps_consecutive": guard.consecutive, "workers": world, "grad_accum": accum}
        losses = window.reduce()
        m.update(losses)
        snap = meter.snapshot()
        m.update(snap if losses else {"data_wait_share": snap["data_wait_share"]})
        norm = accumulation.grad_norm
        if norm is not None and math.isfinite(norm):
            m["grad_norm"] = norm
        if rank == 0:
            try:  # images dropped at decode time (counted by the data layer)
                from dino_scale.data.run_stats import exif_ties, skip_metrics

                m.update(skip_metrics("train"))  # data_skipped and data_skipped/<reason>
                ties = int(exif_ties("train")["count"])  # EXIF ties read upright (data.exif_orientation=auto)
                if ties:
                    m["data_exif_ties"] = ties
            except Exception:
                pass
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in m.items() if k not in ("step", "epoch")}, step=state.global_step)
        return m

    accumulation = AccumulationWindow(engine, accum)

    def flush() -> int:  # the window's step, its lr that of its data position (skipped windows count)
        return accumulation.flush(window_position(state.epoch, state.micro_in_epoch, steps_per_epoch, accum))

    def after_window(micro_batches: int) -> None:
        """Bookkeeping of one optimizer step over ``micro_batches`` successful micro-batches."""
        nonlocal last_ckpt_step
        if not micro_batches:  # every micro-batch of the window was skipped: no step
            return
        skipped = accumulation.skip_reason  # None: applied; fp16 overflow or non-finite gradients: not
        if skipped is not None and rank == 0:
            log.warning("%s at step %d: update skipped%s", skipped, state.global_step,
                        ", loss scale lowered" if skipped == "fp16 overflow" else "")
        if skipped != "fp16 overflow":  # the loss scale's own search is not a bad step
            guard.update_step(skipped is None, step=state.global_step)  # every rank: the skip is global
        if skipped is not None:
            return
        state.global_step += 1
        state.images_seen += micro_batches * micro * world
        meter.add_step()
        if ema is not None:
            ema.update(engine)
        _test_pid_hook(hooks, rank, world, state.global_step)
        if state.global_step % tc.checkpoint_every_steps == 0:
            report(metrics_now(), write_state,
                    checkpoint_dir_name(state.global_step, world, state.epoch, state.micro_in_epoch))
            meter.reset()  # the next window's rate starts after the save (it counted the write)
            last_ckpt_step = state.global_step
        elif state.global_step % tc.log_every_steps == 0:
            report(metrics_now())

    micro_total = state.epoch * steps_per_epoch * accum + state.micro_in_epoch
    # where an abort's checkpoint resumes: the window's position, guard and RNG streams (its replay draws
    # the same denoising noise; the checkpoint held the streams after the aborted window's draws)
    window_start = (state.micro_in_epoch, guard.state_dict(), rng_states())
    nan_steps = set(int(s) for s in hooks.get("nan_micro_steps", []))
    try:
        # a finished run resumed with a larger budget (train.max_steps, train.epochs) goes on training
        while state.global_step < total_steps and state.epoch < tc.epochs:
            limit = steps_per_epoch * accum
            if state.micro_in_epoch >= limit:  # resumed from a checkpoint taken at the epoch's last step
                state.epoch, state.micro_in_epoch = state.epoch + 1, 0
                continue
            set_data_epoch(state.epoch)  # augmentation draws of this epoch (seed, epoch, image_id)
            batches = iter_micro_batches(train_shard, micro, world, rank, tc.deterministic, epoch=state.epoch,
                                         shuffle_buffer=cfg.data.shuffle_buffer,
                                         seed=cfg.data.seed, pad_multiple=pad_multiple)
            for _ in range(state.micro_in_epoch):  # exact resume: skip what this epoch consumed
                next(batches, None)
            if state.micro_in_epoch:  # the replay is no step's data wait: it made the first rate and ETA wrong
                meter.reset()
            batch = ()
            queued: list = []  # the window's micro-batches not yet used, read ahead
            step_boxes: Any = 1.0
            while state.micro_in_epoch < limit and state.global_step < total_steps:
                if accumulation.ends_at(state.micro_in_epoch):  # a window starts
                    window_start = (state.micro_in_epoch, guard.state_dict(), rng_states())
                if not queued:  # the window's micro-batches (its rest, after a resume mid-window) are
                    # read first: the boxes of the whole step, on every rank, normalize each one's loss
                    queued = read_window(batches, min(accum - state.micro_in_epoch % accum,
                                                      limit - state.micro_in_epoch), meter.add_wait)
                    if tc.deterministic:  # a row one rank could not read: the ranks' windows must still pair
                        queued = agreed_window(queued, device)
                    step_boxes = window_num_boxes([sum(len(t["labels"]) for t in b[2]) for b in queued], accum, device)
                if not queued:
                    batch = None
                    break
                batch = queued.pop(0)
                state.micro_in_epoch += 1
                micro_total += 1
                check_target_labels(batch[2], cfg.model.num_classes)  # host side: no device assert
                images, masks, targets = move_batch(batch, device)
                images = _prepare_images(images, masks)
                if micro_total in nan_steps:
                    images = images * float("nan")
                loss, terms = compute_loss(engine, criterion, images, masks, targets, amp, num_boxes=step_boxes)
                finite = all_finite(loss)
                guard.update(finite, step=state.global_step, loss=None if finite else float(loss))
                if finite:
                    accumulation.backward(loss)
                    window.add(loss.detach(), {k: v.detach() for k, v in terms.items()})
                    meter.add_images(images.shape[0])
                elif rank == 0:
                    log.warning("non-finite loss at step %d: skipped (%d in a row, %d total)",
                                state.global_step, guard.consecutive, guard.total)
                if accumulation.ends_at(state.micro_in_epoch):
                    after_window(flush())
            if accumulation.pending:  # the data ran out mid-window
                after_window(flush())
            if state.micro_in_epoch >= limit or batch is None:
                state.epoch += 1
                state.micro_in_epoch = 0
                if last_ckpt_step != state.global_step:  # else the step checkpoint already holds this position
                    report(metrics_now(), write_state, checkpoint_dir_name(state.global_step, world, state.epoch))
                    meter.reset()
                    last_ckpt_step = state.global_step
    except BadStepError as exc:  # every rank raises together (the finiteness flag is all-reduced)
        abort, bad_total = str(exc), guard.total
        # the final checkpoint resumes at the window's start: its micro-batches were never applied
        state.micro_in_epoch, start_guard, start_rng = window_start
        guard.load_state_dict(start_guard)
        set_rng_states(start_rng)
    bad_total = guard.total if abort is None else bad_total

    # final: full weights (all ranks gather for ZeRO-3), distributed evaluation, last report
    full = full_state_dict(engine, rank=rank, all_ranks=True)
    final_metrics: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch, "final": True,
                                     "bad_steps_total": bad_total, "images_seen": state.images_seen,
                                     "resumes": state.resumes}
    if abort:
        final_metrics["abort_reason"] = abort
    if rank == 0:  # the run's decode-time skips, by reason, in its final metrics (and one log line)
        from dino_scale.data.run_stats import skips_at_end

        final_metrics.update(skips_at_end("train"))
    detections = None
    if abort is None and wants_eval(loop_cfg):
        with rng_untouched():  # the final checkpoint's RNG files: as after the last step (a longer rerun goes on)
            eval_model = build_model(replace(cfg.model, backbone_weights=None))  # all replaced by full
            eval_model.load_state_dict(full, strict=True)
            ap, detections = evaluate_val(eval_model, postprocessor, cfg, loop_cfg, device, amp, rank, tracker,
                                           state.global_step)
        final_metrics.update(ap)
        del eval_model
    state.finished = abort is None

    def write_final(folder: Path) -> None:
        write_state(folder)
        if rank == 0:
            save_weights(folder, full)  # config.json: written by write_state
            if ema is not None:
                save_weights(folder / "ema", ema.shadow, config=to_dict(cfg))
            if detections is not None:
                atomic_write_text(folder / "detections.json", json.dumps(detections))

    if tracker is not None:
        tracker.log_metrics({"bad_steps_total": bad_total}, step=state.global_step)
        tracker.close(timeout_s=float(loop_cfg.get("tracking_close_timeout_s", 30)))
    report(final_metrics, write_final, checkpoint_dir_name(state.global_step, world, resumes=state.resumes))

"""The worker loop's evaluations (:mod:`dino_scale.engine.loop`): COCO AP over the ``val``
shard at a training step (:func:`evaluate_val`, every rank calls it) and the evaluation-only run
of :func:`dino_scale.engine.evaluate_weights` (:func:`evaluate_only`)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from dino_scale.engine.batches import rows_of
from dino_scale.engine.checkpoint import atomic_write_text, evaluation_dir_name
from dino_scale.engine.evaluate import (
    evaluate_batches, finite_detections, gather_to_rank0, target_image_ids, unevaluated_images, val_metrics,
)
from dino_scale.engine.train_step import autocast_dtype
from dino_scale.engine.worker_io import from_driver, rank0_tracker, report

__all__ = ["evaluate_only", "evaluate_val", "wants_eval"]

log = logging.getLogger("dino_scale.engine")


def wants_eval(loop_cfg: dict[str, Any]) -> bool:
    """Whether the run evaluates: ``evaluate`` (default true) and a ``val`` dataset given."""
    return bool(loop_cfg.get("evaluate", True)) and "val" in loop_cfg.get("datasets", [])


def evaluate_val(model, postprocessor, cfg, loop_cfg: dict[str, Any], device: torch.device,
                  amp: Optional[torch.dtype], rank: int, tracker, step: int
                  ) -> tuple[dict[str, Any], Optional[list]]:
    """COCO AP of ``model`` over this worker's shard of the ``val`` dataset, logged as ``eval/*``
    at ``step`` when ``tracker`` is given. Returns ``({AP..., detections_nonfinite, num_detections,
    images_unevaluated}, detections)`` on rank 0 (the detections with finite scores and boxes:
    :func:`coco_evaluate` scores only those) and ``({}, None)`` on the others; every rank must
    call it (detections and evaluated image ids are gathered). Images the data layer dropped
    (undecodable) still count in the AP as misses; their number is reported and logged with a
    warning."""
    import ray.train

    from dino_scale.data.collate import collate

    model.to(device).eval()
    pad_multiple = getattr(cfg.data, "pad_multiple", None)
    shard = ray.train.get_dataset_shard("val")
    batches = (collate(rows_of(b), pad_multiple=pad_multiple) for b in shard.iter_batches(
        batch_size=cfg.eval.batch_size, drop_last=False, batch_format="numpy", prefetch_batches=1))
    evaluated: list[int] = []

    def prepared(batches):
        for images, masks, targets in batches:
            evaluated.extend(target_image_ids(targets))
            yield images, masks, targets  # uint8: normalized on the device by evaluate_batches

    factors = [s / cfg.data.eval_size for s in cfg.eval.tta_scales] if cfg.eval.tta else [1.0]
    local = evaluate_batches(model, postprocessor, prepared(batches), device, amp_dtype=amp, tta=cfg.eval.tta,
                             tta_scale_factors=factors, num_select=cfg.model.num_select)
    detections = gather_to_rank0(local)
    evaluated_ids = gather_to_rank0(evaluated)
    if rank != 0:
        return {}, None
    val_gt = from_driver(loop_cfg["val_gt"])
    missing = unevaluated_images(val_gt, evaluated_ids)
    if missing:
        from dino_scale.data.run_stats import skip_reasons

        log.warning("evaluation at step %d: %d of %d val images could not be decoded and were not evaluated "
                    "(their objects count as misses; reasons: %s); image ids %s%s", step, len(missing),
                    len(val_gt.get("images", [])), ", ".join(skip_reasons("eval")) or "-",
                    missing[:10], " ..." if len(missing) > 10 else "")
    ap = val_metrics(val_gt, detections, evaluated_ids)  # AP NaN when no image was evaluated
    detections, _ = finite_detections(detections)  # detections.json: the scored ones (valid JSON, no NaN)
    if tracker is not None:
        tracker.log_metrics({f"eval/{k}": v for k, v in ap.items()}, step=step)
    return {**ap, "num_detections": len(detections)}, detections


def evaluate_only(model, postprocessor, cfg, loop_cfg: dict[str, Any], device: torch.device, rank: int) -> None:
    """An evaluation-only run (``loop_cfg["train"]`` false: :func:`dino_scale.engine.evaluate_weights`).
    The loaded weights are evaluated as they are, in fp32 under the configured autocast: no
    optimizer, no DeepSpeed engine (its bf16 mode would round the weights), no training state.
    The final checkpoint holds only rank 0's ``detections.json``: the weights are the caller's."""
    tracker = rank0_tracker(loop_cfg, rank)
    amp = autocast_dtype(cfg.train.precision)
    metrics: dict[str, Any] = {"step": 0, "epoch": 0, "final": True, "bad_steps_total": 0, "images_seen": 0,
                               "resumes": 0}
    detections = None
    if wants_eval(loop_cfg):
        ap, detections = evaluate_val(model, postprocessor, cfg, loop_cfg, device, amp, rank, tracker, 0)
        metrics.update(ap)
    if tracker is not None:
        tracker.close(timeout_s=float(loop_cfg.get("tracking_close_timeout_s", 30)))

    def write_detections(folder: Path) -> None:
        if detections is not None:
            atomic_write_text(folder / "detections.json", json.dumps(detections))

    report(metrics, write_detections, loop_cfg.get("evaluation_dir_name") or evaluation_dir_name())

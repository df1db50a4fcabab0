"""COCO box evaluation: prediction (optionally with test-time augmentation), gathering
across workers, and pycocotools ``COCOeval`` on rank 0.

Detections use the COCO results format: ``{"image_id", "category_id", "bbox": [x, y, w,
h] in original pixels, "score"}``. :func:`coco_evaluate` returns ``AP, AP50, AP75, APs,
APm, APl`` (fractions in [0, 1], the first six ``COCOeval.stats``; -1 where the ground truth
has no object of that size) and ``detections_nonfinite``: detections with a NaN/inf score or box
(a diverged model, a half-precision overflow) are a counted, logged skip and never scored.
"""
from __future__ import annotations

import builtins
import contextlib
import copy
import io
import logging
import math
import sys
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dino_scale.config_checks import check_eval_config

__all__ = ["METRIC_NAMES", "to_coco_detections", "predict_batch", "coco_evaluate", "gather_to_rank0",
           "evaluate_batches", "unevaluated_images", "target_image_ids", "finite_detections",
           "val_metrics", "check_eval_config"]

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

log = logging.getLogger("dino_scale.engine")


@contextlib.contextmanager
def _prints_to(sink: io.StringIO):
    """Send ``print`` output to ``sink`` (pycocotools prints its progress and summary). A
    stdout redirect alone is not enough in a Ray Train worker: Ray patches ``builtins.print``
    to log every call, whatever ``sys.stdout`` is. Prints to other files pass through."""
    saved = builtins.print

    def to_sink(*objects, sep=" ", end="\n", file=None, flush=False):
        if file is not None and file is not sys.stdout:
            saved(*objects, sep=sep, end=end, file=file, flush=flush)
            return
        sink.write((" " if sep is None else sep).join(map(str, objects)) + ("\n" if end is None else end))

    builtins.print = to_sink
    try:
        with contextlib.redirect_stdout(sink):
            yield sink
    finally:
        builtins.print = saved


def to_coco_detections(results: Sequence[dict], image_ids: Sequence[int]) -> list[dict[str, Any]]:
    """Postprocessor results (xyxy pixels) -> COCO result dicts (xywh pixels)."""
    out = []
    for res, image_id in zip(results, image_ids):
        boxes = res["boxes"].detach().float().cpu()
        scores = res["scores"].detach().float().cpu().tolist()
        labels = res["labels"].detach().cpu().tolist()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, label in zip(xywh, scores, labels):
            out.append({"image_id": int(image_id), "category_id": int(label),
                        "bbox": [round(float(v), 3) for v in box], "score": round(float(score), 6)})
    return out


def _valid_sizes(masks: torch.Tensor) -> list[tuple[int, int]]:
    """Unpadded (h, w) of each image from the padding mask (B,H,W), True on padding."""
    h = (~masks[:, :, 0]).sum(dim=1).tolist()
    w = (~masks[:, 0, :]).sum(dim=1).tolist()
    return list(zip(h, w))


def _flip_valid(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Flip each image horizontally inside its unpadded region (padding stays bottom/right)."""
    out = images.clone()
    for i, (h, w) in enumerate(_valid_sizes(masks)):
        out[i, :, :h, :w] = images[i, :, :h, :w].flip(-1)
    return out


def _rescale(images: torch.Tensor, masks: torch.Tensor, factor: float):
    if abs(factor - 1.0) < 1e-6:
        return images, masks
    H, W = images.shape[-2:]
    size = (max(1, round(H * factor)), max(1, round(W * factor)))
    imgs = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    msk = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
    return imgs, msk


@torch.no_grad()
def predict_batch(model, postprocessor, images: torch.Tensor, masks: torch.Tensor, orig_sizes: torch.Tensor,
                  amp_dtype: Optional[torch.dtype] = None, tta: bool = False,
                  tta_scale_factors: Sequence[float] = (1.0,), num_select: int = 300) -> list[dict]:
    """Detections for one batch: ``images`` float (B,3,H,W) normalized, ``masks`` (B,H,W),
    ``orig_sizes`` (B,2) original (H, W). With ``tta``, every factor in ``tta_scale_factors``
    with and without a horizontal flip; views merged with ``merge_tta``."""
    from dino_scale.models.postprocess import hflip_boxes, merge_tta

    model.eval()
    param = next(model.parameters())
    if images.dtype != param.dtype and amp_dtype is None:
        images = images.to(param.dtype)

    def run(imgs, msk):
        ctx = torch.autocast(imgs.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with ctx:
            outputs = model(imgs, msk)
        outputs = {k: v.float() for k, v in outputs.items() if k in ("pred_logits", "pred_boxes")}
        return postprocessor(outputs, orig_sizes.to(imgs.device))

    if not tta:
        return run(images, masks)
    views: list[list[dict]] = []
    for factor in tta_scale_factors:
        imgs, msk = _rescale(images, masks, factor)
        views.append(run(imgs, msk))
        flipped = run(_flip_valid(imgs, msk), msk)
        for res, (_, w) in zip(flipped, orig_sizes.tolist()):
            res["boxes"] = hflip_boxes(res["boxes"], float(w))
        views.append(flipped)
    return [merge_tta([v[i] for v in views], num_select) for i in range(images.shape[0])]


def gather_to_rank0(items: list) -> Optional[list]:
    """Concatenate every rank's list on rank 0 (None elsewhere); identity without a group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    # to rank 0 only: every rank unpickling every rank's detections (all_gather_object), through
    # world x the largest pickle of GPU memory under NCCL, served nothing
    rank0 = dist.get_rank() == 0
    gathered: Optional[list] = [None] * dist.get_world_size() if rank0 else None
    dist.gather_object(items, gathered, dst=0)
    if not rank0:
        return None
    return [x for part in gathered for x in part]


def target_image_ids(targets: Sequence[dict]) -> list[int]:
    """The ``image_id`` of each target of a batch (a scalar or a 1-element tensor/array)."""
    return [int(torch.as_tensor(t["image_id"]).reshape(-1)[0]) for t in targets]


def unevaluated_images(coco_gt: dict, evaluated_ids: Iterable[int]) -> list[int]:
    """Ids (sorted) of ``coco_gt``'s images that no worker evaluated: images the data layer
    dropped because they would not decode. COCO evaluation still counts their objects as
    missed, so the AP is that of the whole set; this says how many were never looked at."""
    seen = {int(i) for i in evaluated_ids}
    return sorted(int(img["id"]) for img in coco_gt.get("images", []) if int(img["id"]) not in seen)


def finite_detections(detections: list[dict]) -> tuple[list[dict], int]:
    """``(kept, dropped)``: the COCO result dicts whose ``score`` and four ``bbox`` values are
    all finite, and how many others there were. pycocotools must never see the others: a NaN
    box matches every object (its ``iou < threshold`` test is False), so an all-NaN model scored
    AP 0.75 on a test set."""
    kept = [d for d in detections
            if math.isfinite(float(d["score"])) and all(math.isfinite(float(v)) for v in d["bbox"])]
    return kept, len(detections) - len(kept)


def coco_evaluate(coco_gt: dict, detections: list[dict]) -> dict[str, float]:
    """pycocotools bbox ``COCOeval`` of ``detections`` against the COCO-format ``coco_gt``:
    :data:`METRIC_NAMES` and ``detections_nonfinite``.

    Detections of images outside ``coco_gt`` are an error; an empty list gives zeros (nothing
    detected). Non-finite detections are dropped, counted and logged (their images' objects
    count as misses); when every detection was non-finite the metrics are NaN (no measurement,
    never AP 0 reported as a result).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    known = {img["id"] for img in coco_gt["images"]}
    unknown = {d["image_id"] for d in detections} - known
    if unknown:
        raise ValueError(f"detections for {len(unknown)} image ids not in the ground truth, e.g. {sorted(unknown)[:5]}")
    detections, nonfinite = finite_detections(detections)
    if nonfinite:
        log.warning("%d of %d detections have a non-finite score or box (the model's outputs hold NaN/inf) and "
                    "were not scored%s", nonfinite, nonfinite + len(detections),
                    "; no finite detection is left: AP is NaN" if not detections else
                    "; their images' objects count as misses")
    if not detections:
        value = math.nan if nonfinite else 0.0
        return {**{k: value for k in METRIC_NAMES}, "detections_nonfinite": nonfinite}
    with _prints_to(io.StringIO()) as printed:
        gt = COCO()
        # pycocotools adds keys to each annotation dict (COCOeval: 'ignore'; loadRes: area, id,
        # iscrowd, a box polygon) and replaces nothing inside them: copies of the dicts keep the
        # caller's lists as they were. A deepcopy took ~6 us and ~400 B a detection (24M of them
        # for an 80k-image val set: minutes and ~10 GB on rank 0, beside the list itself)
        gt.dataset = {**coco_gt, "annotations": [dict(a) for a in coco_gt["annotations"]],
                      "categories": copy.deepcopy(coco_gt.get("categories", []))}
        gt.createIndex()
        dt = gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    log.debug("pycocotools:\n%s", printed.getvalue())
    return {**{name: float(ev.stats[i]) for i, name in enumerate(METRIC_NAMES)}, "detections_nonfinite": nonfinite}


def evaluate_batches(model, postprocessor, batches: Iterable, device: torch.device, *,
                     amp_dtype: Optional[torch.dtype] = None, tta: bool = False,
                     tta_scale_factors: Sequence[float] = (1.0,), num_select: int = 300) -> list[dict]:
    """COCO detections for an iterable of ``(images, masks, targets)``: images uint8 (B,3,H,W),
    normalized on ``device`` (a quarter of the bytes to copy, and no float pass on the host), or
    already normalized float; ``targets[i]`` must hold ``image_id`` and ``orig_size`` (H, W).
    The batch is copied asynchronously (:func:`~dino_scale.ops.transfer.host_to_device`)."""
    from dino_scale.data.transforms import normalize_batch
    from dino_scale.ops.transfer import host_to_device

    dets: list[dict] = []
    for images, masks, targets in batches:
        orig = host_to_device(torch.stack([torch.as_tensor(t["orig_size"]).reshape(2) for t in targets]), device)
        ids = target_image_ids(targets)
        images, masks = host_to_device(images, device), host_to_device(masks, device)
        if images.dtype == torch.uint8:
            images = normalize_batch(images, masks)
        results = predict_batch(model, postprocessor, images, masks, orig,
                                amp_dtype=amp_dtype, tta=tta, tta_scale_factors=tta_scale_factors,
                                num_select=num_select)
        dets.extend(to_coco_detections(results, ids))
    return dets


def val_metrics(coco_gt: dict, detections: list[dict], evaluated_ids: Iterable[int]) -> dict[str, Any]:
    """:func:`coco_evaluate` of the gathered ``detections`` plus ``images_unevaluated`` (the
    ground truth's images missing from ``evaluated_ids``, see :func:`unevaluated_images`; their
    objects count as misses). When no image was evaluated at all (every one skipped by the data
    layer, e.g. image files missing) the AP metrics are NaN, never AP 0 reported as a result; so
    they are when the ground truth holds no object to find (pycocotools' AP -1: no annotation, or
    crowd regions only)."""
    evaluated = list(evaluated_ids)
    missing = unevaluated_images(coco_gt, evaluated)
    metrics = {**coco_evaluate(coco_gt, detections), "images_unevaluated": len(missing)}
    if not evaluated:
        log.error("no val image was evaluated (all %d were skipped by the data layer): no AP", len(missing))
        metrics.update({k: math.nan for k in METRIC_NAMES})
    elif metrics["AP"] < 0:  # -1: no ground-truth object of any size
        log.error("the val ground truth holds no object to find (no annotation that is not a crowd region): no AP")
        metrics.update({k: math.nan for k in METRIC_NAMES})
    return metrics

"""Post-processing: model outputs -> per-image top-k detections in original pixels.

:class:`PostProcess` is the official one: sigmoid scores over all (query, class) pairs, the
top ``num_select`` (300) pairs per image, no NMS; labels are class indices (= raw category
ids); boxes x1,y1,x2,y2 scaled by each image's original (H, W).

:func:`merge_tta` merges the results of several test-time views of one image (class-wise NMS
over the union: each view finds the same objects).
"""
from __future__ import annotations

import operator
from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy

__all__ = ["PostProcess", "merge_tta", "hflip_boxes", "TTA_NMS_IOU"]

TTA_NMS_IOU = 0.6  # merge_tta: same-label detections of the views overlapping more are one object


class PostProcess(nn.Module):
    def __init__(self, num_select: int = 300):
        super().__init__()
        try:
            count = operator.index(num_select)
        except TypeError:
            count = 0
        if count < 1:  # 0 gave every image no detection: a finished run evaluated to AP 0 without an error
            raise ValueError(f"num_select must be an int >= 1 (detections kept per image; released: 300), "
                             f"got {num_select!r}")
        self.num_select = count

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """outputs: ``pred_logits`` (B,Q,C), ``pred_boxes`` (B,Q,4) cxcywh normalized;
        target_sizes (B,2) as (H,W). Returns B dicts: ``scores`` (k,), ``labels`` (k,) int64,
        ``boxes`` (k,4) xyxy pixels, k = min(num_select, Q*C). Scores and boxes are float32
        whatever the outputs' dtype: ranked in bf16 (a half-precision module, autocast) scores
        tie, and boxes scaled in bf16 are off by up to ~7 px at 1333 px."""
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        if target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(f"target_sizes must be (B,2)=({logits.shape[0]},2), got {tuple(target_sizes.shape)}")
        B, Q, C = logits.shape
        prob = logits.sigmoid()
        k = min(self.num_select, Q * C)
        scores, idx = torch.topk(prob.reshape(B, -1), k, dim=1)
        query = torch.div(idx, C, rounding_mode="floor")
        labels = idx % C
        xyxy = torch.gather(box_cxcywh_to_xyxy(boxes), 1, query.unsqueeze(-1).repeat(1, 1, 4))
        img_h, img_w = target_sizes.to(device=xyxy.device, dtype=xyxy.dtype).unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)
        xyxy = xyxy * scale[:, None, :]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, xyxy)]


def hflip_boxes(boxes: Tensor, width: float) -> Tensor:
    """Map xyxy pixel boxes predicted on a horizontally flipped image back to the original."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=-1)


def merge_tta(results: Sequence[Dict[str, Tensor]], num_select: int = 300,
              iou_threshold: float = TTA_NMS_IOU) -> Dict[str, Tensor]:
    """Merge one image's detections from several test-time views (flips, rescales).

    Each element of ``results`` is a :class:`PostProcess` result ALREADY mapped back to the
    original image's pixel frame (use ``target_sizes`` = original (H, W) for rescaled views
    and :func:`hflip_boxes` for flipped ones): ``scores`` (k,), ``labels`` (k,), ``boxes``
    (k,4) xyxy pixels. Detections of all views are concatenated and reduced by class-wise NMS
    (a detection overlapping a higher-scoring one of the same label by IoU > ``iou_threshold``
    is dropped), then the ``num_select`` highest-scoring are kept. Every view finds the same
    objects: kept, the other views' copies are false positives that COCO AP ranks above the
    true positives of less confident objects (a perfect detector's two views scored AP 0.79).
    Returns the same dict layout, sorted by score (descending).
    """
    from torchvision.ops import batched_nms

    if not results:
        raise ValueError("merge_tta needs at least one result")
    scores = torch.cat([r["scores"] for r in results])
    labels = torch.cat([r["labels"] for r in results])
    boxes = torch.cat([r["boxes"] for r in results])
    keep = batched_nms(boxes.float(), scores.float(), labels, float(iou_threshold))[:num_select]
    return {"scores": scores[keep], "labels": labels[keep], "boxes": boxes[keep]}

"""Post-processing: model outputs -> per-image top-k detections in original pixels.

:class:`PostProcess` is the official one: sigmoid scores over all (query, class) pairs, the
top ``num_select`` (300) pairs per image, no NMS; labels are class indices (= raw category
ids); boxes x1,y1,x2,y2 scaled by each image's original (H, W).

:func:`merge_tta` merges the results of several test-time views of one image (each detection
absorbs its best-overlapping copy of the same label in every other view: each view finds the
same objects).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dino_scale.config_checks import check_num_select

from .box_ops import box_cxcywh_to_xyxy

__all__ = ["PostProcess", "merge_tta", "hflip_boxes", "TTA_NMS_IOU"]

TTA_NMS_IOU = 0.6  # merge_tta: same-label detections of two views overlapping more can be one object


class PostProcess(nn.Module):
    def __init__(self, num_select: int = 300):
        super().__init__()
        self.num_select = check_num_select(num_select)

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
        prob = logits.sigmoid().reshape(B, -1)
        k = min(self.num_select, Q * C)
        # ranked with NaN last (topk puts NaN first: 4 NaN queries of 900 filled all k slots, and the
        # image's finite detections were lost); a NaN kept is still returned as NaN (counted, dropped)
        idx = torch.topk(prob.nan_to_num(nan=-1.0), k, dim=1).indices
        scores = prob.gather(1, idx)
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

    Each element of ``results`` is one view's :class:`PostProcess` result ALREADY mapped back
    to the original image's pixel frame (use ``target_sizes`` = original (H, W) for rescaled
    views and :func:`hflip_boxes` for flipped ones): ``scores`` (k,), ``labels`` (k,), ``boxes``
    (k,4) xyxy pixels. Every view finds the same objects: kept, the other views' copies are false
    positives that COCO AP ranks above the true positives of less confident objects (a perfect
    detector's two views scored AP 0.79). In descending score order, a detection not yet taken
    is kept and takes, from each OTHER view, the one untaken detection of its label that overlaps
    it most with IoU > ``iou_threshold`` (its copy there). A view's own detections never remove
    each other (DINO's output has no NMS: class-wise NMS over the union dropped one of two
    same-class objects side by side, even with one view), and one detection removes at most one
    per view (its neighbour's copies stay for the neighbour). Returns the ``num_select``
    highest-scoring kept detections, same dict layout, sorted by score (descending).
    """
    if not results:
        raise ValueError("merge_tta needs at least one result")
    scores = torch.cat([r["scores"] for r in results])
    labels = torch.cat([r["labels"] for r in results])
    boxes = torch.cat([r["boxes"] for r in results])
    views = torch.cat([torch.full((len(r["scores"]),), v, dtype=torch.long) for v, r in enumerate(results)])
    # NaN scores last (a descending sort puts them first: one claimed the finite copy of another view)
    rank = scores.detach().float().cpu().nan_to_num(nan=-float("inf"))
    order = torch.sort(rank, descending=True, stable=True).indices
    kept = _claim_copies(boxes.detach().float().cpu()[order], labels.cpu()[order], views[order],
                         num_select, float(iou_threshold))
    keep = order[kept].to(scores.device)
    return {"scores": scores[keep], "labels": labels[keep], "boxes": boxes[keep]}


def _claim_copies(boxes: Tensor, labels: Tensor, views: Tensor, limit: int, iou_threshold: float) -> Tensor:
    """:func:`merge_tta`'s matching over detections sorted by score: boxes (K,4), labels (K,),
    views (K,) -> positions (<= limit,) of the kept ones, ascending."""
    from torchvision.ops import box_iou

    if limit <= 0 or len(views) == 0:
        return torch.zeros(0, dtype=torch.long)
    if int(views.max()) == 0:  # one view: nothing to merge
        return torch.arange(min(limit, len(views)))
    # each detection's possible copies (same label, another view, IoU above the threshold), one
    # label at a time (IoU of all K x K pairs cost ~10x more), then ordered by detection
    parts = []
    for label in torch.unique(labels).tolist():
        at = torch.nonzero(labels == label).flatten()
        iou = box_iou(boxes[at], boxes[at])
        pair = (iou > iou_threshold) & (views[at][:, None] != views[at][None, :])
        r, c = torch.nonzero(pair, as_tuple=True)
        parts.append(torch.stack([at[r].double(), at[c].double(), iou[r, c].double()], 1))
    pairs = torch.cat(parts).numpy()
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    rows, cols, overlap = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64), pairs[:, 2]
    starts = np.searchsorted(rows, np.arange(len(views) + 1))
    view_of = views.tolist()
    taken = bytearray(len(view_of))
    kept: list[int] = []
    for i in range(len(view_of)):
        if taken[i]:
            continue
        kept.append(i)
        if len(kept) == limit:
            break
        taken[i] = 1
        best: dict[int, tuple[float, int]] = {}  # view -> (IoU, detection): its copy there
        for j, o in zip(cols[starts[i]:starts[i + 1]].tolist(), overlap[starts[i]:starts[i + 1]].tolist()):
            if not taken[j] and o > best.get(view_of[j], (-1.0, -1))[0]:
                best[view_of[j]] = (o, j)
        for _, j in best.values():
            taken[j] = 1
    return torch.as_tensor(kept, dtype=torch.long)

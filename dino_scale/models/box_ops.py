"""Box utilities: format conversion, IoU and generalized IoU, inverse sigmoid.

Boxes are ``(..., 4)`` tensors, either ``cxcywh`` (center, size) or ``xyxy`` (corners).
Nothing here synchronizes with the host (no validity asserts on tensor values): callers
that need to reject degenerate boxes do so where the data enters the program.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "box_area", "box_iou",
    "generalized_box_iou", "elementwise_generalized_box_iou", "inverse_sigmoid",
]

# The official DINO's util/box_ops.py divides by union + 1e-6 and hull + 1e-6 (its GIoU cost and
# loss): relative differences of ~1e-5 in the loss without it, more for small boxes.
EPS = 1e-6


def box_cxcywh_to_xyxy(x: Tensor) -> Tensor:
    """(..., 4) cx,cy,w,h -> (..., 4) x1,y1,x2,y2."""
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(x: Tensor) -> Tensor:
    """(..., 4) x1,y1,x2,y2 -> (..., 4) cx,cy,w,h."""
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...) area."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes.

    boxes1 (..., N, 4), boxes2 (..., M, 4) (leading dims broadcast) ->
    ``(iou, union)``, each (..., N, M). The union is returned too (GIoU needs it).
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # (..., N, M, 2)
    rb = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / (union + EPS), union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes.

    boxes1 (..., N, 4), boxes2 (..., M, 4) -> (..., N, M), values in [-1, 1].
    Boxes must satisfy x2 >= x1 and y2 >= y1 (not checked: checking would sync).
    """
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.max(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / (hull + EPS)


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of matching pairs: boxes1, boxes2 (..., 4) xyxy -> (...).

    Equals ``generalized_box_iou(b1, b2).diagonal()`` without the N x M matrix.
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - inter
    iou = inter / (union + EPS)
    lt = torch.min(boxes1[..., :2], boxes2[..., :2])
    rb = torch.max(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / (hull + EPS)


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to >= eps.

    The official DINO uses eps 1e-3 (not 1e-5); parity depends on it.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))

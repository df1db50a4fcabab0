"""Hungarian matcher: optimal one-to-one assignment of queries to ground-truth boxes.

Cost = ``cost_class * focal_class_cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU)``,
the class cost being the official focal form ``pos_cost - neg_cost`` at each target's class.

The cost matrices of the whole batch are computed in one go on the predictions' device,
as one (B, Q, max_targets) tensor (targets padded per image), then copied to the host
once; ``scipy.optimize.linear_sum_assignment`` solves each image's (Q, n_i) block.
:meth:`HungarianMatcher.start_many` starts that copy without waiting, so the criterion
queues the denoising losses (which need no matching) before the host waits and solves. The
official code computes the full (B*Q, sum n_i) cross-image matrix instead; the padded
form does B times less work for the same per-image blocks.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from dino_scale.ops.transfer import host_to_device
from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "PendingMatches", "pad_targets", "build_matcher"]


def pad_targets(targets: list[dict], device, dtype=torch.float32):
    """Stack per-image targets into padded tensors.

    Returns ``(labels (B, N) int64, boxes (B, N, 4), sizes list[int])`` with
    ``N = max(n_i, 1)``; padding holds label 0 and the box (0.5, 0.5, 1, 1) so that
    every cost stays finite (padded columns are dropped before assignment).
    """
    sizes = [int(t["labels"].shape[0]) for t in targets]
    n = max(sizes + [1])
    labels = torch.zeros(len(targets), n, dtype=torch.long, device=device)
    boxes = torch.full((len(targets), n, 4), 0.5, device=device, dtype=dtype)  # filled on the device:
    boxes[..., 2:].fill_(1.0)                                                   # no host copy / sync
    if sum(sizes):
        # every image's rows in one scatter: the flat slot of box j of image b is b * n + j (host
        # numpy, one pinned copy) instead of two copies per image
        slots = np.concatenate([b * n + np.arange(k) for b, k in enumerate(sizes)]).astype(np.int64)
        slots = host_to_device(torch.from_numpy(slots), device)
        labels.view(-1).index_copy_(0, slots, torch.cat([t["labels"] for t in targets]).to(device, torch.long))
        boxes.view(-1, 4).index_copy_(0, slots, torch.cat([t["boxes"] for t in targets]).to(device, dtype))
    return labels, boxes, sizes


class HungarianMatcher(nn.Module):
    """Matches predictions to targets per image.

    forward(outputs, targets): ``outputs["pred_logits"]`` (B, Q, C) logits,
    ``outputs["pred_boxes"]`` (B, Q, 4) cxcywh; targets: B dicts with ``labels`` (n_i,)
    int64 in [0, C) and ``boxes`` (n_i, 4) cxcywh. Returns B tuples
    ``(query_index int64 (k_i,), target_index int64 (k_i,))`` on the CPU with
    ``k_i = min(Q, n_i)``, sorted by query index.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(self, pred_logits: Tensor, pred_boxes: Tensor, tgt_labels: Tensor,
                    tgt_boxes: Tensor) -> Tensor:
        """Batched cost: logits (B, Q, C), boxes (B, Q, 4), tgt_labels (B, N), tgt_boxes
        (B, N, 4) -> (B, Q, N) float32 on the input's device."""
        prob = pred_logits.float().sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        # Gather the target classes first: (B, Q, N) instead of (B, Q, C) focal terms.
        index = tgt_labels[:, None, :].expand(-1, prob.shape[1], -1)
        p = prob.gather(2, index)
        neg = (1 - alpha) * p.pow(gamma) * (-(1 - p + 1e-8).log())
        pos = alpha * (1 - p).pow(gamma) * (-(p + 1e-8).log())
        cost_class = pos - neg
        out_boxes = pred_boxes.float()
        tgt = tgt_boxes.float()
        cost_bbox = torch.cdist(out_boxes, tgt, p=1)  # batched; no (B, Q, N, 4) intermediate
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_boxes), box_cxcywh_to_xyxy(tgt))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        logits = outputs["pred_logits"]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"matcher: {len(targets)} targets for a batch of {logits.shape[0]}")
        labels, boxes, sizes = pad_targets(targets, logits.device)
        if labels.device.type == "cpu" and sum(sizes) and (labels.min() < 0 or labels.max() >= logits.shape[-1]):
            raise ValueError(f"matcher: target labels must lie in [0, {logits.shape[-1]})")
        if sum(sizes) == 0:
            return [_empty_match() for _ in sizes]
        cost = self.cost_matrix(logits, outputs["pred_boxes"], labels, boxes)
        cost = cost.cpu().numpy()  # the one host sync
        return [_assign(cost[b, :, :n]) if n else _empty_match() for b, n in enumerate(sizes)]

    @torch.no_grad()
    def match_many(self, outputs_list: list[dict], targets: list[dict]) -> list[list[tuple[Tensor, Tensor]]]:
        """Match several output sets (final layer, aux layers, encoder proposals) to the same
        targets with ONE device-to-host copy for all their cost matrices.
        Returns one :meth:`forward` result per output set."""
        return self.start_many(outputs_list, targets).result()

    @torch.no_grad()
    def start_many(self, outputs_list: list[dict], targets: list[dict],
                   padded: Optional[tuple[Tensor, Tensor, list[int]]] = None) -> "PendingMatches":
        """First half of :meth:`match_many`: compute every cost matrix and start their copy to
        the host without waiting for it (pinned memory, CUDA event). The caller may queue
        more device work (the denoising losses need no matching) before ``.result()``
        waits for the copy and solves the assignments, so the host's solve overlaps the
        device's work instead of leaving the device idle. ``padded``: :func:`pad_targets` of
        ``targets`` on the outputs' device, when the caller has it already."""
        if not outputs_list:
            return PendingMatches([], None, None, [])
        device = outputs_list[0]["pred_logits"].device
        labels, boxes, sizes = padded if padded is not None else pad_targets(targets, device)
        for out in outputs_list:
            if len(targets) != out["pred_logits"].shape[0]:
                raise ValueError(f"matcher: {len(targets)} targets for a batch of {out['pred_logits'].shape[0]}")
        if sum(sizes) == 0:
            return PendingMatches([None] * len(outputs_list), None, None, sizes)
        if labels.device.type == "cpu" and (labels.min() < 0 or
                                            labels.max() >= outputs_list[0]["pred_logits"].shape[-1]):
            raise ValueError(f"matcher: target labels must lie in [0, {outputs_list[0]['pred_logits'].shape[-1]})")
        k_sets = len(outputs_list)
        if len({tuple(o["pred_logits"].shape) for o in outputs_list}) == 1:
            # equal shapes: one batched cost computation for all K sets, (K*B, Q, N)
            logits = torch.stack([o["pred_logits"] for o in outputs_list]).flatten(0, 1)
            pboxes = torch.stack([o["pred_boxes"] for o in outputs_list]).flatten(0, 1)
            cost = self.cost_matrix(logits, pboxes, labels.repeat(k_sets, 1), boxes.repeat(k_sets, 1, 1))
            shapes = [(cost.shape[0] // k_sets,) + tuple(cost.shape[1:])] * k_sets  # (B, Q, N) each
            flat = cost.flatten()  # already one tensor in set order: no concatenation copy
        else:
            costs = [self.cost_matrix(o["pred_logits"], o["pred_boxes"], labels, boxes) for o in outputs_list]
            shapes = [tuple(c.shape) for c in costs]
            flat = torch.cat([c.flatten() for c in costs])
        event = None
        if flat.is_cuda:
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(flat.device))  # the copy's stream, whatever the current device
        else:
            host = flat
        return PendingMatches(shapes, host, event, sizes)

    @torch.no_grad()
    def forward_per_image(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Reference path: one cost matrix and one host copy per image (for tests and the
        benchmark; same result as :meth:`forward`)."""
        result = []
        for b, t in enumerate(targets):
            n = int(t["labels"].shape[0])
            if n == 0:
                result.append(_empty_match())
                continue
            cost = self.cost_matrix(outputs["pred_logits"][b:b + 1], outputs["pred_boxes"][b:b + 1],
                                    t["labels"][None].to(outputs["pred_logits"].device),
                                    t["boxes"][None].to(outputs["pred_boxes"].device))
            result.append(_assign(cost[0].cpu().numpy()))
        return result


class PendingMatches:
    """Cost matrices on their way to the host (see :meth:`HungarianMatcher.start_many`)."""

    def __init__(self, shapes: list, host: Optional[Tensor], event, sizes: list[int]):
        self._shapes, self._host, self._event, self._sizes = shapes, host, event, sizes

    def result(self) -> list[list[tuple[Tensor, Tensor]]]:
        """Wait for the copy (the one host sync of the loss) and solve every assignment."""
        if self._host is None:
            return [[_empty_match() for _ in self._sizes] for _ in self._shapes]
        if self._event is not None:
            self._event.synchronize()
        flat = self._host.numpy()
        result, start = [], 0
        for shape in self._shapes:
            count = int(np.prod(shape))
            block = flat[start:start + count].reshape(shape)
            start += count
            result.append([_assign(block[b, :, :n]) if n else _empty_match() for b, n in enumerate(self._sizes)])
        return result


def _empty_match() -> tuple[Tensor, Tensor]:
    return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)


def _assign(cost: np.ndarray) -> tuple[Tensor, Tensor]:
    if not np.isfinite(cost).all():
        # NaN/Inf predictions would make scipy raise mid-run; keep the assignment defined.
        cost = np.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)
    rows, cols = linear_sum_assignment(cost)
    return torch.from_numpy(rows.astype(np.int64, copy=False)), torch.from_numpy(cols.astype(np.int64, copy=False))


def build_matcher(model_cfg) -> HungarianMatcher:
    """From a :class:`dino_scale.config.ModelConfig`."""
    return HungarianMatcher(cost_class=model_cfg.set_cost_class, cost_bbox=model_cfg.set_cost_bbox,
                            cost_giou=model_cfg.set_cost_giou, focal_alpha=model_cfg.focal_alpha,
                            focal_gamma=model_cfg.focal_gamma)

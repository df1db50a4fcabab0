"""Contrastive denoising (CDN): noised ground-truth queries, their attention mask, the
split of decoder outputs, and the denoising targets.

Layout of the ``pad_size = 2 * max_gt * num_groups`` denoising slots of every image
(``max_gt`` = most boxes in any image of the batch): group ``g`` owns slots
``[2*g*max_gt, 2*(g+1)*max_gt)``; its positives are the first ``max_gt`` of them (box ``j``
of the image in slot ``2*g*max_gt + j``), its negatives the next ``max_gt``. Images with
fewer than ``max_gt`` boxes leave zero-filled slots (treated as background by the loss).

Randomness follows the official algorithm's draws in order (uniform ``p`` per query for
label noise, replacement classes, corner signs, corner magnitudes), over the same
``(2 * groups, total_boxes)`` layout. One difference: the official code draws replacement
classes only for the chosen queries (which needs ``nonzero``, a host sync); here one class
is drawn per query and kept where chosen, so the noise has the same distribution but a
different random stream.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from dino_scale.ops.level_shapes import cached_level_tensors
from dino_scale.ops.transfer import host_to_device

from .box_ops import inverse_sigmoid

__all__ = ["prepare_for_cdn", "noised_queries", "dn_post_process", "build_dn_attn_mask", "cached_dn_attn_mask",
           "dn_targets", "dn_slot_targets", "dn_slot_indices", "num_dn_groups"]


def num_dn_groups(dn_number: int, max_gt: int) -> int:
    """Groups of denoising queries: ``dn_number // max_gt`` (at least 1; 1 with no boxes).

    Matches the official rule for ``dn_number >= 50`` (every released config uses 100).
    The official code doubles ``dn_number`` and divides only when the doubled value is
    >= 100, so a ``dn_number`` below 50 would give ``2 * dn_number`` groups regardless of
    the box count there; this project divides always, keeping about ``dn_number``
    positive queries per image as documented in the paper.
    """
    if max_gt <= 0:
        return 1
    return max(1, dn_number // max_gt)


def build_dn_attn_mask(pad_size: int, num_queries: int, group_size: int,
                       device: Optional[torch.device] = None) -> Tensor:
    """(pad_size + num_queries)^2 bool self-attention mask, True = blocked.

    Rows attend to columns. Matching queries (the last ``num_queries``) cannot see any
    denoising slot; a denoising group (``group_size`` consecutive slots) cannot see
    other groups; denoising slots see the matching queries.
    """
    size = pad_size + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    if pad_size > 0:
        group = torch.arange(pad_size, device=device) // group_size
        mask[:pad_size, :pad_size] = group[:, None] != group[None, :]
        mask[pad_size:, :pad_size] = True
    return mask


def cached_dn_attn_mask(pad_size: int, num_queries: int, group_size: int, device) -> Tensor:
    """:func:`build_dn_attn_mask`, cached per (sizes, device) in the per-size table cache
    (``dino_scale.ops.level_shapes``, at most ``KIND_LIMITS["dn_attn_mask"]`` masks; ~1.2 MB an
    entry with ``dn_number=100`` and 900 queries, ~8.4 MB with 1000). The mask depends only on
    the three sizes, and a batch's ``pad_size`` takes few values, so most steps reuse it: no
    device operators for it at all. Read-only."""
    def build(_shapes, dev):
        return (build_dn_attn_mask(pad_size, num_queries, group_size, dev),)
    key = [(pad_size, num_queries), (group_size, 0)]
    return cached_level_tensors("dn_attn_mask", key, device, build)[0]


def dn_slot_indices(sizes: list[int], blocks: int) -> np.ndarray:
    """Box counts per image ``sizes`` (B ints) and ``blocks`` = 2 * groups -> (2, blocks * total)
    int64: row 0 the image, row 1 the slot of each denoising query, in the order of
    ``labels.repeat(blocks)`` (block-major, then the batch's boxes in order); box ``j`` of an
    image in block ``k`` goes to slot ``k * max(sizes) + j``."""
    sizes = [int(n) for n in sizes]
    max_gt = max(sizes, default=0)
    image = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)                     # (total,)
    local = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes]) if sizes else np.zeros(0, np.int64)
    slot = (np.arange(blocks, dtype=np.int64)[:, None] * max_gt + local[None]).reshape(-1)
    return np.stack([np.tile(image, blocks), slot])


def noised_queries(labels: Tensor, boxes: Tensor, image: Tensor, slot: Tensor, batch: int, pad_size: int,
                   blocks: int, label_noise_ratio: float, box_noise_scale: float, num_classes: int,
                   label_enc: nn.Embedding) -> tuple[Tensor, Tensor]:
    """The tensor part of :func:`prepare_for_cdn` (no host values read; ``DINO`` compiles it
    as a region): the batch's boxes ``labels`` int64 (total,), ``boxes`` (total, 4) cxcywh, and
    their slots ``image``, ``slot`` int64 (blocks * total,) (:func:`dn_slot_indices`) ->
    ``(input_query_label (batch, pad_size, hidden), input_query_bbox (batch, pad_size, 4))``,
    the noised queries in the padded slot layout (zeros in empty slots)."""
    dtype = label_enc.weight.dtype
    device = label_enc.weight.device
    query_label = torch.zeros(batch, pad_size, label_enc.embedding_dim, device=device, dtype=dtype)
    query_bbox = torch.zeros(batch, pad_size, 4, device=device, dtype=dtype)
    total = labels.shape[0]

    # Label noise: with probability ratio/2 a query's label becomes a uniform class.
    known_labels = labels.repeat(blocks)  # (blocks * total,)
    if label_noise_ratio > 0:
        p = torch.rand(known_labels.shape, device=device)
        new_label = torch.randint(0, num_classes, known_labels.shape, device=device)
        known_labels = torch.where(p < label_noise_ratio * 0.5, new_label, known_labels)

    # Box noise on the corners: +-u * (w/2, h/2, w/2, h/2) * scale; u in [0,1) for
    # positives, [1,2) for negatives; clamped to [0, 1], back to cxcywh.
    known_boxes = boxes.repeat(blocks, 1)  # (blocks * total, 4)
    if box_noise_scale > 0:
        corners = torch.cat([known_boxes[:, :2] - known_boxes[:, 2:] / 2,
                             known_boxes[:, :2] + known_boxes[:, 2:] / 2], dim=1)
        half = (known_boxes[:, 2:] / 2).repeat(1, 2)
        sign = torch.randint(0, 2, known_boxes.shape, device=device).float() * 2.0 - 1.0
        part = torch.rand(known_boxes.shape, device=device)
        negative = (torch.arange(blocks * total, device=device) // total) % 2  # block parity per query
        part = (part + negative[:, None].float()) * sign
        corners = (corners + part * half * box_noise_scale).clamp(min=0.0, max=1.0)
        known_boxes = torch.cat([(corners[:, :2] + corners[:, 2:]) / 2,
                                 corners[:, 2:] - corners[:, :2]], dim=1)

    # Scatter into the padded (B, pad_size) layout: block k, box j of image b -> slot k * max_gt + j.
    query_label = query_label.index_put((image, slot), label_enc(known_labels).to(dtype))
    query_bbox = query_bbox.index_put((image, slot), inverse_sigmoid(known_boxes).to(dtype))
    return query_label, query_bbox


def prepare_for_cdn(targets: list[dict], dn_number: int, label_noise_ratio: float,
                    box_noise_scale: float, num_queries: int, num_classes: int,
                    hidden_dim: int, label_enc: nn.Embedding,
                    make_queries: Optional[Callable[..., tuple[Tensor, Tensor]]] = None):
    """Build the denoising queries of one training batch.

    targets: B dicts with ``labels`` int64 (n_i,) and ``boxes`` (n_i, 4) cxcywh in [0, 1].
    label_enc: ``nn.Embedding(dn_labelbook_size + 1, hidden_dim)``; label noise draws
    classes in ``[0, num_classes)``. ``make_queries`` (default :func:`noised_queries` with these
    settings) is called as ``make_queries(labels, boxes, image, slot, batch, pad_size, blocks)``:
    ``DINO`` passes its compiled region.

    Returns ``(input_query_label (B, pad_size, hidden_dim), input_query_bbox (B, pad_size, 4)
    in inverse-sigmoid space, attn_mask bool (pad_size + num_queries)^2 True = blocked,
    dn_meta)`` with ``dn_meta = {"pad_size", "num_dn_group", "single_pad"}`` where
    ``single_pad`` = ``max_gt`` (positives per group and image; a group has
    ``2 * single_pad`` slots). With no box in the batch ``pad_size`` is 0 (one empty group).
    When ``dn_number <= 0`` denoising is off: returns ``(None, None, None, None)``.

    The only host value read is ``max_gt`` (from tensor shapes, no device sync).
    """
    if dn_number <= 0:
        return None, None, None, None
    device = label_enc.weight.device
    batch = len(targets)
    sizes = [int(t["labels"].shape[0]) for t in targets]
    max_gt = max(sizes) if sizes else 0
    groups = num_dn_groups(dn_number, max_gt)
    pad_size = 2 * max_gt * groups
    dtype = label_enc.weight.dtype
    attn_mask = cached_dn_attn_mask(pad_size, num_queries, 2 * max(max_gt, 1), device)
    dn_meta = {"pad_size": pad_size, "num_dn_group": groups, "single_pad": max_gt}
    if sum(sizes) == 0:
        return (torch.zeros(batch, pad_size, hidden_dim, device=device, dtype=dtype),
                torch.zeros(batch, pad_size, 4, device=device, dtype=dtype), attn_mask, dn_meta)
    if label_enc.embedding_dim != hidden_dim:
        raise ValueError(f"label_enc has {label_enc.embedding_dim} features, hidden_dim is {hidden_dim}")

    labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.long)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=torch.float32)
    blocks = 2 * groups  # block 2g: positives of group g; block 2g+1: its negatives
    # The slots depend only on the box counts: built with numpy on the host (no torch CPU
    # operators: no intra-op thread wake-ups) and sent in one pinned copy.
    image, slot = host_to_device(torch.from_numpy(dn_slot_indices(sizes, blocks)), device).unbind(0)
    if make_queries is None:
        def make_queries(*args):
            return noised_queries(*args, label_noise_ratio, box_noise_scale, num_classes, label_enc)
    query_label, query_bbox = make_queries(labels, boxes, image, slot, batch, pad_size, blocks)
    return query_label, query_bbox, attn_mask, dn_meta


def dn_post_process(outputs_class: Tensor, outputs_coord: Tensor, dn_meta: Optional[dict]):
    """Split decoder outputs into denoising and matching parts.

    outputs_class (L, B, pad_size + Q, C), outputs_coord (L, B, pad_size + Q, 4) ->
    ``(outputs_class[:, :, pad_size:], outputs_coord[:, :, pad_size:])``. The denoising
    part goes to ``dn_meta["output_known_lbs_bboxes"] = {"pred_logits": last layer,
    "pred_boxes": last layer, "aux_outputs": [{"pred_logits", "pred_boxes"}] * (L - 1)}``.
    No-op when ``dn_meta`` is None or ``pad_size`` is 0.
    """
    if not dn_meta or dn_meta["pad_size"] <= 0:
        return outputs_class, outputs_coord
    pad = dn_meta["pad_size"]
    known_class, known_coord = outputs_class[:, :, :pad], outputs_coord[:, :, :pad]
    dn_meta["output_known_lbs_bboxes"] = {
        "pred_logits": known_class[-1],
        "pred_boxes": known_coord[-1],
        "aux_outputs": [{"pred_logits": c, "pred_boxes": b}
                        for c, b in zip(known_class[:-1], known_coord[:-1])],
    }
    return outputs_class[:, :, pad:], outputs_coord[:, :, pad:]


def dn_targets(targets: list[dict], dn_meta: dict, num_classes: int):
    """Denoising targets in the slot layout of :func:`prepare_for_cdn`.

    Returns ``(labels (B, pad_size) int64, boxes (B, pad_size, 4), positive (B, pad_size)
    bool)``: positives carry their box's original (un-noised) label and box; negatives and
    empty slots carry ``num_classes`` (background) and a dummy box, ``positive`` False.
    """
    pad = dn_meta["pad_size"]
    groups = dn_meta["num_dn_group"]
    max_gt = pad // (2 * groups) if groups > 0 else 0
    device = targets[0]["boxes"].device if targets else torch.device("cpu")
    batch = len(targets)
    gt_labels = torch.full((batch, max_gt), num_classes, dtype=torch.long, device=device)
    gt_boxes = torch.full((batch, max_gt, 4), 0.5, device=device)
    valid = torch.zeros(batch, max_gt, dtype=torch.bool, device=device)
    for b, t in enumerate(targets):  # per image, not per box
        n = int(t["labels"].shape[0])
        if n:
            gt_labels[b, :n] = t["labels"]
            gt_boxes[b, :n] = t["boxes"].to(gt_boxes.dtype)
            valid[b, :n] = True
    return _group_slots(gt_labels, gt_boxes, valid, groups, num_classes)


def _group_slots(labels: Tensor, boxes: Tensor, valid: Tensor, groups: int, num_classes: int):
    """Per-image targets labels (B, N) (``num_classes`` where not ``valid``), boxes (B, N, 4)
    (0.5 where not valid), valid (B, N) -> the slot layout (B, groups * 2N): each group holds
    the positives, then as many background negatives (label ``num_classes``, box 0.5)."""
    batch, n = labels.shape
    slots = groups * 2 * n  # explicit, not -1: a batch without boxes has 0 slots
    labels = torch.cat([labels, torch.full_like(labels, num_classes)], 1)
    boxes = torch.cat([boxes, torch.full_like(boxes, 0.5)], 1)
    positive = torch.cat([valid, torch.zeros_like(valid)], 1)
    return (labels[:, None].expand(batch, groups, 2 * n).reshape(batch, slots),
            boxes[:, None].expand(batch, groups, 2 * n, 4).reshape(batch, slots, 4),
            positive[:, None].expand(batch, groups, 2 * n).reshape(batch, slots))


def dn_slot_targets(gt_labels: Tensor, gt_boxes: Tensor, counts: Tensor, groups: int, num_classes: int):
    """:func:`dn_targets` from padded targets, tensors only (no host values read; the
    criterion's compiled denoising region calls it): ``gt_labels`` int64 (B, N), ``gt_boxes``
    (B, N, 4) with image b's boxes in its first ``counts[b]`` columns (``matcher.pad_targets``),
    ``counts`` int64 (B,) on their device -> ``(labels (B, 2*N*groups), boxes (B, 2*N*groups, 4),
    positive (B, 2*N*groups))`` exactly as :func:`dn_targets` lays them out for ``max_gt = N``."""
    valid = torch.arange(gt_labels.shape[1], device=counts.device)[None, :] < counts[:, None]  # (B, N)
    labels = torch.where(valid, gt_labels, torch.full_like(gt_labels, num_classes))
    boxes = torch.where(valid[..., None], gt_boxes, torch.full_like(gt_boxes, 0.5))
    return _group_slots(labels, boxes, valid, groups, num_classes)

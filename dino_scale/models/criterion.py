"""DINO's training loss: sigmoid focal classification, L1 and GIoU box terms, for the final
decoder layer, every auxiliary layer (suffix ``_{i}``), the encoder proposals (``_interm``)
and the denoising queries (``_dn`` and ``_dn_{i}``).

Normalization follows the official implementation: every term is divided by the number
of ground-truth boxes in the step's batch (averaged over distributed workers, at least 1;
with gradient accumulation the caller passes that count for the whole step); the
denoising terms by that times the number of denoising groups. The focal term is
``focal.mean(1).sum() / num_boxes * num_queries``. Denoising positives are supervised
with their original label and box; negatives and empty slots count as background for
the classification term and carry no box loss.

Host syncs: none in the loss itself. The matcher copies the cost matrices of all output
sets (final, aux, interm) to the host in one copy (assignment runs there); the matched
indices of all sets go back in one copy.

Launch count: the matched sets (final + aux + interm) are stacked into one (K, B, Q, C)
tensor and their losses computed in one pass (per-set sums by ``index_add``), and so are the
denoising layers; a step issues a few dozen loss kernels instead of one group per layer,
which matters on a GPU where the step is bound by the host. ``matched_losses`` and
``dn_layer_losses`` keep the one-set form (reference and tests).
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino_scale.ops.transfer import host_to_device

from .box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from .denoising import dn_slot_targets, dn_targets
from .matcher import HungarianMatcher, build_matcher, pad_targets

__all__ = ["SetCriterion", "sigmoid_focal_loss", "build_criterion", "build_weight_dict",
           "weighted_loss"]

BASE_KEYS = ("loss_ce", "loss_bbox", "loss_giou")


def focal_terms(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Elementwise focal loss (Lin et al.), official form: logits, targets (..., C) 0/1 -> (..., C)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_boxes: Union[float, Tensor],
                       alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss as the official code reduces it.

    logits, targets (B, Q, C) (targets 0/1) -> ``loss.mean(1).sum() / num_boxes``.
    """
    return focal_terms(logits, targets, alpha, gamma).mean(1).sum() / num_boxes


def box_terms(src: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor]:
    """src, tgt (..., 4) cxcywh -> elementwise (L1 distance, 1 - GIoU), each (...)."""
    l1 = (src - tgt).abs().sum(-1)
    giou = 1 - elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
    return l1, giou


def build_weight_dict(cls_coef: float = 1.0, bbox_coef: float = 5.0, giou_coef: float = 2.0,
                      dec_layers: int = 6, dn: bool = True, interm: bool = True,
                      interm_coef: float = 1.0) -> dict[str, float]:
    """Loss weights for every key :class:`SetCriterion` emits (official naming)."""
    base = {"loss_ce": cls_coef, "loss_bbox": bbox_coef, "loss_giou": giou_coef}
    weights = dict(base)
    if dn:
        weights.update({f"{k}_dn": v for k, v in base.items()})
    layer = dict(weights)
    for i in range(dec_layers - 1):
        weights.update({f"{k}_{i}": v for k, v in layer.items()})
    if interm:
        weights.update({f"{k}_interm": v * interm_coef for k, v in base.items()})
    return weights


def weighted_loss(loss_dict: dict[str, Tensor], weight_dict: dict[str, float]) -> Tensor:
    """Sum of ``loss_dict[k] * weight_dict[k]`` over the keys that have a weight."""
    terms = [loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict]
    if not terms:
        raise ValueError("weighted_loss: no loss key has a weight")
    return torch.stack([t.float() for t in terms]).sum()


class SetCriterion(nn.Module):
    """forward(outputs, targets) -> dict of scalar losses (unweighted; see ``weight_dict``).

    outputs: ``pred_logits`` (B, Q, C), ``pred_boxes`` (B, Q, 4) cxcywh, optional
    ``aux_outputs`` (list of such dicts, earlier decoder layers), ``interm_outputs``
    (encoder proposals, same form) and ``dn_meta`` (see :mod:`.denoising`).
    targets: B dicts with ``labels`` int64 (n_i,) raw ids in [0, C) and ``boxes`` (n_i, 4).
    num_boxes: the normalizer, when the caller knows it (a float or a 0-d tensor, already
    averaged over workers): a step split into accumulated micro-batches must normalize every
    micro-batch by the box count of the whole step (``engine.train_step.window_num_boxes``),
    not by its own. None: this batch's box count averaged over workers, at least 1.
    The dn keys are always present when ``dn_losses`` is on (zeros when a batch has no
    denoising part) so the key set is the same at every step.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, dn_losses: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.dn_losses = dn_losses

    # -- pieces -------------------------------------------------------------------------
    def _num_boxes(self, targets: list[dict], device) -> Union[float, Tensor]:
        total = float(sum(int(t["labels"].shape[0]) for t in targets))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            n = torch.full((), total, dtype=torch.float32, device=device)  # a fill: no blocking copy
            torch.distributed.all_reduce(n)
            return torch.clamp(n / torch.distributed.get_world_size(), min=1.0)
        return max(total, 1.0)

    def _focal_set_sums(self, logits: Tensor, target_classes: Tensor) -> Tensor:
        """logits (K, B, Q, C), target_classes (K, B, Q) in [0, C] -> (K,) focal sums (the
        official ``loss.mean(1).sum()`` of each set, before ``/ num_boxes * Q``)."""
        onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
        loss = focal_terms(logits, onehot, self.focal_alpha, self.focal_gamma)
        return loss.mean(2).sum((1, 2))

    def _class_loss_sets(self, logits: Tensor, target_classes: Tensor, num_boxes) -> Tensor:
        """(K,) focal terms, each equal to :meth:`_class_loss` of one set."""
        return self._focal_set_sums(logits, target_classes) / num_boxes * logits.shape[2]

    def _class_loss(self, logits: Tensor, target_classes: Tensor, num_boxes) -> Tensor:
        """logits (B, Q, C), target_classes (B, Q) in [0, C] (C = background)."""
        onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
        loss = sigmoid_focal_loss(logits, onehot, num_boxes, self.focal_alpha, self.focal_gamma)
        return loss * logits.shape[1]

    @staticmethod
    def _box_losses(src: Tensor, tgt: Tensor, weight: Optional[Tensor], num_boxes):
        """src, tgt (..., 4) cxcywh; weight (...) bool or None -> (l1, giou) sums / num_boxes."""
        l1, giou = box_terms(src, tgt)
        if weight is not None:
            l1 = torch.where(weight, l1, torch.zeros_like(l1))
            giou = torch.where(weight, giou, torch.zeros_like(giou))
        return l1.sum() / num_boxes, giou.sum() / num_boxes

    def matched_losses(self, outputs: dict, targets: list[dict], num_boxes,
                       indices: Optional[list] = None) -> dict[str, Tensor]:
        """loss_ce, loss_bbox, loss_giou of ``outputs`` under ``indices`` (the matcher's
        result; computed here when None)."""
        logits = outputs["pred_logits"].float()
        boxes = outputs["pred_boxes"].float()
        device = logits.device
        if indices is None:
            indices = self.matcher(outputs, targets)
        sizes = [int(t["labels"].shape[0]) for t in targets]
        offsets = torch.tensor([0] + sizes[:-1], dtype=torch.long).cumsum(0)
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        flat_tgt = torch.cat([tgt + offsets[b] for b, (_, tgt) in enumerate(indices)])
        index = host_to_device(torch.stack([batch_idx, src_idx, flat_tgt]), device)
        batch_idx, src_idx, flat_tgt = index.unbind(0)

        all_labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.long)
        all_boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=torch.float32)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=device)
        target_classes[batch_idx, src_idx] = all_labels[flat_tgt]
        loss_ce = self._class_loss(logits, target_classes, num_boxes)
        loss_bbox, loss_giou = self._box_losses(boxes[batch_idx, src_idx], all_boxes[flat_tgt],
                                                None, num_boxes)
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def dn_layer_losses(self, dn_out: dict, labels: Tensor, boxes: Tensor, positive: Tensor,
                        num_boxes) -> dict[str, Tensor]:
        """One layer's denoising losses; labels (B, P), boxes (B, P, 4), positive (B, P)."""
        logits = dn_out["pred_logits"].float()
        loss_ce = self._class_loss(logits, labels, num_boxes)
        loss_bbox, loss_giou = self._box_losses(dn_out["pred_boxes"].float(), boxes, positive, num_boxes)
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def matched_losses_sets(self, outputs_list: list[dict], targets: list[dict], num_boxes,
                            all_indices: list[list]) -> list[dict[str, Tensor]]:
        """:meth:`matched_losses` of K output sets with equal shapes in one pass.

        outputs_list: K dicts with ``pred_logits`` (B, Q, C) and ``pred_boxes`` (B, Q, 4);
        all_indices: K matcher results. Returns K dicts of loss_ce / loss_bbox / loss_giou."""
        logits = torch.stack([o["pred_logits"] for o in outputs_list]).float()  # (K, B, Q, C)
        boxes = torch.stack([o["pred_boxes"] for o in outputs_list]).float()    # (K, B, Q, 4)
        device = logits.device
        sizes = [int(t["labels"].shape[0]) for t in targets]
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        # (set, image, query, flat target) per match, built on the host with numpy (the matches
        # are host tensors: no torch CPU operator calls) and sent in one pinned copy
        rows = [np.stack([np.full(len(src), k), np.full(len(src), b), src.numpy(), tgt.numpy() + offsets[b]])
                for k, indices in enumerate(all_indices) for b, (src, tgt) in enumerate(indices) if len(src)]
        index = np.concatenate(rows, 1).astype(np.int64) if rows else np.zeros((4, 0), np.int64)
        set_idx, batch_idx, src_idx, flat_tgt = host_to_device(torch.from_numpy(index), device).unbind(0)

        all_labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.long)
        all_boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=torch.float32)
        focal, l1, giou = self.matched_set_terms(logits, boxes, set_idx, batch_idx, src_idx, flat_tgt, all_labels,
                                                 all_boxes)
        # normalized outside: num_boxes changes every step (a compiled graph would specialize on it)
        loss_ce, loss_bbox, loss_giou = focal / num_boxes * logits.shape[2], l1 / num_boxes, giou / num_boxes
        return [{"loss_ce": ce, "loss_bbox": bb, "loss_giou": gi}
                for ce, bb, gi in zip(loss_ce.unbind(0), loss_bbox.unbind(0), loss_giou.unbind(0))]

    def matched_set_terms(self, logits: Tensor, boxes: Tensor, set_idx: Tensor, batch_idx: Tensor,
                          src_idx: Tensor, flat_tgt: Tensor, all_labels: Tensor, all_boxes: Tensor
                          ) -> tuple[Tensor, Tensor, Tensor]:
        """The tensor part of :meth:`matched_losses_sets`: logits (K,B,Q,C), boxes (K,B,Q,4), one
        entry per match in set_idx / batch_idx / src_idx (query) / flat_tgt (index into the
        batch's concatenated all_labels (N,) / all_boxes (N,4)) -> per-set sums (K,) of the focal
        term (:meth:`_focal_set_sums`), L1 and 1 - GIoU, not normalized. Tensors only:
        ``compile_criterion`` compiles it (the match count varies)."""
        k_sets, batch, queries, _ = logits.shape
        target_classes = torch.full((k_sets, batch, queries), self.num_classes, dtype=torch.long,
                                    device=logits.device)
        target_classes[set_idx, batch_idx, src_idx] = all_labels[flat_tgt]
        focal = self._focal_set_sums(logits, target_classes)
        l1, giou = box_terms(boxes[set_idx, batch_idx, src_idx], all_boxes[flat_tgt])
        zeros = torch.zeros(k_sets, device=logits.device, dtype=l1.dtype)
        return focal, zeros.index_add(0, set_idx, l1), zeros.index_add(0, set_idx, giou)

    def dn_losses_sets(self, dn_outs: list[dict], gt_labels: Tensor, gt_boxes: Tensor, counts: Tensor,
                       num_boxes) -> list[dict[str, Tensor]]:
        """:meth:`dn_layer_losses` of K denoising layers in one pass, from the padded targets
        (``matcher.pad_targets``: gt_labels (B, N), gt_boxes (B, N, 4), box counts (B,) on the
        device); the slot layout (:func:`.denoising.dn_slot_targets`) is built inside."""
        logits = torch.stack([o["pred_logits"] for o in dn_outs]).float()  # (K, B, P, C)
        pred = torch.stack([o["pred_boxes"] for o in dn_outs]).float()     # (K, B, P, 4)
        focal, l1, giou = self.dn_set_terms(logits, pred, gt_labels, gt_boxes, counts)
        loss_ce, loss_bbox, loss_giou = focal / num_boxes * logits.shape[2], l1 / num_boxes, giou / num_boxes
        return [{"loss_ce": ce, "loss_bbox": bb, "loss_giou": gi}
                for ce, bb, gi in zip(loss_ce.unbind(0), loss_bbox.unbind(0), loss_giou.unbind(0))]

    def dn_set_terms(self, logits: Tensor, pred: Tensor, gt_labels: Tensor, gt_boxes: Tensor, counts: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """The tensor part of :meth:`dn_losses_sets`: logits (K,B,P,C), pred (K,B,P,4) with
        P = 2 * N * groups, padded targets gt_labels (B,N), gt_boxes (B,N,4), counts (B,) ->
        per-layer sums (K,) of the focal term, L1 and 1 - GIoU (positives only), not normalized.
        ``compile_criterion`` compiles it (the slot targets' ~35 operator calls included)."""
        k_sets = logits.shape[0]
        groups = logits.shape[2] // (2 * gt_labels.shape[1])
        labels, boxes, positive = dn_slot_targets(gt_labels, gt_boxes, counts, groups, self.num_classes)
        focal = self._focal_set_sums(logits, labels.expand(k_sets, *labels.shape))
        l1, giou = box_terms(pred, boxes.expand(k_sets, *boxes.shape))
        keep = positive.expand(k_sets, *positive.shape)
        return (focal, torch.where(keep, l1, torch.zeros_like(l1)).sum((1, 2)),
                torch.where(keep, giou, torch.zeros_like(giou)).sum((1, 2)))

    # -- forward ------------------------------------------------------------------------
    def _output_sets(self, outputs: dict) -> list[tuple[str, dict]]:
        aux = outputs.get("aux_outputs") or []
        sets = [("", outputs)] + [(f"_{i}", a) for i, a in enumerate(aux)]
        if outputs.get("interm_outputs") is not None:
            sets.append(("_interm", outputs["interm_outputs"]))
        return sets

    def forward(self, outputs: dict, targets: list[dict], num_boxes=None) -> dict[str, Tensor]:
        device = outputs["pred_logits"].device
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"criterion: {len(targets)} targets for a batch of "
                             f"{outputs['pred_logits'].shape[0]}")
        if num_boxes is None:
            num_boxes = self._num_boxes(targets, device)
        sets = self._output_sets(outputs)
        padded = pad_targets(targets, device)  # (B, N) labels / boxes: for the matcher and the dn targets
        # one host copy for every set's cost matrices, started now and waited for after the
        # denoising losses are queued: the device computes those while the host solves
        pending = self.matcher.start_many([o for _, o in sets], targets, padded=padded)
        dn = {}
        if self.dn_losses:
            num_aux = len(outputs.get("aux_outputs") or [])
            dn = self._dn(outputs.get("dn_meta"), targets, num_boxes, num_aux, device, padded=padded)
        all_indices = pending.result()
        losses = {}
        same_shape = len({tuple(o["pred_logits"].shape) for _, o in sets}) == 1
        if same_shape:
            per_set = self.matched_losses_sets([o for _, o in sets], targets, num_boxes, all_indices)
        else:  # e.g. interm with a different query count: one pass per set
            per_set = [self.matched_losses(o, targets, num_boxes, ind) for (_, o), ind in zip(sets, all_indices)]
        for (suffix, _), terms in zip(sets, per_set):
            losses.update({f"{k}{suffix}": v for k, v in terms.items()})
        losses.update(dn)  # same key order as forward_per_set
        return losses

    def forward_per_set(self, outputs: dict, targets: list[dict], num_boxes=None) -> dict[str, Tensor]:
        """Reference path: the same losses computed one output set / dn layer at a time."""
        if num_boxes is None:
            num_boxes = self._num_boxes(targets, outputs["pred_logits"].device)
        sets = self._output_sets(outputs)
        all_indices = self.matcher.match_many([o for _, o in sets], targets)
        losses = {}
        for (suffix, out), indices in zip(sets, all_indices):
            losses.update({f"{k}{suffix}": v for k, v in
                           self.matched_losses(out, targets, num_boxes, indices).items()})
        if self.dn_losses:
            num_aux = len(outputs.get("aux_outputs") or [])
            losses.update(self._dn(outputs.get("dn_meta"), targets, num_boxes, num_aux,
                                   outputs["pred_logits"].device, vectorized=False))
        return losses

    def _dn(self, dn_meta: Optional[dict], targets, num_boxes, num_aux: int, device,
            vectorized: bool = True, padded: Optional[tuple] = None) -> dict:
        """The ``_dn`` / ``_dn_{i}`` losses. ``vectorized``: all layers in one pass from the
        padded targets (``padded`` = ``pad_targets(targets, device)`` when the caller has them);
        else the reference per-layer form from :func:`.denoising.dn_targets`."""
        known = dn_meta.get("output_known_lbs_bboxes") if dn_meta else None
        if not known or dn_meta["pad_size"] <= 0:
            zero = torch.zeros((), device=device)
            out = {f"{k}_dn": zero for k in BASE_KEYS}
            for i in range(num_aux):
                out.update({f"{k}_dn_{i}": zero for k in BASE_KEYS})
            return out
        norm = num_boxes * dn_meta["num_dn_group"]
        aux_known = known.get("aux_outputs") or []
        if len(aux_known) != num_aux:
            raise ValueError(f"criterion: {len(aux_known)} dn aux outputs for {num_aux} aux layers")
        layers = [known] + list(aux_known)
        if vectorized:
            gt_labels, gt_boxes, sizes = padded if padded is not None else pad_targets(targets, device)
            if 2 * gt_labels.shape[1] * dn_meta["num_dn_group"] != dn_meta["pad_size"]:
                raise ValueError(f"criterion: dn_meta (pad_size {dn_meta['pad_size']}, "
                                 f"{dn_meta['num_dn_group']} groups) does not match targets with at most "
                                 f"{gt_labels.shape[1]} boxes")
            counts = host_to_device(torch.from_numpy(np.asarray(sizes, dtype=np.int64)), device)
            per_layer = self.dn_losses_sets(layers, gt_labels, gt_boxes, counts, norm)
        else:
            labels, boxes, positive = dn_targets(targets, dn_meta, self.num_classes)
            labels, boxes, positive = labels.to(device), boxes.to(device), positive.to(device)
            per_layer = [self.dn_layer_losses(o, labels, boxes, positive, norm) for o in layers]
        suffixes = ["_dn"] + [f"_dn_{i}" for i in range(num_aux)]
        return {f"{k}{suffix}": v for suffix, terms in zip(suffixes, per_layer) for k, v in terms.items()}


def build_criterion(model_cfg) -> SetCriterion:
    """From a :class:`dino_scale.config.ModelConfig`: matcher, weights and loss."""
    weight_dict = build_weight_dict(model_cfg.cls_loss_coef, model_cfg.bbox_loss_coef,
                                    model_cfg.giou_loss_coef, dec_layers=model_cfg.dec_layers,
                                    dn=model_cfg.dn_number > 0, interm=True,
                                    interm_coef=model_cfg.interm_loss_coef)
    return SetCriterion(model_cfg.num_classes, build_matcher(model_cfg), weight_dict,
                        focal_alpha=model_cfg.focal_alpha, focal_gamma=model_cfg.focal_gamma,
                        dn_losses=model_cfg.dn_number > 0)

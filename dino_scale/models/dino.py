"""The DINO detector module (backbone -> input projections -> deformable transformer -> heads).

Module names equal the official implementation's, so an official checkpoint's ``model``
entry loads with identity key mapping (see :mod:`dino_scale.models.official`).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from .backbone import Joiner
from dino_scale.config_checks import check_dn_noise, check_label_book

from .box_ops import inverse_sigmoid
from .denoising import dn_post_process, noised_queries, prepare_for_cdn
from .precision import class_head_fp32
from .transformer import MLP, DeformableTransformer

__all__ = ["DINO", "check_padding_masks"]


def _host_readable(t: Tensor) -> bool:
    """Whether ``t``'s values may be read on the host here: not while compiling (a graph break),
    not for meta or fake tensors (no data), not while a CUDA stream is capturing (an error)."""
    if torch.compiler.is_compiling() or t.device.type == "meta" or is_fake(t):
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_padding_masks(masks: Tensor) -> None:
    """masks (B,H,W), True = padding: ValueError naming the images whose top-left pixel is
    padding (an inverted 1 = valid mask: constant, image-independent detections; or padding on the
    left/top). Read only for host masks (:func:`_host_readable`, on the CPU): on a GPU the read is
    a sync, and the data pipeline and predict build their masks themselves."""
    if masks.device.type != "cpu" or not _host_readable(masks) or not masks.numel():
        return
    bad = [i for i, padded in enumerate(masks[:, 0, 0].tolist()) if padded]
    if bad:
        raise ValueError(f"masks mark the top-left pixel of image(s) {bad} as padding: mask True "
                         "means padding (False = valid pixel), and an image's valid area starts at the "
                         "top-left (pad right/bottom); invert a 1 = valid mask (e.g. Hugging Face "
                         "pixel_mask) with ~mask.bool()")


_BOX_SLACK = 0.01  # normalized boxes a little past the border (unclipped exports) pass; pixels do not


def _check_targets(targets: list, batch: int, num_classes: int) -> None:
    """targets: ``batch`` dicts with ``labels`` (n,) in [0, num_classes) and ``boxes`` (n, 4)
    cxcywh normalized to the unpadded image; ValueError naming the image otherwise. Shapes only,
    but the labels' and boxes' range where they are host tensors (CPU: no device sync): boxes in
    pixels trained without a word against impossible targets (denoising clamped every one)."""
    if len(targets) != batch:
        raise ValueError(f"got {len(targets)} targets for {batch} images: one dict per image")
    for i, t in enumerate(targets):
        if not isinstance(t, dict) or "labels" not in t or "boxes" not in t:
            got = f"keys {list(t)}" if isinstance(t, dict) else type(t).__name__
            raise ValueError(f"target of image {i} must be a dict with 'labels' (n,) and 'boxes' (n, 4), got {got}")
        labels, boxes = t["labels"], t["boxes"]
        if labels.dim() != 1 or tuple(boxes.shape) != (labels.shape[0], 4):
            raise ValueError(f"target of image {i}: expected labels (n,) and boxes (n, 4), got labels "
                             f"{tuple(labels.shape)} and boxes {tuple(boxes.shape)}")
        if labels.numel() and labels.device.type == "cpu" and _host_readable(labels):
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= num_classes:
                raise ValueError(f"target of image {i}: label {low if low < 0 else high} is outside "
                                 f"[0, num_classes={num_classes})")
        if boxes.numel() and boxes.device.type == "cpu" and _host_readable(boxes):
            finite = bool(torch.isfinite(boxes).all())
            low, high = float(boxes.min()), float(boxes.max())
            if not finite or low < -_BOX_SLACK or high > 1 + _BOX_SLACK or bool((boxes[:, 2:] < 0).any()):
                got = "a non-finite value" if not finite else f"values in [{low:g}, {high:g}]"
                raise ValueError(f"target of image {i}: boxes must be (cx, cy, w, h) normalized to the unpadded "
                                 f"image (in [0, 1], w and h >= 0), got {got}; divide pixel boxes by the "
                                 f"image's width and height (xyxy/xywh: convert to cxcywh first)")


class DINO(nn.Module):
    """DINO with shared decoder heads, two-stage mixed query selection and contrastive denoising.

    forward(images (B,3,H,W) float, masks (B,H,W) bool True = padding, targets=None) -> dict:
      ``pred_logits`` (B,Q,num_classes), ``pred_boxes`` (B,Q,4) cxcywh in [0,1] of the unpadded
      image; ``aux_outputs`` [dec_layers-1 x {pred_logits, pred_boxes}]; ``interm_outputs``
      {pred_logits (B,Q,C), pred_boxes (B,Q,4)} of the encoder's selected proposals
      (``interm_outputs_for_matching_pre``: the same tokens' raw proposals);
      ``dn_meta`` (dict with the denoising outputs under ``output_known_lbs_bboxes``) when
      training with targets and ``dn_number > 0``, else None.
    Denoising runs only in train mode; in eval mode targets are ignored (no dn).
    A batch whose feature maps hold fewer tokens than ``num_queries`` (a thumbnail, a very wide
    strip) is padded first (:meth:`pad_to_query_count`), as if batched with a larger image.
    ``share_bbox_embed``/``share_class_embed`` (default True, as released) share the decoder heads.
    """

    def __init__(self, backbone: Joiner, transformer: DeformableTransformer, num_classes: int,
                 num_queries: int, num_feature_levels: int = 4, dn_number: int = 100,
                 dn_label_noise_ratio: float = 0.5, dn_box_noise_scale: float = 1.0,
                 dn_labelbook_size: int = 91, share_bbox_embed: bool = True, share_class_embed: bool = True):
        super().__init__()
        check_label_book(num_classes, dn_number, dn_labelbook_size)
        check_dn_noise(dn_label_noise_ratio, dn_box_noise_scale)
        hidden = transformer.d_model
        self.transformer = transformer
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.hidden_dim = hidden
        self.num_feature_levels = num_feature_levels
        self.dn_number = dn_number
        self.dn_label_noise_ratio = dn_label_noise_ratio
        self.dn_box_noise_scale = dn_box_noise_scale
        self.label_enc = nn.Embedding(dn_labelbook_size + 1, hidden)

        channels = list(backbone.num_channels)
        if num_feature_levels < len(channels):
            raise ValueError(f"num_feature_levels {num_feature_levels} < backbone levels {len(channels)}")
        projs = [nn.Sequential(nn.Conv2d(c, hidden, kernel_size=1), nn.GroupNorm(32, hidden)) for c in channels]
        in_ch = channels[-1]
        for _ in range(num_feature_levels - len(channels)):
            projs.append(nn.Sequential(nn.Conv2d(in_ch, hidden, kernel_size=3, stride=2, padding=1),
                                       nn.GroupNorm(32, hidden)))
            in_ch = hidden
        self.input_proj = nn.ModuleList(projs)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.backbone = backbone

        # decoder heads: shared (one module each, listed once per decoder layer: the released
        # models) or one copy per layer
        class_embed = nn.Linear(hidden, num_classes)
        bbox_embed = MLP(hidden, hidden, 4, 3)
        prior_prob = 0.01
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        n_dec = transformer.num_decoder_layers
        self.bbox_embed = nn.ModuleList([bbox_embed if share_bbox_embed else copy.deepcopy(bbox_embed)
                                         for _ in range(n_dec)])
        self.class_embed = nn.ModuleList([class_embed if share_class_embed else copy.deepcopy(class_embed)
                                          for _ in range(n_dec)])
        transformer.decoder.bbox_embed = self.bbox_embed
        transformer.decoder.class_embed = self.class_embed
        # encoder heads: separate copies
        transformer.enc_out_bbox_embed = copy.deepcopy(bbox_embed)
        transformer.enc_out_class_embed = copy.deepcopy(class_embed)

    def level_strides(self) -> list[int]:
        """Stride of each feature level: the backbone's, then x2 per extra level."""
        strides = list(self.backbone[0].strides)
        while len(strides) < self.num_feature_levels:
            strides.append(strides[-1] * 2)
        return strides

    def pad_to_query_count(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """images (B,3,H,W), masks (B,H,W) -> the same, padded right/bottom (zeros, mask True)
        when the feature maps (ceil(H/s) x ceil(W/s) per level stride s) would hold fewer tokens
        than ``num_queries``, which the two-stage selection needs: H and W go up to multiples of
        the coarsest stride, then the smaller side grows by that stride until there are enough.
        The padded batch is what a batch with a larger image would be (boxes stay in the unpadded
        image's frame); a batch with enough tokens is returned unchanged."""
        strides = self.level_strides()
        H, W = int(images.shape[-2]), int(images.shape[-1])

        def tokens(h: int, w: int) -> int:
            return sum(-(-h // s) * -(-w // s) for s in strides)

        if tokens(H, W) >= self.num_queries:
            return images, masks
        step = strides[-1]
        h, w = -(-H // step) * step, -(-W // step) * step
        while tokens(h, w) < self.num_queries:
            if h <= w:
                h += step
            else:
                w += step
        images = torch.nn.functional.pad(images, (0, w - W, 0, h - H))
        masks = torch.nn.functional.pad(masks, (0, w - W, 0, h - H), value=True)
        return images, masks

    def _features(self, images: Tensor, masks: Tensor):
        """-> srcs [(B,hidden,H_l,W_l)], masks [(B,H_l,W_l)], pos [(B,hidden,H_l,W_l)] of every level;
        the backbone levels' positions in the backbone features' dtype, the extra levels' in theirs."""
        feats = self.backbone[0](images)
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats)]
        for lvl in range(len(feats), self.num_feature_levels):
            srcs.append(self.input_proj[lvl](feats[-1] if lvl == len(feats) else srcs[-1]))
        fmasks, poss = self.backbone.level_encodings(masks, list(feats) + srcs[len(feats):])
        return srcs, fmasks, poss

    def _decoder_heads(self, hs: list, refs: list) -> tuple:
        """hs [L x (B,Q,C)], refs [(L+1) x (B,Q,4)] -> (logits (L,B,Q,classes), boxes (L,B,Q,4)).

        Look forward twice: layer l's boxes refine refs[l], the (undetached) output of layer l-1.
        A head shared by all layers (the released models) runs once on the stacked layers
        (L times fewer operator calls, the same arithmetic per row); per-layer heads run per layer."""
        shared_box = all(m is self.bbox_embed[0] for m in self.bbox_embed)
        shared_cls = all(m is self.class_embed[0] for m in self.class_embed)
        stacked = torch.stack(hs) if shared_box or shared_cls else None
        if shared_box:
            coords = (self.bbox_embed[0](stacked) + inverse_sigmoid(torch.stack(refs[:-1]))).sigmoid()
        else:
            coords = torch.stack([(embed(h) + inverse_sigmoid(ref)).sigmoid()
                                  for ref, embed, h in zip(refs[:-1], self.bbox_embed, hs)])
        if shared_cls:
            logits = class_head_fp32(self.class_embed[0], stacked)
        else:
            logits = torch.stack([class_head_fp32(embed, h) for embed, h in zip(self.class_embed, hs)])
        return logits, coords

    def _dn_queries(self, labels: Tensor, boxes: Tensor, image: Tensor, slot: Tensor, batch: int,
                    pad_size: int, blocks: int) -> tuple[Tensor, Tensor]:
        """The denoising queries' tensor part (:func:`.denoising.noised_queries` with this
        model's noise settings and ``label_enc``): one compiled region under ``compile_regions``."""
        return noised_queries(labels, boxes, image, slot, batch, pad_size, blocks, self.dn_label_noise_ratio,
                              self.dn_box_noise_scale, self.num_classes, self.label_enc)

    def forward(self, images: Tensor, masks: Tensor, targets: Optional[list] = None) -> dict:
        """images (B,3,H,W) float, B, H, W >= 1; masks (B,H,W) True = padding, each image's valid
        area at its top-left (padding right/bottom; the valid extents are read from the first
        row/column); targets: B dicts ``labels`` (n,) in [0, num_classes), ``boxes`` (n,4) cxcywh.
        Returns the dict of the class docstring. Shapes are always checked (free). Values need a
        host read, so they are checked only where that costs no device sync, graph break or capture
        error, i.e. for host (CPU) tensors: a mask whose top-left pixel is padding (an inverted
        1 = valid mask: constant, image-independent detections) and target labels out of range are
        refused there; not under ``torch.compile``, for meta/fake tensors, nor on a GPU (the eval and
        CUDA-graph paths keep no read-back; the data pipeline and predict build their masks)."""
        if images.dim() != 4 or masks.shape != (images.shape[0],) + tuple(images.shape[-2:]):
            raise ValueError(f"expected images (B,3,H,W) and masks (B,H,W), got {tuple(images.shape)} "
                             f"and {tuple(masks.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating-point, ImageNet-normalized (B,3,H,W) pixels, got "
                             f"{images.dtype} (convert to float and normalize first, as the data pipeline does)")
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 channels (RGB), got {images.shape[1]} "
                             "(convert grayscale/RGBA images to RGB first)")
        if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
            raise ValueError(f"images {tuple(images.shape)} hold no pixels: expected B >= 1 images of "
                             "H, W >= 1 (skip an empty batch before the model)")
        masks = masks.to(torch.bool)
        check_padding_masks(masks)
        if self.training and targets is not None:
            _check_targets(targets, images.shape[0], self.num_classes)
        images, masks = self.pad_to_query_count(images, masks)
        srcs, fmasks, poss = self._features(images, masks)

        q_label = q_bbox = attn_mask = dn_meta = None
        if self.training and targets is not None and self.dn_number > 0:
            q_label, q_bbox, attn_mask, dn_meta = prepare_for_cdn(
                targets, self.dn_number, self.dn_label_noise_ratio, self.dn_box_noise_scale, self.num_queries,
                self.num_classes, self.hidden_dim, self.label_enc, make_queries=self._dn_queries)

        hs, refs, hs_enc, ref_enc, init_box_proposal = self.transformer(srcs, fmasks, poss, q_label, q_bbox,
                                                                        attn_mask)
        # keep label_enc in the graph even when no denoising query exists (as official)
        hs[0] = hs[0] + self.label_enc.weight[0, 0] * 0.0

        logits, coords = self._decoder_heads(hs, refs)
        if dn_meta is not None:
            logits, coords = dn_post_process(logits, coords, dn_meta)
        interm_logits = class_head_fp32(self.transformer.enc_out_class_embed, hs_enc[-1])
        return {
            "pred_logits": logits[-1],
            "pred_boxes": coords[-1],
            "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], coords[:-1])],
            "interm_outputs": {"pred_logits": interm_logits, "pred_boxes": ref_enc[-1]},
            # the selected tokens' raw proposals (before the encoder box head), as official
            "interm_outputs_for_matching_pre": {"pred_logits": interm_logits, "pred_boxes": init_box_proposal},
            "dn_meta": dn_meta,
        }

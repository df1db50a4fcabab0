"""The DINO detector in pure PyTorch (no Ray, DeepSpeed or MLflow here).

``build_dino(model_cfg) -> (model, criterion, postprocessor)``.
"""
from __future__ import annotations

from typing import Tuple

from torch import nn

__all__ = ["build_dino", "build_model", "check_model_config"]


def check_model_config(model_cfg) -> None:
    """ValueError naming the ``model.*`` setting when a :class:`dino_scale.config.ModelConfig`
    would fail at the first step or train / evaluate silently wrong (the checks
    :func:`build_dino` makes, without building anything): names (backbone, activation,
    ms_deform_attn backend), sizes, rates, the denoising label book, the denoising noise
    settings and ``num_select``. A training run calls it before it starts."""
    from dino_scale.ops import _BACKENDS

    from .backbone import BACKBONE_NAMES
    from .dino import check_dn_noise, check_label_book
    from .postprocess import PostProcess
    from .transformer import ACTIVATIONS

    c = model_cfg
    for key, allowed in (("backbone", BACKBONE_NAMES), ("activation", ACTIVATIONS), ("msda_backend", _BACKENDS)):
        if getattr(c, key) not in allowed:
            raise ValueError(f"model.{key} {getattr(c, key)!r} is not one of "
                             f"{', '.join('none' if a is None else a for a in allowed)}")
    for key, low in (("hidden_dim", 2), ("nheads", 1), ("dim_feedforward", 1), ("enc_layers", 0),
                     ("dec_layers", 1), ("enc_n_points", 1), ("dec_n_points", 1), ("num_queries", 1),
                     ("num_classes", 1), ("num_feature_levels", 1), ("dn_number", 0)):
        if getattr(c, key) < low:
            raise ValueError(f"model.{key} must be >= {low}, got {getattr(c, key)}")
    if c.hidden_dim % 32 or c.hidden_dim % c.nheads:  # the input projections' GroupNorm has 32 groups
        raise ValueError(f"model.hidden_dim {c.hidden_dim} must be a multiple of 32 and of model.nheads {c.nheads}")
    for key in ("dropout", "backbone_drop_path"):
        if not 0 <= getattr(c, key) < 1:  # NaN fails too
            raise ValueError(f"model.{key} must be in [0, 1), got {getattr(c, key)}")
    try:
        check_label_book(c.num_classes, c.dn_number, c.dn_labelbook_size)
        check_dn_noise(c.dn_label_noise_ratio, c.dn_box_noise_scale)
        PostProcess(c.num_select)
    except ValueError as exc:
        raise ValueError(f"model.{exc}") from None


def build_model(model_cfg) -> nn.Module:
    """The DINO module alone, from a :class:`dino_scale.config.ModelConfig`."""
    from .backbone import build_backbone
    from .dino import DINO
    from .transformer import DeformableTransformer

    c = model_cfg
    backbone = build_backbone(c)
    transformer = DeformableTransformer(
        d_model=c.hidden_dim, nhead=c.nheads, num_encoder_layers=c.enc_layers, num_decoder_layers=c.dec_layers,
        dim_feedforward=c.dim_feedforward, dropout=c.dropout, activation=c.activation,
        num_feature_levels=c.num_feature_levels, enc_n_points=c.enc_n_points, dec_n_points=c.dec_n_points,
        num_queries=c.num_queries, encoder_checkpointing=c.encoder_checkpointing, msda_backend=c.msda_backend)
    return DINO(backbone, transformer, num_classes=c.num_classes, num_queries=c.num_queries,
                num_feature_levels=c.num_feature_levels, dn_number=c.dn_number,
                dn_label_noise_ratio=c.dn_label_noise_ratio, dn_box_noise_scale=c.dn_box_noise_scale,
                dn_labelbook_size=c.dn_labelbook_size, share_bbox_embed=c.dec_pred_bbox_embed_share,
                share_class_embed=c.dec_pred_class_embed_share)


def build_dino(model_cfg) -> Tuple[nn.Module, nn.Module, nn.Module]:
    """ModelConfig -> (DINO model, SetCriterion, PostProcess)."""
    from .criterion import build_criterion
    from .postprocess import PostProcess

    return build_model(model_cfg), build_criterion(model_cfg), PostProcess(model_cfg.num_select)

"""The DINO detector in pure PyTorch (no Ray, DeepSpeed or MLflow here).

``build_dino(model_cfg) -> (model, criterion, postprocessor)``.
"""
from __future__ import annotations

from typing import Tuple

from torch import nn

from dino_scale.config_checks import check_model_config

__all__ = ["build_dino", "build_model", "check_model_config"]


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

"""Backbones: multi-scale feature maps, their padding masks and position embeddings.

Module layout follows the official DINO so checkpoint keys match:
``backbone`` is a :class:`Joiner` whose child ``0`` is the feature extractor (ResNet:
``backbone.0.body.<torchvision key>``; Swin: ``backbone.0.<original Swin key>``) and whose
child ``1`` is the (parameter-free) sine position embedding.

Shapes: images (B,3,H,W) float, masks (B,H,W) bool (True = padding). A Joiner returns
``features`` [(B,C_l,H_l,W_l)], ``masks`` [(B,H_l,W_l) bool] and ``pos`` [(B,hidden,H_l,W_l)].
"""
from __future__ import annotations

import logging
import os
import pickle
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from dino_scale.config_checks import BACKBONE_NAMES

from .position_encoding import PositionEmbeddingSine
from .weights_file import download_weights, read_torch_file

__all__ = ["FrozenBatchNorm2d", "ResNetBackbone", "Joiner", "build_backbone", "load_backbone_weights",
           "IMAGENET_WEIGHTS", "resolve_backbone_weights",
           "downsample_mask"]

logger = logging.getLogger(__name__)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers; eps 1e-5).

    Buffers: ``weight``, ``bias``, ``running_mean``, ``running_var`` (no ``num_batches_tracked``:
    it is dropped when present in a loaded state dict)."""

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + bias


# classification-only keys of ImageNet ResNet checkpoints
CLASSIFIER_PREFIXES = ("fc.",)

_RESNETS = {
    # name: (torchvision constructor, channels of layer1..layer4)
    "resnet50": (torchvision.models.resnet50, [256, 512, 1024, 2048]),
    "resnet18": (torchvision.models.resnet18, [64, 128, 256, 512]),
}


class ResNetBackbone(nn.Module):
    """Torchvision ResNet with FrozenBatchNorm2d; returns the last ``num_levels`` stages.

    ``body`` holds torchvision's modules (conv1, bn1, layer1..layer4; no avgpool/fc), so keys
    are torchvision's. The stem and layer1 are frozen (requires_grad False), as official.
    forward: images (B,3,H,W) -> [ (B, num_channels[k], H/stride_k, W/stride_k) ].
    """

    def __init__(self, name: str = "resnet50", num_levels: int = 3, train_backbone: bool = True):
        super().__init__()
        if name not in _RESNETS:
            raise ValueError(f"unknown resnet {name!r}; choose one of {sorted(_RESNETS)}")
        if not 1 <= num_levels <= 4:
            raise ValueError(f"num_levels must be in 1..4, got {num_levels}")
        ctor, channels = _RESNETS[name]
        body = ctor(weights=None, norm_layer=FrozenBatchNorm2d)
        del body.fc, body.avgpool
        self.body = body
        self.stages = [f"layer{i}" for i in range(5 - num_levels, 5)]
        self.num_channels: List[int] = channels[4 - num_levels:]
        self.strides: List[int] = [2 ** (i + 1) for i in range(5 - num_levels, 5)]
        for pname, p in self.body.named_parameters():
            trainable = train_backbone and any(s in pname for s in ("layer2", "layer3", "layer4"))
            p.requires_grad_(trainable)

    def forward(self, x: Tensor) -> List[Tensor]:
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        outs = []
        for i in range(1, 5):
            x = getattr(b, f"layer{i}")(x)
            if f"layer{i}" in self.stages:
                outs.append(x)
        return outs


def downsample_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """mask (B,H,W) bool -> (B,h,w) bool by nearest interpolation (as the official code)."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


class Joiner(nn.Sequential):
    """``Joiner(features, position_embedding)``: (images, masks) -> (features, masks, pos)."""

    def __init__(self, features: nn.Module, position_embedding: nn.Module):
        super().__init__(features, position_embedding)
        self.num_channels: List[int] = list(features.num_channels)

    def forward(self, images: Tensor, mask: Tensor) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        feats = self[0](images)
        masks, pos = self.level_encodings(mask, feats)
        return feats, masks, pos

    def level_encodings(self, mask: Tensor, levels: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """mask (B,H,W) bool and one tensor per level (B,C_l,H_l,W_l), used for its size and
        dtype only -> (masks [(B,H_l,W_l) bool], pos [(B,hidden,H_l,W_l)] in each level's dtype).

        All levels in one call: ``dino_scale.models.compile.compile_regions`` compiles this as
        one region (the ~35 elementwise operators per level fuse into a few kernels)."""
        masks = [downsample_mask(mask, f.shape[-2:]) for f in levels]
        pos = [self[1](m).to(f.dtype) for f, m in zip(levels, masks)]
        return masks, pos


def _swin(cfg, num_levels: int) -> nn.Module:
    from .swin import SwinTransformerDetection  # helper-owned module

    if cfg.backbone not in ("swin_large_384", "swin_large"):
        raise ValueError(f"unknown swin backbone {cfg.backbone!r}")
    return SwinTransformerDetection(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
                                    window_size=12, drop_path_rate=cfg.backbone_drop_path,
                                    out_indices=tuple(range(4 - num_levels, 4)),
                                    use_checkpoint=cfg.backbone_checkpointing)


def build_backbone(cfg) -> Joiner:
    """ModelConfig -> Joiner. 4 feature levels use 3 backbone stages (2-4), 5 use 4 (1-4);
    the remaining level is the extra stride-2 conv of the DINO module."""
    num_levels = min(cfg.num_feature_levels - 1, 4) if cfg.num_feature_levels > 1 else 1
    if cfg.backbone in ("resnet50", "resnet18", "tiny_resnet"):
        name = "resnet18" if cfg.backbone in ("resnet18", "tiny_resnet") else "resnet50"
        features = ResNetBackbone(name, num_levels)
    elif cfg.backbone.startswith("swin"):
        features = _swin(cfg, num_levels)
    else:
        raise ValueError(f"unknown backbone {cfg.backbone!r}: {' | '.join(BACKBONE_NAMES[:4])}")
    if cfg.hidden_dim % 2:
        raise ValueError(f"hidden_dim must be even, got {cfg.hidden_dim}")
    pos = PositionEmbeddingSine(cfg.hidden_dim // 2, cfg.position_temperature, cfg.position_temperature)
    joiner = Joiner(features, pos)
    if getattr(cfg, "backbone_weights", None):
        load_backbone_weights(joiner, resolve_backbone_weights(cfg.backbone, cfg.backbone_weights))
    return joiner


# The ImageNet weights the official DINO starts from: torchvision's ResNet (``pretrained=True``,
# IMAGENET1K_V1) and the Swin repository's Swin-L 384 ImageNet-22k release (DINO's README).
IMAGENET_WEIGHTS = {
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "swin_large_384": "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
                      "swin_large_patch4_window12_384_22k.pth",
}


def resolve_backbone_weights(backbone: str, value: Optional[str]) -> Optional[str]:
    """``model.backbone_weights`` as a path or URL: ``"imagenet"`` names the official ImageNet
    weights of ``backbone`` (:data:`IMAGENET_WEIGHTS`, downloaded once into torch.hub's cache);
    anything else is returned as given. ValueError for a backbone without such weights."""
    if str(value).strip().lower() != "imagenet":
        return value
    if backbone not in IMAGENET_WEIGHTS:
        raise ValueError(f"model.backbone_weights=imagenet: no ImageNet weights for backbone {backbone!r} "
                         f"(known: {', '.join(IMAGENET_WEIGHTS)}); give a path or URL, or none")
    return IMAGENET_WEIGHTS[backbone]


def load_backbone_weights(backbone: nn.Module, path_or_url: str) -> dict:
    """Load ImageNet weights into a backbone (a :class:`Joiner`, or its feature module).

    ``path_or_url``: a local ``.pth``/``.pt`` file or an ``http(s)://`` URL (downloaded with
    ``torch.hub.load_state_dict_from_url``); both are read with ``weights_only=True``.
    ResNet: torchvision keys (``conv1.weight``, ``layer1.0...``; ``fc.*`` ignored), optionally
    under ``body.`` / ``backbone.0.body.`` / ``module.`` or inside a ``model``/``state_dict``
    entry. Swin: delegated to :func:`swin.load_swin_imagenet_weights` (original or timm keys).
    Every backbone tensor must be present with the right shape and no non-classifier key may be
    left over; otherwise a ValueError lists what is wrong.
    Returns {"loaded": n, "ignored": [keys]}.
    """
    features = backbone[0] if isinstance(backbone, Joiner) else backbone
    if not isinstance(features, ResNetBackbone):  # Swin: its own loader (original or timm keys)
        from .swin_weights import load_swin_imagenet_weights

        report = load_swin_imagenet_weights(features, path_or_url, strict=True)
        return {"loaded": len(report.loaded), "ignored": list(report.dropped)}
    path = path_or_url
    if path_or_url.startswith(("http://", "https://")):
        path = download_weights(path_or_url)  # WeightsDownloadError naming the URL
    elif os.path.isdir(path_or_url):
        raise IsADirectoryError(f"backbone weights {path_or_url}: a directory, not a weights file")
    elif not os.path.isfile(path_or_url):
        raise FileNotFoundError(f"backbone weights not found: {path_or_url}")
    try:
        sd = read_torch_file(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"backbone weights {path_or_url}: refused by weights_only loading (the file "
                         f"holds non-tensor objects; re-save its 'model' state dict): {e}") from e
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    target = features.body
    own = target.state_dict()
    mapped, ignored, unexpected = {}, [], []
    for key, value in sd.items():
        k = key
        for prefix in ("backbone.0.body.", "backbone.0.", "body.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        if k in own:
            mapped[k] = value
        elif not k.endswith("num_batches_tracked"):
            ignored.append(key)
            if not k.startswith(CLASSIFIER_PREFIXES):  # the key without its prefix: module.fc.* too
                unexpected.append(key)
    missing = [k for k in own if k not in mapped]
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in mapped.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if missing or bad or unexpected:
        raise ValueError(f"backbone weights {path_or_url} do not fit the {type(features).__name__}: "
                         f"missing {missing[:10]} ({len(missing)}), unexpected {unexpected[:10]} "
                         f"({len(unexpected)}), shape mismatches {bad[:10]} ({len(bad)})")
    target.load_state_dict(mapped, strict=False)
    logger.info("load_backbone_weights: %d tensors from %s (%d classifier keys ignored)", len(mapped),
                path_or_url, len(ignored))
    return {"loaded": len(mapped), "ignored": ignored}

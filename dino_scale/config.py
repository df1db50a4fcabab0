"""Dataclass configuration, named presets and ``a.b=c`` overrides.

A :class:`Config` has four sections: ``model`` (what is computed), ``data`` (what is
read and how it is augmented), ``train`` (optimization and distribution) and ``eval``.
Presets are data: a dict of overrides applied to the defaults, built by one factory,
:func:`preset`. Configs round-trip through plain dicts, JSON and YAML.

    >>> cfg = preset("r50_4scale", overrides=["model.num_queries=300"])
    >>> cfg.model.num_queries
    300
"""
from __future__ import annotations

import copy
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = [
    "ModelConfig", "DataConfig", "TrainConfig", "EvalConfig", "Config", "ConfigError",
    "PRESETS", "preset", "apply_overrides", "parse_override", "to_dict", "from_dict", "save", "load",
]


class ConfigError(ValueError):
    """A bad preset name, override key or value; the message is one clear line."""


@dataclass
class ModelConfig:
    """The detector. Defaults are the released DINO R50 4-scale model."""

    backbone: str = "resnet50"  # resnet50 | resnet18 | swin_large_384 | tiny_resnet
    backbone_weights: Optional[str] = None  # local path or URL of ImageNet weights
    backbone_checkpointing: bool = False  # activation checkpointing in the backbone
    backbone_drop_path: float = 0.2  # Swin stochastic depth
    num_feature_levels: int = 4  # 4: stages 2-4 + 1 extra; 5: stages 1-4 + 1 extra
    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.0
    activation: str = "relu"
    enc_layers: int = 6
    dec_layers: int = 6
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 900
    num_classes: int = 91  # raw category ids 0..num_classes-1 (COCO 91, Objects365 366)
    position_temperature: float = 20.0
    encoder_checkpointing: bool = False  # activation checkpointing of encoder layers
    msda_backend: Optional[str] = None  # None (auto) | "cuda" | "pytorch"
    # contrastive denoising
    dn_number: int = 100
    dn_box_noise_scale: float = 1.0  # the released models used 1.0 (config file says 0.4)
    dn_label_noise_ratio: float = 0.5
    dn_labelbook_size: int = 91  # label_enc has dn_labelbook_size + 1 rows
    # heads
    dec_pred_bbox_embed_share: bool = True
    dec_pred_class_embed_share: bool = True
    # matcher costs
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # loss weights (final, aux, dn and interm alike)
    cls_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    interm_loss_coef: float = 1.0
    # post-processing
    num_select: int = 300


@dataclass
class DataConfig:
    """Datasets and augmentation. Sizes are in pixels before ``scale_factor``."""

    # folders of Parquet shards (with manifest.json), for Python callers' own use: fit() reads its
    # train_dir / val_dir arguments, and the pipelines take them from --data / --val-data only
    train: Optional[str] = None
    val: Optional[str] = None
    image_root: Optional[str] = None  # overrides the manifests' image roots: one, or one per folder 'a,b'
    val_image_root: Optional[str] = None  # the same for the validation folders (unset: image_root)
    train_scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    train_max_size: int = 1333
    crop_resize_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_size_range: list[int] = field(default_factory=lambda: [384, 600])
    eval_size: int = 800
    eval_max_size: int = 1333
    scale_factor: float = 1.0  # 1.5 for the fine-tuning recipe
    batch_size: int = 2  # images per worker per step
    seed: int = 42
    pad_multiple: Optional[int] = None  # collate pads H, W up to a multiple of this (None: batch max)
    # decoded rows each worker shuffles its stream through (a shard's rows keep their conversion
    # order every epoch; the shard order changes): more mixes more, at ~4 MB a row at 800x1333
    shuffle_buffer: int = 16
    # which pixels an annotated image's boxes lie on when it has an EXIF orientation tag:
    # auto (sizes decide; a size-keeping tag, e.g. 3 = rotate 180, is a tie: upright, logged) |
    # stored (never apply the tag: the official DINO's reading; use it for COCO/Objects365) |
    # upright (always apply it: images annotated in labelme, Label Studio, Roboflow). Predict: upright.
    exif_orientation: str = "auto"


@dataclass
class TrainConfig:
    """Optimization and distribution."""

    epochs: int = 12
    max_steps: Optional[int] = None  # stops early when set
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    lr_linear_proj_mult: float = 1.0  # multiplier for sampling-offset / reference-point layers
    weight_decay: float = 1e-4
    no_decay_norm_embed: bool = False
    schedule: str = "step"  # step | multistep | cosine
    # None: the official 11-of-12 point of any length, round(epochs * 11 / 12) (epoch 11 of 12,
    # 24 of 26, 17 of 18); the longer official schedules drop earlier (24 ep: 20; 36 ep: 30)
    lr_drop_epochs: Optional[list[int]] = None
    warmup_steps: int = 0
    clip_max_norm: float = 0.1
    precision: str = "fp32"  # fp32 | bf16 | fp16
    zero_stage: int = 2
    global_batch_size: int = 16  # fixed across worker counts via gradient accumulation
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: Optional[float] = None  # None: 0.5 without GPUs (leaves CPUs to Ray Data), 1 with
    # extra Ray resources each worker asks for, "name" (1) or "name:amount": gpu_h100 pins a run to the
    # cluster YAMLs' H100 nodes, gpu_spot / gpu_ondemand to a market (cluster/README.md)
    worker_resources: list[str] = field(default_factory=list)
    ema_decay: Optional[float] = None
    checkpoint_every_steps: int = 500
    max_failures: int = 0
    # consecutive non-finite-loss micro-batches (global: with accumulation, several per step) before aborting (>= 1)
    max_bad_steps: int = 5
    storage_path: Optional[str] = None  # local folder, s3:// or gs://
    seed: int = 42
    log_every_steps: int = 10
    # engine (issue 5)
    # seeded, order-preserving data; deterministic kernels on CPU (exact resume). On a GPU the
    # deformable-attention backward sums with atomics: runs repeat to rounding (a warning says so)
    deterministic: bool = False
    min_workers: Optional[int] = None  # elastic: ScalingConfig(num_workers=(min_workers, num_workers))
    # elastic: how often (s) a healthy run checks for room to grow back towards num_workers;
    # growing restarts the workers from the latest checkpoint
    elastic_resize_interval_s: float = 60.0
    checkpoints_to_keep: int = 2
    torch_threads: Optional[int] = None  # intra-op threads per worker (None: torch default)
    compile: bool = False  # regional torch.compile of the model and the criterion (models/compile.py)
    compile_granularity: str = "layer"  # layer | stack (whole encoder / decoder)
    # torch.compile mode of those regions: None (default) | reduce-overhead (CUDA graphs inside each
    # region: fixed input sizes only, e.g. benchmarks; one graph set per size) | max-autotune
    compile_mode: Optional[str] = None
    tf32: bool = True  # TF32 matmuls/convolutions where fp32 remains (CUDA only)
    # seconds a collective waits before the process group gives up (NCCL watchdog): ranks wait in
    # one while rank 0 scores the validation set alone; raise it for very large val sets
    collective_timeout_s: int = 1800


@dataclass
class EvalConfig:
    tta: bool = False
    tta_scales: list[int] = field(default_factory=lambda: [800])  # views' short sides, before data.scale_factor
    batch_size: int = 2


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_SWIN_L = {
    "model.backbone": "swin_large_384",
    "model.backbone_checkpointing": True,
}

# Presets as data: overrides applied to the defaults above.
PRESETS: dict[str, dict[str, Any]] = {
    "r50_4scale": {},
    "r50_5scale": {"model.num_feature_levels": 5, "data.batch_size": 1},
    "swinl_4scale": dict(_SWIN_L),
    "swinl_5scale": {**_SWIN_L, "model.num_feature_levels": 5, "data.batch_size": 1},
    # CPU-sized: small backbone, narrow transformer, ~256 px images. For tests and demos.
    "tiny": {
        "model.backbone": "tiny_resnet",
        "model.hidden_dim": 64,
        "model.nheads": 4,
        "model.dim_feedforward": 128,
        "model.enc_layers": 2,
        "model.dec_layers": 2,
        "model.num_queries": 50,
        "model.dn_number": 20,
        "model.num_select": 50,
        "data.train_scales": [192, 224, 256],
        "data.train_max_size": 320,
        "data.crop_resize_scales": [192, 224],
        "data.crop_size_range": [160, 224],
        "data.eval_size": 256,
        "data.eval_max_size": 320,
        "data.batch_size": 4,
        "train.lr": 2e-4,
        "train.lr_backbone": 2e-4,
        "train.epochs": 50,
        "train.lr_drop_epochs": [11],  # runs are capped by max_steps; the demo's schedule
        "train.global_batch_size": 4,
        "train.zero_stage": 0,
        "train.checkpoint_every_steps": 50,
        "train.log_every_steps": 5,
        "eval.tta_scales": [256],
    },
}


def preset(name: str, overrides: Optional[list[str] | dict[str, Any]] = None) -> Config:
    """The named preset with optional overrides (``["a.b=c", ...]`` or ``{"a.b": c}``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg = Config(name=name)
    apply_overrides(cfg, PRESETS[name])
    if overrides:
        apply_overrides(cfg, overrides)
    return cfg


def _field_types(obj) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (often a string from the command line) to type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "types.UnionType"):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if isinstance(value, str):
            text = value.strip()
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = [v for v in text.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        item, out = (args[0] if args else Any), []
        for v in value:
            try:
                out.append(_coerce(v, item, key))
            except ConfigError:  # said "expected int" of "800 1000", for a list
                raise ConfigError(f"bad value {v!r} in {key} (expected a list of {getattr(item, '__name__', item)}, "
                                  f"e.g. {key}=[480,512] or {key}=480,512)") from None
        return out
    try:
        if value is None or (isinstance(value, bool) and tp in (int, float)):
            raise ValueError(value)  # JSON null for a non-optional field, true/false for a number
        if tp is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, str):  # '1e4', '2.0': whole numbers written as floats
                try:
                    return int(value)
                except ValueError:
                    value = float(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"bad value {value!r} for {key} (expected {getattr(tp, '__name__', tp)})") from None
    return value


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    """Set dotted keys in place, e.g. ``["model.num_queries=300", "train.lr=2e-4"]``."""
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides]
    for key, value in items:
        *path, leaf = key.split(".")
        node = cfg
        for depth, part in enumerate(path):
            if not dataclasses.is_dataclass(node) or part not in _field_types(node):
                raise ConfigError(f"unknown config key {key!r}" + _hint(node, path[:depth], part))
            node = getattr(node, part)
        types = _field_types(node) if dataclasses.is_dataclass(node) else {}
        if leaf not in types:
            raise ConfigError(f"unknown config key {key!r}" + _hint(node, path, leaf))
        if dataclasses.is_dataclass(getattr(node, leaf)):
            raise ConfigError(f"config key {key!r} is a section: set its keys one by one, e.g. {key}.<key>=value")
        setattr(node, leaf, _coerce(value, types[leaf], key))
    return cfg


def _hint(node: Any, prefix: list[str], name: str) -> str:
    """``"; did you mean 'train.lr'?"`` (close matches among ``node``'s keys), else the keys or
    sections there are."""
    import difflib

    if not dataclasses.is_dataclass(node):
        return ""
    keys = list(_field_types(node))
    dotted = [".".join([*prefix, k]) for k in keys]
    close = difflib.get_close_matches(name, keys, n=3, cutoff=0.6)
    if close:
        return "; did you mean " + " or ".join(repr(".".join([*prefix, k])) for k in close) + "?"
    if len(dotted) <= 8:
        return f"; keys here: {', '.join(dotted)}"
    return f"; {len(dotted)} keys here ({', '.join(dotted[:4])}, ...: dino_scale/config.py lists them)"


def parse_override(text: str) -> tuple[str, str]:
    """``(key, value)`` of an ``a.b=c`` override, whitespace around each stripped. A
    :class:`ConfigError` naming the override for no ``=``, no key, whitespace inside the key
    (``train. lr``: no key holds any) or no value (``model.backbone=`` set an empty name,
    ``data.train_scales=`` an empty list; ``none`` and ``[]`` say those on purpose)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, value = (part.strip() for part in text.split("=", 1))
    if not key:
        raise ConfigError(f"override {text!r} names no key: it must look like section.key=value")
    if any(c.isspace() for c in key):
        raise ConfigError(f"override {text!r}: the key {key!r} holds a space; write it without "
                          f"({''.join(key.split())!r}?)")
    if not value:
        raise ConfigError(f"override {text!r} has no value: write {key}=<value> ('none' for an "
                          f"optional key, '[]' for an empty list)")
    return key, value


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Inverse of :func:`to_dict`; unknown keys are an error, missing keys take defaults."""
    cfg = Config()
    if not isinstance(data, dict):  # an empty YAML file (None), a JSON list
        raise ConfigError(f"a config must be a mapping of sections, not {type(data).__name__}")
    data = copy.deepcopy(data)
    flat = {"name": data.pop("name")} if "name" in data else {}
    for section, values in data.items():
        if not isinstance(values, dict):
            if section in _field_types(cfg):
                raise ConfigError(f"config section {section!r} must be a mapping of keys, not {values!r}")
            raise ConfigError(f"unknown config key {section!r}")
        for k, v in values.items():
            flat[f"{section}.{k}"] = v
    return apply_overrides(cfg, flat)


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"model.hidden_dim": 256, ...}``: for tracking params."""
    out = {"name": cfg.name}
    for section, values in to_dict(cfg).items():
        if isinstance(values, dict):  # a tuple set from Python reads back from JSON as a list
            out.update({f"{section}.{k}": list(v) if isinstance(v, tuple) else v for k, v in values.items()})
    return out


def save(cfg: Config, path: str | Path) -> None:
    """Write JSON (``.json``) or YAML (anything else)."""
    path = Path(path)
    data = to_dict(cfg)
    if path.suffix == ".json":
        path.write_text(json.dumps(data, indent=2))
    else:
        import yaml

        path.write_text(yaml.safe_dump(data, sort_keys=False))


def load(path: str | Path) -> Config:
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None

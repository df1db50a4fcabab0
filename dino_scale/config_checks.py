"""What a run's configuration is checked for before anything starts, without importing torch.

:func:`check_training_config` is what a training run checks on the driver before a dataset is
converted, Ray starts or an MLflow run opens; the pipelines call it while parsing their flags, so
a bad ``--set`` is refused in a fraction of a second (importing torch, torchvision and DeepSpeed
for these checks took 4-6 s). This module imports only the standard library and
:mod:`dino_scale.config`. The modules that use a setting import its check and its name table
from here, so each exists once: :mod:`~dino_scale.engine.deepspeed_utils` (ZeRO stage, precision,
batch sizes), :mod:`~dino_scale.engine.optim` (the lr schedule), :mod:`~dino_scale.engine.trainer`
(worker counts, resources), :mod:`~dino_scale.data.transforms` (augmentation sizes),
:mod:`~dino_scale.models` (model settings), :mod:`~dino_scale.engine.evaluate` (evaluation) and
:mod:`~dino_scale.models.compile` (compile modes; what each granularity compiles stays there, keyed
by :data:`COMPILE_GRANULARITIES`, which a test keeps in step).

The checks of a config raise :class:`~dino_scale.config.ConfigError` (a ``ValueError``) naming the
key; :func:`check_label_book`, :func:`check_dn_noise` and :func:`check_num_select`, which the model's
constructors call with plain arguments, raise ``ValueError`` naming the argument.
"""
from __future__ import annotations

import math
import operator

from dino_scale.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig

__all__ = [
    "BACKBONE_NAMES", "ACTIVATION_NAMES", "MSDA_BACKENDS", "COMPILE_MODES", "CUDA_GRAPH_MODES",
    "COMPILE_GRANULARITIES", "EXIF_ORIENTATION_MODES",
    "check_training_config", "worker_count", "extra_worker_resources", "grad_accum_steps",
    "check_zero_and_precision", "check_train_config", "lr_drop_epochs", "check_schedule",
    "scaled_size", "check_exif_orientation", "check_augmentation",
    "check_label_book", "check_dn_noise", "check_num_select", "check_model_config", "check_eval_config",
]

#: ``model.backbone`` (:func:`dino_scale.models.backbone.build_backbone`)
BACKBONE_NAMES = ("resnet50", "resnet18", "tiny_resnet", "swin_large_384", "swin_large")
#: ``model.activation``: names of ``torch.nn.functional`` functions (:mod:`dino_scale.models.transformer`)
ACTIVATION_NAMES = ("relu", "gelu")
#: ``model.msda_backend``: None picks the CUDA kernel for GPU inputs (:func:`dino_scale.ops.ms_deform_attn`)
MSDA_BACKENDS = (None, "pytorch", "cuda")
#: ``train.compile_mode`` (:func:`dino_scale.models.compile.compile_regions`)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # inductor records CUDA graphs in these
#: ``train.compile_granularity``: compiled regions per encoder layer or per encoder/decoder stack
COMPILE_GRANULARITIES = ("layer", "stack")
#: ``data.exif_orientation``: which pixel grid an annotated image is decoded on (:mod:`dino_scale.data.decode`)
EXIF_ORIENTATION_MODES = ("auto", "stored", "upright")


def check_training_config(cfg: Config) -> None:
    """What a training run checks before anything starts: the worker count or elastic range
    (:func:`worker_count`), the workers' own settings at the largest group
    (:func:`check_train_config`), the augmentation sizes (:func:`check_augmentation`), the model's
    settings (:func:`check_model_config`), the evaluation settings (:func:`check_eval_config`: the
    final evaluation runs after all of the training) and the extra worker resources
    (:func:`extra_worker_resources`)."""
    worker_count(cfg)
    check_train_config(cfg.train, cfg.data.batch_size, cfg.train.num_workers)
    extra_worker_resources(cfg.train.worker_resources)
    check_augmentation(cfg.data)  # else a bad size failed in the data pipeline's tasks, mid-run
    check_model_config(cfg.model)
    check_eval_config(cfg)


# --------------------------------------------------------------------------- workers and batches

def worker_count(cfg: Config, training: bool = True) -> int | tuple[int, int]:
    """``num_workers``, or ``(min_workers, num_workers)`` for an elastic run (every count in
    the range must keep the global batch exact). An evaluation-only run (``training`` false)
    accumulates nothing and runs one fixed group: only ``num_workers >= 1`` is checked."""
    tc = cfg.train
    if tc.num_workers < 1:
        raise ConfigError(f"train.num_workers must be >= 1, got {tc.num_workers}")
    if not training:
        return tc.num_workers
    if tc.min_workers is not None and tc.min_workers > tc.num_workers:
        raise ConfigError(f"train.min_workers ({tc.min_workers}) is above train.num_workers ({tc.num_workers}), "
                          "the most workers an elastic run grows to")
    if tc.min_workers is None or tc.min_workers == tc.num_workers:
        grad_accum_steps(tc.global_batch_size, cfg.data.batch_size, tc.num_workers)
        return tc.num_workers
    if tc.min_workers < 1:
        raise ConfigError(f"train.min_workers must be >= 1, got {tc.min_workers}")
    if not tc.elastic_resize_interval_s >= 0:
        raise ConfigError(f"train.elastic_resize_interval_s must be >= 0, got {tc.elastic_resize_interval_s}")
    if cfg.data.batch_size < 1 or tc.global_batch_size < 1:  # a fixed group: grad_accum_steps checks these
        raise ConfigError(f"data.batch_size and train.global_batch_size must be >= 1, got "
                          f"{cfg.data.batch_size} and {tc.global_batch_size}")
    bad = [n for n in range(tc.min_workers, tc.num_workers + 1)
           if tc.global_batch_size % (cfg.data.batch_size * n)]
    if bad:
        raise ConfigError(f"elastic range {tc.min_workers}..{tc.num_workers}: global batch {tc.global_batch_size} "
                          f"is not a multiple of batch_size {cfg.data.batch_size} x workers for {bad}")
    return (tc.min_workers, tc.num_workers)


_BUILT_IN_RESOURCES = {"cpu": "train.cpus_per_worker", "gpu": "train.use_gpu (one GPU a worker)",
                       "memory": None, "object_store_memory": None}


def extra_worker_resources(entries: list[str]) -> dict[str, float]:
    """``train.worker_resources`` (``["gpu_h100", "gpu_spot:1"]``) -> ``{"gpu_h100": 1.0, "gpu_spot": 1.0}``.
    :class:`ConfigError` for an empty name, a built-in resource (set by its own key), a name given
    twice, or an amount that is not a finite number > 0 (Ray refused it in the worker group's
    placement, after Ray and the MLflow run had started, or waited for it forever)."""
    out: dict[str, float] = {}
    for entry in entries or []:
        name, _, amount = str(entry).strip().partition(":")
        name = name.strip()
        if not name:
            raise ConfigError(f"train.worker_resources: {entry!r} names no resource (use name or name:amount)")
        if name.lower() in ("none", "null"):  # `=none` became ["none"]: a resource no node has, waited for forever
            raise ConfigError(f"train.worker_resources: {entry!r} is no resource name; for none give []")
        if name.lower() in _BUILT_IN_RESOURCES:
            key = _BUILT_IN_RESOURCES[name.lower()]
            raise ConfigError(f"train.worker_resources: {name!r} is Ray's own resource"
                              + (f"; set it with {key}" if key else ""))
        try:
            value = float(amount) if amount.strip() else 1.0
        except ValueError:
            value = float("nan")
        if not 0.0 < value < float("inf"):
            raise ConfigError(f"train.worker_resources: {entry!r} needs an amount > 0 (name or name:amount)")
        if name in out:
            raise ConfigError(f"train.worker_resources names {name!r} twice")
        out[name] = value
    return out


def grad_accum_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step that keep ``global_batch_size`` fixed."""
    per_pass = micro_batch_size * world_size
    if micro_batch_size < 1:
        raise ConfigError(f"data.batch_size (images per worker) must be >= 1, got {micro_batch_size}")
    if world_size < 1:
        raise ConfigError(f"the worker count must be >= 1, got {world_size}")
    if global_batch_size < 1:
        raise ConfigError(f"train.global_batch_size must be >= 1, got {global_batch_size}")
    if global_batch_size % per_pass:
        raise ConfigError(
            f"train.global_batch_size={global_batch_size} is not a multiple of data.batch_size "
            f"({micro_batch_size}) x workers ({world_size}) = {per_pass}; pick sizes that divide")
    return global_batch_size // per_pass


# --------------------------------------------------------------------------- the train section

def check_zero_and_precision(cfg: TrainConfig) -> None:
    """``train.zero_stage`` 0-3 and ``train.precision`` fp32, bf16 or fp16 (the DeepSpeed config's)."""
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision must be fp32, bf16 or fp16, got {cfg.precision!r}")


def lr_drop_epochs(cfg: TrainConfig) -> list[int]:
    """The epochs at which the lr drops x0.1: ``cfg.lr_drop_epochs``, or when None the
    official recipe's point (epoch 11 of 12) scaled to ``cfg.epochs``: round(epochs * 11/12)
    (24 of 26 for the Objects365 pretraining, 17 of 18 for the COCO fine-tuning), and at least
    the last epoch at 0.1x as in the recipe (rounding gave ``epochs`` itself for 2 to 6 epochs:
    a short fine-tune never dropped); a 1-epoch run does not drop."""
    if cfg.lr_drop_epochs is not None:
        return sorted(int(e) for e in cfg.lr_drop_epochs)
    epochs = int(cfg.epochs)
    return [min(int(epochs * 11 / 12 + 0.5), max(1, epochs - 1))]


def check_schedule(cfg: TrainConfig) -> list[int]:
    """The lr drop epochs (:func:`lr_drop_epochs`) once ``train.schedule`` is step, multistep or
    cosine and the drops fit it: step and multistep need drops at epochs >= 1, step exactly one."""
    drops = lr_drop_epochs(cfg)
    if cfg.schedule not in ("step", "multistep", "cosine"):
        raise ConfigError(f"unknown schedule {cfg.schedule!r}; choose step, multistep or cosine")
    if cfg.schedule in ("step", "multistep") and not drops:
        raise ConfigError(f"schedule {cfg.schedule!r} needs train.lr_drop_epochs")
    if cfg.schedule in ("step", "multistep") and drops[0] < 1:  # was: the lr at 0.1x from the first step
        raise ConfigError(f"train.lr_drop_epochs {drops}: a drop at epoch e lowers the lr after e epochs, so "
                          f"each must be >= 1")
    if len(set(drops)) != len(drops):  # multistep dropped once per entry: [8, 8] was 0.01x at epoch 8
        raise ConfigError(f"train.lr_drop_epochs {drops} names an epoch twice; give each drop's epoch once")
    if cfg.schedule == "step" and len(drops) > 1:  # it dropped at the first only, the rest ignored
        raise ConfigError(f"schedule 'step' drops the lr once, train.lr_drop_epochs lists {drops}: "
                          f"use schedule 'multistep' to drop at each, or give one epoch")
    return drops


def check_train_config(cfg: TrainConfig, micro_batch_size: int, world_size: int) -> None:
    """Everything the workers would check on start, checked on the driver before a run,
    Ray or MLflow starts (a :class:`ConfigError` there came back as a worker-group failure,
    retried ``max_failures`` times): ZeRO stage, precision and batch sizes, the lr schedule,
    the EMA decay, the checkpoint/log intervals (0 divided by zero after the first step), the
    checkpoints kept (0 was read as 1) and the bad steps in a row that abort, an
    elastic run's ZeRO stage, the lrs (``lr`` > 0), weight decay and clipping norm, ``max_steps``,
    ``epochs`` and ``warmup_steps``, ``torch_threads``, ``cpus_per_worker`` and the compile settings."""
    check_zero_and_precision(cfg)
    grad_accum_steps(cfg.global_batch_size, micro_batch_size, world_size)
    check_schedule(cfg)
    elastic = cfg.min_workers is not None and cfg.min_workers < cfg.num_workers  # as in worker_count
    if elastic and cfg.zero_stage >= 3:  # dino_scale.engine.elastic
        raise ConfigError("an elastic run (train.min_workers) resumes on other worker counts, which "
                          "DeepSpeed cannot do for ZeRO-3 checkpoints: use train.zero_stage <= 2")
    if cfg.ema_decay is not None and not 0.0 < cfg.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in (0, 1), got {cfg.ema_decay}")
    # max_bad_steps 0 (or less) never aborted: a run whose every loss was NaN finished and registered its start
    for key in ("checkpoint_every_steps", "log_every_steps", "checkpoints_to_keep", "max_bad_steps"):
        if int(getattr(cfg, key)) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(cfg, key)}")
    # AdamW checks only its default lr and weight decay: a group's own (the backbone's lr) went
    # unchecked, so a negative one trained that group uphill
    for key in ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay", "clip_max_norm"):
        if not 0.0 <= float(getattr(cfg, key)) < float("inf"):
            raise ConfigError(f"train.{key} must be a finite number >= 0, got {getattr(cfg, key)}")
    if cfg.max_steps is not None and cfg.max_steps < 1:  # 0 read as "no limit": every epoch was trained
        raise ConfigError(f"train.max_steps must be >= 1 (or none: no limit), got {cfg.max_steps}")
    # these trained nothing, or not what was asked, and the run finished and registered its weights:
    # epochs 0 or less took no step (the initial weights evaluated as the result), lr 0 left every
    # group but the backbone as initialized, a negative warmup was read as none
    if int(cfg.epochs) < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {cfg.epochs}")
    if not float(cfg.lr) > 0.0:
        raise ConfigError(f"train.lr must be > 0 (the transformer and heads train at it), got {cfg.lr}")
    if not float(cfg.lr_backbone) > 0.0:  # official DINO refuses it too ("Please set lr_backbone > 0")
        raise ConfigError(f"train.lr_backbone must be > 0, got {cfg.lr_backbone}: a backbone at lr 0 is not frozen "
                          f"(it still takes gradients, AdamW state and a share of the clip norm, which changed "
                          f"how the rest trained); give it a small lr, e.g. 1e-5 as the recipes do")
    if int(cfg.warmup_steps) < 0:
        raise ConfigError(f"train.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if int(cfg.max_failures) < -1:  # Ray Train's -1: retry without limit
        raise ConfigError(f"train.max_failures must be >= 0 (or -1: retry without limit), got {cfg.max_failures}")
    # these failed in every worker as it started (after Ray and the MLflow run had, retried max_failures times)
    if cfg.torch_threads is not None and int(cfg.torch_threads) < 0:  # torch.set_num_threads refuses it
        raise ConfigError(f"train.torch_threads must be >= 1 (0 or none: torch's default), got {cfg.torch_threads}")
    if cfg.cpus_per_worker is not None and not 0.0 <= float(cfg.cpus_per_worker) < float("inf"):
        raise ConfigError(f"train.cpus_per_worker must be a finite number >= 0, got {cfg.cpus_per_worker}")
    if cfg.compile:
        if cfg.compile_granularity not in COMPILE_GRANULARITIES:
            raise ConfigError(f"train.compile_granularity must be one of {sorted(COMPILE_GRANULARITIES)}, "
                              f"got {cfg.compile_granularity!r}")
        if cfg.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"train.compile_mode must be one of {list(COMPILE_MODES)}, got {cfg.compile_mode!r}")
        if cfg.compile_mode in CUDA_GRAPH_MODES and cfg.zero_stage == 3:
            # ZeRO-3 gathers the parameters into new memory every forward: the recorded graphs
            # read parameters at fixed addresses, so every region re-records (up to 128 times each)
            raise ConfigError(f"train.compile_mode={cfg.compile_mode} (CUDA graphs) does not work with "
                              "train.zero_stage=3; use ZeRO-1/2 or compile_mode none")
    # the workers' PYTHONHASHSEED: Python refuses to start outside this range (every worker failed)
    if isinstance(cfg.seed, bool) or not 0 <= int(cfg.seed) <= 2**32 - 1:
        raise ConfigError(f"train.seed must be an integer in [0, 4294967295] (the workers' PYTHONHASHSEED), "
                          f"got {cfg.seed}")
    if not int(cfg.collective_timeout_s) > 0:
        raise ConfigError(f"train.collective_timeout_s must be >= 1, got {cfg.collective_timeout_s}")


# --------------------------------------------------------------------------- the data section

def scaled_size(v: int, factor: float) -> int:
    """``v`` pixels at ``scale_factor``, truncated as the official DINO does (``int(i * overlap)``
    in its make_coco_transforms): 1333 at 1.5 is 1999, not 2000."""
    return int(v * factor)


def check_exif_orientation(mode: str) -> str:
    """``mode`` when it is one of :data:`EXIF_ORIENTATION_MODES`, else a ``ConfigError`` naming them."""
    if mode not in EXIF_ORIENTATION_MODES:
        raise ConfigError(f"data.exif_orientation must be one of {', '.join(EXIF_ORIENTATION_MODES)} "
                          f"(stored: the official DINO's reading, for COCO/Objects365; upright: images "
                          f"annotated by labelling tools that apply EXIF; auto: sizes decide), got {mode!r}")
    return mode


def check_augmentation(cfg: DataConfig) -> None:
    """:class:`~dino_scale.config.ConfigError` unless the augmentation sizes of ``cfg`` (a
    ``DataConfig``) are usable: ``scale_factor`` finite and > 0; ``train_scales`` and
    ``crop_resize_scales`` non-empty; ``crop_size_range`` two sizes ``[min, max]`` with
    ``min <= max``; every size at least 1 pixel after ``scale_factor``; ``pad_multiple`` None
    or >= 0; ``seed`` an int >= 0 (the shuffles' generators refuse a negative one: every worker
    failed at its first batch); ``exif_orientation`` one of :data:`EXIF_ORIENTATION_MODES`. A bad
    one otherwise failed (or, ``train_max_size`` 0, shrank every image to a 1-pixel side) only where
    a sample was drawn: inside the data pipeline's tasks, after the run had started, the crop
    settings only on the ~25% of samples that take the crop branch."""
    check_exif_orientation(getattr(cfg, "exif_orientation", "auto"))
    seed = getattr(cfg, "seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"data.seed must be an integer >= 0, got {seed!r}")
    if getattr(cfg, "shuffle_buffer", 0) < 0:
        raise ConfigError(f"data.shuffle_buffer must be >= 0 (0: no shuffle), got {cfg.shuffle_buffer}")
    try:
        f = float(cfg.scale_factor)
    except (TypeError, ValueError):
        f = math.nan
    if not (math.isfinite(f) and f > 0):
        raise ConfigError(f"data.scale_factor must be a finite number > 0, got {cfg.scale_factor!r}")
    lists = {"train_scales": cfg.train_scales, "crop_resize_scales": cfg.crop_resize_scales,
             "crop_size_range": cfg.crop_size_range}
    for key, values in lists.items():
        if not values:
            raise ConfigError(f"data.{key} must name at least one size, got {values!r}")
    if len(cfg.crop_size_range) != 2 or cfg.crop_size_range[0] > cfg.crop_size_range[1]:
        raise ConfigError(f"data.crop_size_range must be two sizes [min, max] with min <= max, "
                          f"got {cfg.crop_size_range!r}")
    sizes = {f"data.{k}": list(v) for k, v in lists.items()}
    sizes.update({f"data.{k}": [getattr(cfg, k)] for k in ("train_max_size", "eval_size", "eval_max_size")})
    for key, values in sizes.items():
        small = [v for v in values if scaled_size(v, f) < 1]
        if small:
            raise ConfigError(f"{key} must be sizes of at least 1 pixel (after data.scale_factor={f}), "
                              f"got {values!r}")
    if cfg.pad_multiple is not None and cfg.pad_multiple < 0:
        raise ConfigError(f"data.pad_multiple must be None (pad to the batch's largest image) or >= 0, "
                          f"got {cfg.pad_multiple}")


# --------------------------------------------------------------------------- the model and eval sections

def check_label_book(num_classes: int, dn_number: int, dn_labelbook_size: int) -> None:
    """ValueError unless the denoising label table can embed every class: label noise draws
    classes in [0, num_classes) and embeds them with ``label_enc`` (dn_labelbook_size + 1
    rows), so a larger class count would fail at the first training step."""
    if dn_number > 0 and num_classes > dn_labelbook_size + 1:
        raise ValueError(f"num_classes {num_classes} needs dn_labelbook_size >= {num_classes - 1} with "
                         f"denoising on (got {dn_labelbook_size}: label_enc has {dn_labelbook_size + 1} rows); "
                         "set model.dn_labelbook_size, usually equal to model.num_classes")


def check_dn_noise(dn_label_noise_ratio: float, dn_box_noise_scale: float) -> None:
    """ValueError unless the denoising noise settings are what the recipe means: the label noise
    ratio is a fraction in [0, 1] (a query's label is replaced with probability ratio / 2, so 50
    meant as percent replaced every label, silently) and the box noise scale is >= 0 (a negative
    one turned the box noise off without a word). Released: 0.5 and 1.0."""
    if not 0.0 <= dn_label_noise_ratio <= 1.0:
        raise ValueError("dn_label_noise_ratio must be a fraction in [0, 1] (released: 0.5), "
                         f"got {dn_label_noise_ratio}")
    if not dn_box_noise_scale >= 0.0:
        raise ValueError(f"dn_box_noise_scale must be >= 0 (released: 1.0; 0 turns box noise off), "
                         f"got {dn_box_noise_scale}")


def check_num_select(num_select) -> int:
    """``num_select`` (detections kept per image) as an int; ValueError unless it is an int >= 1
    (0 gave every image no detection: a finished run evaluated to AP 0 without an error)."""
    try:
        count = operator.index(num_select)
    except TypeError:
        count = 0
    if count < 1:
        raise ValueError(f"num_select must be an int >= 1 (detections kept per image; released: 300), "
                         f"got {num_select!r}")
    return count


def check_model_config(model_cfg: ModelConfig) -> None:
    """:class:`~dino_scale.config.ConfigError` naming the ``model.*`` setting when a
    :class:`~dino_scale.config.ModelConfig` would fail at the first step or train / evaluate
    silently wrong (the checks :func:`dino_scale.models.build_dino` makes, without building
    anything): names (backbone, activation, ms_deform_attn backend), sizes, rates, the denoising
    label book, the denoising noise settings and ``num_select``."""
    c = model_cfg
    for key, allowed in (("backbone", BACKBONE_NAMES), ("activation", ACTIVATION_NAMES),
                         ("msda_backend", MSDA_BACKENDS)):
        if getattr(c, key) not in allowed:
            raise ConfigError(f"model.{key} {getattr(c, key)!r} is not one of "
                              f"{', '.join('none' if a is None else a for a in allowed)}")
    for key, low in (("hidden_dim", 2), ("nheads", 1), ("dim_feedforward", 1), ("enc_layers", 0),
                     ("dec_layers", 1), ("enc_n_points", 1), ("dec_n_points", 1), ("num_queries", 1),
                     ("num_classes", 1), ("num_feature_levels", 1), ("dn_number", 0)):
        if getattr(c, key) < low:
            raise ConfigError(f"model.{key} must be >= {low}, got {getattr(c, key)}")
    if c.hidden_dim % 32 or c.hidden_dim % c.nheads:  # the input projections' GroupNorm has 32 groups
        raise ConfigError(f"model.hidden_dim {c.hidden_dim} must be a multiple of 32 and of model.nheads {c.nheads}")
    for key in ("dropout", "backbone_drop_path"):
        if not 0 <= getattr(c, key) < 1:  # NaN fails too
            raise ConfigError(f"model.{key} must be in [0, 1), got {getattr(c, key)}")
    # a NaN weight made every loss NaN (the run aborted in the workers), a negative one trained its
    # term uphill, NaN matcher costs matched at random; a NaN also never compared equal on a rerun
    for key in ("cls_loss_coef", "bbox_loss_coef", "giou_loss_coef", "interm_loss_coef", "set_cost_class",
                "set_cost_bbox", "set_cost_giou", "focal_gamma"):
        if not 0 <= float(getattr(c, key)) < float("inf"):
            raise ConfigError(f"model.{key} must be a finite number >= 0, got {getattr(c, key)}")
    if not 0 <= float(c.focal_alpha) <= 1:
        raise ConfigError(f"model.focal_alpha must be in [0, 1], got {c.focal_alpha}")
    if not 0 < float(c.position_temperature) < float("inf"):
        raise ConfigError(f"model.position_temperature must be a finite number > 0, got {c.position_temperature}")
    try:
        check_label_book(c.num_classes, c.dn_number, c.dn_labelbook_size)
        check_dn_noise(c.dn_label_noise_ratio, c.dn_box_noise_scale)
        check_num_select(c.num_select)
    except ValueError as exc:
        raise ConfigError(f"model.{exc}") from None


def check_eval_config(cfg: Config) -> None:
    """:class:`~dino_scale.config.ConfigError` unless ``cfg.eval`` (of a ``Config``) is usable:
    ``batch_size`` an int >= 1 and, with ``tta``, ``tta_scales`` one or more sizes > 0 (the
    views' short sides; each view is the eval image rescaled by ``size / data.eval_size``). A bad
    one otherwise failed in every worker's evaluation, after the whole training run and before its
    final checkpoint was reported."""
    ec = cfg.eval
    if isinstance(ec.batch_size, bool) or not isinstance(ec.batch_size, int) or ec.batch_size < 1:
        raise ConfigError(f"eval.batch_size must be an int >= 1, got {ec.batch_size!r}")
    if not ec.tta:
        return
    scales = list(ec.tta_scales or [])
    bad = [s for s in scales
           if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0]
    if not scales or bad:
        raise ConfigError(f"eval.tta_scales must name at least one size > 0 when eval.tta is on (the short side of "
                          f"each view before data.scale_factor, like data.eval_size={cfg.data.eval_size}, the plain "
                          f"view), got {ec.tta_scales!r}")

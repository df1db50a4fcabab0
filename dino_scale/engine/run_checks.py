"""The checks :func:`~dino_scale.engine.api.fit` makes on the driver before Ray or an MLflow run
starts: the datasets (complete, readable, categories the class head can hold), initial weights
that fit the model, the backbone weights file a run will read, and the line saying what a rerun of
a run name trains. Each refusal is a :class:`~dino_scale.config.ConfigError` naming the fix."""
from __future__ import annotations

import logging
import os
import re
from typing import Optional

from dino_scale.config import Config, ConfigError
from dino_scale.engine.checkpoint import check_fits

__all__ = ["check_category_ids", "resume_note", "backbone_start_note", "check_backbone_weights"]

log = logging.getLogger("dino_scale.engine")  # the logger of fit's own lines


def _num_images(data_dir: str) -> int:
    from dino_scale.data.manifest import data_dirs, read_manifest

    return sum(int(read_manifest(d)["num_images"]) for d in data_dirs(data_dir))


def check_category_ids(categories: list[dict], num_classes: int, data: str) -> None:
    """:class:`ConfigError` when a class head of ``num_classes`` cannot hold a category id of
    ``categories`` (``[{"id", ...}]`` of dataset ``data``): the loop would stop at the first batch
    holding one (on a GPU it was a device-side assert)."""
    need = max((int(c["id"]) for c in categories), default=-1) + 1
    if need > num_classes:
        raise ConfigError(f"{data} has category ids up to {need - 1}: model.num_classes must be >= {need} "
                          f"(got {num_classes})")


def _check_data(train_dir: Optional[str], val_dir: Optional[str], cfg: Config) -> None:
    """Before anything starts: the shards of both datasets are there, whole, with readable
    footers holding the record columns (:func:`~dino_scale.data.preflight.preflight_shards`, one
    :class:`~dino_scale.data.ShardError` naming every damaged shard; Ray Data's planning failed on
    one after Ray and the MLflow run had started, without the file's name, or an epoch did), the
    folders' image roots hold their images (:func:`~dino_scale.data.preflight.check_image_roots`), and
    the class head holds every category id of the training data (:func:`check_category_ids`)."""
    from dino_scale.data.preflight import check_image_roots, preflight_shards
    from dino_scale.data.image_paths import val_image_roots
    from dino_scale.data.manifest import data_dirs, read_manifest

    for data, roots, key in ((train_dir, cfg.data.image_root, "data.image_root"),
                             (val_dir, val_image_roots(cfg.data), "data.val_image_root")):
        if data:
            preflight_shards(data)  # also: the folders' categories agree, so the first folder's hold for all
            check_image_roots(data, roots, key=key)  # a root the nodes lack: every image skipped
    if train_dir:
        check_category_ids(read_manifest(data_dirs(train_dir)[0])["categories"], cfg.model.num_classes, train_dir)
    if val_dir and not sum(int(read_manifest(d)["num_images"]) for d in data_dirs(val_dir)):
        raise ConfigError(f"validation set {val_dir} holds no image: no AP can be measured on it (an "
                          f"--o365-val-split of 0, or every image skipped at conversion: its manifest says why)")


def _conversion_losses(val_dir: str) -> dict[str, int]:
    """``val_images_skipped_at_conversion`` / ``val_boxes_dropped_at_conversion`` /
    ``val_boxes_clipped_at_conversion`` of ``val_dir``
    (:func:`~dino_scale.data.manifest.conversion_losses`), warned about when not 0: the AP is then
    over fewer objects than the annotation file's (the official evaluation counts them as misses)."""
    from dino_scale.data.manifest import conversion_losses

    lost = conversion_losses(val_dir)
    if lost["images_skipped"] or lost["boxes_dropped"]:
        log.warning("the validation set %s lost %d image(s) and %d box(es) at conversion (its manifest lists "
                    "why): the AP is over the rest, not over the whole annotation file", val_dir,
                    lost["images_skipped"], lost["boxes_dropped"])
    if lost["boxes_clipped"]:
        log.warning("the validation set %s holds %d box(es) clipped to their image at conversion: the AP scores "
                    "them clipped, not as the annotation file draws them across the border", val_dir,
                    lost["boxes_clipped"])
    return {"val_images_skipped_at_conversion": lost["images_skipped"],
            "val_boxes_dropped_at_conversion": lost["boxes_dropped"],
            "val_boxes_clipped_at_conversion": lost["boxes_clipped"]}


def _check_init_fits(cfg: Config, weights: str, state: dict, strict: bool = True) -> None:
    """:class:`~dino_scale.models.official.CheckpointMismatch` naming ``weights`` unless ``state``
    loads into the model of ``cfg`` as each worker loads it (:func:`check_fits`; ``strict=False``:
    missing and unexpected keys tolerated, but not a state holding under half of the model's tensors)."""
    from dino_scale.models.official import CheckpointMismatch

    try:
        check_fits(cfg.model, state, strict=strict)
    except CheckpointMismatch as exc:
        raise CheckpointMismatch(f"{weights} does not fit the model of config {cfg.name!r}: {exc}") from None


def resume_note(run_name: str, state: dict, cfg: Config, steps_per_epoch: int) -> str:
    """One line on what a run that reuses ``run_name`` does, from its checkpoint's trainer
    ``state``: where it goes on from, or that it has nothing left to train (Ray's own message
    about the run's snapshot advises deleting the folder, which a user rerunning on purpose
    should not do)."""
    if "global_step" not in state:  # a checkpoint without its trainer state (an older release's)
        return f"run {run_name!r} resumes from its latest checkpoint"
    step, epoch = int(state.get("global_step") or 0), int(state.get("epoch") or 0)
    total = cfg.train.epochs * steps_per_epoch  # the training loop's stop: this many steps, or the epochs
    if cfg.train.max_steps:                     # (an epoch that lost images to decode skips ends early)
        total = min(total, int(cfg.train.max_steps))
    if step >= total or epoch >= cfg.train.epochs:
        return (f"run {run_name!r} finished at step {step} of {total}: nothing left to train; its final weights "
                f"are reported again (a larger --max-steps or --epochs trains on; another --run-name starts a "
                f"new run)")
    return f"run {run_name!r} resumes from its checkpoint at step {step} of {total} (epoch {epoch})"


def backbone_start_note(cfg: Config) -> Optional[str]:
    """A note when a run trains its backbone from random weights where the official recipe starts
    from ImageNet weights (every backbone with published ones; ``model.backbone_weights`` unset)."""
    from dino_scale.models.backbone import IMAGENET_WEIGHTS

    if cfg.model.backbone_weights or cfg.model.backbone not in IMAGENET_WEIGHTS:
        return None
    return (f"note: model.backbone_weights is not set, so the {cfg.model.backbone} backbone starts from "
            f"random weights; the official recipe starts from ImageNet weights: --set "
            f"model.backbone_weights=imagenet (downloads {IMAGENET_WEIGHTS[cfg.model.backbone]}) or a local copy")


def check_backbone_weights(cfg: Config, init_weights: Optional[str], init_strict: bool,
                           ray_address: Optional[str], resumed_world: Optional[int] = None,
                           resumed_frozen: bool = False) -> None:
    """``model.backbone_weights`` is read by every worker as it builds the model, unless init
    weights loaded strictly or the checkpoint the run resumes from (``resumed_world``: the worker
    count that wrote it; None: a new run; ``resumed_frozen``: it holds its frozen tensors, as every
    checkpoint written since they are saved) replace every weight
    (:func:`~dino_scale.engine.elastic.reads_backbone_weights`). A local path that is not a file here failed
    every worker (FileNotFoundError, retried ``train.max_failures`` times) after Ray and the MLflow
    run had started: :class:`ConfigError` naming it when the workers run on this machine. On a
    cluster joined by address (``ray_address`` or ``RAY_ADDRESS``, as ``check_gpus_here`` of the
    pipelines decides) the file may exist on the workers only: a warning. A file here that is cut
    short (:func:`~dino_scale.models.weights_file.check_weights_file`, its structure only) is a
    ``WeightsFileError`` naming it. URLs are not checked. A new run from no weights at all logs
    :func:`backbone_start_note`."""
    from dino_scale.engine.elastic import reads_backbone_weights
    from dino_scale.models.backbone import resolve_backbone_weights

    try:
        path = resolve_backbone_weights(cfg.model.backbone, cfg.model.backbone_weights)  # None stays None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    note = backbone_start_note(cfg) if init_weights is None and resumed_world is None else None
    if note:  # said by fit itself: a caller of the API (not the pipelines) trained from random weights unwarned
        log.warning("%s", note)
    if not reads_backbone_weights(cfg, init_weights=init_weights, init_strict=init_strict, resumed_world=resumed_world,
                                  resumed_frozen=resumed_frozen) or re.match(r"^[a-z][a-z0-9+.-]*://", str(path)):
        return
    if os.path.isfile(path):
        from dino_scale.models.weights_file import check_weights_file

        check_weights_file(path)  # cut short: named here (exit 2), not in every worker after Ray started
        return
    problem = "is a directory, not a weights file" if os.path.isdir(path) else "does not exist"
    if (ray_address or os.environ.get("RAY_ADDRESS") or "local") != "local":
        log.warning("model.backbone_weights %s %s on this machine: every worker of the joined cluster must "
                    "have it at that path", path, problem)
        return
    raise ConfigError(f"model.backbone_weights {path} {problem}: every worker of this run reads it, on this "
                      f"machine; give the path of the ImageNet weights file or an http(s) URL, or "
                      f"model.backbone_weights=none to start the backbone from random weights")


def _cpu_runs_fp16() -> bool:
    """Whether this machine's CPU runs fp16 as DeepSpeed's CPU accelerator asks it to (oneDNN's
    fp16 support, e.g. AVX512-FP16 or AMX-FP16)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_worker_device(cfg: Config, ray_address: Optional[str], training: bool = True) -> None:
    """What CPU workers (``train.use_gpu`` false: ``cfg`` as the run will have it) cannot run, refused
    before Ray starts (``fit``, ``evaluate_weights``; the training pipelines call it before any data
    work):

    - ``model.msda_backend=cuda``: every worker's first forward failed ("needs CUDA tensors").
    - (``training``) ``train.precision=fp16`` on a CPU without oneDNN fp16 (:func:`_cpu_runs_fp16`):
      every worker's ``deepspeed.initialize`` raised "Type fp16 is not supported on your device".

    Both were retried ``train.max_failures`` times, after Ray and the MLflow run had started. The
    fp16 one is a :class:`ConfigError` when the workers run on this machine; on a cluster joined
    by address (as :func:`check_backbone_weights` decides) its nodes' CPUs may differ: a warning."""
    if cfg.train.use_gpu:
        return
    if cfg.model.msda_backend == "cuda":
        raise ConfigError("model.msda_backend=cuda needs GPU workers (train.use_gpu=true, --gpus 1); CPU "
                          "workers run the pytorch backend (model.msda_backend=none picks it)")
    if not training or cfg.train.precision != "fp16" or _cpu_runs_fp16():
        return
    if (ray_address or os.environ.get("RAY_ADDRESS") or "local") != "local":
        log.warning("train.precision=fp16 with CPU workers: this machine's CPU has no fp16 support (oneDNN), so "
                    "DeepSpeed refuses fp16 on CPU nodes like it; bf16 or fp32 run on any CPU")
        return
    raise ConfigError("train.precision=fp16 with CPU workers: DeepSpeed's CPU accelerator needs a CPU with fp16 "
                      "support (oneDNN), which this machine lacks; train in bf16 or fp32 on CPUs, or use GPU "
                      "workers (train.use_gpu=true, --gpus 1)")

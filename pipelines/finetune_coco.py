"""COCO fine-tuning: registry lookup -> class-head transfer -> train -> evaluate -> register.

    python -m pipelines.finetune_coco [--init models:/dino-tiny-o365@pretrained]
                                      [--data COCO_SHARDS] [--scale 1.5] [--tta] [--class-heads fresh]

``--init`` takes a registry URI (default ``models:/dino-<preset>-o365@pretrained``), a
run URI, a local checkpoint, an official ``.pth``, or ``none`` (train from scratch).
The source is recorded on the run (tags ``source.uri``, ``source.model_name``,
``source.model_version``, ``source.run_id``, and ``source.class_heads`` with ``--class-heads
fresh``) and on the registered version; a rerun that resumes a run name must start from the same
source (the alias moved: refused, see README). Class heads are mapped by category name (366 ->
91), or all initialized afresh with ``--class-heads fresh`` (the official recipe); every other
tensor comes from the source. After evaluation the
model is registered as ``dino-<preset>-coco``, its AP tagged on the version (with what it was
measured on: ``eval.data``, the validation labels' fingerprint, and ``eval.tta``), and alias
``champion`` moves to it only when that AP beats the current champion's on the same data.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from dino_scale.data.readers import reading_datasets
from dino_scale.engine.run_lock import run_lock
from pipelines import _common as common
from pipelines import _results as results
from pipelines._flags import SCRATCH
from pipelines._init import CLASS_HEADS
from pipelines._datasets import (
    categories_of, check_classes, class_overrides, resolve_datasets, stored_pixels, user_label_book,
)

EXPERIMENT = "finetune-coco"
CHAMPION = "champion"
SYNTHETIC_IMAGES = 64


def model_name(preset_name: str) -> str:
    return f"dino-{preset_name}-coco"


def default_init(preset_name: str) -> str:
    return f"models:/dino-{preset_name}-o365@pretrained"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False, prog="python -m pipelines.finetune_coco",
        description="Fine-tune DINO on COCO (or a synthetic coco-like set) from a pretrained "
                    "model, evaluate, register dino-<preset>-coco and move alias 'champion' "
                    "when the AP beats the current champion.")
    common.add_common_args(p, data_help="COCO dataset folder (shards + manifest.json), a folder with "
                                        "train/ and val/, or an annotation .json with --images; "
                                        "default: generate a synthetic coco-like set")
    p.add_argument("--init", default=None,
                   help="initial weights: models:/name@alias, models:/name/N, models:/name/latest, runs:/<id>/model, a "
                        "checkpoint folder/file, an official .pth, or 'none' for from-scratch "
                        "(default models:/dino-<preset>-o365@pretrained)")
    p.add_argument("--class-heads", choices=CLASS_HEADS, default="map",
                   help="class heads of the fine-tuned model: 'map' copies the rows of categories the initial "
                        "weights name alike (e.g. 366 Objects365 -> 91 COCO ids), 'fresh' initializes them all, as "
                        "the official fine-tuning recipe does (default map)")
    p.add_argument("--scale", type=float, default=None,
                   help="image scale factor (data.scale_factor); the paper fine-tunes at 1.5")
    p.add_argument("--tta", action="store_true", help="evaluate with test-time augmentation")
    p.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})")
    p.add_argument("--model-name", default=None, help="registered model name (default dino-<preset>-coco)")
    p.add_argument("--no-register", action="store_true",
                   help="train and evaluate only (e.g. a from-scratch baseline)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(argv)
    return 0


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """The pipeline; returns ``{"run_id", "ap", "name", "version", "promoted", ...}``."""
    with contextlib.ExitStack() as held:  # the run folder's lock when --run-name names it
        return _run(argv, held)


def check_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """``argv`` parsed and checked as :func:`run` checks it before any work (no data, Ray or MLflow run):
    a preset typo, an unknown or bad ``--set``, a flag out of range."""
    args = build_parser().parse_args(argv)
    if args.scale is not None and not (math.isfinite(args.scale) and args.scale > 0):  # nan passed "<= 0"
        raise common.UsageError("--scale must be a finite number > 0")
    common.validate_config_args(args, extra=user_label_book(args.overrides) + flag_overrides(args))
    return args


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides of ``--scale`` and ``--tta`` (checked with the rest before any work: a scale
    that leaves no pixel, or TTA without sizes, was refused only after the data and the initial
    model were prepared)."""
    return ([f"data.scale_factor={args.scale}"] if args.scale is not None else []) + (
        ["eval.tta=true"] if args.tta else [])


def _run(argv: Optional[Sequence[str]], held: contextlib.ExitStack) -> dict:
    args = check_args(argv)
    log = common.Progress("finetune")
    work_dir = Path(args.work_dir).expanduser().resolve()
    if note := common.work_dir_note(args):
        log(note)
    work_dir.mkdir(parents=True, exist_ok=True)
    if args.run_name:  # a name a live job uses: refused before any work (default names are unique)
        held.enter_context(run_lock(work_dir / "runs" / args.run_name, f"run {args.run_name!r}"))
    uri = common.setup_tracking(work_dir)
    joined = common.join_cluster_for_the_preset(args, log, extra=user_label_book(args.overrides) + flag_overrides(args))
    scratch = (args.init or "").lower() in SCRATCH
    if not scratch:
        from pipelines._init import check_exists

        # fail fast, before data generation (and before Ray starts, unless the preset waited on it)
        check_exists(args.init or default_init(common.resolve_preset_name(args.preset, common.gpus_asked(args))))
    train, val, synthetic = resolve_datasets(
        args, work_dir, "coco-like", SYNTHETIC_IMAGES, seed=1, log=log,
        require_val="fine-tuning evaluates: give a validation set with --val-data")
    # held through registration: a conversion that would rewrite them under this job is refused
    held.enter_context(reading_datasets((train, val), log))
    categories = categories_of(train)
    extra = (class_overrides(categories, args.overrides, minimum=91) + stored_pixels(args.overrides)
             + flag_overrides(args))
    early_ray = common.config_needs_cluster(args)  # the default preset and GPU use look at the cluster
    if early_ray and not joined:
        log(f"Ray: {common.connect_ray()}")
    cfg = common.build_config(args, extra=extra)
    check_classes(cfg, categories, train)
    name = args.model_name or model_name(cfg.name)
    init = None if scratch else (args.init or default_init(cfg.name))
    run_name = args.run_name or common.default_run_name(f"finetune-{cfg.name}-{'scratch' if scratch else 'init'}")

    tags = {"stage": "finetune", "synthetic_data": str(synthetic).lower(),
            "init": "scratch" if scratch else init}
    init_dir = None
    lineage: dict = {"init": tags["init"]}
    if init is not None:
        from pipelines._init import check_exists, prepare_init

        check_exists(init)
        prepared = prepare_init(init, cfg, categories, work_dir / "init" / run_name, log=log,
                                class_heads=args.class_heads)
        init_dir = str(prepared.path)
        tags.update(prepared.lineage)
        lineage.update(prepared.lineage)
        lineage["class_transfer"] = prepared.summary
    else:
        log("from scratch: no initial weights" + (" (--class-heads fresh changes nothing: every tensor is fresh)"
                                                  if args.class_heads == "fresh" else ""))
    if not early_ray:
        log(f"Ray: {common.connect_ray()}")
    common.check_gpus_here(cfg, args)
    if note := common.device_note(cfg, args):
        log(note)
    log(f"preset {cfg.name}: {cfg.model.num_classes} classes, scale {cfg.data.scale_factor}, "
        f"{cfg.train.num_workers} {'GPU' if cfg.train.use_gpu else 'CPU'} worker(s), ZeRO-{cfg.train.zero_stage}, "
        f"max_steps={cfg.train.max_steps} epochs={cfg.train.epochs} {common.schedule_text(cfg)}, tta={cfg.eval.tta}")
    log(f"training on {train} (val: {val}); MLflow store {uri}")
    from dino_scale.engine import fit

    from dino_scale.config import ConfigError

    try:
        result = fit(cfg, train, val, work_dir / "runs" / run_name, run_name, init_weights=init_dir,
                     experiment=args.experiment, tags=tags, lineage=lineage)
    except ConfigError:  # refused before training (a resumed run of other weights): nothing uses the folder
        if init_dir is not None and prepared.created:
            shutil.rmtree(init_dir, ignore_errors=True)
        raise
    ap = results.result_ap(result)
    log(f"training done: run {result.run_id}, AP {'-' if ap is None else f'{ap:.4f}'}")
    print()
    print(f"MLflow run        : {result.run_id} (experiment {args.experiment}, store {uri})")
    print(f"Initial weights   : {init or 'none (from scratch)'}")
    print(f"AP (val)          : {'-' if ap is None else f'{ap:.4f}'}")
    if note := results.conversion_note(result.metrics or {}):
        print(note)
    summary = {"run_id": result.run_id, "ap": ap, "metrics": dict(result.metrics), "init": init,
               "name": None, "version": None, "promoted": False, "tracking_uri": uri}
    if args.no_register:
        return summary
    version_tags = {k: v for k, v in tags.items() if k.startswith("source.")}
    from dino_scale.tracking import store_client
    from pipelines._datasets import eval_fingerprint
    from pipelines.champion import EVAL_DATA_TAG, EVAL_TTA_TAG, SYNTHETIC_TAG, promote_if_better, tta_protocol

    version_tags.update({"stage": "finetune", "preset": cfg.name, "init": tags["init"],
                         SYNTHETIC_TAG: tags["synthetic_data"]})

    # what the AP was measured on: @champion moves only over an AP of the same data and protocol
    version_tags.update({EVAL_DATA_TAG: eval_fingerprint(val), EVAL_TTA_TAG: tta_protocol(cfg)})
    version = results.register(result, name, alias=None, categories=categories, tags=version_tags,
                               stage="python -m pipelines.finetune_coco")

    print(f"Registered model  : {name} version {version}", flush=True)  # said before a promotion that may fail
    with results.alias_note(name, version, CHAMPION, result.tracking_uri, "--if-better"):
        promo = promote_if_better(name, version, ap, alias=CHAMPION, client=store_client(result.tracking_uri))
    print(f"Champion          : {'moved to v' + version if promo.promoted else 'unchanged'} ({promo.reason})")
    print(f"Model URI         : models:/{name}/{version}"
          + (f"  (= models:/{name}@{CHAMPION})" if promo.promoted else ""))
    print(f"Checkpoint        : {results.result_checkpoint(result)}")
    summary.update({"name": name, "version": version, "promoted": promo.promoted, "reason": promo.reason})
    return summary


if __name__ == "__main__":
    sys.exit(common.run_main(main))

"""Objects365 pretraining -> registered model ``dino-<preset>-o365@pretrained``.

    python -m pipelines.pretrain_o365 [--data O365_SHARDS | --data ann.json --images DIR]
                                      [--preset tiny] [--set train.lr=2e-4] [--max-steps N]

Joins the Ray cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else starts
an embedded local Ray. Without ``--data`` a synthetic ``o365-like`` set is generated in
the work folder. Logs to MLflow experiment ``pretrain-o365`` and ends by registering the
model with alias ``pretrained`` and printing where everything is.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Optional, Sequence

from dino_scale.data.readers import reading_datasets
from dino_scale.engine.run_lock import run_lock
from pipelines import _common as common
from pipelines import _results as results
from pipelines._datasets import (
    categories_of, check_classes, class_overrides, resolve_datasets, stored_pixels, user_label_book,
)

EXPERIMENT = "pretrain-o365"
ALIAS = "pretrained"
SYNTHETIC_IMAGES = 64


def model_name(preset_name: str) -> str:
    return f"dino-{preset_name}-o365"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False, prog="python -m pipelines.pretrain_o365",
        description="Pretrain DINO on Objects365 (or a synthetic o365-like set) and register "
                    "it as dino-<preset>-o365 with alias 'pretrained'.")
    common.add_common_args(p, data_help="Objects365 dataset folder (shards + manifest.json), a "
                                        "folder with train/ and val/, or an annotation .json with "
                                        "--images; default: generate a synthetic o365-like set")
    p.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})")
    p.add_argument("--model-name", default=None, help="registered model name (default dino-<preset>-o365)")
    # None until checked: the default needs no check, and the check imports MLflow (~2 s)
    p.add_argument("--alias", default=None, help=f"alias set on the new version (default {ALIAS})")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(argv)
    return 0


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """The pipeline; returns ``{"name", "version", "run_id", "ap", "uri", ...}``."""
    with contextlib.ExitStack() as held:  # the run folder's lock when --run-name names it
        return _run(argv, held)


def check_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """``argv`` parsed and checked as :func:`run` checks it before any work (no data, Ray or MLflow run):
    a preset typo, an unknown or bad ``--set``, a flag out of range."""
    args = build_parser().parse_args(argv)
    common.validate_config_args(args, extra=user_label_book(args.overrides))
    return args


def _run(argv: Optional[Sequence[str]], held: contextlib.ExitStack) -> dict:
    args = check_args(argv)
    log = common.Progress("pretrain")
    if args.alias is None:  # not given (an empty --alias stays MLflow's to refuse, above)
        args.alias = ALIAS
    work_dir = Path(args.work_dir).expanduser().resolve()
    if note := common.work_dir_note(args):
        log(note)
    work_dir.mkdir(parents=True, exist_ok=True)
    if args.run_name:  # a name a live job uses: refused before any work (default names are unique)
        held.enter_context(run_lock(work_dir / "runs" / args.run_name, f"run {args.run_name!r}"))
    uri = common.setup_tracking(work_dir)  # (a tracking server that does not answer: before any data work)
    joined = common.join_cluster_for_the_preset(args, log, extra=user_label_book(args.overrides))
    train, val, synthetic = resolve_datasets(args, work_dir, "o365-like", SYNTHETIC_IMAGES,
                                             seed=0, log=log)
    # held through registration: a conversion that would rewrite them under this job is refused
    held.enter_context(reading_datasets((train, val), log))
    categories = categories_of(train)
    early_ray = common.config_needs_cluster(args)  # the default preset and GPU use look at the cluster
    if early_ray and not joined:
        log(f"Ray: {common.connect_ray()}")
    cfg = common.build_config(args, extra=class_overrides(categories, args.overrides, minimum=366)
                              + stored_pixels(args.overrides))
    check_classes(cfg, categories, train)
    if not early_ray:
        log(f"Ray: {common.connect_ray()}")
    common.check_gpus_here(cfg, args)
    if note := common.device_note(cfg, args):
        log(note)
    name = args.model_name or model_name(cfg.name)
    run_name = args.run_name or common.default_run_name(f"pretrain-{cfg.name}")
    log(f"preset {cfg.name}: {cfg.model.backbone}, {cfg.model.num_classes} classes, "
        f"{cfg.train.num_workers} {'GPU' if cfg.train.use_gpu else 'CPU'} worker(s), ZeRO-{cfg.train.zero_stage}, "
        f"max_steps={cfg.train.max_steps} epochs={cfg.train.epochs} {common.schedule_text(cfg)}")
    log(f"training on {train} (val: {val or 'none'}); MLflow store {uri}")

    from dino_scale.engine import fit
    from pipelines.champion import SYNTHETIC_TAG

    result = fit(cfg, train, val, work_dir / "runs" / run_name, run_name, experiment=args.experiment,
                 tags={"stage": "pretrain", "synthetic_data": str(synthetic).lower()},
                 evaluate=val is not None)
    log(f"training done: run {result.run_id}")
    version = results.register(result, name, alias=None, categories=categories,
                               stage="python -m pipelines.pretrain_o365",
                               tags={"stage": "pretrain", "preset": cfg.name, SYNTHETIC_TAG: str(synthetic).lower()})
    with results.alias_note(name, version, args.alias, result.tracking_uri, synthetic=synthetic):
        kept = results.move_alias(result, name, args.alias, version, synthetic)
    ap = results.result_ap(result)
    print()
    print(f"Registered model  : {name} version {version}" + (f" (alias @{args.alias})" if kept is None else ""))
    if kept is not None:
        print(f"Alias             : {kept}")
    print(f"Model URI         : models:/{name}" + (f"/{version}" if kept else f"@{args.alias}"))
    print(f"MLflow run        : {result.run_id} (experiment {args.experiment})")
    print(f"MLflow store      : {uri}")
    print(f"Checkpoint        : {results.result_checkpoint(result)}")
    print(f"Data              : train {train}; val {val or '-'}")
    print(f"AP (val)          : {'-' if ap is None else f'{ap:.4f}'}")
    if note := results.conversion_note(result.metrics or {}):
        print(note)
    init = (f" --init models:/{name}/{version}" if kept else
            "" if (name, args.alias) == (model_name(cfg.name), ALIAS) else f" --init models:/{name}@{args.alias}")
    print(f"Next              : python -m pipelines.finetune_coco --work-dir {args.work_dir} "
          f"--preset {cfg.name}{init}")
    return {"name": name, "version": version, "alias": args.alias, "alias_moved": kept is None,
            "run_id": result.run_id, "ap": ap,
            "metrics": dict(result.metrics), "tracking_uri": uri, "train": train, "val": val}


if __name__ == "__main__":
    sys.exit(common.run_main(main))

"""COCO AP of any model on a dataset: registry URI, run URI, checkpoint or official .pth.

    python -m pipelines.evaluate --model models:/dino-tiny-coco@champion [--data COCO_VAL]
    python -m pipelines.evaluate --model checkpoint_0011.pth --preset r50_4scale \\
        --data val2017.json --images val2017/

Runs the distributed evaluation of the engine (Ray Train workers, pycocotools) and
prints the AP table; logs a run in MLflow experiment ``evaluate``. Without ``--data`` the
validation set recorded in the model's lineage is used when it is on this machine, else the
synthetic validation set of the matching flavour (generated when missing; with a note when the
lineage names a validation set that is not on this machine).
A model that carries its config (everything this project trains) uses it; an official
``.pth`` needs ``--preset`` (its class count is read from the checkpoint). Workers and GPUs
are this machine's (``--workers``, ``--gpus``; default one worker, on a GPU when there is
one), not the training run's. Exit status 0 when an AP was measured; 1 when none was (NaN:
no image evaluated, no object in the ground truth, no finite detection) or on failure; 2 on
bad usage.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from dino_scale.engine.run_lock import run_lock
from pipelines import _common as common
from pipelines._datasets import categories_of, stored_pixels, synthetic_dirs, whole_dataset
from pipelines._results import conversion_note

EVALUATIONS = "evaluations"  # <work-dir>/evaluations/<run name>: apart from the training runs
EXPERIMENT = "evaluate"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False, prog="python -m pipelines.evaluate",
        description="COCO box AP table of a registered model, run, checkpoint or official .pth.")
    p.add_argument("--model", required=True,
                   help="models:/name@alias, models:/name/N, models:/name/latest, runs:/<id>/model, a checkpoint "
                        "folder/file, or an official .pth (then give --preset)")
    common.add_common_args(p, training=False,
                           data_help="evaluation dataset folder (shards + manifest.json), a folder with "
                                     "val/ (its val split), or an annotation .json with --images; default: "
                                     "the validation set the model was evaluated on at training (when it is "
                                     "here), else "
                                     "the synthetic validation set of the model's flavour")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (eval.tta)")
    p.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})")
    return p


def format_table(metrics: dict, title: str) -> str:
    """The AP table in %. A metric pycocotools reports as -1 (the ground truth has no object of
    that size) or NaN (no AP measured: no image evaluated, no finite detection) is '-' with a
    line saying which, never '-100.00' or 'nan'."""
    values = {m: float(metrics.get(m, float("nan"))) for m in METRICS}
    head = " | ".join(f"{m:>6}" for m in METRICS)
    vals = " | ".join(f"{100 * v:6.2f}" if v >= 0 else f"{'-':>6}" for v in values.values())  # NaN >= 0: False
    notes = []
    absent = [m for m, v in values.items() if v < 0]
    if absent:
        notes.append(f"{', '.join(absent)}: the ground truth has no objects of that size")
    if all(math.isnan(v) for v in values.values()):
        notes.append("no AP was measured (no val image evaluated, no detection with a finite score and box, or a "
                     "ground truth without an object that is not a crowd region)")
    return "\n".join([title, head, vals] + notes)


def label_space_check(model_categories: Optional[list[dict]], num_classes: int, data_categories: list[dict],
                      data: str) -> Optional[str]:
    """The model's class index i is scored as the dataset's category id i. :class:`UsageError`
    when the class head (``num_classes``) holds no index for some category id of ``data``;
    a warning line (else None) when the model's categories (its ``categories.json``, when known)
    name some of ``data``'s ids otherwise: another label space, whose AP would mean nothing."""
    need = max((int(c["id"]) for c in data_categories), default=-1) + 1
    if need > num_classes:
        raise common.UsageError(f"{data} has category ids up to {need - 1}, but the model's class head has "
                                f"{num_classes} classes (class index = category id): it was trained on another "
                                f"label space; fine-tune it on this one (class heads are mapped by name)")
    if model_categories is None:
        return None
    names = {int(c["id"]): str(c["name"]).strip().lower() for c in model_categories}
    differ = [c for c in data_categories if names.get(int(c["id"])) != str(c["name"]).strip().lower()]
    if not differ:
        return None
    c = differ[0]
    there = names.get(int(c["id"]))
    return (f"warning: {len(differ)} of {len(data_categories)} categories of {data} are not the model's classes "
            f"of the same id (id {c['id']} is {c['name']!r} here, "
            f"{'absent' if there is None else repr(there)} in the model): its AP scores class index i as "
            f"category id i, so it means little; fine-tune on this label space (class heads are mapped by name)")


def check_eval_settings(cfg) -> None:
    """:class:`ConfigError` (exit 2) for a ``model.*`` setting the model cannot be built with
    (``num_select`` < 1: the detections kept per image; the denoising label book) or an unusable
    ``eval.*`` (batch size, TTA scales) of ``cfg`` (the model's config with ``--set`` and
    ``--tta``): before a val set is generated or Ray starts, not in every worker."""
    from dino_scale.config_checks import check_eval_config, check_model_config

    check_model_config(cfg.model)
    check_eval_config(cfg)


def exit_status(metrics: dict) -> tuple[int, Optional[str]]:
    """``(0, None)`` when an AP was measured, else ``(1, reason)``: a NaN or missing AP (no val
    image evaluated, no object in the ground truth, no finite detection) is no result, and a
    script that goes on to compare or promote on it must not read it as a success."""
    ap = metrics.get("AP")
    try:
        measured = ap is not None and not math.isnan(float(ap))
    except (TypeError, ValueError):
        measured = False
    if measured:
        return 0, None
    return 1, "no AP was measured (see the lines above the table); exit status 1"


def main(argv: Optional[Sequence[str]] = None) -> int:
    status, reason = exit_status(run(argv)["metrics"])
    if reason:
        print(f"error: {reason}", file=sys.stderr, flush=True)
    return status


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """The pipeline; returns ``{"metrics", "run_id", "val"}``."""
    args = build_parser().parse_args(argv)
    log = common.Progress("evaluate")
    common.validate_config_args(args)
    work_dir = Path(args.work_dir).expanduser().resolve()
    if note := common.work_dir_note(args):
        log(note)
    # the checks first, creating nothing: a mistyped --model or --data left an empty ./runs behind
    common.setup_tracking(work_dir, create=False)
    from pipelines._init import check_exists, is_remote, resolve

    check_exists(args.model)
    if args.data is not None:  # a mistyped --data is said before a registry model is downloaded and read
        from pipelines._datasets import _one

        _one(args.data, args.images, work_dir, "dataset path", log, convert=False, split="val")
    work_dir.mkdir(parents=True, exist_ok=True)
    uri = common.setup_tracking(work_dir)
    run_name = args.run_name or common.default_run_name("evaluate")
    download = work_dir / "eval" / run_name  # a registry/run model is downloaded here, removed at the end
    # before the download: a second job of this run name replaced, then removed, the first one's
    with run_lock(work_dir / EVALUATIONS / run_name, f"evaluation run {run_name!r}"):
        try:
            return _evaluate(args, log, work_dir, uri, run_name, resolve(args.model, download / "source"))
        finally:
            if is_remote(args.model):  # never a user's own files
                shutil.rmtree(download, ignore_errors=True)


def use_own_image_roots(cfg, args: argparse.Namespace, val: str, trained_val: Optional[str], log) -> None:
    """A validation set other than the model's own (``--data``, or a synthetic one) is read from the
    image root its manifest records: the model's config carried its training run's
    ``data.image_root`` / ``data.val_image_root`` (set with ``--set`` where that cluster keeps the
    images), which were applied to it. The set was refused for a folder absent here, or scored on
    the other folder's files of the same names. Those set in this call stay; each dropped is said."""
    def folders(spec: Optional[str]) -> set:
        return {Path(p).expanduser().resolve() for p in str(spec).split(",")} if spec else set()

    if folders(val) == folders(trained_val):
        return
    user = {o.split("=", 1)[0].strip() for o in (args.overrides or [])}
    for key in ("image_root", "val_image_root"):
        value = getattr(cfg.data, key)
        if value is not None and f"data.{key}" not in user:
            setattr(cfg.data, key, None)
            log(f"note: data.{key}={value} of the model's training run is not applied to {val} (not the "
                f"set it was trained with): its images are read where its manifest says (--set data.{key}=... "
                f"to change that)")


def _evaluate(args, log, work_dir: Path, uri: str, run_name: str, resolved) -> dict:
    from pipelines._init import lineage_tags

    held = None  # [the weights' state dict] when read here (a model without config)
    joined = False  # Ray joined for the default preset (the cluster's GPUs)
    if resolved.config is not None:
        cfg = resolved.config
        if args.preset is not None and args.preset != cfg.name:
            log(f"note: --preset {args.preset} ignored; the model carries its config ({cfg.name})")
        from dino_scale.config import apply_overrides

        cfg.model.msda_backend = None  # where it runs is this run's choice (trained on cuda, evaluated on CPU)
        apply_overrides(cfg, list(args.overrides))
    else:
        from pipelines._init import _source_state, check_fits_preset, head_sizes

        state = _source_state(resolved.weights_path)
        extra = head_sizes(state)
        if args.preset is None and common.config_needs_cluster(args):
            log(f"Ray: {common.connect_ray()}")  # the default preset looks at the cluster's GPUs, not this node's
            joined = True
        name = common.resolve_preset_name(args.preset, common.gpus_asked(args))  # --gpus 0: tiny, as training
        if args.preset is None:
            log(f"note: the model carries no config; using the default preset {name} (give --preset)")
        extra += stored_pixels(args.overrides)  # as pretraining and fine-tuning read COCO-style data
        cfg = common.preset(name, extra + list(args.overrides))
        check_fits_preset(args.model, state, cfg, args.preset is not None)  # else every worker fails loading it
        held = [state]  # the engine takes it from here (the file was read once)
        del state
    common.apply_flags(cfg, args)
    if args.tta:
        cfg.eval.tta = True
    check_eval_settings(cfg)
    trained_val = (resolved.lineage or {}).get("val_dir")
    if args.data is None and trained_val and all(Path(p).is_dir() for p in str(trained_val).split(",")):
        val = str(trained_val)
        log("no --data: using the validation set recorded in the model's lineage")
    elif args.data is None:
        if trained_val:  # recorded relative by an older release, or on another machine
            log(f"note: the validation set in the model's lineage ({trained_val}) is not here; "
                f"using a synthetic one (give --data)")
        else:  # an official .pth, a folder copied without its lineage.json: a real model scored on generated images
            log("note: the model records no validation set (no lineage.json beside its weights); using a "
                "synthetic one (give --data)")
        flavour = "o365-like" if cfg.model.num_classes >= 366 else "coco-like"
        seed = 0 if flavour == "o365-like" else 1  # the pipelines' default sets
        (val,) = synthetic_dirs(work_dir, flavour, 64, seed, log, splits=("val",))
    else:
        from pipelines._datasets import _one

        val = _one(args.data, args.images, work_dir, "dataset path", log, split="val")
    whole_dataset(val)
    if resolved.config is not None:
        use_own_image_roots(cfg, args, val, trained_val, log)
    from pipelines._init import _source_categories

    val_categories = categories_of(val)
    n_cats = len(val_categories)
    mismatch = label_space_check(_source_categories(resolved), cfg.model.num_classes, val_categories, val)
    if mismatch:
        print(mismatch, file=sys.stderr, flush=True)
    if not joined:
        log(f"Ray: {common.connect_ray()}")
    common.set_eval_resources(cfg, args, log)
    common.check_gpus_here(cfg, args)
    log(f"evaluating {args.model} ({cfg.name}, {cfg.model.num_classes} classes, tta={cfg.eval.tta}) "
        f"on {val} ({n_cats} categories), {cfg.train.num_workers} worker(s), "
        f"{'GPU' if cfg.train.use_gpu else 'CPU'}")
    from dino_scale.engine import evaluate_weights

    tags = {**lineage_tags(resolved), "stage": "evaluate"}
    # its own folder tree: under runs/ a --run-name of a training run rewrote that run's final/
    # config and lineage, and Ray Train took the training run's checkpoints for this run's
    # absolute: the lineage records it (a relative path named nothing read from another folder)
    result = evaluate_weights(cfg, str(Path(resolved.weights_path).resolve()), val, work_dir / EVALUATIONS / run_name,
                              run_name, experiment=args.experiment, tags=tags, weights_state=held)
    print()
    print(format_table(result.metrics, f"COCO box AP (%) of {args.model} on {val}"))
    unevaluated = int(result.metrics.get("images_unevaluated") or 0)
    if unevaluated:
        print(f"warning: {unevaluated} val image(s) could not be decoded and were not evaluated; their objects "
              f"count as misses in the AP (image ids in the workers' log)")
    if note := conversion_note(result.metrics):
        print(note)
    print(f"MLflow run: {result.run_id} (experiment {args.experiment}, store {uri}); detections and lineage in "
          f"{work_dir / EVALUATIONS / run_name / 'final'}")
    return {"metrics": dict(result.metrics), "run_id": result.run_id, "val": val}


if __name__ == "__main__":
    sys.exit(common.run_main(main))

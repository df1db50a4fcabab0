"""``make demo``: pretrain -> fine-tune -> evaluate on embedded defaults, then the registry.

Embedded defaults: a local Ray (or the cluster ``RAY_ADDRESS`` names, as under ``ray job
submit``), sqlite MLflow in ``<work-dir>/mlflow.db``, synthetic
data (``o365-like`` for pretraining, ``coco-like`` for fine-tuning), the CPU ``tiny``
preset. Steps:

1. ``pipelines.pretrain_o365`` -> ``dino-tiny-o365@pretrained``
2. ``pipelines.finetune_coco`` from ``models:/dino-tiny-o365@pretrained`` (class heads
   mapped by name) -> ``dino-tiny-coco`` (+ ``@champion`` when its AP is the best)
3. the same fine-tuning from scratch, same budget (not registered), for comparison
4. ``pipelines.evaluate`` of ``models:/dino-tiny-coco@champion``
5. prints both APs, the wall time and the registry: both models, aliases, lineage.

    python -m pipelines.demo [--work-dir runs/demo] [--fresh] [--pretrain-steps N]
                             [--finetune-steps N] [--no-scratch] [--gpus 0|1]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from pipelines import _common as common

PRESET = "tiny"
# Demo budget (<= 15 min on 2 CPU cores): fewer intermediate checkpoints. (Measured: lr 1e-3
# instead of the preset's 2e-4 made both stages worse at this budget: AP 0.00 / 0.03.)
DEMO_OVERRIDES = ["train.checkpoint_every_steps=100"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m pipelines.demo",
                                description="pretrain -> fine-tune -> evaluate on a laptop (CPU, "
                                            "local Ray, sqlite MLflow, synthetic data, tiny preset)")
    p.add_argument("--work-dir", default="runs/demo", help="demo work folder (default runs/demo)")
    p.add_argument("--fresh", action="store_true", help="delete the work folder first")
    p.add_argument("--pretrain-images", type=int, default=384, help="synthetic o365-like training images (default 384)")
    p.add_argument("--finetune-images", type=int, default=192, help="synthetic coco-like training images (default 192)")
    p.add_argument("--pretrain-steps", type=int, default=200, help="pretraining optimizer steps (default 200)")
    p.add_argument("--finetune-steps", type=int, default=100, help="fine-tuning optimizer steps (default 100)")
    p.add_argument("--no-scratch", action="store_true", help="skip the from-scratch comparison run")
    p.add_argument("--gpus", type=int, default=None, choices=(0, 1),
                   help="1: every stage on one GPU worker; default CPU (0), unless --set train.use_gpu says "
                        "otherwise (a stage's own default takes a GPU whenever the machine has one)")
    p.add_argument("--set", dest="overrides", action=common.OverrideAction, default=[], metavar="KEY=VALUE",
                   help=f"extra config override for every stage (repeatable; applied after the "
                        f"demo's own: {' '.join(DEMO_OVERRIDES)})")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def stage_overrides(user: Sequence[str]) -> list[str]:
    """The ``--set`` list each stage gets: the demo's own, less the keys the user sets, then the
    user's (a stage refuses a key given twice with two values)."""
    keys = {o.split("=", 1)[0] for o in user}
    return [o for o in DEMO_OVERRIDES if o.split("=", 1)[0] not in keys] + list(user)


def _gpu_args(gpus: Optional[int], user: Sequence[str]) -> list[str]:
    """``--gpus`` for each stage, evaluation included: the demo runs on CPU (its docs, its 15-minute
    budget) unless its ``--gpus`` or a ``--set train.use_gpu`` says otherwise; without a word a stage
    took a GPU whenever the machine had one."""
    if gpus is None:
        said = [o.split("=", 1)[1].strip().lower() for o in user if o.split("=", 1)[0].strip() == "train.use_gpu"]
        gpus = 1 if said and said[-1] in ("true", "1", "yes", "on") else 0
    return ["--gpus", str(gpus)]


def stage_args(work: Path, gpus: Optional[int], user: Sequence[str]) -> list[str]:
    """The arguments every training stage gets: work folder, preset, device, ``--set`` list."""
    base = ["--work-dir", str(work), "--preset", PRESET] + _gpu_args(gpus, user)
    for o in stage_overrides(user):
        base += ["--set", o]
    return base


def evaluate_args(name: str, work: Path, gpus: Optional[int], user: Sequence[str]) -> list[str]:
    """The evaluate stage's arguments: the champion, the device, and the user's ``--set`` (the
    demo's own are training settings); without them it ran on what the model's config holds
    less what evaluate drops (``train.cpus_per_worker``...), though the help says every stage."""
    return (["--model", f"models:/{name}@champion", "--work-dir", str(work)] + _gpu_args(gpus, user)
            + [x for o in user for x in ("--set", o)])


def _fmt(ap: Optional[float]) -> str:
    return "-" if ap is None else f"{100 * ap:.2f}"


def use_own_store(work: Path, log) -> str:
    """Point MLflow at ``<work>/mlflow.db`` whatever the environment says (returns the URI): with
    ``MLFLOW_TRACKING_URI`` set (a team's server), the demo registered its dino-tiny-* models and
    moved their aliases there, and ``--fresh`` did not reset them."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        if os.environ.get(var):
            log(f"note: {var}={os.environ[var]} is not used: the demo keeps its runs and registry in "
                f"{work / 'mlflow.db'}")
            del os.environ[var]
    return common.setup_tracking(work)


# what a demo work folder holds (its store, data, runs ...): --fresh removes a folder holding nothing else
_DEMO_ENTRIES = frozenset({"mlartifacts", "data", "runs", "init", "evaluations", "eval", "ray", ".run.lock"})


def check_fresh_removable(work: Path) -> None:
    """:class:`UsageError` unless ``work`` looks like a demo work folder (only what a demo writes)
    and is not the current folder, one above it or the home folder: ``--work-dir . --fresh``
    deleted the folder the user stood in, whatever it held."""
    here, home = Path.cwd().resolve(), Path.home().resolve()
    if work == home or here == work or here.is_relative_to(work):
        raise common.UsageError(f"--fresh would remove {work}, which holds the current folder or is the home "
                                f"folder: give the demo its own --work-dir")
    other = sorted(p.name for p in work.iterdir()  # (the store: mlflow.db, its .lock, -journal, -wal ...)
                   if p.name not in _DEMO_ENTRIES and not p.name.startswith("mlflow.db"))
    if other:
        raise common.UsageError(f"--fresh would remove {work}, which holds more than a demo's output "
                                f"({', '.join(other[:5])}{' ...' if len(other) > 5 else ''}): give the demo its "
                                f"own --work-dir, or remove that folder yourself")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("pretrain_images", "finetune_images", "pretrain_steps", "finetune_steps"):
        if getattr(args, flag) < 1:  # checked before anything runs, not after pretraining
            raise common.UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    cfg = common.preset(PRESET, stage_overrides(args.overrides))  # a bad --set, before Ray starts
    for o in args.overrides:  # keys each stage sets from the demo's own flags (was: silently replaced)
        key = o.split("=", 1)[0]
        if key == "train.max_steps":
            raise common.UsageError(f"--set {o}: the demo's stages train --pretrain-steps and --finetune-steps "
                                    f"steps; give those")
        if key in ("data.train", "data.val"):
            raise common.UsageError(f"--set {o}: the demo trains on synthetic sets it makes "
                                    f"(python -m pipelines.pretrain_o365 --data ... for yours)")
    for flag in ("pretrain_images", "finetune_images"):  # each stage trains at least one step
        if getattr(args, flag) < cfg.train.global_batch_size:
            raise common.UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is fewer than one "
                                    f"global batch ({cfg.train.global_batch_size})")
    from pipelines import evaluate, finetune_coco, pretrain_o365

    work = Path(args.work_dir).expanduser().resolve()
    base = stage_args(work, args.gpus, args.overrides)
    pre_args = base + ["--max-steps", str(args.pretrain_steps), "--synthetic-images", str(args.pretrain_images)]
    ft_args = base + ["--max-steps", str(args.finetune_steps), "--synthetic-images", str(args.finetune_images)]
    # each training stage's own up-front checks (worker counts, model, schedule), before Ray starts:
    # a bad --set was refused by the first stage, after Ray had started
    pretrain_o365.check_args(pre_args)
    finetune_coco.check_args(ft_args)
    t0 = time.monotonic()
    log = common.Progress("demo")
    if args.fresh and work.exists():
        check_fresh_removable(work)
        log(f"removing {work}")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    use_own_store(work, log)
    log(f"Ray: {common.connect_ray()}")

    from pipelines.registry import format_state, registry_state

    timings = {}
    log(f"1/4 pretraining on synthetic o365-like data ({args.pretrain_steps} steps)")
    t = time.monotonic()
    pre = pretrain_o365.run(pre_args)
    timings["pretrain"] = time.monotonic() - t
    log(f"2/4 fine-tuning from models:/{pre['name']}@{pre['alias']} ({args.finetune_steps} steps)")
    t = time.monotonic()
    ft = finetune_coco.run(ft_args)
    timings["finetune"] = time.monotonic() - t
    scratch = None
    if not args.no_scratch:
        log(f"3/4 the same fine-tuning from scratch ({args.finetune_steps} steps, not registered)")
        t = time.monotonic()
        scratch = finetune_coco.run(ft_args + ["--init", "none", "--no-register"])
        timings["scratch"] = time.monotonic() - t
    else:
        log("3/4 from-scratch comparison skipped (--no-scratch)")
    from dino_scale.tracking.registry import get_version_by_alias

    champion = get_version_by_alias(ft["name"], "champion")  # this run's version, or an earlier better one
    champion_v = str(champion.version) if champion is not None else "?"
    log(f"4/4 evaluating models:/{ft['name']}@champion (v{champion_v})")
    t = time.monotonic()
    ev = evaluate.run(evaluate_args(ft["name"], work, args.gpus, args.overrides))
    timings["evaluate"] = time.monotonic() - t
    wall = time.monotonic() - t0

    print()
    print("=" * 78)
    print("dino_scale demo: results (COCO box AP in %, synthetic coco-like val set)")
    print("=" * 78)
    print(f"pretrained model      : {pre['name']} v{pre['version']} @pretrained, "
          f"AP {_fmt(pre['ap'])} on its o365-like val set")
    print(f"fine-tuned (from o365): {ft['name']} v{ft['version']}  AP {_fmt(ft['ap'])}  "
          f"({args.finetune_steps} steps)  champion: {ft.get('reason', '-')}")
    if scratch is not None:
        print(f"fine-tuned (scratch)  : AP {_fmt(scratch['ap'])}  (same {args.finetune_steps} steps, "
              f"run {scratch['run_id']})")
        if ft["ap"] is not None and scratch["ap"] is not None:
            diff = 100 * (ft["ap"] - scratch["ap"])
            print(f"pretraining effect    : {diff:+.2f} AP points")
    print(f"@champion re-evaluated: v{champion_v}, AP {_fmt(ev['metrics'].get('AP'))}"
          + ("" if champion_v == str(ft["version"]) else
             f"  (an earlier version than this run's v{ft['version']}, on its own validation set)"))
    print(f"wall time             : {wall / 60:.1f} min ("
          + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + ")")
    print(f"MLflow store          : {common.tracking_uri(work)}")
    print()
    print("Registry (models, versions, aliases, AP, lineage):")
    print(format_state(registry_state(names=[pre["name"], ft["name"]])))
    print()
    # the store named: with MLFLOW_TRACKING_URI exported (which the demo set aside), `--work-dir`
    # alone listed the team server's registry
    print(f"Inspect: MLFLOW_TRACKING_URI={common.tracking_uri(work)} .venv/bin/dino-scale registry list")
    print(f"         .venv/bin/mlflow ui --backend-store-uri {common.tracking_uri(work)}")
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))

"""Shared pipeline options and the top-level error handler."""
from __future__ import annotations

import argparse
import re

import pytest
import torch

from dino_scale.config import ConfigError, preset
from pipelines import _common as common


def _parse(argv):
    p = argparse.ArgumentParser()
    common.add_common_args(p, data_help="data")
    return p.parse_args(argv)


def test_pipelines_common_flags_map_to_config():
    args = _parse(["--preset", "tiny", "--set", "train.lr=3e-4", "--set", "model.num_queries=30",
                   "--workers", "2", "--gpus", "0", "--zero-stage", "3", "--max-steps", "7", "--epochs", "2"])
    cfg = common.build_config(args, extra=["model.num_classes=91", "train.lr=1e-5"])
    assert cfg.name == "tiny" and cfg.model.num_classes == 91
    assert cfg.train.lr == 3e-4  # --set wins over the pipeline's extra overrides
    assert cfg.model.num_queries == 30
    assert (cfg.train.num_workers, cfg.train.use_gpu, cfg.train.zero_stage) == (2, False, 3)
    assert (cfg.train.max_steps, cfg.train.epochs) == (7, 2)
    with pytest.raises(common.UsageError, match="--workers"):
        common.build_config(_parse(["--preset", "tiny", "--workers", "0"]))
    elastic = common.build_config(_parse(["--preset", "tiny", "--workers", "4", "--min-workers", "2",
                                          "--set", "train.global_batch_size=8"]))
    assert (elastic.train.min_workers, elastic.train.num_workers) == (2, 4)
    with pytest.raises(common.UsageError, match="--min-workers"):
        common.build_config(_parse(["--preset", "tiny", "--min-workers", "0"]))


@pytest.mark.parametrize("gpus_here", [False, True])
def test_the_default_preset_follows_what_the_user_asks_of_gpus(gpus_here, monkeypatch):
    """Without --preset the default followed the GPUs this machine (or cluster) has, whatever
    --gpus said: --gpus 8 on a GPU-less head trained the CPU demo model on 8 GPUs (registered as
    the pretrained model), --gpus 0 on a GPU node ResNet-50 on the CPU. Unsaid, the machine decides."""
    monkeypatch.setattr(common, "_gpus_available", lambda: gpus_here)
    asked = {("--gpus", "1"): ("r50_4scale", True), ("--gpus", "0"): ("tiny", False),
             ("--set", "train.use_gpu=true"): ("r50_4scale", True), ("--set", "train.use_gpu=false"): ("tiny", False),
             (): ("r50_4scale", True) if gpus_here else ("tiny", False)}
    for argv, (name, use_gpu) in asked.items():
        cfg = common.build_config(_parse(list(argv)))
        assert (cfg.name, cfg.train.use_gpu) == (name, use_gpu), argv


@pytest.mark.parametrize("argv,needle", [
    (["--val-data", "v"], "--val-data needs --data"),
    (["--data", "d", "--synthetic-images", "64"], "--synthetic-images sizes the generated set"),
    (["--data", "d", "--images", "img"], "--set data.image_root=<folder>"),
    (["--data", "a.json", "--val-data", "v", "--val-images", "img"], "--set data.val_image_root=<folder>"),
])
def test_data_flags_that_would_be_ignored_are_refused(argv, needle):
    """--images with a dataset folder (images moved: data.image_root), --val-images without a
    --val-data .json, --synthetic-images with --data, --val-data without --data: each was
    accepted and ignored without a word."""
    p = argparse.ArgumentParser()
    common.add_common_args(p, data_help="data", training=True)
    with pytest.raises(common.UsageError, match=re.escape(needle)):
        common.check_flag_values(p.parse_args(argv))
    common.check_flag_values(p.parse_args(["--data", "a.json,b", "--images", "img"]))  # a .json: read with them


def test_experiment_names_mlflow_refuses_are_refused_up_front():
    """``--experiment ""`` was refused by MLflow at the run's creation, after the data checks and
    Ray's start, with a hint about deleted experiments. Checked without importing MLflow (usage
    errors stay fast): the length limit is MLflow's."""
    from mlflow.utils.validation import MAX_EXPERIMENT_NAME_LENGTH

    from pipelines import _flags

    assert _flags._MAX_EXPERIMENT_NAME == MAX_EXPERIMENT_NAME_LENGTH
    for name, needle in (("", "give an MLflow experiment name"), ("  ", "give an MLflow experiment name"),
                         ("x" * 501, "501 characters, MLflow takes 500 at most")):
        with pytest.raises(common.UsageError, match=needle):
            common.check_flag_values(argparse.Namespace(experiment=name))
    common.check_flag_values(argparse.Namespace(experiment="x" * 500))


def test_pipelines_common_default_preset_and_uri(tmp_path, monkeypatch):
    assert common.resolve_preset_name(None, gpus_available=True) == "r50_4scale"
    assert common.resolve_preset_name(None, gpus_available=False) == "tiny"
    with pytest.raises(ConfigError, match="unknown preset"):
        common.resolve_preset_name("swinl")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert common.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("HOME", str(tmp_path))  # a --work-dir of ~/... is the user's home
    assert common.tracking_uri("~/work") == f"sqlite:///{tmp_path.resolve() / 'work' / 'mlflow.db'}"
    assert (tmp_path / "work").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert common.tracking_uri(tmp_path) == "http://127.0.0.1:5000"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not common.preset_needs_cluster(_parse([]))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert common.preset_needs_cluster(_parse([])) and not common.preset_needs_cluster(_parse(["--preset", "tiny"]))


def test_pipelines_common_run_main_exit_codes(capsys):
    def usage(argv):
        raise ConfigError("unknown config key 'x.y'")

    def crash(argv):
        raise RuntimeError("worker died\nlong details")

    assert common.run_main(usage, []) == 2
    assert capsys.readouterr().err == "error: unknown config key 'x.y'\n"
    assert common.run_main(crash, []) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: RuntimeError: worker died (run with --debug") and err.count("\n") == 1
    with pytest.raises(RuntimeError, match="^worker died\nlong details$"):  # --debug: the error itself
        common.run_main(crash, ["--debug"])
    assert common.run_main(lambda argv: 0, []) == 0


def test_pipelines_common_sigterm_runs_the_cleanup(capsys):
    """SIGTERM (``ray job stop``, a pod stopped) before Ray started ended the process at once: no
    cleanup ran (a conversion's child process was left running). It is an exception while a
    pipeline runs (exit 143, as after ``ray.init``, whose handler exits with 15), and the default
    handler is back afterwards."""
    import os
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    cleaned: list[str] = []

    def main(argv):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises here
        except BaseException as exc:  # what fit does: end the MLflow run as KILLED
            cleaned.append(type(exc).__name__)
            raise
        return 0

    assert common.run_main(main, []) == 143
    assert cleaned == ["Terminated"] and "terminated (SIGTERM)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    def ray_started(argv):  # ray.init's own handler: sys.exit(15)
        raise SystemExit(signal.SIGTERM)

    assert common.run_main(ray_started, []) == 143 and "terminated (SIGTERM)" in capsys.readouterr().err


def test_pipelines_common_usage_errors_before_any_work_import_no_mlflow(tmp_path):
    """A preset typo is reported without importing MLflow (~2 s): the error handler imported it
    to classify every error, and pretrain's default --alias was validated with it."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from pipelines import pretrain_o365 as p; from pipelines._common import run_main; "
            f"rc = run_main(p.main, ['--preset', 'tinny', '--work-dir', {str(tmp_path)!r}]); "
            "print(rc, 'mlflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr[-2000:]
    assert "unknown preset 'tinny'" in proc.stderr


def test_pipelines_common_internal_errors_are_not_usage_errors(capsys):
    """An IndexError inside a pipeline is a failure (exit 1, with the --debug hint), not a
    user mistake: `evaluate` without --data crashed as `error: list index out of range`, exit 2."""
    def crash(argv):
        return [][0]

    assert common.run_main(crash, []) == 1
    assert capsys.readouterr().err.startswith("error: IndexError: list index out of range (run with --debug")


def test_pipelines_common_eval_resources_are_this_machines():
    """A model trained on 16 GPU workers is evaluated with this machine's resources, unless the
    user says otherwise (flags or --set), as `evaluate` applies them."""
    from dino_scale.config import apply_overrides, preset

    def evaluated(argv):
        args = _parse(argv)
        cfg = preset("tiny", ["train.num_workers=16", "train.use_gpu=true", "train.min_workers=8"])
        apply_overrides(cfg, list(args.overrides))
        return common.set_eval_resources(common.apply_flags(cfg, args), args).train

    tc = evaluated([])
    assert (tc.num_workers, tc.min_workers, tc.use_gpu) == (1, None, common._gpus_available())
    tc = evaluated(["--workers", "2", "--gpus", "0"])
    assert (tc.num_workers, tc.use_gpu) == (2, False)
    tc = evaluated(["--set", "train.num_workers=3", "--set", "train.use_gpu=true"])
    assert (tc.num_workers, tc.use_gpu) == (3, True)


def test_pipelines_common_run_names():
    names = {common.default_run_name("pretrain-tiny") for _ in range(50)}  # same second, distinct
    assert len(names) == 50 and all(n.startswith("pretrain-tiny-") for n in names)
    for good in ("run1", "pre.train-2026", "a b"):
        common.check_run_name(good)
    for bad in ("", " ", ".", "..", "a/b", "/abs", "..\\x", "a\0b"):
        with pytest.raises(common.UsageError, match="--run-name"):
            common.check_run_name(bad)


@pytest.mark.parametrize("pipeline", ["pretrain_o365", "finetune_coco"])
def test_training_gpus_this_machine_lacks_are_refused(pipeline, tmp_path, monkeypatch, capsys,
                                                      mlflow_store_restored):
    """``--gpus 1`` on a machine without a GPU (the embedded local Ray: nothing can join it) made
    pretraining and fine-tuning ask Ray Train for a GPU worker and wait for ever, as evaluate did:
    all three now stop with a usage error (exit 2) naming the GPUs there are."""
    import importlib

    import ray

    import dino_scale.engine

    module = importlib.import_module(f"pipelines.{pipeline}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(module, "resolve_datasets",
                        lambda *a, **k: (str(tmp_path / "train"), str(tmp_path / "val"), True))
    monkeypatch.setattr(module, "categories_of", lambda data: [{"id": 1, "name": "person"}])
    monkeypatch.setattr(module, "check_classes", lambda *a, **k: None)
    started = []
    monkeypatch.setattr(common, "connect_ray",
                        lambda *a, **k: started.append(1) or "started embedded local Ray (4 logical CPUs)")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    # this machine has a GPU (the early check of the flags passes): the check against Ray's resources refuses
    monkeypatch.setattr(common, "local_gpu_count", lambda: 1)

    def fit(*args, **kwargs):
        raise AssertionError("Ray Train was asked for GPU workers")

    monkeypatch.setattr(dino_scale.engine, "fit", fit)
    argv = ["--work-dir", str(tmp_path / "work"), "--preset", "tiny", "--gpus", "1"]
    if pipeline == "finetune_coco":
        argv += ["--init", "scratch"]
    assert common.run_main(module.main, argv) == 2
    err = capsys.readouterr().err
    assert "--gpus 1" in err and "0 GPU" in err, err
    assert started == [1]  # refused by the check of Ray's resources, not the early one
    # a joined cluster may be given GPU nodes: not refused here (fit is reached)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with pytest.raises(AssertionError, match="asked for GPU workers"):
        module.main(argv)


def test_pipelines_common_set_is_normalized_and_checked_at_parse_time():
    """``--set`` keeps ``key=value`` stripped; a bad one or a key given twice with two values is a
    ConfigError naming it while the arguments are parsed (run_main: one line, exit 2, before any
    data or Ray). Was: a second value silently won, '=1' read "unknown config key ''" and an
    empty value set an empty backbone name."""
    from pipelines import demo

    args = _parse(["--preset", "tiny", "--set", " train.lr = 1e-3", "--set", "train.lr=1e-3",
                   "--set", "model.num_queries =30"])
    assert args.overrides == ["train.lr=1e-3", "model.num_queries=30"]  # a repeat of one value: kept once
    assert common.build_config(args).train.lr == 1e-3
    # two spellings of one value are one setting (were refused as "given twice"), kept as first written
    args = _parse(["--preset", "tiny", "--set", "train.lr=1e-4", "--set", "train.lr=0.0001", "--set",
                   "train.use_gpu=true", "--set", "train.use_gpu=1", "--set", "data.train_scales=[96, 128]",
                   "--set", "data.train_scales=96,128", "--set", "model.num_queries=30",
                   "--set", "model.num_queries=3e1"])
    assert args.overrides == ["train.lr=1e-4", "train.use_gpu=true", "data.train_scales=[96, 128]",
                              "model.num_queries=30"]
    for argv, message in [(["--set", "train.lr=1", "--set", " train.lr=2"],
                           "--set train.lr given twice \\('1' and '2'\\)"),
                          (["--set", "train.lr=1e-4", "--set", "train.lr=1e-5"],
                           "--set train.lr given twice \\('1e-4' and '1e-5'\\)"),
                          (["--set", "train.nope=1", "--set", "train.nope=1.0"],  # unknown: not read as one value
                           "--set train.nope given twice"),
                          (["--set", "=1"], "names no key"), (["--set", "train. lr=1"], "holds a space"),
                          (["--set", "model.backbone="], "has no value"), (["--set", "train.lr"], "section.key=value")]:
        with pytest.raises(ConfigError, match=message):
            _parse(["--preset", "tiny", *argv])
        with pytest.raises(ConfigError, match=message):
            demo.build_parser().parse_args(argv)
    # the demo hands each stage its own overrides less the keys the user sets, then the user's
    assert demo.stage_overrides(["train.checkpoint_every_steps=5", "train.lr=1"]) == [
        "train.checkpoint_every_steps=5", "train.lr=1"]
    assert demo.stage_overrides([]) == demo.DEMO_OVERRIDES


def test_pipelines_common_gpu_default_looks_at_the_joined_cluster(monkeypatch, ray_lock):
    """A job submitted with ``--preset`` and no ``--gpus`` trained on CPU on a GPU cluster: the
    config (whose GPU default asks Ray for GPUs) was built before the pipeline joined the
    cluster, so only the head node's torch was asked. It now joins first unless the user chose
    (``--gpus``, ``train.use_gpu``), and a run that trains on CPU there says so."""
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert common.config_needs_cluster(_parse(["--preset", "tiny"]))
    assert common.config_needs_cluster(_parse([]))
    assert not common.config_needs_cluster(_parse(["--preset", "tiny", "--gpus", "1"]))
    assert not common.config_needs_cluster(_parse(["--preset", "tiny", "--set", "train.use_gpu=false"]))
    monkeypatch.delenv("RAY_ADDRESS")
    assert not common.config_needs_cluster(_parse(["--preset", "tiny"]))

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what the pipelines read (ray.init is done here)
    ray.init(address="local", num_cpus=1, num_gpus=2, include_dashboard=False)  # a cluster with (logical) GPUs
    try:
        args = _parse(["--preset", "tiny"])
        cfg = common.build_config(args)
        assert cfg.train.use_gpu and common.device_note(cfg, args) is None
        args = _parse(["--preset", "tiny", "--gpus", "0"])
        assert not common.build_config(args).train.use_gpu
        assert common.device_note(common.build_config(args), args) is None  # asked for
    finally:
        ray.shutdown()
    if not torch.cuda.is_available():  # joined, no GPU there: the run says it trains on CPU
        args = _parse(["--preset", "tiny"])
        cfg = common.build_config(args)
        assert not cfg.train.use_gpu and "training on CPU" in common.device_note(cfg, args)


def test_pipelines_common_relative_work_dir_of_a_job_gets_a_note(monkeypatch, tmp_path):
    """Under ``ray job submit`` the driver runs in Ray's temporary copy of the working folder: a
    relative ``--work-dir`` (the default ``./runs``) put data, checkpoints and the store there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert common.work_dir_note(_parse([])) is None  # a local run: ./runs is where the user is
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    note = common.work_dir_note(_parse([]))
    assert "--work-dir ./runs is relative" in note and str(tmp_path) in note
    assert common.work_dir_note(_parse(["--work-dir", str(tmp_path / "w")])) is None
    # a relative sqlite store (the README's local example) under a job: its runs and registry lost
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    note = common.work_dir_note(_parse(["--work-dir", str(tmp_path / "w")]))
    assert "MLFLOW_TRACKING_URI sqlite:///mlflow.db names a file relative" in note and "--work-dir" not in note
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert common.work_dir_note(_parse(["--work-dir", str(tmp_path / "w")])) is None


def test_pipelines_demo_keeps_its_own_store(tmp_path, monkeypatch, mlflow_store_restored):
    """The demo registers dino-tiny-* models and moves their aliases: with MLFLOW_TRACKING_URI set
    (a team's server) it did so there. It now always uses ``<work-dir>/mlflow.db``, with a note."""
    from pipelines.demo import use_own_store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "http://mlflow.example:5000")
    said: list[str] = []
    uri = use_own_store(tmp_path, said.append)
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    import mlflow
    assert mlflow.get_tracking_uri() == uri and mlflow.get_registry_uri() == uri
    assert len(said) == 2 and all("is not used" in m for m in said)


def test_pipelines_demo_stages_run_on_cpu_unless_told(tmp_path, monkeypatch):
    """The demo is documented as a CPU run, but passed no --gpus: on a machine with a GPU every
    stage took it. It passes --gpus 0 unless its own --gpus or --set train.use_gpu says otherwise."""
    from pipelines import demo, pretrain_o365

    monkeypatch.setattr(common, "_gpus_available", lambda: True)

    def use_gpu(gpus, user):
        args = pretrain_o365.build_parser().parse_args(demo.stage_args(tmp_path, gpus, user))
        return common.build_config(args).train.use_gpu

    assert use_gpu(None, []) is False
    assert use_gpu(1, []) is True
    assert use_gpu(None, ["train.use_gpu=true"]) is True
    assert use_gpu(None, ["train.use_gpu=false"]) is False
    assert demo.stage_args(tmp_path, None, [])[:6] == ["--work-dir", str(tmp_path), "--preset", "tiny", "--gpus", "0"]
    # the evaluate stage gets no --set: its --gpus carries the user's choice
    assert demo._gpu_args(None, ["train.use_gpu=false"]) == ["--gpus", "0"]
    assert demo._gpu_args(None, ["train.use_gpu=true"]) == ["--gpus", "1"]


def test_a_flag_and_a_set_for_one_field_must_agree():
    """``--epochs 5 --set train.epochs=10`` trained 5 epochs, ``--scale 1.5 --set
    data.scale_factor=2.0`` trained at 2.0: one of the two won (the flag for some fields, the
    ``--set`` for others), without a word. Two values for one field are refused before any work;
    the same value twice is fine. ``--set data.train=...`` was accepted, recorded in the run's
    config, and ignored (the run trained on a synthetic set): the data comes from ``--data``."""
    from pipelines import evaluate, finetune_coco, pretrain_o365
    from pipelines._datasets import user_label_book

    def check(module, argv):
        args = module.build_parser().parse_args(["--preset", "tiny", *argv])
        common.validate_config_args(args, extra=user_label_book(args.overrides))

    pre, fine = pretrain_o365, finetune_coco
    for module, argv, needle in [
            (pre, ["--epochs", "5", "--set", "train.epochs=10"], "--epochs 5 and --set train.epochs=10 disagree"),
            (pre, ["--workers", "2", "--set", "train.num_workers=4"], "--workers 2 and --set train.num_workers=4"),
            (pre, ["--gpus", "0", "--set", "train.use_gpu=true"], "--gpus 0 and --set train.use_gpu=true"),
            (pre, ["--max-steps", "3", "--set", "train.max_steps=none"], "--max-steps 3 and --set train.max_steps"),
            (pre, ["--zero-stage", "1", "--set", "train.zero_stage=2"], "--zero-stage 1 and"),
            (fine, ["--scale", "1.5", "--set", "data.scale_factor=2.0"], "--scale 1.5 and --set data.scale_factor"),
            (fine, ["--tta", "--set", "eval.tta=false"], "--tta and --set eval.tta=false disagree"),
            (evaluate, ["--model", "m", "--tta", "--set", "eval.tta=false"], "--tta and --set eval.tta=false"),
            (pre, ["--set", "data.train=/mnt/o365/train"], "given with --data, not --set (pass --data /mnt"),
            (fine, ["--set", "data.val=/mnt/coco/val"], "given with --val-data, not --set"),
            (evaluate, ["--model", "m", "--set", "data.val=/mnt/coco/val"], "given with --data, not --set"),
            # renamed the registered model; the printed next step then named a preset that is not one
            (pre, ["--set", "name=mine"], "name is the preset's (--preset); the registered model's name is")]:
        with pytest.raises(common.UsageError, match=re.escape(needle)):
            check(module, argv)
    for module, argv in [(pretrain_o365, ["--epochs", "5", "--set", "train.epochs=5"]),
                         (pretrain_o365, ["--gpus", "0", "--set", "train.use_gpu=false"]),
                         (finetune_coco, ["--scale", "1.5", "--set", "data.scale_factor=1.5"]),
                         (finetune_coco, ["--set", "eval.tta=false"]),
                         # alone, it sizes the label book too (the run does): was refused here
                         (pretrain_o365, ["--set", "model.num_classes=366"])]:
        check(module, argv)
    with pytest.raises(ConfigError, match="needs dn_labelbook_size >= 365"):  # both given: the user's
        check(pretrain_o365, ["--set", "model.num_classes=366", "--set", "model.dn_labelbook_size=91"])


def test_pipelines_demo_refuses_sets_its_stages_would_override(tmp_path, monkeypatch):
    """The demo adds ``--max-steps`` (its --pretrain-steps / --finetune-steps) after the user's
    ``--set``: ``--set train.max_steps=10`` was silently replaced by 200."""
    from pipelines import demo

    def no_ray(*args, **kwargs):
        raise AssertionError("the demo got past its checks and started Ray")

    monkeypatch.setattr(common, "connect_ray", no_ray)
    for argv, needle in [(["--set", "train.max_steps=10"], "--pretrain-steps and --finetune-steps"),
                         (["--set", "data.train=/data/o365"], "synthetic sets it makes")]:
        with pytest.raises(common.UsageError, match=needle):
            demo.main(["--work-dir", str(tmp_path / "w"), *argv])
    assert not (tmp_path / "w").exists()  # refused before anything ran


def test_pipelines_demo_fresh_removes_only_a_demo_work_folder(tmp_path, monkeypatch):
    """``demo --work-dir . --fresh`` removed the folder the user stood in, whatever it held (a
    project with its .git): --fresh now removes only a folder holding what a demo writes, never
    the current folder, one above it or the home folder."""
    from pipelines import demo

    def no_ray(*args, **kwargs):
        raise AssertionError("the demo got past its checks and started Ray")

    monkeypatch.setattr(common, "connect_ray", no_ray)
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "important.py").write_text("x = 1\n")
    with pytest.raises(common.UsageError, match=r"holds more than a demo's output \(src\)"):
        demo.main(["--work-dir", str(project), "--fresh"])
    assert (project / "src" / "important.py").is_file()
    monkeypatch.chdir(project / "src")
    with pytest.raises(common.UsageError, match="holds the current folder"):
        demo.main(["--work-dir", "..", "--fresh"])
    demo_work = tmp_path / "demo"
    for name in ("data", "runs", "init", "evaluations"):
        (demo_work / name).mkdir(parents=True)
    for name in ("mlflow.db", "mlflow.db.lock"):  # as a demo leaves them (ls of a real run's folder)
        (demo_work / name).write_text("")
    demo.check_fresh_removable(demo_work)  # a demo's own folder: removable
    from pathlib import Path

    with pytest.raises(common.UsageError, match="home folder"):
        demo.check_fresh_removable(Path.home().resolve())


def test_the_start_up_line_says_when_the_lr_never_drops():
    cfg = preset("tiny", ["train.epochs=6"])  # the tiny preset pins its drop at epoch 11
    assert common.schedule_text(cfg) == ("lr x0.1 at epoch 11 (after this run's 6 epochs: the lr never drops; "
                                         "set train.lr_drop_epochs)")
    assert common.schedule_text(preset("tiny", ["train.epochs=12"])) == "lr x0.1 at epoch 11"
    # the default schedule of a 1-epoch run does not drop, as documented: no advice to change it
    assert common.schedule_text(preset("r50_4scale", ["train.epochs=1"])) == "lr x0.1 at epoch 1"
    assert common.schedule_text(preset("r50_4scale", ["train.epochs=6"])) == "lr x0.1 at epoch 5"
    assert common.schedule_text(preset("tiny", ["train.schedule=cosine"])) == "lr cosine"


@pytest.mark.parametrize("stage", ["pretrain_o365", "finetune_coco"])
def test_pipelines_common_a_job_without_a_preset_is_checked_once_joined_before_any_data(stage, tmp_path, monkeypatch,
                                                                                         capsys, mlflow_store_restored):
    """A job joining a cluster without ``--preset`` (its default preset looks at the cluster's
    GPUs) had its training settings checked first inside ``fit``: after the training data was
    converted or generated, and for fine-tuning after its starting model was fetched. It now
    joins the cluster before any data work and is refused there (exit 2). The cluster is not
    dialled: what is checked is the pipeline's order, so its join is recorded instead."""
    import importlib

    from pipelines._common import run_main

    pipeline = importlib.import_module(f"pipelines.{stage}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    joined = []
    monkeypatch.setattr(common, "connect_ray", lambda *a, **k: joined.append(1) or "joined")
    monkeypatch.setattr(common, "_gpus_available", lambda: False)  # a CPU cluster: the tiny preset
    work = tmp_path / "work"
    argv = ["--work-dir", str(work), "--workers", "2", "--set", "train.global_batch_size=7"]
    if stage == "finetune_coco":
        argv += ["--init", "scratch"]
    assert run_main(pipeline.main, argv) == 2
    err = capsys.readouterr().err
    assert "global_batch_size" in err and joined == [1], err
    assert not (work / "data").exists() and not list(work.glob("**/*.parquet"))  # no data generated
    if stage == "finetune_coco":  # the default starting model, looked up once joined (none registered here)
        monkeypatch.setattr(common, "_gpus_available", lambda: False)
        assert run_main(pipeline.main, ["--work-dir", str(work)]) == 2
        err = capsys.readouterr().err
        assert "models:/dino-tiny-o365@pretrained" in err and not (work / "data").exists(), err


def test_pipelines_common_finetune_checks_its_scale_and_tta_flags_before_any_work(monkeypatch):
    """``--scale`` and ``--tta`` reached the config only once the data and the initial model were
    prepared, so a scale that leaves no pixel, or TTA without sizes, was refused that late (in
    ``fit``). They are checked with the other settings before any work now."""
    from pipelines import finetune_coco

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="data.train_scales must be sizes of at least 1 pixel"):
        finetune_coco.check_args(["--init", "scratch", "--scale", "0.001"])
    with pytest.raises(ConfigError, match="eval.tta_scales must name at least one size"):
        finetune_coco.check_args(["--init", "scratch", "--tta", "--set", "eval.tta_scales=[]"])
    finetune_coco.check_args(["--init", "scratch", "--scale", "1.5", "--tta"])  # fine ones pass


@pytest.mark.parametrize("stage", ["pretrain_o365", "finetune_coco"])
def test_pipelines_common_what_cpu_workers_cannot_run_is_refused_before_any_data(
        stage, tmp_path, monkeypatch, capsys, caplog, mlflow_store_restored):
    """``--set model.msda_backend=cuda`` or ``--set train.precision=fp16`` (on a CPU without fp16) with
    CPU workers was refused inside ``fit`` only: after the dataset was converted (hours for
    Objects365) and Ray had started. Refused now with the other settings, before any data work;
    a job joining a cluster without ``--preset``, once joined; GPU workers run both."""
    import importlib

    from dino_scale.engine import run_checks
    from pipelines._common import run_main

    pipeline = importlib.import_module(f"pipelines.{stage}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(run_checks, "_cpu_runs_fp16", lambda: False)
    monkeypatch.setattr(common, "_gpus_available", lambda: False)
    started = []
    monkeypatch.setattr(common, "connect_ray", lambda *a, **k: started.append(1) or "joined")
    work = tmp_path / "work"
    init = ["--init", "scratch"] if stage == "finetune_coco" else []
    for setting, needle in (("model.msda_backend=cuda", "model.msda_backend=cuda needs GPU workers"),
                            ("train.precision=fp16", "train.precision=fp16 with CPU workers")):
        assert run_main(pipeline.main, ["--work-dir", str(work), "--preset", "tiny", "--set", setting, *init]) == 2
        err = capsys.readouterr().err
        assert needle in err and not started, err
        assert not (work / "data").exists() and not list(work.glob("**/*.parquet"))  # no data generated
        pipeline.check_args(["--preset", "tiny", "--set", "train.use_gpu=true", "--set", setting, *init])  # fine
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # no --preset: checked once joined, still before data
        if setting.startswith("model."):
            assert run_main(pipeline.main, ["--work-dir", str(work), "--set", setting, *init]) == 2
            err = capsys.readouterr().err
            assert needle in err and started == [1] and not (work / "data").exists(), err
        else:  # fp16 on a joined cluster: a warning, its nodes' CPUs may differ (the run goes on)
            args = pipeline.check_args(["--set", setting, *init])
            with caplog.at_level("WARNING"):
                assert common.join_cluster_for_the_preset(args, print) and started == [1]
            assert "this machine's CPU has no fp16 support" in caplog.text
        monkeypatch.delenv("RAY_ADDRESS")
        started.clear()

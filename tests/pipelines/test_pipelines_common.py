"""Shared pipeline options (the top-level error handler: test_pipelines_errors.py; the demo's own rules:
test_pipelines_demo.py; the GPU default of a job on a joined cluster: test_pipelines_joined_cluster.py;
what is refused before any data work: test_pipelines_before_data.py)."""
from __future__ import annotations

import argparse
import re

import pytest

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


def test_eval_on_this_machines_ray_drops_the_training_clusters_resources_and_storage(monkeypatch):
    """A model trained with the cluster YAMLs' node pin (``train.worker_resources=gpu_h100``), CPUs
    per worker and a bucket was evaluated on a laptop's Ray with all three: the worker asked for a
    resource no node there has (Ray Train waits for it, retrying), and the detections went to the
    training run's bucket. Without RAY_ADDRESS they are dropped and said; a value set in this call,
    or a joined cluster (its own nodes and storage), keeps them."""
    from dino_scale.config import apply_overrides, preset

    trained = ["train.worker_resources=[gpu_h100]", "train.cpus_per_worker=8", "train.storage_path=s3://b/ckpts"]

    def evaluated(argv):
        args, said = _parse(argv), []
        cfg = preset("tiny", trained)
        apply_overrides(cfg, list(args.overrides))
        tc = common.set_eval_resources(common.apply_flags(cfg, args), args, said.append).train
        return (tc.worker_resources, tc.cpus_per_worker, tc.storage_path), said

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    values, said = evaluated([])
    assert values == ([], None, None)
    assert said == ["note: train.worker_resources=['gpu_h100'] of the training run is not used on this machine's Ray "
                    "(--set train.worker_resources=... to use one)",
                    "note: train.cpus_per_worker=8.0 of the training run is not used on this machine's Ray "
                    "(--set train.cpus_per_worker=... to use one)",
                    "note: train.storage_path='s3://b/ckpts' of the training run is not used on this machine's Ray "
                    "(--set train.storage_path=... to use one)"]
    values, said = evaluated(["--set", "train.worker_resources=[big_cpu:2]", "--set", "train.cpus_per_worker=2"])
    assert values == (["big_cpu:2"], 2.0, None) and len(said) == 1 and "storage_path" in said[0]
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a joined cluster: never dialled here
    assert evaluated([]) == ((["gpu_h100"], 8.0, "s3://b/ckpts"), [])


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


def test_the_start_up_line_says_when_the_lr_never_drops():
    cfg = preset("tiny", ["train.epochs=6"])  # the tiny preset pins its drop at epoch 11
    assert common.schedule_text(cfg) == ("lr x0.1 at epoch 11 (after this run's 6 epochs: the lr never drops; "
                                         "set train.lr_drop_epochs)")
    assert common.schedule_text(preset("tiny", ["train.epochs=12"])) == "lr x0.1 at epoch 11"
    # the default schedule of a 1-epoch run does not drop, as documented: no advice to change it
    assert common.schedule_text(preset("r50_4scale", ["train.epochs=1"])) == "lr x0.1 at epoch 1"
    assert common.schedule_text(preset("r50_4scale", ["train.epochs=6"])) == "lr x0.1 at epoch 5"
    assert common.schedule_text(preset("tiny", ["train.schedule=cosine"])) == "lr cosine"
    # a pinned drop past the run among others, and a warmup as long as the run: were listed without a word
    multi = ["train.schedule=multistep", "train.lr_drop_epochs=[8,20]", "train.epochs=12"]
    assert common.schedule_text(preset("tiny", multi)) == ("lr x0.1 at epoch 8,20 (epoch 20 is after this run's "
                                                           "12 epochs: no drop there)")
    assert common.schedule_text(preset("tiny", ["train.max_steps=100", "train.warmup_steps=100"])) == (
        "lr x0.1 at epoch 11 (warmup 100 steps, max_steps=100: the lr never reaches its base value)")
    short_warmup = preset("tiny", ["train.max_steps=100", "train.warmup_steps=99"])
    assert common.schedule_text(short_warmup) == "lr x0.1 at epoch 11"

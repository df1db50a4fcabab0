"""The training pipelines refuse what they can before any data work (a dataset converted or
generated, a starting model fetched) or Ray: a job joining a cluster without ``--preset`` once
joined, and what CPU workers cannot run. The cluster is never dialled: its join is recorded."""
from __future__ import annotations

import pytest

from dino_scale.config import ConfigError
from pipelines import _common as common


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
    monkeypatch.setattr(common, "local_gpu_count", lambda: 1)  # the use_gpu=true lines below: one GPU here
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


@pytest.mark.parametrize("stage", ["pretrain_o365", "finetune_coco"])
def test_pipelines_gpus_asked_by_set_and_a_bad_backbone_file_are_refused_before_any_data(
        stage, tmp_path, monkeypatch, capsys):
    """``--set train.use_gpu=true`` on a machine without the GPUs (``--gpus 1`` was refused at
    once), and a ``model.backbone_weights`` that is missing, cut short or ``imagenet`` for a
    backbone without published weights: refused inside ``fit`` only, after the data was
    converted or generated and Ray had started. Refused before any data work now, unless the
    weights are not read: a fine-tune from ``--init`` (loaded strictly over them), or a run name
    that resumes (its checkpoint may hold every weight)."""
    import importlib

    from pipelines._common import run_main

    pipeline = importlib.import_module(f"pipelines.{stage}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(common, "local_gpu_count", lambda: 0)
    started = []
    monkeypatch.setattr(common, "connect_ray", lambda *a, **k: started.append(1) or "joined")
    work = tmp_path / "work"
    init = ["--init", "scratch"] if stage == "finetune_coco" else []
    cut = tmp_path / "cut.pth"
    cut.write_bytes(b"PK\x03\x04 not a whole zip")
    for setting, needle in (("train.use_gpu=true", "train.use_gpu: 1 GPU worker(s), but this machine has 0"),
                            (f"model.backbone_weights={tmp_path / 'none.pth'}", "none.pth does not exist"),
                            (f"model.backbone_weights={cut}", "cut.pth"),
                            ("model.backbone_weights=imagenet", "no ImageNet weights for backbone 'tiny_resnet'")):
        argv = ["--work-dir", str(work), "--preset", "tiny", "--set", setting, *init]
        assert run_main(pipeline.main, argv) == 2, setting
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1 and not started, err
        assert not (work / "data").exists()  # no data generated
    missing = f"model.backbone_weights={tmp_path / 'none.pth'}"
    (work / "runs" / "again").mkdir(parents=True)  # a resumed run: checked in fit, with its checkpoint
    pipeline.check_args(["--work-dir", str(work), "--preset", "tiny", "--set", missing, "--run-name", "again", *init])
    if stage == "finetune_coco":  # from a model: its weights replace the backbone's, the file is never read
        pipeline.check_args(["--work-dir", str(work), "--preset", "tiny", "--set", missing, "--init", str(tmp_path)])

"""`pipelines.demo`'s own rules: its own MLflow store, CPU stages unless told, the settings its
stages set refused from --set, and --fresh removing only a demo's folder. Nothing here trains."""
from __future__ import annotations

import pytest

from pipelines import _common as common


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
    assert demo._gpu_args(None, ["train.use_gpu=false"]) == ["--gpus", "0"]
    assert demo._gpu_args(None, ["train.use_gpu=true"]) == ["--gpus", "1"]
    # the evaluate stage gets the user's --set too (the help says every stage; it got none), and they parse
    from pipelines import evaluate

    user = ["train.use_gpu=true", "train.cpus_per_worker=1"]
    argv = demo.evaluate_args("dino-tiny-coco", tmp_path, None, user)
    assert argv == ["--model", "models:/dino-tiny-coco@champion", "--work-dir", str(tmp_path), "--gpus", "1",
                    "--set", "train.use_gpu=true", "--set", "train.cpus_per_worker=1"]
    parsed = evaluate.build_parser().parse_args(argv)
    assert parsed.overrides == user and parsed.gpus == 1
    common.check_flag_conflicts(parsed, common.preset("tiny", user))  # --gpus 1 and use_gpu=true agree


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

"""Shared pipeline options and the top-level error handler."""
from __future__ import annotations

import argparse

import pytest

from mlflow_store import seeded_store
from dino_scale.config import ConfigError
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
    with pytest.raises(RuntimeError):
        common.run_main(crash, ["--debug"])
    assert common.run_main(lambda argv: 0, []) == 0


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


def test_pipelines_common_register_uploads_weights_the_tracker_left_behind(tmp_path, monkeypatch):
    """An MLflow outage past the engine's close timeout leaves the final folder's upload
    pending: registration uploads it itself instead of registering a version with no weights;
    the categories land beside the local weights too. All of it in the run's store, even with
    the process pointed at another one (was: the process-wide registry, which in CI was another
    test's store)."""
    import json

    import mlflow

    from dino_scale.config import preset, to_dict
    from dino_scale.engine.api import FitResult
    from dino_scale.engine.checkpoint import save_weights
    from dino_scale.models import build_dino
    from dino_scale.tracking.registry import resolve_model_uri

    uri = seeded_store(tmp_path)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(var, other)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("pretrain-o365", artifact_location=str(tmp_path / "art")))
    cfg = preset("tiny")
    final = tmp_path / "final"
    save_weights(final, build_dino(cfg.model)[0].state_dict(), config=to_dict(cfg))
    result = FitResult(checkpoint_path=str(final), weights_path=final / "model.safetensors",
                       config_path=final / "config.json", metrics={"AP": 0.25}, run_id=run.info.run_id,
                       tracking_uri=uri, run_name="r")
    cats = [{"id": 1, "name": "person"}]
    version = common.register(result, "dino-tiny-o365", alias="pretrained", categories=cats)
    assert version == "1"
    assert json.loads((final / "categories.json").read_text()) == cats
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.safetensors", "model/config.json", "model/categories.json"} <= logged
    resolved = resolve_model_uri("models:/dino-tiny-o365@pretrained", tmp_path / "dl", tracking_uri=uri)
    assert resolved.weights_path.is_file() and client.get_model_version("dino-tiny-o365", "1").tags["AP"] == "0.250000"
    assert mlflow.MlflowClient(other, registry_uri=other).search_registered_models() == []


def test_pipelines_common_register_completes_a_partial_model_upload(tmp_path):
    """An upload of the final folder cut short (the tracking server went down mid-way, past the
    engine's close timeout) can leave ``model/`` with the weights but not ``config.json`` /
    ``lineage.json``, or with a weights file cut short. Registration makes the artifact match the
    final folder file for file (name and size) before registering: was, a version whose
    ``config.json`` was missing (evaluate/predict then built the default preset) or whose weights
    were truncated was registered because ``model.safetensors`` was listed."""
    import json

    import mlflow
    import torch

    from dino_scale.config import preset, to_dict
    from dino_scale.engine.api import FitResult
    from dino_scale.engine.checkpoint import save_weights
    from dino_scale.models import build_dino
    from dino_scale.tracking.registry import load_model_from_uri

    uri = seeded_store(tmp_path)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("finetune-coco", artifact_location=str(tmp_path / "art"))
    cfg = preset("tiny")
    cfg.model.num_queries = 17  # not the preset's: the registered config must be this one
    final = tmp_path / "final"
    model = build_dino(cfg.model)[0]
    save_weights(final, model.state_dict(), config=to_dict(cfg))
    (final / "lineage.json").write_text(json.dumps({"train_dir": "/data/coco/train"}))
    cut = tmp_path / "cut" / "model.safetensors"
    cut.parent.mkdir()
    cut.write_bytes((final / "model.safetensors").read_bytes()[:4096])
    cats = [{"id": 1, "name": "person"}]
    for i, partial in enumerate((final / "model.safetensors", cut)):
        run = client.create_run(exp)
        client.log_artifact(run.info.run_id, str(partial), artifact_path="model")  # the rest never arrived
        result = FitResult(checkpoint_path=str(final), weights_path=final / "model.safetensors",
                           config_path=final / "config.json", metrics={"AP": 0.25}, run_id=run.info.run_id,
                           tracking_uri=uri, run_name=f"r{i}")
        version = common.register(result, "dino-tiny-coco", alias=None, categories=cats)
        sizes = {a.path: a.file_size for a in client.list_artifacts(run.info.run_id, "model")}
        assert sizes == {f"model/{f.name}": f.stat().st_size for f in final.iterdir()}
        loaded, loaded_cfg = load_model_from_uri(f"models:/dino-tiny-coco/{version}", tracking_uri=uri)
        assert loaded_cfg.model.num_queries == 17
        ref = model.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())

"""What the training pipelines do with a finished run: registration in the run's own store."""
from __future__ import annotations

from mlflow_store import seeded_store
from pipelines import _results as results


def test_pipelines_results_register_uploads_weights_the_tracker_left_behind(tmp_path, monkeypatch):
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
    version = results.register(result, "dino-tiny-o365", alias="pretrained", categories=cats)
    assert version == "1"
    assert json.loads((final / "categories.json").read_text()) == cats
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.safetensors", "model/config.json", "model/categories.json"} <= logged
    resolved = resolve_model_uri("models:/dino-tiny-o365@pretrained", tmp_path / "dl", tracking_uri=uri)
    assert resolved.weights_path.is_file() and client.get_model_version("dino-tiny-o365", "1").tags["AP"] == "0.250000"
    assert mlflow.MlflowClient(other, registry_uri=other).search_registered_models() == []


def test_pipelines_results_register_completes_a_partial_model_upload(tmp_path):
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
        version = results.register(result, "dino-tiny-coco", alias=None, categories=cats)
        sizes = {a.path: a.file_size for a in client.list_artifacts(run.info.run_id, "model")}
        assert sizes == {f"model/{f.name}": f.stat().st_size for f in final.iterdir()}
        loaded, loaded_cfg = load_model_from_uri(f"models:/dino-tiny-coco/{version}", tracking_uri=uri)
        assert loaded_cfg.model.num_queries == 17
        ref = model.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


def test_pipelines_results_failed_registration_says_how_to_register_without_training(tmp_path, capsys):
    """Registration failing after a long training (the store went away, the run was deleted)
    printed the error only: the run name, generated with a timestamp, was nowhere on screen,
    and rerunning without it trained again from the start. The note names the run, its weights
    and the --run-name that resumes the finished run and registers it."""
    import pytest
    from mlflow.exceptions import MlflowException

    from dino_scale.config import preset, to_dict
    from dino_scale.engine.api import FitResult
    from dino_scale.engine.checkpoint import save_weights
    from dino_scale.models import build_dino

    uri = seeded_store(tmp_path)
    final = tmp_path / "final"
    save_weights(final, build_dino(preset("tiny").model)[0].state_dict(), config=to_dict(preset("tiny")))
    result = FitResult(checkpoint_path=str(final), weights_path=final / "model.safetensors",
                       config_path=final / "config.json", metrics={"AP": 0.25}, run_id="0" * 32,
                       tracking_uri=uri, run_name="finetune-tiny-init-20261206-101500")
    with pytest.raises(MlflowException):  # no such run in this store
        results.register(result, "dino-tiny-coco", alias=None, categories=[{"id": 1, "name": "person"}])
    err = capsys.readouterr().err
    assert "--run-name finetune-tiny-init-20261206-101500" in err and str(final) in err and "0" * 32 in err, err


def test_pipelines_results_a_smoke_test_never_takes_pretrained_from_real_data(tmp_path):
    """Every pretraining moved ``@pretrained`` to its version: a synthetic smoke test in a shared
    store took it from the Objects365 model, and the next default fine-tune started from junk.
    A synthetic version takes it only from no holder or another synthetic one."""
    import mlflow

    from dino_scale.engine.api import FitResult
    from dino_scale.tracking.registry import get_version_by_alias

    uri = seeded_store(tmp_path)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("dino-tiny-o365")

    def version(synthetic: bool) -> str:
        v = client.create_model_version("dino-tiny-o365", source=str(tmp_path / "w")).version
        client.set_model_version_tag("dino-tiny-o365", v, "synthetic_data", str(synthetic).lower())
        return str(v)

    result = FitResult("c", tmp_path / "w", tmp_path / "c", {}, None, uri, "r")

    def holder() -> str:
        return str(get_version_by_alias("dino-tiny-o365", "pretrained", tracking_uri=uri).version)

    assert results.move_alias(result, "dino-tiny-o365", "pretrained", version(True), True) is None  # no holder
    assert holder() == "1"
    assert results.move_alias(result, "dino-tiny-o365", "pretrained", version(False), False) is None
    assert holder() == "2"
    kept = results.move_alias(result, "dino-tiny-o365", "pretrained", version(True), True)
    assert holder() == "2" and "stays on v2 (trained on real data)" in kept and "registry promote" in kept
    assert results.move_alias(result, "dino-tiny-o365", "pretrained", version(False), False) is None
    assert holder() == "4"

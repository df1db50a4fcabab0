"""Resilient MLflow logging: sqlite store, a real mlflow server, and the server going away."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlflow_server import MlflowServer  # noqa: E402

from mlflow_store import seeded_store
from dino_scale.config import flatten, preset  # noqa: E402
from dino_scale.tracking.logger import ResilientLogger  # noqa: E402
from dino_scale.tracking.uris import absolute_sqlite_uri, default_tracking_uri, sqlite_artifact_location  # noqa: E402


def test_sqlite_default_and_nested_runs(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "cwd"  # e.g. a `ray job submit` driver's temporary copy of the working dir
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    uri = default_tracking_uri(tmp_path / "work")
    assert uri == f"sqlite:///{(tmp_path / 'work' / 'mlflow.db').resolve()}"
    parent = ResilientLogger(uri)
    parent_id = parent.start_run("stage-test", "pipeline", {"kind": "pipeline"})
    child = ResilientLogger(uri)
    child_id = child.start_run("stage-test", "finetune", {"preset": "tiny"}, parent_run_id=parent_id)
    cfg = preset("tiny")
    child.log_params(flatten(cfg))
    for step in range(3):
        child.log_metrics({"loss": 10.0 - step, "lr": 1e-4}, step=step)
    art = tmp_path / "model"
    art.mkdir()
    (art / "config.json").write_text("{}")
    child.log_artifacts(art, "model")
    child.end_run()
    assert child.close(timeout_s=5) and child.pending == 0
    client = MlflowClient(uri)
    run = client.get_run(child_id)
    assert run.data.params["model.hidden_dim"] == "64" and run.data.params["name"] == "tiny"
    assert run.data.tags["mlflow.parentRunId"] == parent_id and run.data.tags["preset"] == "tiny"
    assert [m.value for m in client.get_metric_history(child_id, "loss")] == [10.0, 9.0, 8.0]
    assert run.info.status == "FINISHED"
    assert [f.path for f in client.list_artifacts(child_id, "model")] == ["model/config.json"]
    # artifacts live next to the database, never in MLflow's default ./mlruns of the cwd
    stored = tmp_path / "work" / "mlartifacts" / "stage-test" / child_id / "artifacts" / "model" / "config.json"
    assert run.info.artifact_uri == (stored.parents[1]).as_uri() and stored.is_file()
    assert list(cwd.iterdir()) == []


def test_sqlite_artifact_location():
    assert sqlite_artifact_location("sqlite:////data/runs/mlflow.db", "pretrain o365/v2") == \
        "file:///data/runs/mlartifacts/pretrain_o365_v2"
    assert sqlite_artifact_location("sqlite:////data/mlflow.db?timeout=30", "x") == "file:///data/mlartifacts/x"
    relative = (Path.cwd() / "rel" / "mlartifacts" / "x").as_uri()
    assert sqlite_artifact_location("sqlite:///rel/mlflow.db", "x") == relative
    for uri in ("http://127.0.0.1:5000", "sqlite://", "sqlite:///:memory:", "file:///data/mlruns"):
        assert sqlite_artifact_location(uri, "x") is None


def test_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI=sqlite:///mlflow.db is exported to Ray Train workers, which run in
    their own trial folders: there it named another (empty) database and the metrics were lost."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db?timeout=30")
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}?timeout=30"
    for uri in ("sqlite:////data/mlflow.db", "sqlite:///:memory:", "sqlite://", "http://127.0.0.1:5000"):
        assert absolute_sqlite_uri(uri) == uri


@pytest.mark.parametrize("name", ["exp?v2", "lr%201e-4", "a#b"])
def test_a_work_folder_whose_path_reads_as_url_syntax_is_refused_for_the_sqlite_store(tmp_path, monkeypatch, name):
    """``--work-dir runs/exp?v2`` put the store in the file ``runs/exp`` (SQLAlchemy reads '?' as
    a query), shared by every sibling ``exp?...`` folder: their runs and registries mixed without
    a word; ``lr%201e-4`` opened ``lr 1e-4/mlflow.db``, which did not exist (100 s of retries,
    then an OperationalError). Refused, naming the character, before the folder is made."""
    from dino_scale.config import ConfigError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=r"cannot hold the sqlite MLflow store .* set MLFLOW_TRACKING_URI"):
        default_tracking_uri(tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    assert default_tracking_uri(tmp_path / name) == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"  # its own store


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_server_stopped_mid_run_training_continues(tmp_path, caplog):
    """A real server; it dies during training; training finishes; the buffer is flushed
    once the server is back (same port, same store)."""
    from mlflow.tracking import MlflowClient

    from dino_scale.engine.optim import build_optimizer
    from dino_scale.engine.train_step import train_step
    from dino_scale.models import build_dino

    server = MlflowServer(tmp_path / "server").start()
    try:
        logger = ResilientLogger(server.uri, timeout_s=2, retry_interval_s=0.5)
        run_id = logger.start_run("resilience", "server-stop", {"preset": "tiny"}, wait_s=60)
        assert run_id is not None
        cfg = preset("tiny", {"train.lr": 1e-4, "train.lr_backbone": 1e-4})
        torch.manual_seed(0)
        model, criterion, _ = build_dino(cfg.model)
        opt = build_optimizer(model, cfg.train)
        images = torch.randn(1, 3, 64, 64)
        masks = torch.zeros(1, 64, 64, dtype=torch.bool)
        targets = [{"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
        caplog.set_level(logging.WARNING, logger="dino_scale.tracking")
        steps = 6
        for step in range(steps):
            if step == 2:
                server.stop()
            out = train_step(model, criterion, opt, (images, masks, targets))
            logger.log_metrics({"loss": float(out.loss)}, step=step)
            if step == 4:
                assert logger.pending > 0  # buffered while the server is down
        assert any("unreachable" in r.getMessage() for r in caplog.records)
        logger.end_run()
        server.start()
        assert logger.close(timeout_s=60), "buffered calls were not flushed after the server returned"
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        client = MlflowClient(server.uri)
        history = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(steps))
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        server.stop()


def test_run_created_later_when_server_down_at_start(tmp_path):
    from mlflow_server import free_port

    logger = ResilientLogger(f"http://127.0.0.1:{free_port()}", timeout_s=1, retry_interval_s=0.1)
    assert logger.start_run("x", "y") is None  # nothing listens: no crash, no run yet
    logger.log_metrics({"loss": 1.0}, step=0)
    assert logger.pending == 2
    assert not logger.close(timeout_s=0.5)


def test_http_settings_apply_to_the_loggers_requests_only(tmp_path, monkeypatch):
    """No retries / short timeout while the logger sends; afterwards the process's other MLflow
    calls (registry, user code) get MLflow's defaults back, and a user's own setting wins."""
    import os

    from mlflow_server import free_port

    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "17")  # the user's
    logger = ResilientLogger(seeded_store(tmp_path), timeout_s=2, max_retries=0)
    seen = []
    real = logger.client.log_batch

    def spy(*args, **kwargs):
        seen.append({k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                                                     "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")})
        return real(*args, **kwargs)

    logger.client.log_batch = spy
    assert logger.start_run("http-settings", "run") is not None
    logger.log_metrics({"loss": 1.0}, step=0)
    assert logger.close(timeout_s=5)
    assert seen == [{"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "17",
                     "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}]
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "17"
    # ...and the same while the server is unreachable (the failed attempt restores them too)
    down = ResilientLogger(f"http://127.0.0.1:{free_port()}", timeout_s=1, retry_interval_s=0.1)
    assert down.start_run("x", "y") is None
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ

"""The resilient logger against a store that refuses a call (a bad key, a deleted run or
experiment, a read-only artifact store): what is dropped, what is retried, what is said."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlflow_store import seeded_store  # noqa: E402

from dino_scale.tracking.logger import ResilientLogger  # noqa: E402


def _sqlite(tmp_path) -> str:
    return seeded_store(tmp_path)


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name == "dino_scale.tracking"]


def test_refused_key_is_dropped_and_the_calls_behind_it_are_sent(tmp_path, caplog):
    """An invalid metric key used to stay at the head of the queue for ever, retried as an
    'unreachable' store: every later call (metrics, end_run) waited behind it and was lost."""
    from mlflow.tracking import MlflowClient

    caplog.set_level(logging.WARNING, logger="dino_scale.tracking")
    uri = _sqlite(tmp_path)
    logger = ResilientLogger(uri, retry_interval_s=0.1)
    run_id = logger.start_run("errors", "bad-key")
    logger.log_params({"lr": 1e-4, "bad@param": 1})
    logger.log_metrics({"loss": 2.0, "bad@key": 1.0}, step=1)  # one batch: only the bad key is lost
    for step in range(2, 5):
        logger.log_metrics({"loss": 1.0 / step, "bad@key": 0.0}, step=step)
    logger.end_run()
    assert logger.pending == 0 and logger.outages == 0
    assert not logger.close(timeout_s=5), "a dropped call must show in close()"
    assert logger.dropped == 5
    assert logger.failed_ops == ["log_params(bad@param): refused (MlflowException: Invalid value \"bad@param\" "
                                 "for parameter 'params[0].key' supplied: Names may only contain alphanumerics, "
                                 "underscores (_), dashes (-), periods (.), spaces ( ), colon(:) and slashes (/).)"]
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.0001"}
    assert sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss")) == [1, 2, 3, 4]
    errors = _errors(caplog)
    assert len(errors) == 3, errors  # the param, the first bad metric (the rest are counted), the summary
    assert f"MLflow run {run_id} at {uri}: log_metrics(bad@key) at step 1 dropped, refused (MlflowException: " \
           "Invalid value \"bad@key\"" in errors[1]
    assert errors[2].startswith(f"MLflow run {run_id}: 5 logging calls were dropped (metrics 4, params 1)")
    assert not any("unreachable" in r.getMessage() for r in caplog.records)


def test_run_deleted_during_training(tmp_path, caplog):
    """Every call after the deletion is refused: dropped, not retried; the refused end_run is an
    error the caller can see (failed_ops, close() False), and close() does not wait out its timeout."""
    import time

    from mlflow.tracking import MlflowClient

    caplog.set_level(logging.WARNING, logger="dino_scale.tracking")
    uri = _sqlite(tmp_path)
    logger = ResilientLogger(uri, retry_interval_s=0.1)
    run_id = logger.start_run("errors", "deleted")
    logger.log_metrics({"loss": 1.0, "lr": 0.1}, step=0)
    MlflowClient(uri).delete_run(run_id)
    for step in range(1, 4):
        logger.log_metrics({"loss": 1.0, "lr": 0.1}, step=step)
    logger.end_run()
    t0 = time.monotonic()
    assert not logger.close(timeout_s=30)
    assert time.monotonic() - t0 < 10
    # 3 batches of 2 and end_run: the first refusal names the run, so the rest are dropped unsent
    # (was: each batch resent value by value, each value refused again: 7 drops, 9 requests)
    assert logger.pending == 0 and logger.dropped == 4
    assert len(logger.failed_ops) == 1 and logger.failed_ops[0].startswith(
        f"end_run(FINISHED): its run {run_id} takes no more calls, refused (")
    errors = _errors(caplog)
    assert [e.split(" dropped,")[0] for e in errors[:3]] == [
        f"MLflow run {run_id} at {uri}: log_metrics(loss, lr) at step 1",  # refused
        f"MLflow run {run_id} at {uri}: log_metrics(loss, lr) at step 2",  # the first dropped unsent
        f"MLflow run {run_id} at {uri}: end_run(FINISHED)"]
    assert "4 logging calls were dropped (end 1, metrics 3)" in errors[3]


def test_artifact_store_refusing_the_write(tmp_path, caplog):
    """The model's log_artifacts refused by the (file) artifact store: an error naming it, in
    failed_ops; the run still ends FINISHED."""
    from mlflow.tracking import MlflowClient

    caplog.set_level(logging.WARNING, logger="dino_scale.tracking")
    uri = _sqlite(tmp_path)
    logger = ResilientLogger(uri, retry_interval_s=0.1)
    run_id = logger.start_run("errors", "artifacts")
    run = MlflowClient(uri).get_run(run_id)
    blocked = Path(run.info.artifact_uri[len("file://"):])
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("not a folder")  # nothing can be written under it
    model = tmp_path / "final"
    model.mkdir()
    (model / "config.json").write_text("{}")
    logger.log_artifacts(model, "model")
    logger.log_metrics({"final/AP": 0.5}, step=3)
    logger.end_run()
    assert not logger.close(timeout_s=5) and logger.pending == 0 and logger.dropped == 1
    assert logger.failed_ops[0].startswith(f"log_artifacts({model} -> model): refused (")
    assert any(f"log_artifacts({model} -> model) dropped, refused" in e for e in _errors(caplog))
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"final/AP": 0.5}


def test_refused_run_creation(tmp_path, caplog):
    """An experiment that was deleted: the run cannot be created, ever. start_run returns None
    and everything logged for it is dropped (it waited for a run that would never come)."""
    from mlflow.tracking import MlflowClient

    caplog.set_level(logging.WARNING, logger="dino_scale.tracking")
    uri = _sqlite(tmp_path)
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("gone"))
    logger = ResilientLogger(uri, retry_interval_s=0.1)
    assert logger.start_run("gone", "run") is None
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.end_run()
    assert not logger.close(timeout_s=5) and logger.pending == 0 and logger.dropped == 3
    assert [op.split(":")[0] for op in logger.failed_ops] == ["create run 'run' in experiment 'gone'",
                                                               "end_run(FINISHED)"]
    assert "end_run(FINISHED) dropped, its run's creation was refused" in "\n".join(_errors(caplog))


def test_refusal_classification():
    """What is dropped (the store answered 'never') and what is retried (it may come back)."""
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    from dino_scale.tracking.refusals import is_refusal

    def http_error(status: int) -> requests.HTTPError:
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(f"{status}", response=response)

    refused = [MlflowException("x", error_code=getattr(codes, name)) for name in (
        "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "PERMISSION_DENIED",
        "RESOURCE_ALREADY_EXISTS", "ENDPOINT_NOT_FOUND")]
    refused += [http_error(403), http_error(413), PermissionError("read-only"), NotADirectoryError("x"),
                TypeError("not JSON serializable")]
    retried = [MlflowException("x", error_code=getattr(codes, name)) for name in (
        "TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED", "UNAUTHENTICATED",
        "DEADLINE_EXCEEDED")]
    retried += [http_error(500), http_error(503), http_error(429), requests.ConnectionError("refused"),
                requests.Timeout("slow"), ConnectionResetError("reset"), TimeoutError("slow"), RuntimeError("?")]
    assert [e for e in refused if not is_refusal(e)] == []
    assert [e for e in retried if is_refusal(e)] == []


def test_start_run_that_must_succeed(tmp_path):
    """start_run(wait_s=...) for a caller that hands the run id to other processes (fit() gives
    it to rank 0 before training): it retries, then raises naming the store and the cause,
    instead of returning None (rank 0 then logged nothing) and creating the run later."""
    import time

    from mlflow.tracking import MlflowClient
    from mlflow_server import free_port

    from dino_scale.tracking.logger import TrackingUnavailable

    uri = f"http://127.0.0.1:{free_port()}"
    logger = ResilientLogger(uri, timeout_s=1, retry_interval_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=rf"MLflow run 'r' \(experiment 'x'\) could not be created at "
                                                  rf"{uri} within 1 s: unreachable \(MlflowException: "):
        logger.start_run("x", "r", wait_s=1.0)
    assert 1.0 <= time.monotonic() - t0 < 10 and logger.outages == 1
    assert logger.pending == 0  # no run created behind the caller's back once the server answers
    sqlite = _sqlite(tmp_path)
    client = MlflowClient(sqlite)
    client.delete_experiment(client.create_experiment("gone"))
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="could not be created at .*: create run 'r' in experiment 'gone' "
                                                  r"refused \(MlflowException: The experiment .* deleted") as err:
        ResilientLogger(sqlite, retry_interval_s=5).start_run("gone", "r", wait_s=60)
    # advice for a refusal, not for an outage (was "start the tracking server")
    assert "mlflow experiments restore" in str(err.value) and "start the tracking server" not in str(err.value)
    assert time.monotonic() - t0 < 30  # a refusal raises at once
    assert ResilientLogger(sqlite).start_run("here", "r", wait_s=0) is not None


def test_upload_timeout_grows_with_the_size(tmp_path):
    """60 s plus the size at 5 MB/s (every file under a folder, nested ones too), at least the floor."""
    from dino_scale.tracking.ops import upload_timeout_s

    assert upload_timeout_s("/no/such/folder", 3) == 60
    assert upload_timeout_s("/no/such/folder", 90) == 90
    folder = tmp_path / "ckpt"
    (folder / "sub" / "deeper").mkdir(parents=True)
    big = folder / "model.bin"
    big.write_bytes(b"\0" * 10_000_000)  # 10 MB: 2 s at 5 MB/s
    (folder / "sub" / "deeper" / "state.pt").write_bytes(b"\1" * 2_500_000)  # nested: 0.5 s
    (tmp_path / "empty").mkdir()
    assert upload_timeout_s(tmp_path / "empty", 3) == 60
    assert upload_timeout_s(big, 3) == pytest.approx(60 + 10_000_000 / 5e6)  # a single file: 62
    assert upload_timeout_s(str(big), 3) == pytest.approx(62.0)
    assert upload_timeout_s(folder, 3) == pytest.approx(60 + 12_500_000 / 5e6)  # the folder: 62.5
    assert upload_timeout_s(folder / "sub", 3) == pytest.approx(60.5)  # only what is under it
    assert upload_timeout_s(folder, 61) == pytest.approx(62.5)  # a floor below the size's time
    assert upload_timeout_s(folder, 90) == 90  # the floor wins
    assert upload_timeout_s(folder, 3, min_rate_bytes_s=1e6) == pytest.approx(60 + 12.5)


def test_a_run_deleted_while_it_is_logged_to_costs_one_refused_call(tmp_path, monkeypatch, caplog):
    """A run deleted in the UI while training logs to it: each refused batch was resent key by key
    (the cure for one bad key), every one refused again: 200 steps of 10 keys made 2,206 requests,
    and each later step K more. The first refusal that names the run drops the rest unsent."""
    from mlflow.tracking import MlflowClient

    uri = _sqlite(tmp_path)
    logger = ResilientLogger(uri, retry_interval_s=1000)
    run_id = logger.start_run("errors", "deleted")
    logger.log_metrics({"loss": 1.0}, step=0)
    assert logger.close(timeout_s=10)
    MlflowClient(uri).delete_run(run_id)
    calls = []
    real = MlflowClient.log_batch

    def counted(self, *args, **kwargs):  # the real call, counted
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counted)
    with caplog.at_level(logging.ERROR):
        for step in range(1, 51):
            logger.log_metrics({f"k{i}": float(step) for i in range(10)}, step=step)
        assert not logger.close(timeout_s=10)
    assert len(calls) <= 2, len(calls)
    assert logger.pending == 0 and logger.dropped == 50
    assert "must be in the 'active' state" in caplog.text

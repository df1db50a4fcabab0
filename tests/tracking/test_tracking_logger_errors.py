"""The resilient logger (and registration) against stores that stop answering, answer late or
refuse a call."""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlflow_server import MlflowServer  # noqa: E402

from mlflow_store import seeded_store
from dino_scale.tracking.logger import ResilientLogger  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-errors")).start()
    try:
        yield srv
    finally:
        srv.stop()


def _freeze(server: MlflowServer, frozen: bool) -> None:
    """Stop (SIGSTOP) or resume the server's processes: requests time out, as with a server
    that hangs, without a restart."""
    os.killpg(server.proc.pid, signal.SIGSTOP if frozen else signal.SIGCONT)


@pytest.mark.timeout(300)
def test_recovery_message_counts_each_outage_alone(server, caplog):
    """'flushed N buffered calls' after the second outage counts that outage's calls only (it
    was cumulative: 2 calls buffered in the second outage were reported as 5)."""
    from mlflow.tracking import MlflowClient

    caplog.set_level(logging.WARNING, logger="dino_scale.tracking")
    # a frozen server answers late: the first call of each outage waits out its 1 s timeout, the
    # later ones are buffered without a retry (the next is a minute away) until the forced flush
    logger = ResilientLogger(server.uri, timeout_s=1, retry_interval_s=60.0, max_timeout_s=2)
    run_id = logger.start_run("errors", "two-outages", wait_s=120)  # a loaded machine's late answer: retried
    assert run_id is not None
    step = 0
    for buffered in (3, 2):
        _freeze(server, True)
        try:
            for _ in range(buffered):
                logger.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
                step += 1
            assert logger.pending == buffered
        finally:
            _freeze(server, False)
        deadline = time.monotonic() + 60  # the woken server may answer its queue first: tried until sent
        while not logger.flush(force=True):
            assert time.monotonic() < deadline, logger.last_error
            time.sleep(0.2)
        assert logger.flushed_after_outage == buffered
    recovered = [r.getMessage() for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(recovered) == 2 and logger.outages == 2
    assert recovered[0].endswith("flushed 3 buffered calls") and recovered[1].endswith("flushed 2 buffered calls")
    history = MlflowClient(server.uri).get_metric_history(run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(step))


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


@pytest.mark.timeout(120)
def test_refusals_over_rest(server, caplog):
    """The same through a tracking server (RestException): a bad key is dropped alone, a run
    that does not exist (404) refuses everything; a frozen server is an outage, not a refusal."""
    from mlflow.tracking import MlflowClient

    caplog.set_level(logging.WARNING, logger="dino_scale.tracking")
    # a live server: a timeout long enough that a loaded CI machine is not read as an outage
    logger = ResilientLogger(server.uri, timeout_s=10, retry_interval_s=0.1)
    run_id = logger.start_run("errors", "rest")
    logger.log_metrics({"loss": 1.0, "bad@key": 1.0}, step=0)
    logger.log_metrics({"loss": 0.5}, step=1)
    logger.end_run()
    assert not logger.close(timeout_s=10) and logger.dropped == 1 and logger.failed_ops == []
    assert sorted(m.step for m in MlflowClient(server.uri).get_metric_history(run_id, "loss")) == [0, 1]
    assert MlflowClient(server.uri).get_run(run_id).info.status == "FINISHED"
    missing = ResilientLogger(server.uri, "0" * 32, timeout_s=10, retry_interval_s=0.1)
    missing.log_metrics({"loss": 1.0, "lr": 0.1}, step=0)  # RESOURCE_DOES_NOT_EXIST: not resent value by value
    missing.end_run()
    assert not missing.close(timeout_s=10) and missing.pending == 0 and missing.dropped == 2
    assert "RESOURCE_DOES_NOT_EXIST" in missing.failed_ops[0]
    assert not any("unreachable" in r.getMessage() for r in caplog.records)


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


@pytest.mark.timeout(300)
def test_a_run_whose_creation_answer_was_lost_is_not_created_again(server):
    """The server created the run but its answer came after the logger's timeout: the retry
    found that run (by the creation tag) instead of creating another (every retry made one:
    orphan RUNNING runs with the same name, which a resumed run could be linked to)."""
    from mlflow.tracking import MlflowClient

    from slow_proxy import SlowProxy

    proxy = SlowProxy(server.uri, ("POST", "runs/create"), delay_s=3)
    try:
        logger = ResilientLogger(proxy.uri, timeout_s=1, retry_interval_s=0.5)
        run_id = logger.start_run("slow-create", "created-once", wait_s=30)
        logger.log_metrics({"loss": 1.0}, step=1)
        logger.end_run("FINISHED")
        assert logger.close(timeout_s=30)
    finally:
        proxy.close()
    assert proxy.count("POST", "runs/create") == 1
    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("slow-create").experiment_id])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0]


@pytest.mark.timeout(300)
def test_an_upload_answered_late_is_sent_once_and_the_run_ends(server, tmp_path):
    """A tracking server that answers an artifact upload only once it has stored it (in S3,
    say) answered after the logger's short timeout: the upload was counted as an outage and
    sent again from the start every retry, and the run's end, queued behind it, never went
    out (the run stayed RUNNING). Uploads get a timeout sized to what they send."""
    from mlflow.tracking import MlflowClient

    from slow_proxy import SlowProxy

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 200_000)
    proxy = SlowProxy(server.uri, ("PUT", "mlflow-artifacts/artifacts"), delay_s=3)
    try:
        logger = ResilientLogger(proxy.uri, timeout_s=1, retry_interval_s=0.5)
        run_id = logger.start_run("slow-upload", "uploaded-once", wait_s=30)
        logger.log_artifacts(str(folder), "model")
        logger.end_run("FINISHED")
        assert logger.close(timeout_s=30) and logger.outages == 0
    finally:
        proxy.close()
    assert proxy.count("PUT", "mlflow-artifacts/artifacts") == 1
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [(a.path, a.file_size) for a in client.list_artifacts(run_id, "model")] == [("model/weights.bin", 200_000)]


@pytest.mark.timeout(300)
def test_a_store_slower_than_the_timeout_gets_longer_timeouts(server):
    """A store answering every metric batch after the logger's timeout got the same request again
    each retry, for ever (``close`` gave up with the calls unsent). A late answer doubles the
    request timeout; the retried batch is stored once (MLflow keeps an identical metric once)."""
    from mlflow.tracking import MlflowClient

    from slow_proxy import SlowProxy

    proxy = SlowProxy(server.uri, ("POST", "log-batch"), delay_s=2.5)
    try:
        logger = ResilientLogger(proxy.uri, timeout_s=1, retry_interval_s=0.2)
        run_id = logger.start_run("slow-store", "slow-batches", wait_s=30)
        for step in range(5):
            logger.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        assert logger.close(timeout_s=40), logger.last_error
    finally:
        proxy.close()
    assert 4 <= logger.request_timeout_s <= 16  # 1 s, 2 s: late; 4 s: answered (8, 16 on a loaded machine)
    history = MlflowClient(server.uri).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / (s + 1)) for s in range(5)]


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


@pytest.mark.timeout(300)
def test_a_backlog_goes_out_in_merged_batches(server):
    """Metric calls buffered during an outage go out as few ``log_batch`` requests (up to 1000
    values each), not one per call: rank 0's backlog of 1500 steps took one request each, 123 s
    inside a single ``log_metrics``. A bad key in a merged batch costs only its own call."""
    from mlflow.tracking import MlflowClient

    from slow_proxy import SlowProxy

    proxy = SlowProxy(server.uri, ("GET", "-none-"), delay_s=0)  # counts the requests
    try:
        logger = ResilientLogger(proxy.uri, timeout_s=1, retry_interval_s=0.5)
        run_id = logger.start_run("errors", "backlog", wait_s=60)
        logger.retry_interval_s = 1000  # no retry until close
        _freeze(server, True)
        try:
            for step in range(300):
                logger.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4}, step=step)
            logger.log_metrics({"bad@key": 1.0}, step=300)  # refused by the store
            for step in range(301, 310):
                logger.log_metrics({"loss": 0.1}, step=step)
            assert logger.pending == 310
        finally:
            _freeze(server, False)
        logger.retry_interval_s = 0.5  # close retries a late answer of the woken server
        before = proxy.count("POST", "log-batch")
        assert not logger.close(timeout_s=60)  # False: the bad key's call was dropped
        sent = proxy.count("POST", "log-batch") - before
    finally:
        proxy.close()
    assert logger.pending == 0 and logger.dropped == 1
    steps = sorted({m.step for m in MlflowClient(server.uri).get_metric_history(run_id, "loss")})
    assert steps == [s for s in range(310) if s != 300]
    assert sent <= 30, sent  # was 311: one per call; a refused merged batch is tried again in halves


@pytest.mark.timeout(300)
def test_a_run_ended_while_the_store_was_down_is_finished_before_registration(server):
    """``fit`` closed its logger with the store down and dropped it: the final metrics, the
    checkpoint tag and the end status were never sent, and the pipelines registered a version of
    a run left RUNNING. ``FitResult`` keeps the logger while calls are buffered, and
    ``finish_tracking`` (called by the pipelines before registering) sends them."""
    from mlflow.tracking import MlflowClient

    from dino_scale.engine.api import FitResult

    logger = ResilientLogger(server.uri, timeout_s=1, retry_interval_s=0.5)
    run_id = logger.start_run("errors", "ended-while-down", wait_s=60)
    logger.retry_interval_s = 1000  # no retry until finish_tracking
    _freeze(server, True)
    try:
        logger.log_metrics({"final/AP": 0.5}, step=3)
        logger.log_metrics({"bad@key": 1.0}, step=3)  # refused by the store once it is back: dropped
        logger.end_run("FINISHED")
        assert not logger.close(timeout_s=2) and logger.pending == 3
    finally:
        _freeze(server, False)
    logger.retry_interval_s = 0.5  # finish_tracking retries a late answer of the woken server
    result = FitResult(checkpoint_path="ckpt", weights_path=Path("w"), config_path=Path("c"), metrics={},
                       run_id=run_id, tracking_uri=server.uri, run_name="r", pending_tracking=logger)
    # True although a call was dropped: the end status went out (the pipelines warned "it shows
    # RUNNING" for a FINISHED run); the drop itself is logged as an error by the logger
    assert result.finish_tracking(timeout_s=60) and result.pending_tracking is None
    assert logger.dropped == 1
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run_id, "final/AP")] == [0.5]
    assert FitResult("c", Path("w"), Path("c"), {}, run_id, server.uri, "r").finish_tracking()  # nothing pending


@pytest.mark.timeout(300)
def test_a_registration_whose_answer_was_lost_makes_one_version(server, monkeypatch):
    """A gateway answered 504 to a model-version create the server had done: MLflow's client
    sent it again, and the run got two versions (the pipelines then tagged and promoted the
    second, leaving an orphan). ``register_model`` keeps the first and deletes the resends'."""
    from mlflow.tracking import MlflowClient

    from dino_scale.tracking.registry import register_model
    from slow_proxy import SlowProxy

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    logger = ResilientLogger(server.uri)
    run_id = logger.start_run("errors", "registered-once", wait_s=60)
    logger.end_run()
    assert logger.close(timeout_s=30), logger.last_error
    proxy = SlowProxy(server.uri, ("POST", "model-versions/create"), delay_s=0, lose_answers=1)
    try:
        version = register_model(run_id, "dino-registered-once", tracking_uri=proxy.uri)
    finally:
        proxy.close()
    assert proxy.count("POST", "model-versions/create") == 2  # the resend happened
    client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    versions = client.search_model_versions("name='dino-registered-once'")
    assert [(v.version, v.run_id) for v in versions] == [(version, run_id)] and version == "1"


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

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

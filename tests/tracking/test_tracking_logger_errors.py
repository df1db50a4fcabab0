"""The resilient logger against stores that stop answering, and stores that refuse a call."""
from __future__ import annotations

import logging
import os
import signal
import sys
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
    logger = ResilientLogger(server.uri, timeout_s=1, retry_interval_s=0.0)
    run_id = logger.start_run("errors", "two-outages")
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
        assert logger.flush(force=True)
        assert logger.flushed_after_outage == buffered
    recovered = [r.getMessage() for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(recovered) == 2 and logger.outages == 2
    assert recovered[0].endswith("flushed 3 buffered calls") and recovered[1].endswith("flushed 2 buffered calls")
    history = MlflowClient(server.uri).get_metric_history(run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(step))

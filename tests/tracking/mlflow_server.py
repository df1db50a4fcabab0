"""A real ``mlflow server`` on 127.0.0.1 for tests (sqlite backend, local artifacts)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A free port the server binds later, and binds again on a restart (tests/free_ports.py)."""
    from free_ports import listen_port

    return listen_port()


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "MlflowServer":
        from mlflow_store import seeded_store

        seeded_store(self.root)  # an empty store (kept on a restart): no migrations at start-up
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                                          # MLflow's GenAI job runner: 8 more processes importing mlflow
                                          # at each start, running beside the test (start 8-10 -> 5-7 s)
                                          "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        self._warm_up(deadline)
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError("mlflow server did not become healthy")

    def _warm_up(self, deadline: float) -> None:
        """One tracking call with a generous timeout: the server's first store request (database
        session, schema check) took over a second on a loaded 2-core box, and tests that give
        their client a 1 s timeout saw the server as unreachable before any outage began."""
        url = f"{self.uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
        try:
            with urllib.request.urlopen(url, timeout=max(1.0, deadline - time.monotonic())):
                pass
        except urllib.error.HTTPError:
            pass  # answered (e.g. 404 where no Default experiment exists): the store is warm

    def stop(self) -> None:
        """End the server's process group (it forks workers); only processes we started."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=5)
        self.proc = None
        # wait for the port to close
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)

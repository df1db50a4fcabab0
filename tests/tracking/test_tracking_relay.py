"""Which tracking URIs rank 0 reaches through the driver's node (the relay actor itself is
exercised on Ray in tests/engine/test_engine_ray.py::test_tracking_relay_logs_from_the_drivers_node)."""
from __future__ import annotations

import pytest

from dino_scale.tracking.relay import is_node_local


@pytest.mark.parametrize("uri", [
    "sqlite:////data/runs/mlflow.db", "sqlite:///rel/mlflow.db?timeout=30", "file:///data/mlruns", "file:mlruns",
    "/data/mlruns", "mlruns",
    # a server on the driver's machine: on another node, this address is that node
    "http://127.0.0.1:5000", "http://127.0.1.1:5000", "http://localhost:5000", "http://LOCALHOST:5000/",
    "https://localhost", "http://[::1]:5000", "http://0.0.0.0:5000", "http://user:pw@127.0.0.1:5000",
    "postgresql://mlflow@localhost/mlflow", "postgresql:///mlflow",
])
def test_node_local(uri):
    assert is_node_local(uri)


@pytest.mark.parametrize("uri", [
    "databricks", "databricks://my-profile", "http://mlflow:5000", "http://10.0.0.5:5000",
    "https://mlflow.example.com", "http://[2001:db8::1]:5000", "postgresql://mlflow@db.internal/mlflow",
])
def test_reached_from_any_node(uri):
    assert not is_node_local(uri)


def test_the_relay_is_handed_the_store_clients_variables(monkeypatch, tmp_path):
    """What :class:`TrackingRelay` sets in its process (a Ray worker has the raylet's environment,
    not the driver's): MLflow's and Databricks' settings, proxies and CA bundles, nothing else."""
    import os

    from dino_scale.tracking.relay import TrackingRelay, client_env

    env = {"MLFLOW_TRACKING_TOKEN": "t", "MLFLOW_TRACKING_INSECURE_TLS": "true", "DATABRICKS_HOST": "h",
           "https_proxy": "http://proxy:3128", "NO_PROXY": "internal", "REQUESTS_CA_BUNDLE": "/ca.pem",
           "HOME": "/home/u", "AWS_SECRET_ACCESS_KEY": "s", "PATH": "/bin", "XMLFLOW_TOKEN": "x"}
    assert client_env(env) == {k: env[k] for k in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS",
                                                   "DATABRICKS_HOST", "https_proxy", "NO_PROXY",
                                                   "REQUESTS_CA_BUNDLE")}
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the actor's process, here this one's copy
    relay = TrackingRelay(f"sqlite:///{tmp_path}/mlflow.db", "0" * 32, {"MLFLOW_TRACKING_TOKEN": "from-the-driver"})
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "from-the-driver" and relay.logger is not None

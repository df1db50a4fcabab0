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

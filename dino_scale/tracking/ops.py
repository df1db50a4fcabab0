"""What :class:`~dino_scale.tracking.logger.ResilientLogger` queues and sends: params flattened to
MLflow's limits, metric calls as MLflow entities, and the request timeout of an artifact upload.
A queued call is a tuple: ``("params", {k: v})``, ``("tags", {k: v})``, ``("metrics", {k: v},
timestamp_ms, step)``, ``("artifacts", local_dir, artifact_path)``, ``("dict", data, file)``,
``("end", status)``."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["MAX_PARAM_LEN", "MAX_BATCH_METRICS", "PARAMS_PER_CALL", "flatten_params", "metric_entities",
           "upload_timeout_s"]

MAX_PARAM_LEN = 6000
MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit: queued metric calls go out merged up to it
PARAMS_PER_CALL = 100


def flatten_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> ``{"a.b": "value"}`` with string values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_params(v, key + "."))
        else:
            text = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            out[key] = text[:MAX_PARAM_LEN]
    return out


def metric_entities(op: tuple) -> list:
    """MLflow ``Metric`` entities of a queued ``("metrics", values, timestamp, step)`` call
    (non-finite values as NaN)."""
    from mlflow.entities import Metric

    _, values, ts, step = op
    return [Metric(k, v if math.isfinite(v) else float("nan"), ts, step) for k, v in values.items()]


def upload_timeout_s(local_dir: str | Path, floor_s: float, min_rate_bytes_s: float = 5e6) -> float:
    """The request timeout of an artifact upload of ``local_dir``: 60 s plus its size at 5 MB/s,
    at least ``floor_s``. The logger's short timeout (a hung server must not stall training)
    cut off uploads a tracking server answers only once stored (e.g. in S3): each try was
    counted as an outage and sent again from the start, so the run's end never went out."""
    path = Path(local_dir)
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else []
    size = 0
    for f in files:
        with contextlib.suppress(OSError):
            size += f.stat().st_size
    return max(float(floor_s), 60.0 + size / float(min_rate_bytes_s))

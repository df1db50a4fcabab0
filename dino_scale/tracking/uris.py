"""Where runs and their artifacts are stored.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set (a relative sqlite path made absolute), else
``sqlite:///<work_dir>/mlflow.db``. With a local sqlite store, an experiment the logger creates
keeps its artifacts next to the database (``<db folder>/mlartifacts/<experiment>``), not in
MLflow's default ``./mlruns`` under the process's working directory: for a ``ray job submit``
driver that is Ray's temporary copy of the submitted folder, which goes away with the cluster.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

__all__ = ["absolute_sqlite_uri", "default_tracking_uri", "local_path", "sqlite_artifact_location"]


def absolute_sqlite_uri(uri: str) -> str:
    """``sqlite:///rel/path.db`` -> ``sqlite:////abs/path.db`` (from the current directory, as
    SQLAlchemy reads it). Other URIs unchanged. Exported URIs must be absolute: Ray Train
    workers run in their own trial folders, where a relative path names another database."""
    if not uri.startswith("sqlite:///"):
        return uri
    db, sep, query = uri[len("sqlite:///"):].partition("?")
    if not db or db == ":memory:" or db.startswith("/"):
        return uri
    return f"sqlite:///{Path(db).expanduser().resolve()}{sep}{query}"


def default_tracking_uri(work_dir: Optional[str | Path] = None, create: bool = True) -> str:
    """``MLFLOW_TRACKING_URI`` (a relative sqlite path made absolute) or sqlite in
    ``work_dir`` (created unless ``create`` is False: a lookup must not leave a mistyped folder)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return absolute_sqlite_uri(uri)
    if work_dir is None:
        raise ValueError("set MLFLOW_TRACKING_URI or pass a work_dir for the sqlite store")
    folder = Path(work_dir).expanduser().resolve()
    odd = sorted({c for c in str(folder) if c in "?#%"})
    if odd:  # SQLAlchemy reads the URI: '?' starts a query ('exp?v2' stored in 'exp'), '%20' is a space
        from dino_scale.config import ConfigError

        raise ConfigError(f"{folder}: a work folder whose path holds {' '.join(repr(c) for c in odd)} cannot hold "
                          f"the sqlite MLflow store (URL syntax in sqlite:///<path>: the store would be another "
                          f"file); choose another --work-dir, or set MLFLOW_TRACKING_URI")
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def sqlite_artifact_location(tracking_uri: str, experiment: str) -> Optional[str]:
    """Artifact location (a ``file://`` URI) for a new experiment in a local sqlite store:
    ``<db folder>/mlartifacts/<experiment>``; None for other stores (a tracking server's
    ``--default-artifact-root`` / ``--artifacts-destination`` decides there) and in-memory
    sqlite. A relative database path is taken from the current directory, as SQLAlchemy does."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in experiment) or "default"
    return (Path(db).resolve().parent / "mlartifacts" / safe).as_uri()


def local_path(uri: str) -> Path:
    """The path a model URI that names no registry or run artifact stands for: a path (``~``
    expanded) or a ``file:`` URI as ``Path.as_uri()`` and MLflow write them (``file:///a/b%20c``,
    ``file://localhost/a``). The ``file://`` prefix was cut off as text: a percent-encoded name
    (a space) was not found, and ``file://localhost/a`` was the relative path ``localhost/a``.
    :class:`ValueError` for a ``file:`` URI naming another host."""
    from urllib.parse import unquote, urlparse

    if not uri.startswith("file:"):
        return Path(uri).expanduser()
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{uri} names a file on the host {parsed.netloc!r}: give a path on this machine "
                         f"(file:///absolute/path, or the path itself)")
    return Path(unquote(parsed.path))

"""MLflow clients made one process at a time per new sqlite store.

MLflow builds a sqlite store's schema (its whole migration history) when the first client of
the file is made. Two jobs starting together on a new store (a fresh work folder, a team's
first runs) both migrated it: 2-3 of 3 processes started at once failed with ``duplicate
column name: step`` or ``table _alembic_tmp_model_versions already exists``, the winner
included. The client is made under an exclusive ``flock`` on ``<store>.lock`` beside the
database, so the second waits, then finds the schema current. Other stores (a tracking server)
are not locked.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

__all__ = ["mlflow_client", "sqlite_path"]


def sqlite_path(uri: Optional[str]) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URI (None for any other store)."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


@contextlib.contextmanager
def _schema_lock(uri: Optional[str]) -> Iterator[None]:
    db = sqlite_path(uri)
    if db is None or not db.parent.is_dir():  # not sqlite; or no folder: MLflow's own error follows
        yield
        return
    import fcntl

    try:
        fh = open(db.with_name(db.name + ".lock"), "a")
    except OSError:  # a store this user may only read (a team's folder, a read-only mount): nothing to migrate
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
        yield


def mlflow_client(tracking_uri: Optional[str] = None, registry_uri: Optional[str] = None):
    """``MlflowClient(tracking_uri, registry_uri)`` (None: MLflow's configured URIs), made under
    the store's schema lock when it is a sqlite file."""
    import mlflow
    from mlflow.tracking import MlflowClient

    with _schema_lock(tracking_uri or mlflow.get_tracking_uri()):
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)

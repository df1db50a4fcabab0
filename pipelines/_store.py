"""The pipelines' MLflow store: which one (:func:`tracking_uri`), pointing MLflow and the
processes started afterwards at it (:func:`setup_tracking`), and failing fast where a lookup
cannot work (:func:`require_store`). Re-exported by :mod:`pipelines._common`."""
from __future__ import annotations

import os
from pathlib import Path

from pipelines._errors import UsageError


def tracking_uri(work_dir: str | Path, create: bool = True) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<abs work-dir>/mlflow.db`` (the
    engine's rule, :func:`dino_scale.tracking.uris.default_tracking_uri`; creates work-dir
    unless ``create`` is False)."""
    from dino_scale.tracking.uris import default_tracking_uri

    return default_tracking_uri(work_dir, create=create)


def setup_tracking(work_dir: str | Path, create: bool = True) -> str:
    """Point MLflow (tracking and registry) at the shared store; exported in the
    environment so processes started afterwards (Ray workers) use the same store.
    ``create=False`` (lookups: registry, predict): a missing work folder is not created, so a
    mistyped ``--work-dir`` leaves nothing behind and :func:`require_store` names it."""
    import logging

    import mlflow

    # A new sqlite store announces its schema migration at INFO on stderr: noise for users.
    for name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if create:
        Path(work_dir).expanduser().mkdir(parents=True, exist_ok=True)  # as tracking_uri reads it
    uri = tracking_uri(work_dir, create=create)
    if create and uri.startswith(("http://", "https://")):  # a stage that logs: a server that does not
        require_store(uri)  # answer fails it now, not after its data checks and Ray start (minutes)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


class StoreUnreachable(RuntimeError):
    """The MLflow tracking server does not answer (exit code 1: not the user's mistake)."""


def require_store(uri: str, looking_for: str = "") -> None:
    """Fail fast, naming the store, where a lookup cannot work: a sqlite store that does not
    exist (a mistyped ``--work-dir``: MLflow would create an empty one) or a tracking server
    that does not answer its ``/health`` within 10 s (MLflow's own retries take minutes)."""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):].split("?", 1)[0]
        if db and db != ":memory:" and not Path(db).is_file():
            raise UsageError((f"cannot resolve {looking_for}: " if looking_for else "") +
                             f"no MLflow store at {db}: give the --work-dir your runs used, or set "
                             f"MLFLOW_TRACKING_URI")
    elif uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
        except urllib.error.HTTPError:
            return  # it answered (e.g. a proxy that wants credentials): MLflow's calls will tell
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StoreUnreachable(f"MLflow tracking server {uri} unreachable ({reason}); start it, or "
                                   f"point MLFLOW_TRACKING_URI at a running one") from None

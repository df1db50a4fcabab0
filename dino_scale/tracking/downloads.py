"""Downloads of registered models and run artifacts (:func:`~dino_scale.tracking.registry.resolve_model_uri`),
also from a sqlite store copied off the machine it was written on (:func:`moved_store_uri`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ["MODEL_ARTIFACT_PATH", "run_and_path", "download_siblings", "download_version",
           "download_run_artifact", "moved_store_uri"]

MODEL_ARTIFACT_PATH = "model"


def run_and_path(uri: str) -> tuple[str, str]:
    """``runs:/<run id>/<artifact path>`` -> (run id, artifact path; "" when none)."""
    run_id, _, path = uri[len("runs:/"):].partition("/")
    return run_id, path


def download_siblings(client, run_id: str, path: str, dst: Path, store: Optional[str] = None) -> None:
    """What a model folder holds beside its weights, next to the run artifact file ``path``
    (downloaded under ``dst``), where the run has them: the config, the lineage, and the categories
    by which fine-tuning maps class heads and predict names labels (a URI naming the weights file
    lost them: heads initialized fresh, labels printed as numbers)."""
    from urllib.parse import unquote, urlparse

    from dino_scale.engine.checkpoint import CONFIG_NAME

    folder = path.strip("/").rpartition("/")[0]
    moved = moved_store_uri(client.get_run(run_id).info.artifact_uri, store)
    if moved is not None:  # the store's recorded root is gone: listed where the copy holds it
        local = Path(unquote(urlparse(moved).path)) / folder
        listed = {p.name for p in local.iterdir()} if local.is_dir() else set()
    else:
        listed = {Path(a.path).name for a in client.list_artifacts(run_id, folder or None)}
    for name in (CONFIG_NAME, "lineage.json", "categories.json"):
        if name in listed:
            download_run_artifact(client, run_id, f"{folder}/{name}" if folder else name, dst, store)


def download_version(client, mv, dst: Path, tracking_uri: Optional[str]) -> Path:
    """The local copy (under ``dst``) of what model version ``mv`` registered: its ``source``, a
    folder of its run's artifacts (``register_model``: ``<run artifact root>/model``), a
    ``runs:/<run id>/<path>`` URI, or any other artifact location MLflow reads (a path, ``s3://``,
    a logged model). A source outside its run's artifacts used to be read as the run's ``model``
    folder: another artifact than the one registered."""
    import mlflow.artifacts

    source = mv.source.rstrip("/")
    store = tracking_uri or getattr(client, "tracking_uri", None)
    run_id, path = run_and_path(source) if source.startswith("runs:/") else (None, None)
    if run_id is None and mv.run_id:
        base = client.get_run(mv.run_id).info.artifact_uri.rstrip("/")
        if source == base or source.startswith(base + "/"):
            run_id, path = mv.run_id, source[len(base):].strip("/") or MODEL_ARTIFACT_PATH
    if run_id is not None:
        local = download_run_artifact(client, run_id, path, dst, store)
        if local.is_file():  # a version of the weights file: its config, lineage and categories too
            download_siblings(client, run_id, path, dst, store)
        return local
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=moved_store_uri(mv.source, store) or mv.source,
                                                    dst_path=str(dst), tracking_uri=tracking_uri))


def download_run_artifact(client, run_id: str, path: str, dst: Path, store: Optional[str]) -> Path:
    """``path`` of run ``run_id``'s artifacts, downloaded under ``dst``; from the store's own
    ``mlartifacts`` folder when the run's recorded root is a local folder that is gone (a store
    copied off its machine: :func:`moved_store_uri`)."""
    import mlflow.artifacts

    moved = moved_store_uri(client.get_run(run_id).info.artifact_uri, store)
    if moved is None:
        return Path(client.download_artifacts(run_id, path, str(dst)))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{moved.rstrip('/')}/{path}", dst_path=str(dst)))


def moved_store_uri(artifact_uri: str, store: Optional[str]) -> Optional[str]:
    """For a sqlite store copied elsewhere (``ray rsync-down`` of the head's work folder): the
    ``file://`` artifact location ``artifact_uri`` recorded on the machine it came from, where that
    folder is gone here and the copy's ``<db folder>/mlartifacts`` holds it; None otherwise. The
    store records absolute roots, so every version pointed at the old machine's folder."""
    from urllib.parse import unquote, urlparse

    if not artifact_uri.startswith("file:") or not (store or "").startswith("sqlite:///"):
        return None
    recorded = Path(unquote(urlparse(artifact_uri).path))
    marker = "mlartifacts"
    if recorded.exists() or marker not in recorded.parts:
        return None
    db = store[len("sqlite:///"):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    rest = recorded.parts[len(recorded.parts) - recorded.parts[::-1].index(marker):]
    here = Path(db).resolve().parent / marker / Path(*rest) if rest else Path(db).resolve().parent / marker
    return here.as_uri() if here.exists() else None

"""MLflow model registry helpers and model-URI resolution for the pipelines.

A logged model is the run artifact folder ``model/`` holding ``model.safetensors``
(full fp32 state dict), ``config.json`` (the :class:`~dino_scale.config.Config`) and
``lineage.json`` (where its initial weights came from). URIs understood by
:func:`resolve_model_uri`:

* ``models:/<name>@<alias>`` and ``models:/<name>/<version>`` (registry),
* ``runs:/<run_id>/<artifact_path>``,
* a local folder (holding ``model.safetensors``, e.g. a final checkpoint) or a file
  (``.safetensors``, or an official ``.pth`` whose ``model`` entry is the state dict).
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dino_scale.config import Config, from_dict

__all__ = [
    "ResolvedModel", "register_model", "set_alias", "get_version_by_alias", "resolve_model_uri",
    "load_model_from_uri", "is_not_found", "MODEL_ARTIFACT_PATH", "NOT_FOUND_CODES",
]

MODEL_ARTIFACT_PATH = "model"
# MLflow error codes of a lookup that found nothing (no such name, alias, version or run)
NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def is_not_found(exc: BaseException) -> bool:
    """An MLflow lookup error that means "there is none" (not an outage, a locked sqlite
    store or a server error: those must not read as an empty registry)."""
    return getattr(exc, "error_code", None) in NOT_FOUND_CODES


def store_client(tracking_uri: Optional[str] = None):
    """A client of ``tracking_uri``'s store for its runs and its registry alike (the registry
    lives in the tracking store); ``None``: MLflow's configured URIs. Given only a tracking URI,
    MLflow's client takes the registry from the process's global one (``mlflow.set_registry_uri``,
    ``MLFLOW_REGISTRY_URI``), which may name another store: a version registered there would
    point at runs of this one, and a lookup there would not find this store's models."""
    from mlflow.tracking import MlflowClient

    if tracking_uri is None:
        return MlflowClient()
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@dataclass
class ResolvedModel:
    """A model URI made local: weights file, its config (None if unknown) and lineage."""

    uri: str
    weights_path: Path
    config: Optional[Config]
    lineage: dict[str, Any] = field(default_factory=dict)


def register_model(run_id: str, name: str, artifact_path: str = MODEL_ARTIFACT_PATH,
                   tags: Optional[dict[str, Any]] = None, tracking_uri: Optional[str] = None,
                   description: Optional[str] = None) -> str:
    """Register ``runs:/<run_id>/<artifact_path>`` as a new version of ``name``; returns the
    version (string). The registered model is created when missing."""
    client = store_client(tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not is_not_found(exc):
            raise
        try:
            client.create_registered_model(name)
        except MlflowException as race:  # another job registered the first version meanwhile
            if race.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    mv = client.create_model_version(name, source=source, run_id=run_id,
                                     tags={k: str(v) for k, v in (tags or {}).items()},
                                     description=description)
    return str(mv.version)


def set_alias(name: str, alias: str, version: str | int, tracking_uri: Optional[str] = None) -> None:
    """Point ``name@alias`` at ``version`` (moving it if it pointed elsewhere)."""
    store_client(tracking_uri).set_registered_model_alias(name, alias, str(version))


def get_version_by_alias(name: str, alias: str, tracking_uri: Optional[str] = None):
    """The ``ModelVersion`` behind ``name@alias``, or None if the model or alias is missing
    (any other MLflow error is raised)."""
    from mlflow.exceptions import MlflowException

    try:
        return store_client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if is_not_found(exc):
            return None
        raise


def _from_local(path: Path, uri: str, lineage: dict[str, Any]) -> ResolvedModel:
    from dino_scale.engine.checkpoint import CONFIG_NAME, WEIGHTS_NAME

    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{uri}: no {WEIGHTS_NAME} in {path}")
        cfg_file = path / CONFIG_NAME
        lin_file = path / "lineage.json"
    elif path.is_file():
        weights = path
        cfg_file = path.with_name(CONFIG_NAME)
        lin_file = path.with_name("lineage.json")
    else:
        raise FileNotFoundError(f"{uri}: no such file or folder {path}")
    config = from_dict(json.loads(cfg_file.read_text())) if cfg_file.is_file() else None
    if lin_file.is_file():
        lineage = {**json.loads(lin_file.read_text()), **lineage}
    return ResolvedModel(uri=uri, weights_path=weights, config=config, lineage=lineage)


def resolve_model_uri(uri: str, dst_dir: Optional[str | Path] = None,
                      tracking_uri: Optional[str] = None) -> ResolvedModel:
    """Make ``uri`` local (downloading registry/run artifacts into ``dst_dir`` or a temp
    folder); ``lineage`` holds ``uri``, and for registry URIs ``name``, ``version``,
    ``run_id``, ``source``, ``aliases`` and version tags (plus the model's own lineage.json)."""
    lineage: dict[str, Any] = {"uri": uri}
    if uri.startswith("models:/") or uri.startswith("runs:/"):
        client = store_client(tracking_uri)
        if uri.startswith("models:/"):
            rest = uri[len("models:/"):]
            if "@" in rest:
                name, alias = rest.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, version = rest.rsplit("/", 1)
                mv = client.get_model_version(name, version)
            lineage.update({"name": mv.name, "version": str(mv.version), "run_id": mv.run_id,
                            "source": mv.source, "aliases": list(getattr(mv, "aliases", []) or []),
                            "tags": dict(mv.tags or {})})
            run_id = mv.run_id
            base = client.get_run(run_id).info.artifact_uri.rstrip("/")
            path = mv.source[len(base):].strip("/") if mv.source.startswith(base) else MODEL_ARTIFACT_PATH
        else:
            run_id, _, path = uri[len("runs:/"):].partition("/")
            lineage["run_id"] = run_id
        dst = Path(dst_dir) if dst_dir else Path(tempfile.mkdtemp(prefix="dino_model_"))
        dst.mkdir(parents=True, exist_ok=True)
        local = client.download_artifacts(run_id, path or MODEL_ARTIFACT_PATH, str(dst))
        return _from_local(Path(local), uri, lineage)
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    return _from_local(path, uri, lineage)


def load_model_from_uri(uri: str, device: str = "cpu", tracking_uri: Optional[str] = None,
                        config: Optional[Config] = None):
    """``(model, cfg)`` with the weights at ``uri`` loaded strictly (eval mode).

    ``config`` is required when the URI carries none (e.g. an official ``.pth``)."""
    from dino_scale.engine.checkpoint import load_weights
    from dino_scale.models import build_dino

    # a registry/run download goes to a temp folder that is removed once the weights are
    # in memory (each call used to leave a copy of the model under the temp dir)
    with tempfile.TemporaryDirectory(prefix="dino_model_") as scratch:
        resolved = resolve_model_uri(uri, dst_dir=scratch, tracking_uri=tracking_uri)
        cfg = config or resolved.config
        if cfg is None:
            raise ValueError(f"{uri} has no config.json; pass config=")
        state = load_weights(resolved.weights_path)
    # the weights replace the whole model: model.backbone_weights (the ImageNet file its training
    # started from, often a path on the training cluster) is not read
    model, _criterion, _post = build_dino(dataclasses.replace(cfg.model, backbone_weights=None))
    try:
        from dino_scale.models.official import load_official_state_dict

        load_official_state_dict(model, state)
    except ImportError:
        model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg

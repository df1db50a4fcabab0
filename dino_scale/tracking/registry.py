"""MLflow model registry helpers and model-URI resolution for the pipelines.

A logged model is the run artifact folder ``model/`` holding ``model.safetensors``
(full fp32 state dict), ``config.json`` (the :class:`~dino_scale.config.Config`) and
``lineage.json`` (where its initial weights came from). URIs understood by
:func:`resolve_model_uri`:

* ``models:/<name>@<alias>``, ``models:/<name>/<version>`` and ``models:/<name>/latest`` (the
  highest version number; an error naming the model when it has no versions) from the registry.
  MLflow's stage URIs (``models:/<name>/Production``, ``Staging``...) are refused with an error
  that says to use an alias: MLflow 3 deprecated stages and this project never sets them,
* ``runs:/<run_id>/<artifact_path>``,
* a local folder (holding ``model.safetensors``, e.g. a final checkpoint) or a file
  (``.safetensors``, or an official ``.pth`` whose ``model`` entry is the state dict).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dino_scale.config import Config, ConfigError, from_dict
from dino_scale.tracking.downloads import (
    MODEL_ARTIFACT_PATH, download_run_artifact, download_siblings, download_version, run_and_path,
)
from dino_scale.tracking.refusals import is_refusal
from dino_scale.tracking.search import filter_literal, pages
from dino_scale.tracking.uris import local_path

__all__ = [
    "ResolvedModel", "register_model", "set_alias", "get_version_by_alias", "resolve_model_uri",
    "load_model_from_uri", "is_not_found", "parse_model_uri", "model_version_for_uri", "MODEL_ARTIFACT_PATH",
    "NOT_FOUND_CODES",
]

log = logging.getLogger("dino_scale.tracking")
REGISTER_ID_TAG = "dino_scale.register_id"  # one per register_model call: finds versions its resends made
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
    from dino_scale.tracking.clients import mlflow_client

    if tracking_uri is None:
        return mlflow_client()
    return mlflow_client(tracking_uri, registry_uri=tracking_uri)


def parse_model_uri(uri: str) -> tuple[str, Optional[str], Optional[str]]:
    """``(name, alias, version)`` of ``models:/<name>@<alias>`` or ``models:/<name>/<version>``
    (``version`` as written: digits, ``latest`` or anything else, which
    :func:`model_version_for_uri` refuses); ``name`` is "" when the URI names no model."""
    rest = uri[len("models:/"):] if uri.startswith("models:/") else uri
    rest = rest.rstrip("/")  # models:/m@champion/ read as model "m@champion", version ""
    if "/" in rest:  # a model name has no "/" (MLflow refuses one), but may hold "@"
        name, version = rest.rsplit("/", 1)
        return name, None, version
    if "@" in rest:  # an alias has no "@": the last one splits
        name, alias = rest.rsplit("@", 1)
        return name, alias, None
    return rest, None, None


def _refuse(message: str, code: str = "INVALID_PARAMETER_VALUE"):
    """An MLflow lookup error (``code``, one of :data:`NOT_FOUND_CODES`) saying ``message``."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    return MlflowException(message, error_code=getattr(databricks_pb2, code))


def _latest_version(client, name: str):
    """The highest-numbered version of ``name`` (MLflow's ``models:/<name>/latest``)."""
    client.get_registered_model(name)  # a missing model: MLflow's own not-found error
    literal = filter_literal(name)
    if literal is None:  # no filter can name it: every version, picked out here
        found = [v for v in pages(client.search_model_versions) if v.name == name]
        found.sort(key=lambda v: -int(v.version))
    else:
        found = client.search_model_versions(f"name={literal}", max_results=1, order_by=["version_number DESC"])
    if not found:
        raise _refuse(f"Registered model '{name}' has no versions: models:/{name}/latest names none",
                      "RESOURCE_DOES_NOT_EXIST")
    return found[0]


def model_version_for_uri(client, uri: str):
    """The ``ModelVersion`` a ``models:/`` URI names: by alias, version number or ``latest``.

    A lookup that finds nothing raises MLflow's error (:func:`is_not_found` codes), as does a
    URI this project does not read: a stage (deprecated in MLflow 3; use an alias), a version
    that is not a number, or no version at all."""
    name, alias, version = parse_model_uri(uri)
    if not name:
        raise _refuse(f"bad model URI {uri}: use models:/<name>@<alias> or models:/<name>/<version>")
    if alias is not None:
        client.get_registered_model(name)  # a model typo reads as one, not as a missing alias
        return client.get_model_version_by_alias(name, alias)
    if version is None:
        raise _refuse(f"bad model URI {uri}: no version; use models:/{name}@<alias>, "
                      f"models:/{name}/<version> or models:/{name}/latest")
    if version.isascii() and version.isdigit():  # "²": a digit to str, no number to MLflow
        return client.get_model_version(name, version)
    if version.lower() == "latest":
        return _latest_version(client, name)
    what = ("model stages (deprecated in MLflow 3) are not supported"
            if version.lower() in ("production", "staging", "archived", "none")
            else f"'{version}' is not a version number or 'latest'")
    raise _refuse(f"bad model URI {uri}: {what}; use an alias, models:/{name}@<alias> (`dino-scale registry promote "
                  f"{name} <version> --alias <alias>` sets one), models:/{name}/<version> or models:/{name}/latest")


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
    token = uuid.uuid4().hex
    try:
        mv = client.create_model_version(name, source=source, run_id=run_id,
                                         tags={**{k: str(v) for k, v in (tags or {}).items()}, REGISTER_ID_TAG: token},
                                         description=description)
    except MlflowException as exc:
        if is_refusal(exc):
            raise
        made = _registered_by(client, name, run_id, token)  # the store made it; its answer was lost
        if not made:
            raise
        mv = made[0]
    return _one_version(client, name, run_id, token, str(mv.version))


def _registered_by(client, name: str, run_id: str, token: str) -> list:
    """The versions of ``name`` registered from ``run_id`` with ``token``, oldest first."""
    literal = filter_literal(name)
    query = f"run_id='{run_id}'" + (f" and name={literal}" if literal is not None else "")
    found = [v for v in pages(client.search_model_versions, filter_string=query)
             if v.name == name and (v.tags or {}).get(REGISTER_ID_TAG) == token]
    return sorted(found, key=lambda v: int(v.version))


def _one_version(client, name: str, run_id: str, token: str, version: str) -> str:
    """After a registration: its oldest version. MLflow's client resends a create whose answer
    was a 502/503/504 (a proxy or load balancer timing out while the store did the work), and
    each resend made another version of the same run; the extra ones are deleted."""
    try:
        made = _registered_by(client, name, run_id, token)
    except Exception as exc:  # the version exists: a failed check must not fail the registration
        log.warning("registry: could not check %s for duplicate versions of run %s (%s); version %s is kept",
                    name, run_id, exc, version)
        return version
    for extra in made[1:]:
        log.warning("registry: %s version %s duplicates version %s (a registration request was sent again "
                    "after its answer was lost); deleting it", name, extra.version, made[0].version)
        client.delete_model_version(name, str(extra.version))
    return str(made[0].version) if made else version


# how the databases MLflow's SQL store runs on word a duplicate-key insert (SQLite, PostgreSQL,
# MySQL/MariaDB, SQL Server), lower-cased
_UNIQUE_VIOLATION_TEXTS = ("unique constraint failed", "duplicate key value violates unique constraint",
                           "duplicate entry", "cannot insert duplicate key", "violation of unique key constraint",
                           "violation of primary key constraint")


def is_unique_violation(exc: BaseException) -> bool:
    """True when ``exc`` (an MLflow error from a SQL-backed store, directly or through ``mlflow
    server``) says a row with that key already exists: the loser of an insert race."""
    text = str(exc).lower()
    return any(words in text for words in _UNIQUE_VIOLATION_TEXTS)


def set_alias(name: str, alias: str, version: str | int, tracking_uri: Optional[str] = None) -> None:
    """Point ``name@alias`` at ``version`` (moving it if it pointed elsewhere). MLflow's sqlite
    store reads, then inserts a new alias: two processes making one alias at once (two first
    fine-tunes promoting to an empty ``@champion``) failed the loser with 'UNIQUE constraint
    failed' (11 of 80 tries; PostgreSQL and MySQL word it otherwise, see
    :func:`is_unique_violation`). Set again, the alias exists and is moved."""
    from mlflow.exceptions import MlflowException

    client = store_client(tracking_uri)
    try:
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:
        if not is_unique_violation(exc):
            raise
        log.info("registry: %s@%s was made by another process at the same time; moving it", name, alias)
        client.set_registered_model_alias(name, alias, str(version))


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


def _read_config(cfg_file: Path) -> Config:
    """The model's ``config.json``; a key this version does not know (a config written by
    another release) is a :class:`ConfigError` that names the file."""
    try:
        data = json.loads(cfg_file.read_text())
    except ValueError as exc:  # was a bare JSONDecodeError that named no file
        raise ConfigError(f"{cfg_file} is not a readable config ({exc}): the model's config.json is damaged; "
                          f"replace it, or remove it and give --preset") from None
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{cfg_file}: {exc} (written by another version of dino_scale?)") from None
    except (TypeError, AttributeError) as exc:  # a JSON document of another shape (a list, a string)
        raise ConfigError(f"{cfg_file} is not a dino_scale config ({exc})") from None


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
    config = _read_config(cfg_file) if cfg_file.is_file() else None
    if lin_file.is_file():
        try:
            lineage = {**json.loads(lin_file.read_text()), **lineage}
        except (ValueError, TypeError) as exc:  # was a bare JSONDecodeError that named no file
            raise ConfigError(f"{lin_file} is not a readable lineage file ({exc}): the model's lineage.json is "
                              f"damaged; restore it, or remove it to load the model without its lineage") from None
    return ResolvedModel(uri=uri, weights_path=weights, config=config, lineage=lineage)


def resolve_model_uri(uri: str, dst_dir: Optional[str | Path] = None,
                      tracking_uri: Optional[str] = None) -> ResolvedModel:
    """Make ``uri`` local (downloading registry/run artifacts into ``dst_dir`` or a temp
    folder); ``lineage`` holds ``uri``, and for registry URIs ``name``, ``version``,
    ``run_id``, ``source``, ``aliases`` and version tags (plus the model's own lineage.json)."""
    lineage: dict[str, Any] = {"uri": uri}
    if uri.startswith("models:/") or uri.startswith("runs:/"):
        client = store_client(tracking_uri)
        if dst_dir:  # a fresh folder in it: a download merged into an earlier one's files (its lineage.json)
            Path(dst_dir).mkdir(parents=True, exist_ok=True)
            dst = Path(tempfile.mkdtemp(prefix="download-", dir=dst_dir))
        else:
            dst = Path(tempfile.mkdtemp(prefix="dino_model_"))
        try:
            if uri.startswith("models:/"):
                mv = model_version_for_uri(client, uri)
                lineage.update({"name": mv.name, "version": str(mv.version), "run_id": mv.run_id,
                                "source": mv.source, "aliases": list(getattr(mv, "aliases", []) or []),
                                "tags": dict(mv.tags or {})})
                return _from_local(download_version(client, mv, dst, tracking_uri), uri, lineage)
            run_id, path = run_and_path(uri)
            lineage["run_id"] = run_id
            store = tracking_uri or getattr(client, "tracking_uri", None)
            local = download_run_artifact(client, run_id, path or MODEL_ARTIFACT_PATH, dst, store)
            if local.is_file():  # runs:/<id>/model/model.safetensors: its config and lineage beside it too
                download_siblings(client, run_id, path, dst, store)
            return _from_local(local, uri, lineage)
        except BaseException:  # the folder made above, which the caller never learns of: the download
            shutil.rmtree(dst, ignore_errors=True)  # (gigabytes) would stay
            raise
    return _from_local(local_path(uri), uri, lineage)


def load_model_from_uri(uri: str, device: str = "cpu", tracking_uri: Optional[str] = None,
                        config: Optional[Config] = None):
    """``(model, cfg)`` with the weights at ``uri`` loaded strictly (eval mode).

    ``config`` is required when the URI carries none (e.g. an official ``.pth``)."""
    from dino_scale.engine.checkpoint import load_into, load_weights
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
    # started from, often a path on the training cluster) is not read; the attention backend is
    # chosen for ``device`` (a model trained with msda_backend=cuda loads on a CPU)
    model, _criterion, _post = build_dino(dataclasses.replace(cfg.model, backbone_weights=None, msda_backend=None))
    load_into(model, state)  # as the Ray workers and the pipelines load it
    return model.to(device).eval(), cfg

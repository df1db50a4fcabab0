"""Initial weights for fine-tuning: resolve a model URI, map its class heads by name.

``prepare_init(uri, cfg, target_categories, out_dir)`` resolves ``uri`` (registry URI,
run URI, local checkpoint, official ``.pth``), builds the target model from ``cfg``
(fresh init, seeded), transfers every class-independent tensor and the class-head
rows of categories whose names match (:mod:`dino_scale.models.class_transfer`),
checks the result loads strictly, and writes ``out_dir/model.safetensors`` +
``config.json`` + ``lineage.json`` for the engine's ``init_weights``.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from dino_scale.config import Config, ConfigError, to_dict
from dino_scale.tracking.registry import is_not_found, model_version_for_uri, parse_model_uri
from pipelines._common import UsageError


@dataclass
class InitWeights:
    path: Path  # folder with model.safetensors, config.json, lineage.json
    lineage: dict[str, Any] = field(default_factory=dict)  # source.* tags for the run
    summary: str = ""
    created: bool = False  # the folder was made by this call (a run refused before training removes it)


def _folder_for(out_dir: Path, tags: dict[str, str], log=print) -> Path:
    """``out_dir``, unless it holds the initial weights of another source (a rerun of a run name
    with other ``--init``): then ``<out_dir>-<digest of this source>``, so that the weights an
    earlier run of that name started from are never overwritten (a resumed run refuses another
    source, after this folder was written)."""
    import hashlib

    from dino_scale.tracking.resume import source_identity

    try:
        before = json.loads((out_dir / "lineage.json").read_text())
    except (OSError, ValueError):
        return out_dir  # none yet (or unreadable: nothing to keep)
    now = source_identity(tags)
    if not isinstance(before, dict) or source_identity(before) == now:
        return out_dir
    digest = hashlib.sha256(repr(now).encode()).hexdigest()[:8]
    other = out_dir.with_name(f"{out_dir.name}-{digest}")
    log(f"{out_dir} holds the initial weights of {before.get('init_uri') or 'another source'}: kept; "
        f"this source's go to {other}")
    return other


def is_remote(uri: str) -> bool:
    """A registry or run URI (downloaded from MLflow), not a local path."""
    return uri.startswith(("models:/", "runs:/"))


def _require_local(uri: str) -> Path:
    """The absolute path of the local model ``uri`` (a path or a ``file:`` URI); a one-line
    :class:`UsageError` when it names another host or does not exist."""
    from dino_scale.tracking.uris import local_path

    try:
        path = local_path(uri)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not path.exists():
        raise UsageError(f"model not found: {uri} (expected models:/name@alias, models:/name/N, models:/name/latest, "
                         f"runs:/<run_id>/model, a checkpoint folder/file or an official .pth)")
    return path.resolve()


def check_exists(uri: str) -> None:
    """Cheap existence check of a model URI (no download): a one-line
    :class:`UsageError` when the registry name/alias/version, run or path is unknown."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from dino_scale.tracking.clients import mlflow_client

    if not is_remote(uri):
        _require_local(uri)
        return
    from pipelines._store import require_store

    require_store(mlflow.get_tracking_uri(), looking_for=uri)
    client = mlflow_client()
    try:
        if uri.startswith("runs:/"):
            client.get_run(uri[len("runs:/"):].split("/", 1)[0])
            return
        model_version_for_uri(client, uri)  # alias, version number or latest; a stage is refused
    except MlflowException as exc:
        if not is_not_found(exc):
            raise  # the store failed, not the lookup
        msg = str(exc).splitlines()[0]
        raise UsageError(f"cannot resolve {uri}: {msg} ({_what_exists(client, uri)})") from None


def _what_exists(client, uri: str) -> str:
    """For a registry URI that names nothing: what the registry does hold, in a few words (the
    model's aliases and versions when the model exists, else the closest model names)."""
    from mlflow.exceptions import MlflowException

    hint = "list models with `dino-scale registry --work-dir DIR list`"
    if uri.startswith("runs:/"):
        return "a run id as MLflow shows it (the run's page, or `mlflow runs list --experiment-id ID`)"
    if not uri.startswith("models:/"):
        return hint
    name = parse_model_uri(uri)[0]
    try:
        from pipelines.champion import _versions
        from pipelines.registry import _get_model, model_names_hint

        model = _get_model(client, name) if name else None
        if model is not None:
            versions = sorted(int(v.version) for v in _versions(client, name))
            aliases = sorted((getattr(model, "aliases", None) or {}).items())
            alias_text = ", ".join(f"@{a} (v{v})" for a, v in aliases)
            return (f"{name} has " + (f"alias{'es' if len(aliases) > 1 else ''} {alias_text} and " if aliases
                                      else "no aliases and ")
                    + (f"versions {', '.join(map(str, versions[-10:]))}" if versions else "no versions")
                    + (f" (the last 10 of {len(versions)})" if len(versions) > 10 else ""))
        return model_names_hint(client, name)
    except MlflowException:
        return hint  # the lookup's own error is the message; the listing is only a help


def resolve(uri: str, dst_dir: Path):
    """``ResolvedModel`` of ``uri``, with a one-line :class:`UsageError` when it does not exist."""
    from mlflow.exceptions import MlflowException

    from dino_scale.tracking.registry import resolve_model_uri

    if not is_remote(uri):
        # absolute ('~' the shell left expanded): the run's tags, lineage and resume check record it,
        # and 'final' named another folder from another working directory (and './final' other weights)
        uri = str(_require_local(uri))
    try:
        return resolve_model_uri(uri, dst_dir=dst_dir)
    except MlflowException as exc:
        if not is_not_found(exc):
            raise
        msg = str(exc).splitlines()[0]
        hint = ""
        if uri.startswith("models:/"):
            from dino_scale.tracking import store_client

            hint = f" ({_what_exists(store_client(), uri)})"
        raise UsageError(f"cannot resolve {uri}: {msg}{hint}") from None


def _source_state(weights: Path) -> dict:
    from dino_scale.engine.checkpoint import load_weights

    if weights.suffix in (".pth", ".pt"):
        from dino_scale.models.official import load_official_checkpoint

        state = load_official_checkpoint(str(weights))
    else:
        state = load_weights(weights)
    # checkpoints saved from DDP/DeepSpeed wrappers
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def head_sizes(state: dict) -> list[str]:
    """Overrides fitting a preset's heads to a config-less (official) state dict: ``model.num_classes``
    from the ``class_embed.0`` rows and ``model.dn_labelbook_size`` from the ``label_enc`` rows less
    one (two settings in the official code: custom-data models keep the default labelbook of 91
    over fewer classes, which the class count did not fit); none for what the state lacks."""
    classes = next((int(v.shape[0]) for k, v in state.items() if k.endswith("class_embed.0.weight")), None)
    book = next((int(v.shape[0]) - 1 for k, v in state.items() if k.endswith("label_enc.weight")), classes)
    return ([f"model.num_classes={classes}"] if classes is not None else []) + (
        [f"model.dn_labelbook_size={book}"] if book is not None else [])


def preset_misfit(uri: str, preset_name: str, preset_given: bool, exc: Exception) -> UsageError:
    """The usage error of a model file without config (an official ``.pth``) that does not fit
    the preset it was built with (``exc``: the :class:`CheckpointMismatch`)."""
    from dino_scale.config import PRESETS

    return UsageError(f"{uri} carries no config and does not fit preset {preset_name}"
                      f"{'' if preset_given else ' (the default)'}: give --preset the file was trained with "
                      f"({', '.join(PRESETS)}); {str(exc).splitlines()[0]}")


def check_fits_preset(uri: str, state: dict, cfg: Config, preset_given: bool) -> None:
    """:func:`preset_misfit` unless ``state`` (a model file without config) loads into the model
    of ``cfg`` (the preset it will be evaluated with; :func:`~dino_scale.engine.checkpoint.check_fits`):
    in the caller, before a val set is generated or Ray starts."""
    from dino_scale.engine.checkpoint import check_fits
    from dino_scale.models.official import CheckpointMismatch

    try:
        check_fits(cfg.model, state)
    except CheckpointMismatch as exc:
        raise preset_misfit(uri, cfg.name, preset_given, exc) from None


def _source_categories(resolved) -> Optional[list[dict]]:
    """The source model's categories: ``categories.json`` beside its weights (registered
    models, and final checkpoints of this project's runs), else the manifest of the data it
    was trained on (``train_dir`` of its lineage: a checkpoint folder of an older run), else
    None."""
    folder = resolved.weights_path.parent
    path = folder / "categories.json"
    if path.is_file():
        try:
            categories = json.loads(path.read_text())
            if not (isinstance(categories, list) and all(isinstance(c, dict) and "id" in c and "name" in c
                                                         for c in categories)):
                raise ValueError("not a list of {id, name} entries")
        except ValueError as exc:  # was a bare JSONDecodeError / TypeError (exit 1) that named no file
            raise ConfigError(f"{path} is not a readable categories file ({exc}): the model's categories.json "
                              f"is damaged; restore it from where the model came from") from None
        return categories
    cfg = resolved.config
    trained_on = (resolved.lineage or {}).get("train_dir") or (cfg.data.train if cfg is not None else None)
    if trained_on:
        try:
            from dino_scale.data import read_manifest

            return read_manifest(str(trained_on).split(",")[0])["categories"]
        except (FileNotFoundError, ValueError, OSError):
            return None
    return None


def _check_same_tensors(uri: str, cfg: Config, source: dict, fresh: dict) -> None:
    """:class:`UsageError` unless ``source`` and the target model name the same tensors (the
    model's own integer buffers, e.g. Swin's ``relative_position_index``, may be absent): a
    source with another number of encoder/decoder layers (same shapes) would otherwise start the
    fine-tune with freshly initialized layers, or drop the source's extra ones, silently."""
    from dino_scale.models.official import DROPPED_SUFFIXES, OPTIONAL_BUFFERS

    missing = [k for k in fresh if k not in source and not k.endswith(OPTIONAL_BUFFERS)]
    extra = [k for k in source if k not in fresh and not k.endswith(DROPPED_SUFFIXES)]
    if missing or extra:
        parts = [f"{len(missing)} model tensors missing from it (first: {', '.join(missing[:3])})"
                 if missing else "",
                 f"{len(extra)} tensors the model lacks (first: {', '.join(extra[:3])})" if extra else ""]
        raise UsageError(f"{uri} does not fit preset {cfg.name!r}: " + "; ".join(p for p in parts if p)
                         + "; pass the matching --preset and the source's layer counts (--set model.*)")


# what the network computes, beside its tensors' shapes: a source trained with other values (an
# activation, position_temperature or nheads keeps every shape) was fine-tuned as another network
ARCHITECTURE_KEYS = ("backbone", "num_feature_levels", "hidden_dim", "nheads", "dim_feedforward", "activation",
                     "enc_layers", "dec_layers", "enc_n_points", "dec_n_points", "num_queries",
                     "position_temperature", "dec_pred_bbox_embed_share", "dec_pred_class_embed_share")


def _set_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_same_architecture(uri: str, cfg: Config, source: Optional[Config]) -> None:
    """:class:`UsageError` naming each ``model.*`` key of :data:`ARCHITECTURE_KEYS` whose value in
    ``source`` (the config the model carries; None: an official ``.pth``, unchecked) differs from
    ``cfg``'s, with the ``--set`` that fine-tunes the source as it was trained."""
    from dino_scale.config import PRESETS, preset

    def differences(target) -> list[tuple[str, Any, Any]]:
        return [(k, getattr(source.model, k), getattr(target, k)) for k in ARCHITECTURE_KEYS
                if getattr(source.model, k) != getattr(target, k)]

    if source is None or not (diffs := differences(cfg.model)):
        return
    said = ", ".join(f"model.{k} {s!r} (there) vs {t!r} (here)" for k, s, t in diffs)
    other_preset = source.name != cfg.name and source.name in PRESETS  # its own preset, then what differs from it
    advice = ([f"--preset {source.name}"] if other_preset else []) + [
        f"--set model.{k}={_set_text(s)}" for k, s, _ in differences(preset(source.name).model if other_preset
                                                                         else cfg.model)]
    raise UsageError(f"{uri} was trained as another network than preset {cfg.name!r} builds: {said}; "
                     f"fine-tune it as it was trained with {' '.join(advice)}")


def lineage_tags(resolved) -> dict[str, str]:
    lin = resolved.lineage or {}
    tags = {"source.uri": str(resolved.uri)}
    if lin.get("name"):
        tags["source.model_name"] = str(lin["name"])
        tags["source.model_version"] = str(lin.get("version", ""))
    if lin.get("run_id"):
        tags["source.run_id"] = str(lin["run_id"])
    return tags


CLASS_HEADS = ("map", "fresh")


def prepare_init(uri: str, cfg: Config, target_categories: list[dict], out_dir: Path,
                 log=print, class_heads: str = "map") -> InitWeights:
    """The initial weights of a fine-tuning run from ``uri``, written to ``out_dir`` (or to a
    sibling, see :func:`_folder_for`). ``class_heads``: ``map`` copies the class-head rows
    (``class_embed.*``, ``enc_out_class_embed``, ``label_enc``) of categories the source names
    alike; ``fresh`` initializes them all afresh (seeded), as the official fine-tuning does."""
    import torch

    from dino_scale.engine.checkpoint import atomic_write_text, save_weights
    from dino_scale.models import build_dino
    from dino_scale.models.class_transfer import transfer_class_heads
    from dino_scale.models.official import load_official_state_dict
    from dino_scale.tracking.resume import CLASS_HEADS_TAG

    if class_heads not in CLASS_HEADS:
        raise UsageError(f"class heads {class_heads!r}: use one of {', '.join(CLASS_HEADS)}")

    out_dir = Path(out_dir)
    existed = out_dir.exists()  # before a download into it
    if is_remote(uri):  # a Swin-L model is ~0.9 GB: nothing was said until it was in
        log(f"downloading {uri} ...")
    try:
        resolved = resolve(uri, out_dir / "source")
        tags = lineage_tags(resolved)
        if class_heads == "fresh":
            tags[CLASS_HEADS_TAG] = class_heads
        log(f"init from {uri}" + (f" = {tags['source.model_name']} v{tags['source.model_version']}"
                                  if "source.model_name" in tags else "")
            + (f" (run {tags['source.run_id']})" if "source.run_id" in tags else ""))
        check_same_architecture(uri, cfg, resolved.config)
        source = _source_state(resolved.weights_path)
        # fresh: no category in common, every class-head row is the fresh model's (none is read)
        src_cats = [] if class_heads == "fresh" else _source_categories(resolved)
    finally:  # a downloaded copy is in memory now, or useless (a failed or partial download)
        if is_remote(uri):
            shutil.rmtree(out_dir / "source", ignore_errors=True)
    chosen = _folder_for(out_dir, tags, log)
    created = not chosen.exists() if chosen != out_dir else not existed
    out_dir = chosen
    torch.manual_seed(cfg.train.seed)
    # built without model.backbone_weights: _check_same_tensors and the strict load below make
    # every backbone tensor the source's, so the ImageNet file (a path perhaps only the workers
    # have, or a URL: a download) would be read only to be overwritten
    model, _, _ = build_dino(replace(cfg.model, backbone_weights=None))
    fresh = model.state_dict()
    _check_same_tensors(uri, cfg, source, fresh)
    if class_heads == "fresh":
        log("class heads freshly initialized (--class-heads fresh)")
    elif src_cats is None:
        # No category names (e.g. an official .pth): same label space -> copy by id,
        # else fresh heads (what the official fine-tuning recipe does).
        rows = next((v.shape[0] for k, v in source.items() if k.endswith("class_embed.0.weight")), None)
        same = rows == cfg.model.num_classes
        src_cats = target_categories if same else []
        log("source has no category names: class heads " +
            ("copied by id (same label space)" if same else "freshly initialized"))
    state, report = transfer_class_heads(source, fresh, src_cats, target_categories)
    non_class_skipped = [k for k in report.skipped_keys if k in fresh and k not in report.class_keys]
    if non_class_skipped:
        raise UsageError(f"{uri} does not fit preset {cfg.name!r}: {len(non_class_skipped)} tensors "
                         f"differ in shape (first: {non_class_skipped[0]}); pass the matching --preset")
    if report.copied_keys == 0:
        raise UsageError(f"{uri} shares no weights with preset {cfg.name!r}; pass the matching --preset")
    load_official_state_dict(model, state)  # strict: proves the result is loadable
    log(report.summary())
    lineage = {"init_uri": str(resolved.uri), **tags,
               "class_transfer": {"matched": {str(k): v for k, v in report.matched.items()},
                                  "fresh": report.unmatched_target}}
    save_weights(out_dir, model.state_dict(), config=to_dict(cfg))
    atomic_write_text(out_dir / "lineage.json", json.dumps(lineage, indent=2))
    return InitWeights(path=out_dir, lineage=tags, summary=report.summary(), created=created)

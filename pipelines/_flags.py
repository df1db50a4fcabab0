"""The pipelines' shortcut flags: their ranges (:func:`check_flag_values`), the config fields
they set (:func:`apply_flags`) and a flag and a ``--set`` that disagree on one field
(:func:`check_flag_conflicts`), and :func:`check_backbone_file` before any data work.
Re-exported by :mod:`pipelines._common`."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from dino_scale.config import Config, parse_override
from pipelines._errors import UsageError

_FLAG_MINIMA = (("--workers", "workers", 1), ("--min-workers", "min_workers", 1), ("--gpus", "gpus", 0),
                ("--max-steps", "max_steps", 1), ("--epochs", "epochs", 1),
                ("--synthetic-images", "synthetic_images", 1))


def check_run_name(name: Optional[str]) -> None:
    """:class:`UsageError` unless ``name`` (``--run-name``) is usable as one folder name: it
    names ``<work-dir>/runs/<name>`` (and the ``init``/``eval`` folders a run may delete)."""
    if name is None:
        return
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise UsageError(f"--run-name {name!r}: must be a single folder name (not empty, '.' or '..', "
                         f"no '/' or '\\')")
    if not (name.isascii() and name.isprintable()):  # Ray Train tags its metrics with it: ASCII only
        raise UsageError(f"--run-name {name!r}: use printable ASCII characters only (Ray Train's metrics "
                         f"are tagged with the run name and refuse others, after the run has started)")


def check_folder_path(path: Optional[str], what: str = "") -> None:
    """:class:`UsageError` when the folder ``path`` (``what``: the flag naming it, if any) is a file
    or lies under one (was ``FileExistsError`` / ``NotADirectoryError``, exit 1, from the first
    folder made in it)."""
    if path is None:
        return
    p = Path(path).expanduser()
    for q in (p, *p.parents):  # the nearest part that exists decides
        if q.exists():
            if not q.is_dir():
                raise UsageError(f"{what + ' ' if what else ''}{path}: {q} is a file, not a folder")
            return


SCRATCH = ("none", "scratch")  # a fine-tune's --init that starts from no weights

_MAX_EXPERIMENT_NAME = 500  # mlflow.utils.validation.MAX_EXPERIMENT_NAME_LENGTH (mlflow not imported here)


def check_flag_values(args: argparse.Namespace) -> None:
    """:class:`UsageError` for a flag out of range, a ``--run-name`` that is not one folder
    name, or a ``--model-name`` / ``--alias`` / ``--experiment`` that MLflow would refuse at
    registration (after training) or at the run's creation."""
    for flag, attr, low in _FLAG_MINIMA:
        value = getattr(args, attr, None)
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}")
    check_run_name(getattr(args, "run_name", None))
    check_folder_path(getattr(args, "work_dir", None), "--work-dir")
    check_data_flags(args)
    experiment = getattr(args, "experiment", None)  # "" was refused at the run's creation, after the
    if experiment is not None and not experiment.strip():  # data checks and Ray's start
        raise UsageError(f"--experiment {experiment!r}: give an MLflow experiment name")
    if experiment is not None and len(experiment) > _MAX_EXPERIMENT_NAME:
        raise UsageError(f"--experiment: {len(experiment)} characters, MLflow takes {_MAX_EXPERIMENT_NAME} at most")
    name, alias = getattr(args, "model_name", None), getattr(args, "alias", None)
    if name is None and alias is None:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    checks = [(validation._validate_model_name, name, "--model-name")] if name is not None else []
    if alias is not None:
        checks += [(validation._validate_model_alias_name, alias, "--alias"),
                   (validation._validate_model_alias_name_reserved, alias, "--alias")]
    for check, value, flag in checks:
        try:
            check(value)
        except MlflowException as exc:
            raise UsageError(f"{flag} {value!r}: {exc.message}") from None


def _has_json(value: Optional[str]) -> bool:
    return bool(value) and any(p.strip().lower().endswith(".json") for p in str(value).split(","))


def check_data_flags(args: argparse.Namespace) -> None:
    """:class:`UsageError` for a data flag that would be ignored: ``--images`` / ``--val-images``
    without an annotation ``.json`` to read them for (a dataset folder's images moved: that is
    ``--set data.image_root=...``), ``--val-data`` without ``--data``, ``--synthetic-images`` with
    ``--data``. Each was accepted without a word (a finetune's ``--val-data`` mistake was even
    hidden behind a registry error). A ``--work-dir`` holding ',' where the run converts an
    annotation file or generates its synthetic set there (the folder it made was read as two,
    after the conversion)."""
    data, val = getattr(args, "data", None), getattr(args, "val_data", None)
    if val is not None and data is None:
        raise UsageError("--val-data needs --data (without --data a synthetic set is generated)")
    if getattr(args, "synthetic_images", None) is not None and data is not None:
        raise UsageError("--synthetic-images sizes the generated set used without --data; it does nothing with --data")
    work_dir = str(getattr(args, "work_dir", None) or "")
    if "," in work_dir and (_has_json(data) or _has_json(val) or (data is None and hasattr(args, "synthetic_images"))):
        # the data is converted (or generated) into <work-dir>/data/..., then read as "a,b": two folders
        raise UsageError(f"--work-dir {work_dir}: a folder whose path holds ',' cannot hold this run's converted "
                         f"data (dataset folders are joined by ','); choose another --work-dir, or convert with "
                         f"`dino-scale prepare-data` and pass the dataset folder as --data")
    for flag, attr, given in (("--images", "images", data), ("--val-images", "val_images", val)):
        if getattr(args, attr, None) is not None and not _has_json(given):
            key = "data.image_root" if attr == "images" else "data.val_image_root"
            raise UsageError(f"{flag} is the image folder of an annotation .json given with "
                             f"{'--data' if attr == 'images' else '--val-data'}; for a converted dataset whose "
                             f"images moved, use --set {key}=<folder>")


def check_backbone_file(cfg: Config, args: argparse.Namespace) -> None:
    """The engine's check of ``model.backbone_weights``
    (:func:`~dino_scale.engine.run_checks.check_backbone_weights`: ``imagenet`` for a backbone
    without published weights, a local file that is missing or cut short) before any data work,
    where the workers run on this machine (no ``RAY_ADDRESS``) and surely read it: a new run
    (its ``--run-name`` folder absent: a resumed one may replace every weight) not started from
    a fine-tuning ``--init`` (loaded strictly over it). Was: in ``fit`` only, after the dataset's
    conversion (hours for Objects365) and Ray's start. torch is imported only when it is set."""
    import os

    init = getattr(args, "init", None)
    if (not cfg.model.backbone_weights or os.environ.get("RAY_ADDRESS")
            or (hasattr(args, "init") and str(init or "").lower() not in SCRATCH)):
        return
    run_name = getattr(args, "run_name", None)
    if run_name and (Path(args.work_dir).expanduser() / "runs" / run_name).exists():
        return
    from dino_scale.engine.run_checks import check_backbone_weights

    check_backbone_weights(cfg, None, True, None)


# the shortcut flags and the config field each sets: (flag, attribute, key, the field's value).
# apply_flags sets these; --scale / --tta reach the config as the pipeline's own overrides
_TRAIN_FLAGS = (("--workers", "workers", "train.num_workers", lambda v: v),
                ("--min-workers", "min_workers", "train.min_workers", lambda v: v),
                ("--gpus", "gpus", "train.use_gpu", lambda v: v > 0),
                ("--zero-stage", "zero_stage", "train.zero_stage", lambda v: v),
                ("--max-steps", "max_steps", "train.max_steps", lambda v: v),
                ("--epochs", "epochs", "train.epochs", lambda v: v))
_FLAG_FIELDS = _TRAIN_FLAGS + (("--scale", "scale", "data.scale_factor", lambda v: v),
                               ("--tta", "tta", "eval.tta", lambda v: v or None))  # store_true: False: not given


def apply_flags(cfg: Config, args: argparse.Namespace) -> Config:
    """``--workers``, ``--min-workers``, ``--gpus``, ``--zero-stage``, ``--max-steps``,
    ``--epochs`` on ``cfg``."""
    check_flag_values(args)
    for _, attr, key, field_value in _TRAIN_FLAGS:
        given = getattr(args, attr, None)
        if given is not None:
            section, leaf = key.split(".")
            setattr(getattr(cfg, section), leaf, field_value(given))
    return cfg


def check_flag_conflicts(args: argparse.Namespace, cfg: Config) -> None:
    """:class:`UsageError` when a flag and a ``--set`` give one config field two values (one
    silently won: the flag for --workers/--epochs/..., the ``--set`` for --scale/--tta), or a
    ``--set`` names a field the pipeline takes from a flag (``data.train``: it trained on ``--data``,
    or on a synthetic set, while the config recorded the path). ``cfg``: preset + ``--set``."""
    user = dict(parse_override(o) for o in getattr(args, "overrides", None) or [])
    if "name" in user:  # renamed the registered model and the runs, while the next steps named a preset
        raise UsageError(f"--set name={user['name']}: name is the preset's (--preset); the registered "
                         f"model's name is --model-name, the run's --run-name")
    # the data folders come from flags only (fit takes them as arguments)
    val_flag = "--val-data" if hasattr(args, "val_data") else "--data"
    for key, flag in (("data.train", "--data"), ("data.val", val_flag)):
        if key in user:
            raise UsageError(f"--set {key}={user[key]}: the data to use is given with {flag}, not --set "
                             f"(pass {flag} {user[key]})")
    for flag, attr, key, field_value in _FLAG_FIELDS:
        given = getattr(args, attr, None)
        if given is None or key not in user or field_value(given) is None:
            continue
        section, leaf = key.split(".")
        if getattr(getattr(cfg, section), leaf) != field_value(given):
            shown = "" if isinstance(given, bool) else f" {given}"
            raise UsageError(f"{flag}{shown} and --set {key}={user[key]} disagree: give one of them")

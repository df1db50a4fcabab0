"""Turn the ``--data`` / ``--val-data`` arguments into dataset folders (shards + manifest).

Accepted forms for each argument:

- a dataset folder (``manifest.json`` + Parquet shards), or several joined by commas;
- a folder holding ``train/`` and ``val/`` dataset folders (for ``--data`` only: both
  are used; a ``train_extra/`` beside them, the rest of Objects365 val that
  ``prepare-data --o365-val-split`` writes, is trained on too, as in the paper's recipe);
- an annotation JSON (COCO / Objects365 format) plus ``--images``: converted first into
  ``<work-dir>/data/<name>/`` (reused while the file is unchanged, converted again after an edit);
- nothing: a synthetic set (``o365-like`` or ``coco-like``) is generated under
  ``<work-dir>/data/synthetic-<flavour>-<n>-s<seed>/{train,val}`` (reused when present).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Optional

from dino_scale.data.manifest import (
    DATASET_PARTS, MANIFEST_NAME as MANIFEST, absolute_data_dirs, holds_dataset, repeated_paths)
from pipelines._common import UsageError, check_path


def _is_dataset(p: Path) -> bool:
    return (p / MANIFEST).is_file()


def dataset_parts(folder: Path) -> dict[str, Path]:
    """The ``train``, ``train_extra`` and ``val`` datasets a folder that is no dataset itself holds
    (the form ``--data`` takes), by name, in that order; {} for a dataset folder. An unfinished one
    (:func:`~dino_scale.data.manifest.holds_dataset`) is listed too, so that reading it refuses it by
    name: it was left out without a word (check-data passed the folder; training went on without that
    split)."""
    if _is_dataset(folder):
        return {}
    return {name: folder / name for name in DATASET_PARTS if holds_dataset(folder / name)}


def _convert(ann: Path, images: Optional[str], work_dir: Path, log: Callable[[str], None]) -> Path:
    from dino_scale.data import convert_coco

    if images is None:
        raise UsageError(f"{ann} is an annotation file: give its image folder with --images")
    root = check_path(images, "image folder")
    key = hashlib.sha1(f"{ann.resolve()}|{root.resolve()}".encode()).hexdigest()[:8]
    out = work_dir / "data" / f"{ann.stem}-{key}"
    if _is_dataset(out):
        log(f"using converted dataset {out} (converted again if {ann.name} changed since)")
    else:
        log(f"converting {ann} (images under {root}) -> {out}")
    # the manifest's signature (the file's size and mtime) decides: an unchanged file returns
    # at once, an edited one is converted again rather than trained on as it was before
    convert_coco(str(ann), str(root), str(out), progress=True)
    return out


def _one(arg: str, images: Optional[str], work_dir: Path, what: str,
         log: Callable[[str], None], convert: bool = True, split: Optional[str] = None) -> str:
    """A comma-separated list of dataset folders for one argument value (``convert=False``:
    only check the value, converting no annotation file). ``split``: a folder holding that split
    as a dataset (``data/coco`` with ``val/``, as the training pipelines take it) stands for it."""
    parts = []
    pieces = [p.strip() for p in arg.split(",") if p.strip()]
    twice = repeated_paths(pieces)  # before any is converted (an Objects365 file named twice converted for hours)
    if twice:
        raise UsageError(f"{what} {arg!r} names {' and '.join(twice)} twice: give each once")
    for piece in pieces:
        p = check_path(piece, what)
        if p.is_file():
            if p.suffix.lower() != ".json":
                raise UsageError(f"{what} {piece} is a file but not an annotation .json")
            parts.append(str(_convert(p, images, work_dir, log)) if convert else str(p))
        elif _is_dataset(p):
            parts.append(str(p))
        elif split is not None and _is_dataset(p / split):
            if convert:
                log(f"using {p / split} (the {split} split of {piece})")
            parts.append(str(p / split))
        else:
            raise UsageError(f"{what} {piece} is not a dataset folder (no {MANIFEST}); convert it "
                             f"with `dino-scale prepare-data` or pass an annotation .json with --images")
    if not parts:
        raise UsageError(f"empty {what} argument")
    twice = repeated_paths(parts)  # a folder and its parent's split: one dataset, read twice an epoch
    if twice:
        raise UsageError(f"{what} {arg!r} names the dataset {' and '.join(twice)} twice: give each folder once")
    return ",".join(parts)


def synthetic_dirs(work_dir: Path, flavour: str, num_images: int, seed: int,
                   log: Callable[[str], None], splits: tuple[str, ...] = ("train", "val")) -> tuple[str, ...]:
    """Generate (or reuse) a synthetic train/val pair under ``<work-dir>/data``
    (``num_images`` training images, ``min(48, max(8, num_images // 4))`` validation images)."""
    from dino_scale.data import convert_coco, synthetic
    from dino_scale.data.shards import folder_lock

    base = work_dir / "data" / f"synthetic-{flavour}-{num_images}-s{seed}"
    num_val = min(48, max(8, num_images // 4))
    out = []
    plan = {"train": (num_images, seed), "val": (num_val, seed + 1000)}
    for split in splits:
        n, s = plan[split]
        d = base / split
        # two pipelines sharing the work folder: one generates, the other waits and reuses it
        with folder_lock(base / f".{split}.lock", log, f"synthetic {flavour} {split} set {d}"):
            if _is_dataset(d):
                log(f"using synthetic {flavour} {split} set {d}")
            else:
                log(f"generating synthetic {flavour} {split} set: {n} images -> {d}")
                root, ann = synthetic.generate(str(base / f"raw-{split}"), flavour=flavour,
                                               num_images=n, seed=s)
                # Images embedded in the shards: the set is self-contained (any node can read it).
                convert_coco(str(ann), str(root), str(d), embed_images=True, progress=False)
        out.append(str(d))
    return tuple(out)


def whole_dataset(dataset: str) -> str:
    """``dataset`` (folders joined by commas) once every shard its manifests list is there at its
    recorded size with a readable footer of the record columns: a :class:`~dino_scale.data.ShardError`
    here, before Ray starts, names the shards a half-finished copy left out or cut short and those
    damaged in place (:func:`~dino_scale.data.preflight.preflight_shards`; the engine's own check
    then reads no footer again)."""
    from dino_scale.data.preflight import preflight_shards

    preflight_shards(dataset)
    return dataset


def resolve_datasets(args, work_dir: Path, flavour: str, default_images: int, seed: int,
                     log: Callable[[str], None], require_val: Optional[str] = None
                     ) -> tuple[str, Optional[str], bool]:
    """``(train, val, synthetic)``: dataset folder strings for the engine.

    ``val`` is ``None`` only when real training data was given without any validation
    set (training then runs without evaluation); with ``require_val`` (the message) that is
    a :class:`UsageError`, raised before an annotation file is converted.
    """
    if args.data is None:
        if args.val_data is not None:
            raise UsageError("--val-data needs --data (without --data a synthetic set is generated)")
        n = args.synthetic_images or default_images
        train, val = synthetic_dirs(work_dir, flavour, n, seed, log)
        return train, val, True
    val: Optional[str] = None
    train: Optional[str] = None
    data = None if "," in args.data else check_path(args.data, "dataset path")
    parts = dataset_parts(data) if data is not None and data.is_dir() else {}
    if "train" in parts:
        train = str(parts["train"])
        if "train_extra" in parts:  # was left out without a word
            train += f",{parts['train_extra']}"
            log(f"training on {data / 'train'} and {data / 'train_extra'} (the rest of the Objects365 val split)")
        if "val" in parts:
            val = str(parts["val"])
    if require_val and val is None and args.val_data is None:
        if train is None:
            _one(args.data, args.images, work_dir, "dataset path", log, convert=False)  # its own errors first
        raise UsageError(require_val)
    if train is None:
        train = _one(args.data, args.images, work_dir, "dataset path", log)
    if args.val_data is not None:
        val = _one(args.val_data, args.val_images or args.images, work_dir, "validation dataset path", log)
    # absolute: what the run records (a later evaluate reads it from the lineage, elsewhere)
    train, val = absolute_data_dirs(train), absolute_data_dirs(val)
    return whole_dataset(train), (whole_dataset(val) if val else None), False


def categories_of(dataset: str) -> list[dict]:
    """``[{"id", "name"}, ...]`` of the first folder of a dataset string."""
    from dino_scale.data import read_manifest

    first = dataset.split(",")[0]
    return [{"id": int(c["id"]), "name": str(c["name"])} for c in read_manifest(first)["categories"]]


def class_overrides(categories: list[dict], user_overrides: list[str], minimum: int = 0) -> list[str]:
    """``model.num_classes`` / ``model.dn_labelbook_size`` = max(max id + 1, ``minimum``)
    (366 for Objects365, 91 for COCO, so synthetic sets keep the real head layout),
    unless the user set them with ``--set``. A ``--set model.num_classes=N`` alone also
    sizes the denoising label book (N, as in the released configs)."""
    n = max(max((c["id"] for c in categories), default=0) + 1, minimum)
    user = dict(_split_override(o) for o in user_overrides)
    out = []
    if "model.num_classes" not in user:
        out.append(f"model.num_classes={n}")
    if "model.dn_labelbook_size" not in user:
        out.append(f"model.dn_labelbook_size={_whole_number(user.get('model.num_classes'), n)}")
    return out


def user_label_book(user_overrides: list[str]) -> list[str]:
    """What :func:`class_overrides` adds for a ``--set model.num_classes=N`` alone
    (``model.dn_labelbook_size=N``), known before the data is: for the checks made before it is
    converted (they refused N above the preset's label book, which the run itself sizes)."""
    user = dict(_split_override(o) for o in user_overrides)
    if "model.num_classes" in user and "model.dn_labelbook_size" not in user:
        n = _whole_number(user["model.num_classes"], -1)
        return [f"model.dn_labelbook_size={n}"] if n >= 0 else []
    return []


def stored_pixels(user_overrides: list[str]) -> list[str]:
    """``data.exif_orientation=stored`` unless the user set it: COCO and Objects365 boxes lie on
    the pixels as stored (the official DINO never applies an EXIF tag), and the default ``auto``
    turns an image whose tag keeps its size (rotate 180, mirror) upright, off its boxes."""
    user = dict(_split_override(o) for o in user_overrides)
    return [] if "data.exif_orientation" in user else ["data.exif_orientation=stored"]


def _whole_number(text, default: int) -> int:
    """``text`` as the config reads an int ('100', '1e2', '100.0'), else ``default``."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return default
    return int(value) if value.is_integer() else default


def _split_override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.strip(), value.strip()


def check_classes(cfg, categories: list[dict], data: str) -> None:
    """:class:`UsageError` before training when the class head cannot hold a category id of
    ``data`` (the loss would index past it at the first step) or, with denoising on, the
    label book is smaller than the class count (denoising draws labels from all classes)."""
    from dino_scale.engine.api import check_category_ids
    from dino_scale.config_checks import check_label_book

    m = cfg.model
    try:
        check_category_ids(categories, m.num_classes, data)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        check_label_book(m.num_classes, m.dn_number, m.dn_labelbook_size)
    except ValueError as exc:
        raise UsageError(f"model.{exc}") from None


def eval_fingerprint(val: str) -> str:
    """16 hex digits naming the labels of the validation set ``val`` (folders joined by commas):
    its images (id, width, height), boxes (image id, category id, x, y, w, h, crowd) and
    category ids, in any order, whatever folder, copy or shard layout holds them. Tagged on a
    registered version (``eval.data``) so that only APs measured on the same data are compared
    for ``@champion``."""
    import json

    from dino_scale.data import to_coco_gt

    gt = to_coco_gt(val)
    images = sorted((int(i["id"]), int(i["width"]), int(i["height"])) for i in gt["images"])
    boxes = sorted((int(a["image_id"]), int(a["category_id"]), *(round(float(v), 3) for v in a["bbox"]),
                    int(a["iscrowd"])) for a in gt["annotations"])
    cats = sorted(int(c["id"]) for c in gt["categories"])
    text = json.dumps([images, boxes, cats], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]

"""Dataset folders and their manifests: naming the folders of a dataset, reading and checking
``manifest.json``, and the shard files it lists.

A dataset is a folder of ``shard-NNNNN.parquet`` files (the records, :mod:`.records`) plus
``manifest.json``; several folders can be read as one when their categories agree.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence, Union

__all__ = [
    "MANIFEST_NAME", "FORMAT", "CONVERT_WORK_NAME", "PathLike", "read_manifest", "shard_paths", "conversion_losses",
    "data_dirs", "repeated_paths", "absolute_data_dirs", "category_ids", "ShardError", "check_shards",
    "ManifestError", "DATASET_PARTS", "holds_dataset",
]

FORMAT = "dino_scale.records/1"
CONVERT_WORK_NAME = ".convert-work"  # a conversion's work folder, in its dataset folder until it finishes
MANIFEST_NAME = "manifest.json"

PathLike = Union[str, Path]
# the datasets a folder given as --data holds, in this order, when it is no dataset itself
DATASET_PARTS = ("train", "train_extra", "val")


def holds_dataset(folder: Path) -> bool:
    """A dataset in ``folder``, finished or not: a manifest, or shards or a conversion's work folder
    without one (a conversion cut short, or a copy that lost its manifest: reading it names which)."""
    return ((folder / MANIFEST_NAME).is_file() or (folder / CONVERT_WORK_NAME).is_dir()
            or any(folder.glob("shard-*.parquet")))


def data_dirs(data_dir: Union[PathLike, Sequence[PathLike]]) -> list[Path]:
    """One or several dataset folders: a path, a list of paths, or ``"a,b"``.

    Several folders are read as one dataset (e.g. Objects365 train plus the rest of
    val for the paper's recipe); their categories must agree.
    """
    if isinstance(data_dir, (str, Path)):
        parts = [p for p in str(data_dir).split(",") if p.strip()]
    else:
        parts = [str(p) for p in data_dir]
    if not parts:
        raise ValueError("no dataset folder given")
    out = [Path(p.strip()).expanduser() for p in parts]  # as convert_coco wrote "~/out"
    twice = repeated_paths(out)
    if twice:  # read twice, every image of it twice an epoch
        raise ValueError(f"dataset folder given twice: {', '.join(twice)}")
    return out


def repeated_paths(paths: Sequence[PathLike]) -> list[str]:
    """The entries of ``paths`` (sorted, as given) that name a file or folder another entry names
    too, however spelt (``a``, ``./a/``, a link to it): [] when each is named once."""
    real = [os.path.realpath(os.path.expanduser(str(p))) for p in paths]
    return sorted({str(p) for p, r in zip(paths, real) if real.count(r) > 1})


def absolute_data_dirs(data_dir: Optional[str]) -> Optional[str]:
    """``data_dir`` (``"a,b"``) with each folder made absolute (``~`` expanded); ``None`` stays.
    What a run reads and records: a relative folder meant the driver's working folder, not the
    workers' (other machines, Ray's copy of a job's working folder), and a later ``evaluate``
    that read it from a run's lineage in another folder found nothing there."""
    if data_dir is None:
        return None
    # abspath, not resolve: a symlinked mount (/data -> /mnt/nfs/data on the driver) keeps the
    # name the nodes know it by
    return ",".join(os.path.abspath(p.expanduser()) for p in data_dirs(data_dir))


class ManifestError(ValueError):
    """A ``manifest.json`` that is not valid JSON, of another format, or without the entries
    the readers use (``num_images``, ``categories`` with ids and names, ``shards`` with files)."""


def _manifest_problem(manifest: Any) -> Optional[str]:
    """What keeps ``manifest`` (parsed JSON) from being read, or ``None``."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if manifest.get("format") != FORMAT:
        return f"unknown format {manifest.get('format')!r} (expected {FORMAT})"
    if not isinstance(manifest.get("num_images"), int):
        return "no integer num_images"
    categories, shards = manifest.get("categories"), manifest.get("shards")
    if not isinstance(categories, list) or not all(
            isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)
            for c in categories):
        return "categories is not a list of {id, name}"
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("file"), str)
                                               for s in shards):
        return "shards is not a list of {file, ...}"
    return None


def read_manifest(data_dir: PathLike) -> dict[str, Any]:
    """The manifest of one dataset folder (dict; see :func:`convert_coco` for keys);
    :class:`ManifestError` when it cannot be read as one."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        if (Path(data_dir) / CONVERT_WORK_NAME).is_dir():  # a conversion cut short
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {data_dir}: its conversion did not finish (rerun the "
                                    f"same prepare-data command to resume it)")
        if any(Path(data_dir).glob("shard-*.parquet")):  # a conversion writes its manifest last
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {data_dir}, which holds shards: an incomplete copy of a "
                                    f"converted dataset (copy the folder again, or convert the data again with "
                                    f"python -m pipelines.prepare_data)")
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {data_dir}: not a converted dataset "
                                f"(run python -m pipelines.prepare_data first)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ManifestError(f"{path}: not valid JSON ({e}); copy the folder again, or run the python -m "
                            f"pipelines.prepare_data command that made it again: it converts such a folder "
                            f"anew") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise ManifestError(f"{path}: {problem}")
    return manifest


def _agreeing_manifests(data_dir: Union[PathLike, Sequence[PathLike]]) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, manifest) of each dataset folder; ``ValueError`` unless their categories agree."""
    out: list[tuple[Path, dict[str, Any]]] = []
    for d in data_dirs(data_dir):
        manifest = read_manifest(d)
        cats = [(c["id"], c["name"]) for c in manifest["categories"]]
        if out and cats != [(c["id"], c["name"]) for c in out[0][1]["categories"]]:
            raise ValueError(f"{d}: categories differ from the other dataset folders")
        out.append((d, manifest))
    return out


class ShardError(ValueError):
    """Shard files of a dataset folder that are missing or not the size its manifest records
    (a copy or sync that did not finish, a shard deleted or rewritten after conversion).
    ``detail``: which shards, without the folder and the advice."""

    def __init__(self, folder: Path, detail: str):
        super().__init__(f"{folder}: {detail} (copy the folder again, or run the python -m pipelines.prepare_data "
                         f"command that made it again: it converts such a folder anew)")
        self.folder, self.detail = folder, detail

    def __reduce__(self):  # raised in a Ray task or actor, it is pickled to the caller
        return type(self), (self.folder, self.detail)


# how many bad shards an error names (the count covers them all)
_NAMED_BAD_SHARDS = 5
_STAT_THREADS = 32


def _size(path: Path) -> Optional[int]:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def check_shards(folder: Path, manifest: dict[str, Any]) -> None:
    """:class:`ShardError` unless every shard of ``manifest`` is a file of its recorded size.
    One ``stat`` per shard, :data:`_STAT_THREADS` at a time (on a bucket mount, e.g. Mountpoint
    for S3, each is a request); a change that keeps the size is found where the records are read
    (their checksums, :mod:`.integrity`)."""
    shards = manifest["shards"]
    with ThreadPoolExecutor(max(1, min(_STAT_THREADS, len(shards)))) as pool:
        sizes = list(pool.map(_size, [Path(folder) / s["file"] for s in shards]))
    bad = []
    for shard, size in zip(shards, sizes):
        if size is None:
            bad.append(f"{shard['file']} is missing")
        elif "bytes" in shard and size != int(shard["bytes"]):
            bad.append(f"{shard['file']} has {size} bytes, the manifest {int(shard['bytes'])}")
    if bad:
        more = f"; and {len(bad) - _NAMED_BAD_SHARDS} more" if len(bad) > _NAMED_BAD_SHARDS else ""
        raise ShardError(folder, f"{len(bad)} of {len(manifest['shards'])} shards do not match {MANIFEST_NAME}: "
                                 f"{'; '.join(bad[:_NAMED_BAD_SHARDS])}{more}")


def shard_paths(data_dir: Union[PathLike, Sequence[PathLike]]) -> list[Path]:
    """All shard files of one or several dataset folders, in manifest order; :class:`ShardError`
    when one is missing or not the size its manifest records (before any read: a read would
    fail on it mid-epoch, or on every worker at once)."""
    out = []
    for d, manifest in _agreeing_manifests(data_dir):
        check_shards(d, manifest)
        out.extend(d / s["file"] for s in manifest["shards"])
    return out


def category_ids(data_dir: Union[PathLike, Sequence[PathLike]]) -> list[int]:
    """The category ids of the dataset's manifest (several folders: theirs must agree, else
    ``ValueError``, as for :func:`shard_paths`)."""
    return [int(c["id"]) for c in _agreeing_manifests(data_dir)[0][1]["categories"]]


def conversion_losses(data_dir: Union[PathLike, Sequence[PathLike]]) -> dict[str, int]:
    """What conversion left out of the dataset folders, from their manifests: ``images_skipped``
    (missing, unreadable, corrupt ... files) and ``boxes_dropped`` (malformed, degenerate, outside
    the image, or of a skipped image; not those of ids absent from the file's image list, which
    no evaluation counts). :func:`~.records.to_coco_gt` holds neither, so an AP against it is over fewer
    objects than the annotation file's: the evaluation reports these beside it. ``boxes_clipped``:
    boxes across the image's border, held clipped to it (the annotation file's own box scores
    another IoU against the same detection)."""
    images = boxes = clipped = 0
    for folder in data_dirs(data_dir):
        m = read_manifest(folder)
        images += sum(int(v) for v in (m.get("images_skipped") or {}).values())
        boxes += sum(int(v) for k, v in (m.get("boxes_dropped") or {}).items() if k != "orphan")
        clipped += int(m.get("boxes_clipped") or 0)
    return {"images_skipped": images, "boxes_dropped": boxes, "boxes_clipped": clipped}

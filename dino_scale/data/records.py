"""The record schema, the manifest, and reading records back from shards.

One row per image (DESIGN.md "Data records"):

=============  =====================  ==================================================
column         type                   meaning
=============  =====================  ==================================================
image_id       int64                  id from the annotation file
file_name      string                 path relative to the image root
width, height  int32                  annotated image size in pixels
image          binary (nullable)      encoded image bytes; null when read by path
boxes          list<float32>          x,y,w,h in pixels, flattened (4 per box)
category_ids   list<int32>            raw category ids (COCO 1..90, Objects365 1..365)
iscrowd        list<bool>             crowd flag per box (kept out of training targets)
area           list<float32>          area per box (COCO ``area`` or w*h)
labels_crc32   uint32                 CRC-32 of the columns above but ``image``
image_crc32    uint32 (nullable)      CRC-32 of ``image``; null when read by path
=============  =====================  ==================================================

The two checksums (:mod:`.integrity`) find a shard changed after conversion where its
records are read; shards written before they existed lack both columns and are read unchecked.

A dataset is a folder of ``shard-NNNNN.parquet`` files plus ``manifest.json``.
"""
from __future__ import annotations

import errno
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .integrity import CHECKSUM_FIELDS, damage_detail, record_damage

__all__ = [
    "SCHEMA", "MANIFEST_NAME", "FORMAT", "read_manifest", "shard_paths", "iter_records",
    "to_coco_gt", "conversion_losses", "data_dirs", "repeated_paths", "absolute_data_dirs",
    "resolve_image_path", "folder_image_roots", "val_image_roots", "Roots", "category_ids",
    "ShardError", "check_shards", "ManifestError", "CONTENT_SCHEMA", "record_from_row",
    "arrow_rows", "check_schema", "schema_problems",
]

FORMAT = "dino_scale.records/1"
CONVERT_WORK_NAME = ".convert-work"  # a conversion's work folder, in its dataset folder until it finishes
MANIFEST_NAME = "manifest.json"

CONTENT_SCHEMA = pa.schema([  # what a record holds; SCHEMA adds its checksums
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("image", pa.binary()),
    ("boxes", pa.list_(pa.float32())),
    ("category_ids", pa.list_(pa.int32())),
    ("iscrowd", pa.list_(pa.bool_())),
    ("area", pa.list_(pa.float32())),
])
SCHEMA = pa.schema(list(CONTENT_SCHEMA) + CHECKSUM_FIELDS)
_LABEL_COLUMNS = [n for n in CONTENT_SCHEMA.names if n != "image"]  # what labels_crc32 covers

PathLike = Union[str, Path]


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


def val_image_roots(data_cfg) -> Optional[str]:
    """The image-root override of the validation folders: ``data.val_image_root``, else
    ``data.image_root`` (one setting served both, so moved train and val folders could not both
    be found)."""
    return getattr(data_cfg, "val_image_root", None) or data_cfg.image_root


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
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {data_dir}: not a converted dataset "
                                f"(run python -m pipelines.prepare_data first)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ManifestError(f"{path}: not valid JSON ({e}); convert the data again with "
                            f"python -m pipelines.prepare_data") from None
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
        super().__init__(f"{folder}: {detail} (copy the folder again, or convert the data again with "
                         f"python -m pipelines.prepare_data)")
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


OUTSIDE_ROOT = "lies outside the image root"


def resolve_image_path(root: Optional[PathLike], file_name: str) -> Optional[Path]:
    """Find ``file_name`` under ``root``; ``None`` when absent.

    Objects365 annotation files name images ``images/v1/patchN/x.jpg`` (v2 also
    ``images/v2/patchN``) while the archives unpack to ``<root>/patchN/x.jpg``; the
    prefixes ``images/v1/``, ``images/v2/`` and ``images/`` are tried stripped. No other
    fallback: a file of the same base name in another folder is another image.
    Raises ``OSError`` where the OS refuses the lookup (a name too long, no permission on a
    folder, I/O errors): callers count that as an unreadable image. So is a name that leaves
    ``root`` (an absolute path elsewhere, or climbing out with ``..``): an annotation file copied any file its
    reader could read into the shards (``--embed-images``), or trained on it. Symbolic links
    inside ``root`` are followed (the check is on the name).
    """
    base = Path(root) if root is not None else Path(".")
    candidates = [file_name]
    for prefix in ("images/v1/", "images/v2/", "images/"):
        if file_name.startswith(prefix):
            candidates.append(file_name[len(prefix):])
    if root is not None:  # by name: an absolute name inside the root is fine, as is a/../b;
        top = os.path.abspath(root)  # each stripped name too ("images/v1/../../x" is "../../x")
        for cand in candidates:
            if os.path.commonpath([top, os.path.normpath(os.path.join(top, cand))]) != top:
                raise PermissionError(errno.EACCES, f"{file_name} {OUTSIDE_ROOT} {root}")
    for cand in candidates:
        p = base / cand
        if p.is_file():
            return p
    return None


def _name(value: Any) -> Optional[str]:
    """A ``file_name`` cell as read (str, or bytes from a binary read) -> str; bytes that are not
    UTF-8 (a damaged shard) keep their bytes as surrogates, so the labels checksum sees them."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return value


def _int(value: Any, missing: int) -> int:
    """An integer cell; ``missing`` for a null (the columns are never null as written)."""
    return missing if value is None else int(value)


_NULL_ITEM = {"boxes": float("nan"), "category_ids": -1, "iscrowd": False, "area": float("nan")}


def _without_nulls(values: Any, fill: Any) -> list:
    """``values`` (a list, nested lists allowed) with each None replaced by ``fill``."""
    return [fill if v is None else _without_nulls(v, fill) if isinstance(v, (list, tuple, np.ndarray)) else v
            for v in values]


def record_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row of the record columns (python lists or numpy arrays; ``file_name`` str or bytes;
    any list may be null) -> a record: numpy arrays, ``boxes`` (n,4) x,y,w,h float32 for n
    category ids. Lists whose lengths disagree (only a damaged shard has them) are kept as read,
    ``boxes`` flat, for :class:`~.transforms.DetectionTransform` to skip the record (its
    checksum no longer matches) instead of failing here. Other keys are kept."""
    lists = {k: [] if row.get(k) is None else row[k] for k in ("boxes", "category_ids", "iscrowd", "area")}
    # a null item (only a damaged shard has one) is read as NaN / -1 / False: the record then no
    # longer matches its labels checksum and is skipped, where np.asarray raised TypeError for
    # the whole batch (a Ray Data task mid-run, or check-data's report)
    n = len(lists["category_ids"])
    arrays = {}
    for key, dtype in (("boxes", np.float32), ("category_ids", np.int64), ("iscrowd", bool), ("area", np.float32)):
        try:
            arrays[key] = np.asarray(lists[key], dtype=dtype).reshape(-1)
        except (TypeError, ValueError):  # null items (nested too: a box's coordinate)
            arrays[key] = np.asarray(_without_nulls(lists[key], _NULL_ITEM[key]), dtype=dtype).reshape(-1)
    boxes = arrays["boxes"]
    extra = {"image_root": _name(row["image_root"])} if "image_root" in row else {}  # (Ray rows: a folder's root)
    return {
        **row, **extra,
        "image_id": _int(row["image_id"], -1),
        "file_name": _name(row["file_name"]),
        "width": _int(row["width"], 0),
        "height": _int(row["height"], 0),
        "image": row.get("image"),
        "boxes": boxes.reshape(n, 4) if boxes.size == 4 * n else boxes,
        "category_ids": arrays["category_ids"],
        "iscrowd": arrays["iscrowd"],
        "area": arrays["area"],
        "labels_crc32": row.get("labels_crc32"),
        "image_crc32": row.get("image_crc32"),
    }


def arrow_rows(batch: Union[pa.RecordBatch, pa.Table]) -> list[dict[str, Any]]:
    """Rows of an Arrow batch as python values, strings as bytes (``file_name``: see
    :func:`record_from_row`): pyarrow does not check that string data is UTF-8 when it reads a
    file, and decoding a damaged name raised for the whole batch (``UnicodeDecodeError`` from
    ``to_pylist``, seen)."""
    strings = [i for i, f in enumerate(batch.schema) if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    for i in strings:
        batch = batch.set_column(i, batch.schema.field(i).name, batch.column(i).cast(pa.binary()))
    return batch.to_pylist()


def schema_problems(schema: pa.Schema) -> list[str]:
    """What keeps a shard of Arrow ``schema`` from holding the record columns with their types
    (empty: nothing; the checksum columns may be absent)."""
    have = {f.name: f.type for f in schema}
    wrong = [f"{f.name} is missing" if f.name not in have else f"{f.name} is {have[f.name]}, not {f.type}"
             for f in SCHEMA if (f.name in have and have[f.name] != f.type)
             or (f.name not in have and f.name in CONTENT_SCHEMA.names)]
    return wrong + [f"{name} is not a record column" for name in have if name not in SCHEMA.names]


def check_schema(path: Path, schema: pa.Schema) -> None:
    """:class:`ShardError` unless the shard at ``path`` (its Arrow ``schema``) holds the record
    columns with their types (the checksum columns may be absent: an older release). A footer
    damaged after conversion can rename a column or change its type; its values would then
    reach the readers as something else."""
    wrong = schema_problems(schema)
    if wrong:
        raise ShardError(path.parent, f"{path.name} does not hold the record columns ({'; '.join(wrong[:5])})")


def iter_records(data_dir: Union[PathLike, Sequence[PathLike]], columns: Optional[list[str]] = None,
                 batch_rows: int = 256, verify: bool = False) -> Iterator[dict[str, Any]]:
    """Yield records (dicts, boxes as (n,4) x,y,w,h pixels) in shard order; no Ray needed.

    Records carry their checksums (``None`` in shards written without them); the loaders
    skip a damaged one (:class:`~.transforms.DetectionTransform`). ``verify``: a record
    that does not match its checksums raises :class:`ShardError` instead, for readers that
    must not drop one (the ground truth of an evaluation). A shard whose Parquet structure
    cannot be read raises :class:`ShardError` naming it."""
    cols = list(columns or SCHEMA.names)
    cols += [f.name for f in CHECKSUM_FIELDS if f.name not in cols]
    for path in shard_paths(data_dir):
        done = 0  # records of this shard yielded
        try:
            pf = pq.ParquetFile(path)
            check_schema(path, pf.schema_arrow)
            present = set(pf.schema_arrow.names)
            batches = pf.iter_batches(batch_size=batch_rows, columns=[c for c in cols if c in present])
            labels_read = set(_LABEL_COLUMNS) <= set(cols)  # else the labels checksum cannot be compared
            for row in (row for batch in batches for row in arrow_rows(batch)):
                rec = record_from_row({k: row.get(k) for k in SCHEMA.names})
                if not labels_read:
                    rec["labels_crc32"] = None
                if "image" not in cols:  # the bytes are not read: their checksum cannot be compared
                    rec["image_crc32"] = None
                what = record_damage(rec) if verify else None
                if what:
                    raise ShardError(path.parent, f"{path.name} row {done} (image id {rec['image_id']}): "
                                                  f"{damage_detail(what)}")
                yield rec
                done += 1
        except (OSError, pa.ArrowException, UnicodeDecodeError) as e:  # a damaged footer, page header or encoding
            raise ShardError(path.parent, f"{path.name} cannot be read after {done} records: "
                                          f"{type(e).__name__}: {e}") from e


def to_coco_gt(data_dir: Union[PathLike, Sequence[PathLike]]) -> dict[str, Any]:
    """Ground truth in COCO format (images, annotations incl. iscrowd, categories).

    Built from the shards, so it holds exactly what was converted (dropped boxes and
    skipped images are absent: :func:`conversion_losses` counts them). Feed it to
    ``pycocotools.coco.COCO`` via ``dataset=``.
    Several folders must not share an image id (``ValueError``): COCO evaluation keys
    detections and ground truth by image id, so two images of one id would be scored as one.
    A record whose labels do not match their checksum raises :class:`ShardError`: scoring
    against changed labels, or without that image, would not be the dataset's AP.
    """
    dirs = data_dirs(data_dir)
    categories = _agreeing_manifests(dirs)[0][1]["categories"]  # the folders' must agree
    images, annotations = [], []
    cols = ["image_id", "file_name", "width", "height", "boxes", "category_ids", "iscrowd", "area", "labels_crc32"]
    owner: dict[int, Path] = {}  # image id -> its folder (a converted folder never repeats an id)
    for folder, rec in ((d, r) for d in dirs for r in iter_records(d, columns=cols, verify=True)):
        if rec["image_id"] in owner:
            raise ValueError(f"image id {rec['image_id']} is in {owner[rec['image_id']]} and in {folder}: "
                             f"evaluation matches detections to ground truth by image id, so the folders "
                             f"need distinct ids (evaluate them separately, or renumber one before converting)")
        owner[rec["image_id"]] = folder
        images.append({"id": rec["image_id"], "file_name": rec["file_name"],
                       "width": rec["width"], "height": rec["height"]})
        for box, cat, crowd, area in zip(rec["boxes"], rec["category_ids"], rec["iscrowd"], rec["area"]):
            annotations.append({"id": len(annotations) + 1, "image_id": rec["image_id"],
                                "category_id": int(cat), "bbox": [float(v) for v in box],
                                "area": float(area), "iscrowd": int(bool(crowd))})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c["id"], "name": c["name"]} for c in categories]}


def conversion_losses(data_dir: Union[PathLike, Sequence[PathLike]]) -> dict[str, int]:
    """What conversion left out of the dataset folders, from their manifests: ``images_skipped``
    (missing, unreadable, corrupt ... files) and ``boxes_dropped`` (malformed, degenerate, outside
    the image, or of a skipped image; not those of ids absent from the file's image list, which
    no evaluation counts). :func:`to_coco_gt` holds neither, so an AP against it is over fewer
    objects than the annotation file's: the evaluation reports these beside it."""
    images = boxes = 0
    for folder in data_dirs(data_dir):
        m = read_manifest(folder)
        images += sum(int(v) for v in (m.get("images_skipped") or {}).values())
        boxes += sum(int(v) for k, v in (m.get("boxes_dropped") or {}).items() if k != "orphan")
    return {"images_skipped": images, "boxes_dropped": boxes}


# an image-root override: none, one root for every folder, or one per folder (list or "a,b")
Roots = Union[None, str, Sequence[Optional[str]]]


def folder_image_roots(data_dir: Union[PathLike, Sequence[PathLike]],
                       image_root: Roots = None) -> list[tuple[Path, Optional[str]]]:
    """``(folder, image root)`` for each dataset folder of ``data_dir`` (see :func:`data_dirs`).

    Without ``image_root``, each folder's root is the one recorded in its own manifest at
    conversion (``None`` for embedded images). ``image_root`` overrides it: one path applies
    to every folder, which is refused (``ValueError``) when the folders that reference files
    were converted against different roots, as one path cannot hold both folders' images;
    give one root per folder instead, as a list or ``"root_a,root_b"`` in folder order.
    """
    dirs = data_dirs(data_dir)
    manifests = [read_manifest(d) for d in dirs]
    if not image_root:
        return [(d, m.get("image_root")) for d, m in zip(dirs, manifests)]
    roots = ([str(r) if r else "" for r in image_root] if not isinstance(image_root, (str, Path))
             else [r.strip() for r in str(image_root).split(",")])
    if len(roots) > 1:
        if len(roots) != len(dirs):
            raise ValueError(f"image_root names {len(roots)} roots for {len(dirs)} dataset folders "
                             f"({', '.join(map(str, dirs))}): give one root, or one per folder in folder order")
        return [(d, r or m.get("image_root")) for d, r, m in zip(dirs, roots, manifests)]
    recorded = {m.get("image_root") for m in manifests if not m.get("embed_images")}
    if len(recorded) > 1:
        raise ValueError(
            f"image_root={roots[0]!r} is ambiguous: the dataset folders {', '.join(map(str, dirs))} were "
            f"converted against different image roots {sorted(map(str, recorded))}; give one root per "
            f"folder in folder order (image_root='root_a,root_b'), or none to use the recorded ones")
    return [(d, roots[0]) for d in dirs]

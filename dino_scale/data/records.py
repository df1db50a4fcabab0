"""The record schema and reading records back from shards.

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

A dataset is a folder of ``shard-NNNNN.parquet`` files plus ``manifest.json`` (:mod:`.manifest`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import pyarrow as pa

from .integrity import CHECKSUM_FIELDS, damage_detail, record_damage
from .manifest import PathLike, ShardError, _agreeing_manifests, data_dirs, shard_paths
from .shard_read import open_shard, shard_batches

__all__ = [
    "SCHEMA", "iter_records", "to_coco_gt", "CONTENT_SCHEMA", "record_from_row", "arrow_rows", "check_schema",
    "schema_problems",
]

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
    """:class:`~.manifest.ShardError` unless the shard at ``path`` (its Arrow ``schema``) holds the record
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
    that does not match its checksums raises :class:`~.manifest.ShardError` instead, for readers that
    must not drop one (the ground truth of an evaluation). A shard whose Parquet structure
    cannot be read raises :class:`~.manifest.ShardError` naming it."""
    cols = list(columns or SCHEMA.names)
    cols += [f.name for f in CHECKSUM_FIELDS if f.name not in cols]
    for path in shard_paths(data_dir):
        done = 0  # records of this shard yielded
        try:
            shard = open_shard(path)  # as Ray Data reads it (the same damage refused)
            check_schema(path, shard.physical_schema)
            present = set(shard.physical_schema.names)
            batches = shard_batches(shard, [c for c in cols if c in present], batch_rows)
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
    skipped images are absent: :func:`~.manifest.conversion_losses` counts them). Feed it to
    ``pycocotools.coco.COCO`` via ``dataset=``.
    Several folders must not share an image id (``ValueError``): COCO evaluation keys
    detections and ground truth by image id, so two images of one id would be scored as one.
    A record whose labels do not match their checksum raises :class:`~.manifest.ShardError`: scoring
    against changed labels, or without that image, would not be the dataset's AP. So does one (of a
    shard without checksums) whose label lists differ in length.
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
        lists = (rec["boxes"], rec["category_ids"], rec["iscrowd"], rec["area"])
        if len({len(x) for x in lists}) > 1:  # a shard without checksums: zip would drop objects unsaid
            raise ShardError(folder, f"image id {rec['image_id']}: its boxes, category ids, iscrowd flags and "
                                     f"areas differ in number ({', '.join(str(len(x)) for x in lists)}): a damaged "
                                     f"shard (convert the annotations again)")
        for box, cat, crowd, area in zip(*lists):
            annotations.append({"id": len(annotations) + 1, "image_id": rec["image_id"],
                                "category_id": int(cat), "bbox": [float(v) for v in box],
                                "area": float(area), "iscrowd": int(bool(crowd))})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c["id"], "name": c["name"]} for c in categories]}

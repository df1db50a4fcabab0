"""Record checksums: damage to a shard after conversion is found where the record is read.

The converter writes two CRC-32 columns into every record (DESIGN.md "Data records"):

- ``labels_crc32`` uint32: over the record's id, file name, size and annotation lists
  (:func:`labels_crc32` fixes the byte layout);
- ``image_crc32`` uint32, null when the image is read by path: over the embedded bytes.

A shard damaged without changing its size (a bad disk, a faulty copy) passes
:func:`~.manifest.check_shards`, and Parquet reads most such damage without an error: a
changed byte in an embedded JPEG decodes to other pixels, one in a box coordinate to
another box (both seen). :func:`record_damage` names what no longer matches; the loaders
skip and count such a record (reason ``damaged``, :class:`~.decode.ImageDecodeError`),
the COCO ground truth refuses it (:class:`~.manifest.ShardError`), and :func:`check_dataset`
(``dino-scale check-data``) reads a whole folder, page checksums included, and lists the
damaged records, e.g. after a copy to a cluster. Shards written before these columns
existed carry none and are not checked.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["CHECKSUMS", "CHECKSUM_FIELDS", "labels_crc32", "image_crc32", "add_checksums", "record_damage",
           "check_dataset", "describe", "damage_detail"]

CHECKSUMS = "crc32/1"  # the manifest's name for this layout (``checksums``)
CHECKSUM_FIELDS = [pa.field("labels_crc32", pa.uint32()), pa.field("image_crc32", pa.uint32())]
_HEADER = struct.Struct("<qiiIIIII")  # id, width, height, name bytes, boxes/ids/crowd/area lengths


def _values(x: Any, dtype: str) -> np.ndarray:
    return np.asarray([] if x is None else x, dtype=dtype).reshape(-1)


def labels_crc32(image_id, file_name, width, height, boxes, category_ids, iscrowd, area) -> int:
    """CRC-32 of one record's labels: ``image_id`` (int64), ``width``/``height`` (int32),
    ``file_name`` (UTF-8; bytes as they are), then ``boxes`` (float32, any shape: its 4n
    values), ``category_ids`` (int32), ``iscrowd`` (uint8) and ``area`` (float32), each
    little-endian and preceded by its length, so that no two records of different content
    share a byte string. ``None`` lists count as empty."""
    name = (file_name if isinstance(file_name, bytes)  # a damaged name read as bytes (surrogates: the same bytes)
            else ("" if file_name is None else str(file_name)).encode("utf-8", "surrogateescape"))
    parts = [_values(boxes, "<f4"), _values(category_ids, "<i4"), _values(iscrowd, "?").astype("u1"),
             _values(area, "<f4")]
    crc = zlib.crc32(_HEADER.pack(int(image_id), int(width), int(height), len(name), *(p.size for p in parts)))
    crc = zlib.crc32(name, crc)
    for p in parts:
        crc = zlib.crc32(p.tobytes(), crc)
    return crc


def image_crc32(image: Optional[bytes]) -> Optional[int]:
    """CRC-32 of embedded image bytes; ``None`` for an image read by path."""
    return None if image is None else zlib.crc32(image)


def _lists(table: pa.Table, name: str, dtype: str) -> list[np.ndarray]:
    """Column ``name`` (list<...>) of ``table`` -> one numpy array per row (null -> empty)."""
    col = table[name].combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(dtype)
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def add_checksums(table: pa.Table) -> pa.Table:
    """Record rows (the record columns of :data:`~.records.SCHEMA`) -> the same rows with
    ``labels_crc32`` and ``image_crc32`` appended (computed per row, as the readers do)."""
    ids = table["image_id"].to_numpy()
    widths, heights = table["width"].to_numpy(), table["height"].to_numpy()
    names = table["file_name"].to_pylist()
    boxes, cats = _lists(table, "boxes", "<f4"), _lists(table, "category_ids", "<i4")
    crowd, area = _lists(table, "iscrowd", "?"), _lists(table, "area", "<f4")
    labels = [labels_crc32(*row) for row in zip(ids, names, widths, heights, boxes, cats, crowd, area)]
    images = [image_crc32(b.as_py()) for b in table["image"]]
    table = table.append_column(CHECKSUM_FIELDS[0], pa.array(labels, pa.uint32()))
    return table.append_column(CHECKSUM_FIELDS[1], pa.array(images, pa.uint32()))


def _stored(value: Any) -> Optional[int]:
    """A checksum cell as :func:`~.records.record_from_row` holds it -> ``int`` or ``None``."""
    return None if value is None else int(value)


def record_damage(record: dict[str, Any]) -> Optional[str]:
    """What of ``record`` no longer matches its checksums: ``"labels"``, ``"image"``, or
    ``None`` (intact, or a record without checksums). ``record``: as
    :func:`~.records.record_from_row` makes it (what :func:`~.records.iter_records` and the Ray
    datasets' map function hold); a checksum is compared only where the columns it covers are
    present (a reader that leaves a column out sets the checksum over it to None)."""
    want = _stored(record.get("labels_crc32"))
    if want is not None and all(k in record for k in ("boxes", "category_ids", "iscrowd", "area")):
        got = labels_crc32(record["image_id"], record["file_name"], record["width"], record["height"],
                           record["boxes"], record["category_ids"], record["iscrowd"], record["area"])
        if got != want:
            return "labels"
    want = _stored(record.get("image_crc32"))
    # a stored checksum is written for embedded bytes only: a null image cell behind one lost them
    # (was: read by path instead, against no root, from the worker's working folder)
    if want is not None and (record.get("image") is None or image_crc32(bytes(record["image"])) != want):
        return "image"
    return None


def damage_detail(what: str) -> str:
    """The words for a :func:`record_damage` result (or :func:`_scan`'s ``"category"``)."""
    if what == "category":
        return ("a category id the manifest does not list (the manifest or the shard was changed after "
                "conversion; training skips the image)")
    return (f"{'its labels do' if what == 'labels' else 'its image bytes do'} not match the checksum written "
            f"at conversion (the shard was changed after conversion)")


def _scan(path: Path, verify_pages: bool, batch_rows: int, known: frozenset = frozenset()
          ) -> tuple[int, list[dict[str, Any]], bool]:
    """(rows, damaged records, whether the shard has checksum columns) of one shard. A record whose
    checksums match but that holds a category id not in ``known`` (the manifest's; empty: not
    checked) is listed with ``what`` ``"category"``: training skips it (``unknown_category``)."""
    from .records import SCHEMA, arrow_rows, check_schema, record_from_row
    from .shard_read import open_shard, shard_batches

    shard = open_shard(path, verify_pages)  # read as Ray Data reads it: what passes here, a run reads
    check_schema(path, shard.physical_schema)
    present = set(shard.physical_schema.names)
    rows, damaged = 0, []
    for batch in shard_batches(shard, [n for n in SCHEMA.names if n in present], batch_rows):
        for rec in map(record_from_row, arrow_rows(batch)):
            what = record_damage(rec)
            ids = rec["category_ids"]  # an array (None in a damaged record)
            if not what and known and ids is not None and not {int(c) for c in ids} <= known:
                what = "category"
            if what:
                damaged.append({"file": path.name, "row": rows, "image_id": rec["image_id"], "what": what})
            rows += 1
    return rows, damaged, "labels_crc32" in present


_READ_ERRORS = (OSError, pa.ArrowException, UnicodeDecodeError)  # a page checksum, footer or encoding


def _check_shard(path: Path, batch_rows: int, known: frozenset = frozenset()) -> dict[str, Any]:
    """One shard's part of a :func:`check_dataset` report (``known``: the manifest's category ids)."""
    from .manifest import ShardError

    out: dict[str, Any] = {"rows": 0, "damaged": [], "unreadable": None, "checked": True}
    try:
        try:
            out["rows"], out["damaged"], out["checked"] = _scan(path, True, batch_rows, known)
        except _READ_ERRORS as page_error:  # read again without page checksums, to name the records
            out["rows"], out["damaged"], out["checked"] = _scan(path, False, batch_rows, known)
            if not out["damaged"]:  # records intact: the change is in what the record checksums do not cover
                out["unreadable"] = {"file": path.name, "error": f"{type(page_error).__name__}: {page_error} "
                                                                 f"(every record matches its checksums)"}
    except ShardError as e:  # columns renamed or retyped: a damaged footer
        out.update(rows=0, damaged=[], unreadable={"file": path.name, "error": e.detail})
    except _READ_ERRORS as e:
        out.update(rows=0, damaged=[], unreadable={"file": path.name, "error": f"{type(e).__name__}: {e}"})
    return out


def check_dataset(folder, on_shard: Optional[Callable[[str, int, int], None]] = None,
                  batch_rows: int = 64, workers: int = 4) -> dict[str, Any]:
    """Read every record of the dataset ``folder`` and compare it with its checksums.

    Parquet's page checksums are verified too (shards written with them); a shard that fails
    them is read again without, to name its damaged records; a record is also damaged when it holds a
    category id the manifest does not list (``what`` ``"category"``: training skips it; was passed,
    exit 0, after one changed id in ``manifest.json``). Returns ``{"folder", "shards",
    "images", "damaged": [{"file", "row", "image_id", "what"}], "unreadable": [{"file",
    "error"}], "unchecked": [files without checksum columns]}``, in shard order
    (``unreadable``: a shard whose structure cannot be read, or whose pages fail their
    checksums where its records do not). ``workers`` shards are read at a time (threads:
    pyarrow's reads and ``zlib.crc32`` release the GIL; on a bucket mount the reads wait on
    the network); ``on_shard(file, done, total)`` is called as each finishes. A missing or
    truncated shard raises :class:`~.manifest.ShardError` first (:func:`~.manifest.shard_paths`)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from .manifest import _agreeing_manifests, shard_paths

    paths = shard_paths(folder)
    manifests = _agreeing_manifests(folder)
    listed = {d / str(s.get("file")): s.get("num_images")  # each folder's shards (a comma list: several)
              for d, manifest in manifests for s in manifest.get("shards", [])}
    # the categories training reads records against (agreeing: one list); a record with another id is skipped
    known = frozenset(int(c["id"]) for c in manifests[0][1].get("categories", [])) if manifests else frozenset()
    parts: list[Optional[dict[str, Any]]] = [None] * len(paths)
    with ThreadPoolExecutor(max(1, min(int(workers), len(paths) or 1))) as pool:
        pending = {pool.submit(_check_shard, p, batch_rows, known): i for i, p in enumerate(paths)}
        for done, future in enumerate(as_completed(pending), 1):
            part = parts[pending[future]] = future.result()
            expected = listed.get(paths[pending[future]])
            if not part["unreadable"] and isinstance(expected, int) and part["rows"] != expected:
                # every record sound, but not the records listed: training's pre-flight refuses the folder
                part["unreadable"] = {"file": paths[pending[future]].name,
                                      "error": f"{part['rows']} records where the manifest lists {expected}"}
            if on_shard is not None:
                on_shard(paths[pending[future]].name, done, len(paths))
    return {"folder": str(folder), "shards": len(paths), "images": sum(p["rows"] for p in parts),
            "damaged": [d for p in parts for d in p["damaged"]],
            "unreadable": [p["unreadable"] for p in parts if p["unreadable"]],
            "unchecked": [path.name for path, p in zip(paths, parts) if not p["checked"]]}


def describe(report: dict[str, Any]) -> str:
    """One paragraph for a :func:`check_dataset` report."""
    folder = report["folder"]
    if not report["damaged"] and not report["unreadable"]:
        tail = (f"; {len(report['unchecked'])} shard(s) written without checksums were read but not checked"
                if report["unchecked"] else "")
        return f"{folder}: {report['images']} records in {report['shards']} shards match their checksums{tail}"
    lines = [f"{folder}: {len(report['damaged'])} damaged record(s), {len(report['unreadable'])} unreadable "
             f"shard(s) of {report['shards']} (copy the folder again, or remove it and convert the data again)"]
    lines += [f"  {d['file']} row {d['row']} (image id {d['image_id']}): {damage_detail(d['what'])}"
              for d in report["damaged"][:20]]
    if len(report["damaged"]) > 20:
        lines.append(f"  ... and {len(report['damaged']) - 20} more")
    lines += [f"  {u['file']}: {u['error']}" for u in report["unreadable"]]
    return "\n".join(lines)


def labels_fingerprint(data_dir) -> str:
    """16 hex digits naming the labelled images of a dataset (one folder, several, or ``"a,b"``):
    the multiset of its records' ``labels_crc32`` (image id, file name, size, boxes, categories),
    so a moved copy or a conversion with other shard sizes or row order names the same data.
    Reads that one column of each shard. Shards written without checksums count by their
    manifest entry (images and boxes) instead. A resumed run compares it with the one its
    checkpoint was trained on (:func:`dino_scale.engine.elastic.resume_changes`)."""
    import hashlib

    from .manifest import _agreeing_manifests, check_shards
    from .shard_read import open_shard, read_columns

    crcs, unchecked = [], []
    for folder, manifest in _agreeing_manifests(data_dir):
        check_shards(folder, manifest)
        for entry in manifest["shards"]:
            shard = open_shard(folder / entry["file"])  # one open: its footer, then the one column
            column = read_columns(shard, ["labels_crc32"]).column(0) \
                if "labels_crc32" in shard.physical_schema.names else None
            if column is None or column.null_count:
                unchecked.append((int(entry["num_images"]), int(entry["num_boxes"])))
            else:
                crcs.append(column.to_numpy(zero_copy_only=False).astype("<u4"))
    digest = hashlib.sha256(np.sort(np.concatenate(crcs)).tobytes() if crcs else b"")
    digest.update(repr(sorted(unchecked)).encode())
    return digest.hexdigest()[:16]

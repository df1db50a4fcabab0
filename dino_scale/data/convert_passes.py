"""The streaming passes of :mod:`.convert` over a COCO-format JSON.

Both passes spill to per-bucket files in a work folder, the bucket of an image id given by
:func:`bucket_of` (a 64-bit mix of the id, modulo the bucket count) so that an image and its
annotations land in the same bucket whatever the order of the file. Only per-chunk state
stays in memory.

- :func:`scan_images` (categories, then images; run in a child process so it overlaps
  the annotation pass on another core): ``images-BBBBB.arrow`` (frames of
  :data:`IMAGE_SCHEMA` rows, read back by :func:`read_image_rows`).
- :func:`scan_annotations`: ``ann-BBBBB.bin`` (records of :data:`ANN`), box checks that
  need no image (malformed, non-finite, ``w <= 0`` / ``h <= 0``) counted here; the dropped
  boxes that name a usable image id also go to ``drop-BBBBB.bin`` (records of :data:`DROP`),
  so that an Objects365 val split can give them to the split of their image.
"""
from __future__ import annotations

import logging
import os
import time
from array import array
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from .decode import ImageDecodeError, read_size_and_orientation
from .json_stream import stream_items
from .image_paths import resolve_image_path
from .json_values import INT32, exact_ints, floats_of, image_id_of, is_int

__all__ = ["ANN", "BUCKETING", "DROP", "DROP_REASONS", "IMAGE_SCHEMA", "ConversionError", "bucket_of",
           "bucket_of_id", "image_check_warnings", "read_categories", "scan_images", "scan_annotations",
           "read_image_rows"]

ANN = np.dtype([("iid", "<i8"), ("box", "<f4", (4,)), ("cat", "<i4"), ("crowd", "u1"), ("area", "<f4")])
log = logging.getLogger(__name__)
DROP_REASONS = ("malformed", "nonfinite", "degenerate")  # the annotation pass's drops
DROP = np.dtype([("iid", "<i8"), ("reason", "u1")])  # reason: index into DROP_REASONS
IMAGE_SCHEMA = pa.schema([("pos", pa.int64()), ("image_id", pa.int64()), ("file_name", pa.string()),
                          ("width", pa.int32()), ("height", pa.int32()), ("status", pa.string())])
_CHUNK = 262144
_IMAGE_FLUSH_ROWS = 65536  # the image pass appends its rows to the bucket files every this many images


class ConversionError(ValueError):
    """Input that cannot be converted (bad categories, unknown category ids...)."""


def read_categories(path: Path) -> list[dict[str, Any]]:
    cats = []
    for c in stream_items(path, "categories.item"):
        if (not isinstance(c, dict) or not is_int(c.get("id"), -INT32, INT32 - 1) or "name" not in c):
            raise ConversionError(f"{path}: bad category entry {c!r} (need an integer id in int32 range and a name)")
        if c["id"] < 0:  # it passed the class-head check before a run and stopped the loop at its first batch
            raise ConversionError(f"{path}: category {c!r} has a negative id; a category id is the class "
                                  f"index (ids stay raw), so it must be >= 0: renumber the categories")
        cats.append({"id": int(c["id"]), "name": str(c["name"])})
    if not cats:
        raise ConversionError(f"{path}: no 'categories' in the annotation file")
    ids = [c["id"] for c in cats]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConversionError(f"{path}: duplicate category ids {dup}")
    return sorted(cats, key=lambda c: c["id"])


BUCKETING = "splitmix64"  # the rule of bucket_of, kept in a conversion's signature
_U64 = (1 << 64) - 1


def bucket_of(image_ids: np.ndarray, nb: int) -> np.ndarray:
    """Bucket (int64, the shape of ``image_ids``) of each image id (int64): splitmix64's
    finaliser of the id's 64 bits, modulo ``nb``. ``id % nb`` put ids spaced at a common step
    (all multiples of ``nb``, of 1000 ...) into one bucket, which the write pass holds whole."""
    z = np.asarray(image_ids, np.int64).astype(np.uint64)  # a negative id: its two's complement bits
    with np.errstate(over="ignore"):  # the products wrap modulo 2**64, as they should
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(nb)).astype(np.int64)


def bucket_of_id(image_id: int, nb: int) -> int:
    """:func:`bucket_of` of one id (a Python int in int64 range), without numpy per row."""
    z = image_id & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return (z ^ (z >> 31)) % nb


def _size_from_file(images: Optional[Path], fname: str) -> tuple[Optional[tuple[tuple[int, int], int]], str]:
    """((width, height) as stored, EXIF orientation) from the header of ``fname`` under
    ``images``, and ``""``; or ``None`` and the skip reason the write pass gives such a file:
    ``missing_file``, ``unreadable`` (also a name the OS refuses, e.g. too long, or one leaving
    ``images``), ``empty_file``, ``corrupt``, ``too_large``; ``bad_metadata`` without ``images``
    (nothing to read the size from)."""
    if not images:
        return None, "bad_metadata"
    try:
        path = resolve_image_path(images, fname)
        if path is None:
            return None, "missing_file"
        return read_size_and_orientation(path.read_bytes()), ""
    except ImageDecodeError as e:
        return None, e.reason
    except OSError:
        return None, "unreadable"


def _append_frame(path: Path, batch: pa.RecordBatch) -> None:
    """Append ``batch`` to ``path`` as one frame: its byte length (8 bytes, little endian), then
    a whole Arrow IPC stream holding it. The file is open only while it is written, so the
    image pass holds one file at a time whatever the number of buckets (it kept one open per
    bucket: a 4 GB JSON over ``ulimit -n 256``)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    data = sink.getvalue()
    with open(path, "ab") as fh:
        fh.write(len(data).to_bytes(8, "little"))
        fh.write(memoryview(data))


def read_image_rows(path: Path) -> Optional[pa.Table]:
    """The rows (:data:`IMAGE_SCHEMA`) the image pass appended to ``path`` in their order;
    ``None`` when the file is absent. A frame cut short raises :class:`ConversionError` (the
    plan is written after the pass ends, so only a file changed since then has one)."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    tables, at = [], 0
    while at < len(data):
        n = int.from_bytes(data[at:at + 8], "little") if len(data) - at >= 8 else len(data)
        if at + 8 + n > len(data):
            raise ConversionError(f"{path}: a frame is cut short at byte {at}; delete {path.parent} to "
                                  f"convert again")
        tables.append(pa.ipc.open_stream(pa.py_buffer(data[at + 8:at + 8 + n])).read_all())
        at += 8 + n
    return pa.concat_tables(tables) if tables else IMAGE_SCHEMA.empty_table()


def scan_images(path: Path, images: Optional[Path], work: Path, nb: int,
                select: tuple[int, Optional[int]]) -> dict[str, Any]:
    """Categories + images pass; returns counts. Images outside ``select`` (file-order
    range) are recorded in ``excluded.npy``: their annotations belong to the sibling split.
    ``image_checks`` (:func:`image_check_warnings` words them): ``turned_sizes_read``, images
    without a usable width/height whose file turns them by EXIF (orientation 5-8, not square),
    with the first file names: their size is recorded as stored, so ``data.exif_orientation=auto``
    decodes them as stored, which their boxes may not be drawn on; ``shared_files``
    (:func:`_shared_files`)."""
    cats = read_categories(path)
    lo, hi = select
    buf: dict[int, list[tuple]] = {}
    excluded: list[int] = []
    counts = np.zeros(nb, np.int64)
    n_all = n = pending = 0
    turned: list[str] = []
    n_turned = 0
    name_hashes = array("q")  # hash(file_name) of each usable entry: files named by several ids

    def flush():
        for b, rows in buf.items():
            cols = list(zip(*rows))
            _append_frame(work / f"images-{b:05d}.arrow", pa.record_batch(
                [pa.array(c, f.type) for c, f in zip(cols, IMAGE_SCHEMA)], schema=IMAGE_SCHEMA))
        buf.clear()

    for img in stream_items(path, "images.item"):
        pos = n_all
        n_all += 1
        ok_dict = isinstance(img, dict)
        iid = image_id_of(img.get("id")) if ok_dict else None
        if pos < lo or (hi is not None and pos >= hi):
            if iid is not None:
                excluded.append(iid)
            continue
        fname = str(img.get("file_name") or "") if ok_dict else ""
        w, h = (img.get("width"), img.get("height")) if ok_dict else (None, None)
        status = ""
        id_ok = iid is not None
        if not id_ok or not fname:
            status, iid = "bad_metadata", iid if id_ok else -1
        elif not (is_int(w, 1, INT32 - 1) and is_int(h, 1, INT32 - 1)):
            read, status = _size_from_file(images, fname)  # width/height missing or not a pixel count: the header
            (w, h), orientation = read if read else ((0, 0), 1)
            if read and orientation in (5, 6, 7, 8) and w != h:
                n_turned += 1
                if len(turned) < 5:
                    turned.append(fname)
        if not status:
            name_hashes.append(hash(os.path.normpath(fname)))  # 'a.jpg', './a.jpg': one file
        b = bucket_of_id(iid, nb)
        buf.setdefault(b, []).append((pos, iid, fname, int(w) if not status else 0, int(h) if not status else 0,
                                      status))
        counts[b] += 1
        n += 1
        pending += 1
        if pending >= _IMAGE_FLUSH_ROWS:
            flush()
            pending = 0
    flush()
    np.save(work / "excluded.npy", np.unique(np.asarray(excluded, dtype=np.int64)))
    return {"categories": cats, "num_images": n, "num_images_in_file": n_all, "bucket_counts": counts.tolist(),
            "image_checks": {"turned_sizes_read": {"images": n_turned, "examples": turned},
                             "shared_files": _shared_files(work, nb, np.frombuffer(name_hashes, np.int64))}}


def _usable_rows(work: Path, nb: int):
    """(image id, file name) of every usable entry the image pass wrote to ``work``; the name
    normalized (``os.path.normpath``) as the duplicate-id check compares them."""
    for b in range(nb):
        rows = read_image_rows(work / f"images-{b:05d}.arrow")
        if rows is not None:
            cols = (rows.column(c).to_pylist() for c in ("image_id", "file_name", "status"))
            yield from ((iid, os.path.normpath(name)) for iid, name, status in zip(*cols) if not status)


def _shared_files(work: Path, nb: int, name_hashes: np.ndarray) -> dict[str, Any]:
    """Files that several image ids name (``files``, their ``entries``, the first ``examples``):
    each id brings its own annotations, so such a file is trained on once per id with the other
    ids' objects as background. Ids the conversion skips as ``duplicate_id`` are left out (an id
    that names several files, or that the sibling split lists); an id listed twice for one file
    counts once. ``name_hashes``: (n,) int64, ``hash(file_name)`` of the usable entries; only the
    names behind a repeated hash are read back from the image pass's frames in ``work``."""
    ordered = np.sort(name_hashes)
    repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    ids_of: dict[str, set] = {}
    if repeated:
        for iid, name in _usable_rows(work, nb):
            if hash(name) in repeated:
                ids_of.setdefault(name, set()).add(iid)
    candidates = {i for ids in ids_of.values() if len(ids) > 1 for i in ids}
    if candidates:  # drop the ids that name another file too, or that the sibling split lists
        names_of: dict[int, set] = {}
        for iid, name in _usable_rows(work, nb):
            if iid in candidates:
                names_of.setdefault(iid, set()).add(name)
        excluded = set(np.load(work / "excluded.npy").tolist())
        kept = {i for i in candidates if len(names_of[i]) == 1 and i not in excluded}
        ids_of = {name: ids & kept for name, ids in ids_of.items()}
    shared = sorted(name for name, ids in ids_of.items() if len(ids) > 1)
    return {"files": len(shared), "entries": sum(len(ids_of[name]) for name in shared), "examples": shared[:5]}


def image_check_warnings(checks: dict[str, Any]) -> list[str]:
    """What :func:`scan_images`' ``image_checks`` ask the user to look at, one text each."""
    out = []
    turned = checks.get("turned_sizes_read") or {}
    if turned.get("images"):
        out.append(f"{turned['images']} images have no width/height in the file and an EXIF orientation that "
                   f"turns them (e.g. {', '.join(map(repr, turned['examples']))}): their size was read as "
                   f"stored, so data.exif_orientation=auto decodes them as stored (the official reading); if "
                   f"their boxes were drawn on the upright image (labelling tools that apply EXIF), write their "
                   f"upright width/height (swapped) into those entries and convert again: auto then turns them")
    shared = checks.get("shared_files") or {}
    if shared.get("files"):
        out.append(f"{shared['files']} image files are named by {shared['entries']} image entries with different "
                   f"ids (e.g. {', '.join(map(repr, shared['examples']))}): each entry is converted as an image of "
                   f"its own with its own boxes, so such a file is trained on once per id, the other entries' "
                   f"objects as background; merge their annotations under one id if they are one image")
    return out


def _spill(work: Path, nb: int, kind: str, rec: np.ndarray) -> None:
    """Append records (n,) with an ``iid`` field (:data:`ANN`, :data:`DROP`) to
    ``<kind>-BBBBB.bin``, bucket :func:`bucket_of` of ``iid``."""
    if not len(rec):
        return
    bucket = bucket_of(rec["iid"], nb)
    order = np.argsort(bucket, kind="stable")
    rec, bucket = rec[order], bucket[order]
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    for s, e in zip(starts, list(starts[1:]) + [len(bucket)]):
        with open(work / f"{kind}-{int(bucket[s]):05d}.bin", "ab") as fh:
            rec[s:e].tofile(fh)


_MALFORMED_SHOWN = 5  # malformed annotations named in the log, each with the field at fault


def scan_annotations(path: Path, work: Path, nb: int, progress=None) -> dict[str, Any]:
    """Annotation pass: spill valid-looking boxes per bucket; count what is dropped here."""
    dropped = dict.fromkeys(DROP_REASONS, 0)
    seen_cats: set = set()
    ids: list = []
    cats: list = []
    boxes: list = []
    crowds: list = []
    areas: list = []
    total = 0
    t0 = time.time()
    said = [0]  # malformed annotations shown so far

    def process():
        iid, bad_i = exact_ints(ids)
        cat, bad_c = exact_ints(cats)  # True or "3" is no category id (numpy would read 1.0, 3.0)
        box, bad_b = floats_of(boxes, 4, numbers_only=True)  # [true, false, 10, 10] or text: no box
        crowd, bad_cr = floats_of(crowds)  # "true" or a list is no crowd flag: dropped, not read as 0
        area, _ = floats_of(areas)
        raw_cats = list(cats)
        int_id = ~bad_i
        int_cat = ~bad_c
        malformed = ~int_id | bad_b | bad_cr
        dropped["malformed"] += int(malformed.sum())
        for i in np.flatnonzero(malformed)[:max(0, _MALFORMED_SHOWN - said[0])]:  # which field: the count alone
            # did not say (a segmentation-only entry, iscrowd "true", a string image_id)
            what = (f"image_id {ids[i]!r} is not an integer" if bad_i[i] else f"bbox {boxes[i]!r} is not "
                    f"[x, y, w, h] numbers" if bad_b[i] else f"iscrowd {crowds[i]!r} is not 0/1")
            log.warning("%s: annotation #%d dropped as malformed: %s%s", path.name, total - len(ids) + i + 1,
                        str(what)[:200], "" if said[0] + 1 < _MALFORMED_SHOWN else " (more are counted, not shown)")
            said[0] += 1
        for lst in (ids, cats, boxes, crowds, areas):
            lst.clear()
        keep = ~malformed
        finite = np.isfinite(box).all(1)
        dropped["nonfinite"] += int((keep & ~finite).sum())
        keep &= finite
        degenerate = ~(box[:, 2] > 0) | ~(box[:, 3] > 0)
        dropped["degenerate"] += int((keep & degenerate).sum())
        gone = int_id & (malformed | ~finite | degenerate)  # dropped, naming an image it belongs to
        drop = np.empty(int(gone.sum()), DROP)
        drop["iid"], drop["reason"] = iid[gone], np.where(malformed, 0, np.where(~finite, 1, 2))[gone]
        _spill(work, nb, "drop", drop)
        keep &= ~degenerate
        seen_cats.update(np.unique(cat[keep & int_cat]).tolist())
        for i in np.flatnonzero(keep & ~int_cat)[:100]:
            seen_cats.add(repr(raw_cats[i]))
        rec = np.empty(int(keep.sum()), ANN)
        rec["iid"] = iid[keep]
        rec["box"] = box[keep]
        rec["cat"] = np.where(int_cat, cat, -1)[keep]
        rec["crowd"] = np.nan_to_num(crowd, nan=0.0)[keep] > 0
        rec["area"] = area[keep]
        _spill(work, nb, "ann", rec)

    ap_i, ap_c, ap_b, ap_cr, ap_a = ids.append, cats.append, boxes.append, crowds.append, areas.append
    for a in stream_items(path, "annotations.item"):
        total += 1
        try:
            get = a.get
            ap_i(get("image_id")); ap_c(get("category_id")); ap_b(get("bbox"))
            ap_cr(get("iscrowd", 0)); ap_a(get("area"))
        except AttributeError:  # not an object
            ap_i(None); ap_c(None); ap_b(None); ap_cr(0); ap_a(None)
        if len(ids) == _CHUNK:
            process()
            if progress and total % (_CHUNK * 8) == 0:
                progress(f"  annotations: {total:,} read ({total / (time.time() - t0):,.0f}/s)")
    if ids:
        process()
    return {"boxes_in": total, "dropped": dropped, "seen_categories": sorted(seen_cats, key=str)}

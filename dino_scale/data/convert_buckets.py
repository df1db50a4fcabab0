"""The write pass's view of one bucket of :mod:`.convert`: the join of its images and
annotations (duplicate ids, box clipping) and the order its rows are written in.

Order: with a shuffle seed the buckets are written in a seeded permutation and each bucket's
rows in a seeded permutation of their own (file order otherwise). A bucket holds the ids that
:func:`~.convert_passes.bucket_of` (a hash) sends to it, so it samples the whole id range; a
shard (a run of rows of one or a few buckets) then mixes images from all over the file, not a
run of neighbouring ids, which in COCO / Objects365 files come from the same source and collection. The draws depend
on (seed, bucket) only, so the same input and seed give the same rows in the same order.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from .convert_passes import ANN, DROP, DROP_REASONS, read_image_rows

__all__ = ["join_bucket", "bucket_order", "shuffle_bucket"]


def bucket_order(num_buckets: int, seed: Optional[int]) -> np.ndarray:
    """Buckets (int64, (num_buckets,)) in the order they are written: ``0..num_buckets-1``
    without a seed, else a permutation drawn from ``seed``."""
    if seed is None:
        return np.arange(num_buckets, dtype=np.int64)
    return np.random.default_rng([int(seed)]).permutation(num_buckets).astype(np.int64)


def shuffle_bucket(meta: pa.Table, ann: np.ndarray, seed: int, b: int) -> tuple[pa.Table, np.ndarray]:
    """``join_bucket``'s (metadata of n rows, annotations) of bucket ``b`` with the rows in a
    permutation drawn from (``seed``, ``b``): the metadata's rows taken in that order, each
    annotation's ``pos`` renumbered to its image's new row and the annotations sorted by it
    again (an image's boxes keep their order)."""
    perm = np.random.default_rng([int(seed), int(b) + 1]).permutation(meta.num_rows)
    new_row = np.empty_like(perm)
    new_row[perm] = np.arange(len(perm))
    ann = ann.copy()
    ann["pos"] = new_row[ann["pos"]]
    return meta.take(pa.array(perm)), ann[np.argsort(ann["pos"], kind="stable")]


def join_bucket(work: Path, b: int, excluded: np.ndarray) -> tuple[Optional[pa.Table], np.ndarray, dict]:
    """(image metadata, its annotations sorted by position, box stats) of bucket ``b``.

    ``work``: the conversion's work folder (the spills of :mod:`.convert_passes`); ``excluded``:
    image ids (int64, any shape) of the sibling split. The metadata: n rows of
    :data:`~.convert_passes.IMAGE_SCHEMA` in file order, ``status`` "" for a usable image else the
    skip reason (duplicate ids marked here); ``None`` when the bucket lists no image. The
    annotations: a structured array of the boxes kept (clipped to their image), ``pos`` (row of
    the metadata, ascending) then the :data:`~.convert_passes.ANN` fields. The stats: dropped /
    clipped box counts by reason."""
    meta = read_image_rows(work / f"images-{b:05d}.arrow")
    apath = work / f"ann-{b:05d}.bin"
    ann = np.fromfile(apath, dtype=ANN) if apath.is_file() else np.zeros(0, ANN)
    stats = {"orphan": 0, "other_split": 0, "skipped_meta": 0, "outside": 0, "clipped": 0}
    ids = meta.column("image_id").to_numpy() if meta is not None else np.zeros(0, np.int64)
    # boxes the annotation pass dropped whose image only the sibling split lists are that split's (an
    # id both list, a duplicate_id skip in each, is each one's: its boxes were counted by neither)
    dpath = work / f"drop-{b:05d}.bin"
    drop = np.fromfile(dpath, dtype=DROP) if dpath.is_file() else np.zeros(0, DROP)
    only_theirs = np.isin(drop["iid"], excluded) & ~np.isin(drop["iid"], ids)
    theirs = np.bincount(drop["reason"][only_theirs], minlength=len(DROP_REASONS))
    stats.update({f"other_split_{r}": int(n) for r, n in zip(DROP_REASONS, theirs)})
    if meta is None or meta.num_rows == 0:
        other = np.isin(ann["iid"], excluded)
        stats["other_split"], stats["orphan"] = int(other.sum()), int((~other).sum())
        return None, np.zeros(0, ANN), stats
    status = np.array(meta.column("status").to_pylist(), dtype=object)
    # an id that the sibling split (o365 val/train_extra) also lists is in neither
    status[(status == "") & np.isin(ids, excluded)] = "duplicate_id"
    # among the remaining usable entries (a bad entry takes no id) an id listed again for the
    # same file keeps its first entry; one given to different files is kept by none of them:
    # the annotations name the id only, so the first got the other files' boxes as its own
    usable = np.flatnonzero(status == "")
    order = usable[np.argsort(ids[usable], kind="stable")]
    # one file however its name is spelled ('a.jpg', './a.jpg'): it resolves to one path under the root
    names = np.array([os.path.normpath(n) for n in meta.column("file_name").to_pylist()], dtype=object)[order]
    repeat, other_file = np.zeros(len(order), bool), np.zeros(len(order), bool)
    repeat[1:] = ids[order][1:] == ids[order][:-1]
    other_file[1:] = repeat[1:] & (names[1:] != names[:-1])
    group = np.cumsum(~repeat)  # one number per id
    status[order[repeat | np.isin(group, group[other_file])]] = "duplicate_id"
    valid = np.flatnonzero(status == "")
    vorder = np.argsort(ids[valid], kind="stable")
    vids = ids[valid][vorder]
    p = np.minimum(np.searchsorted(vids, ann["iid"]), max(len(vids) - 1, 0))
    found = (vids[p] == ann["iid"]) if len(vids) else np.zeros(len(ann), bool)
    other = ~found & np.isin(ann["iid"], excluded) & ~np.isin(ann["iid"], ids)
    of_skipped = ~found & ~other & np.isin(ann["iid"], ids[status != ""])
    stats["other_split"], stats["skipped_meta"] = int(other.sum()), int(of_skipped.sum())
    stats["orphan"] = int((~found & ~other & ~of_skipped).sum())
    ann = ann[found]
    pos = valid[vorder[p[found]]]
    w = meta.column("width").to_numpy()[pos].astype(np.float64)
    h = meta.column("height").to_numpy()[pos].astype(np.float64)
    box = ann["box"].astype(np.float64)
    x1, y1 = np.clip(box[:, 0], 0, w), np.clip(box[:, 1], 0, h)
    x2, y2 = np.clip(box[:, 0] + box[:, 2], 0, w), np.clip(box[:, 1] + box[:, 3], 0, h)
    inside = (x2 > x1) & (y2 > y1)
    stats["outside"] = int((~inside).sum())
    new = np.stack([x1, y1, x2 - x1, y2 - y1], 1)
    stats["clipped"] = int((inside & (np.abs(new - box).max(1) > 1e-3)).sum())
    ann, pos, new = ann[inside], pos[inside], new[inside]
    ann["box"] = new
    # an annotation listed twice (merged exports) reads as two identical boxes: counted, kept as given
    key = np.empty(len(ann), [("iid", "<i8"), ("cat", ANN.fields["cat"][0]), ("crowd", "?"), ("box", "<f4", (4,))])
    key["iid"], key["cat"], key["crowd"], key["box"] = ann["iid"], ann["cat"], ann["crowd"], new
    stats["repeated"] = int(len(key) - len(np.unique(key.view(f"V{key.dtype.itemsize}")))) if len(key) else 0
    area = ann["area"]
    ann["area"] = np.where(np.isfinite(area) & (area > 0), area, new[:, 2] * new[:, 3])
    o = np.argsort(pos, kind="stable")
    ann, pos = ann[o], pos[o]
    ann_pos = np.empty(len(ann), dtype=[("pos", "<i8")] + [(n, ANN.fields[n][0]) for n in ANN.names])
    ann_pos["pos"] = pos
    for n in ANN.names:
        ann_pos[n] = ann[n]
    meta = meta.set_column(meta.schema.get_field_index("status"), "status", pa.array(status.tolist(), pa.string()))
    return meta, ann_pos, stats


"""The write pass of a conversion (:mod:`.convert`): each bucket's images and annotations joined
(:mod:`.convert_buckets`), the image files looked up / read / verified, and the rows handed to
:class:`~.shards.ShardWriter` as records, or as counted skips.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .convert_buckets import bucket_order, join_bucket, shuffle_bucket
from .decode import verify_image_bytes
from .image_paths import OUTSIDE_ROOT, resolve_image_path
from .integrity import add_checksums
from .records import CONTENT_SCHEMA
from .shards import ShardWriter, load_progress, read_json_or_none, write_json_atomic

log = logging.getLogger("dino_scale.data.convert")  # the conversion's logger, whichever module of it logs

_LOG_SKIPS = 50  # individual skip lines logged before only counting

# image bytes a bucket's conversion holds before handing its rows on: buckets are sized by
# annotation bytes, so a small file of large images held every image at once (~3.4x their size)
_CHUNK_IMAGE_BYTES = 64 * 1024 * 1024


class _WritePass:
    """The write pass of :class:`~.convert._Converter` (its settings and work folder: ``out``, ``work``,
    ``nb``, ``embed``, ``images`` ...; ``_logged``, ``_said_outside``: what was logged so far)."""

    def write(self, plan: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, int]]:
        done = load_progress(self.out, self.work)
        writer = ShardWriter(self.out, self.work, self.shard_bytes, self.max_rows, done)
        start = writer.start_index
        excluded = np.load(self.work / "excluded.npy")
        order = bucket_order(self.nb, self.shuffle_seed)  # global row index: position in this order
        bases = np.r_[0, np.cumsum(np.asarray(plan["bucket_counts"], np.int64)[order])]
        totals: dict[str, int] = {}
        t0 = time.time()
        for k, b in enumerate(order.tolist()):
            spath = self.work / f"bucket-{b:05d}.json"
            stats = read_json_or_none(spath) if bases[k + 1] <= start else None  # done before an interruption
            if not isinstance(stats, dict):
                stats = self._write_bucket(b, excluded, writer, int(bases[k]), start)
                write_json_atomic(spath, stats)
            for key, v in stats.items():
                totals[key] = totals.get(key, 0) + v
            if self.progress and k % 32 == 31:
                self.say(f"  bucket {k + 1}/{self.nb}: {len(writer.done)} shards ({time.time() - t0:.0f}s)")
        return writer.finish(int(bases[-1])), totals

    def _write_bucket(self, b: int, excluded: np.ndarray, writer: ShardWriter, base: int, start: int) -> dict:
        meta, ann, stats = join_bucket(self.work, b, excluded)
        if meta is None:
            return stats
        if self.shuffle_seed is not None:  # rows (and so the global indices) in the seeded order
            meta, ann = shuffle_bucket(meta, ann, self.shuffle_seed, b)
        n = meta.num_rows
        first = max(0, start - base)
        counts = np.bincount(ann["pos"], minlength=n).astype(np.int64)
        status = np.array(meta.column("status").to_pylist(), dtype=object)
        ids = meta.column("image_id").to_numpy()
        names = meta.column("file_name")
        images: list[Optional[bytes]] = [None] * n
        chunk_start, held = first, 0  # rows [chunk_start, i] read; held: their image bytes
        if self.embed or (self.check_files and self.images is not None):
            widths, heights = meta.column("width").to_pylist(), meta.column("height").to_pylist()
            for i in range(first, n):
                if status[i]:
                    continue
                try:  # the lookup stats the file: EACCES, ENAMETOOLONG, EIO are "unreadable" too
                    p = resolve_image_path(self.images, names[i].as_py())
                    if p is None:
                        status[i] = "missing_file"
                    elif self.embed:
                        data = p.read_bytes()
                        reason = (verify_image_bytes(data, (widths[i], heights[i])) if self.verify
                                  else (None if data else "empty_file"))
                        status[i] = reason or ""
                        images[i] = data if not reason else None
                        held += len(data) if not reason else 0
                    elif p.stat().st_size == 0:
                        status[i] = "empty_file"
                except OSError as e:  # permissions, a failing network filesystem
                    status[i] = "unreadable"
                    outside = OUTSIDE_ROOT in str(e) and not self._said_outside  # said once, else debug
                    (log.warning if outside else log.debug)("image id %s: %s%s", int(ids[i]), e,
                                                            " (such names are unreadable skips)" if outside else "")
                    self._said_outside = self._said_outside or outside
                if held >= _CHUNK_IMAGE_BYTES:  # hand these rows on: a bucket's images are not all held at once
                    self._add_rows(writer, meta, ann, status, images, counts, base, chunk_start, i + 1)
                    chunk_start, held = i + 1, 0
        self._add_rows(writer, meta, ann, status, images, counts, base, chunk_start, n)
        return stats

    def _add_rows(self, writer: ShardWriter, meta: pa.Table, ann: np.ndarray, status: np.ndarray,
                  images: list, counts: np.ndarray, base: int, lo: int, hi: int) -> None:
        """Rows ``lo..hi-1`` of a bucket (``status`` decided for each) to ``writer``: the skipped
        ones as counted skips (logged), the others as records; their image bytes are then released
        from ``images``. Called in bucket order, so the shards are those of one call per bucket."""
        ids = meta.column("image_id").to_numpy()
        names = meta.column("file_name")
        pos_col = meta.column("pos").to_numpy()
        ok = np.zeros(len(status), bool)
        ok[lo:hi] = status[lo:hi] == ""
        for i in np.flatnonzero(~ok[lo:hi]) + lo:
            writer.add_skip(base + i, int(ids[i]), str(status[i]), int(counts[i]), names[i].as_py())
            if self._logged < _LOG_SKIPS:
                log.warning("skipping image id %s (%s): entry %d of the file, file_name %r", int(ids[i]),
                            status[i], int(pos_col[i]), names[i].as_py())
                self._logged += 1
        if not ok.any():
            return
        sel = np.flatnonzero(ok)
        a = ann[np.repeat(ok, counts)]
        sub = counts[sel]
        off = np.r_[0, np.cumsum(sub)].astype(np.int32)
        take = pa.array(sel)
        img_col = pa.array([images[i] for i in sel], pa.binary())
        for i in sel:
            images[i] = None
        table = add_checksums(pa.table({
            "image_id": pa.array(ids[sel], pa.int64()),
            "file_name": names.take(take),
            "width": meta.column("width").take(take),
            "height": meta.column("height").take(take),
            "image": img_col,
            "boxes": pa.ListArray.from_arrays(pa.array(off * 4), pa.array(a["box"].reshape(-1), pa.float32())),
            "category_ids": pa.ListArray.from_arrays(pa.array(off), pa.array(a["cat"], pa.int32())),
            "iscrowd": pa.ListArray.from_arrays(pa.array(off), pa.array(a["crowd"].astype(bool))),
            "area": pa.ListArray.from_arrays(pa.array(off), pa.array(a["area"], pa.float32())),
        }, schema=CONTENT_SCHEMA))
        row_bytes = 64 + sub * 25 + pc.binary_length(table["file_name"]).to_numpy(zero_copy_only=False)
        if self.embed:
            row_bytes = row_bytes + pc.binary_length(img_col).to_numpy(zero_copy_only=False)
        writer.add(table, base + sel, row_bytes.astype(np.int64))

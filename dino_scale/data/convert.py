"""COCO-format annotation JSON (COCO 2017, Objects365 v1/v2) -> Parquet record shards.

Memory stays bounded whatever the file size. The JSON is streamed with ijson
(:mod:`.convert_passes`): categories + images in a child process while the annotations
are read in this one; both spill to per-bucket files (bucket: a hash of ``image_id`` modulo
the bucket count, about one bucket per 16 MB of JSON). The write pass joins each bucket's
images and annotations (vectorized, :mod:`.convert_buckets`), clips boxes to the image,
optionally reads / verifies / embeds the image files, and hands rows to
:class:`~.shards.ShardWriter`. Shards hold images grouped by bucket; with ``shuffle_seed``
(the default) buckets and the rows within each come in a seeded random order, so that every
shard samples the whole file rather than a run of neighbouring image ids (training reads
shards in random order through a small shuffle buffer); without, buckets in turn, in file
order within a bucket.

Bad input: non-finite or malformed coordinates, ``w <= 0`` or ``h <= 0``, boxes wholly
outside the image, and boxes of unknown images are dropped; boxes partly outside are
clipped; every case is counted. Images whose file is missing, unreadable, empty or corrupt
(or above PIL's pixel limit: ``too_large``) or whose pixels do not match the annotated size
(when checked: ``size_mismatch``, see :func:`~.decode.sizes_agree`), and images with bad
metadata (no file name, or an id that is neither an int64 nor an integral float below 2**53)
or duplicate ids (an id listed again for the same file keeps its first usable entry; an id
given to different files is kept by none, as the annotations cannot tell whose boxes are
whose; with an Objects365 val split, an id on both sides is kept on neither) are skipped,
counted and logged with their id, entry position and file name; their boxes count as dropped
(``skipped_image``). With a val split, each split's manifest counts the boxes of its own
images; boxes naming no image of either split (an unknown or unusable image id) are counted
in both. A width or height that is not a whole pixel count in int32 range is read from the
file header instead. Unknown or negative category ids (an id is the class index) stop the
conversion before anything is written. The manifest satisfies
``images_in == num_images + sum(images_skipped.values())`` and
``boxes_in == num_boxes + sum(boxes_dropped.values())``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing as mp
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .convert_buckets import bucket_order, join_bucket, shuffle_bucket
from .convert_passes import (
    BUCKETING, DROP_REASONS, ConversionError, image_check_warnings, scan_annotations, scan_images,
)
from .decode import verify_image_bytes
from .json_stream import MalformedJSONError
from .integrity import CHECKSUMS, add_checksums
from .records import (
    CONTENT_SCHEMA, CONVERT_WORK_NAME, FORMAT, MANIFEST_NAME, OUTSIDE_ROOT, ManifestError, ShardError, read_manifest,
    resolve_image_path,
)
from .preflight import preflight_shards
from .readers import rewriting_dataset
from .shards import (STAGING_DIR, ShardWriter, crowd_boxes, finish_swap, folder_lock, load_progress,
                     read_json_or_none, shard_files, write_json_atomic)

__all__ = ["convert_coco", "ConversionError"]

log = logging.getLogger(__name__)

_BUCKET_BYTES = 16 << 20  # JSON bytes per bucket
_LOG_SKIPS = 50  # individual skip lines logged before only counting
_MAX_LISTED = 1000  # skipped image ids listed in the manifest
_PARALLEL_MIN_BYTES = 64 << 20  # below this, one process reads everything
PLAN_NAME = "plan.json"  # in the work folder: the finished scan (resumable)
LOCK_NAME = ".lock"  # in the output folder: one conversion of it at a time (shards.folder_lock)


def _images_child(conn, args) -> None:
    try:
        conn.send(("ok", scan_images(*args)))
    except BaseException as e:  # noqa: BLE001 - forwarded to the parent
        conn.send(("err", e))
    finally:
        conn.close()


class _Converter:
    def __init__(self, ann_path: Path, images: Optional[Path], out: Path, embed: bool, shard_bytes: int,
                 max_rows: int, select: tuple[int, Optional[int]], check_files: bool, verify: bool,
                 progress: bool, parallel: Optional[bool], shuffle_seed: Optional[int]):
        self.ann_path, self.images, self.out = ann_path, images, out
        self.embed, self.shard_bytes, self.max_rows = embed, shard_bytes, max_rows
        self.select, self.check_files, self.verify, self.progress = select, check_files, verify, progress
        self.shuffle_seed = None if shuffle_seed is None else int(shuffle_seed)
        self.work = out / CONVERT_WORK_NAME
        size = ann_path.stat().st_size
        self.nb = max(1, -(-size // _BUCKET_BYTES))
        self.parallel = size >= _PARALLEL_MIN_BYTES if parallel is None else parallel
        self.signature = {
            "annotations": str(ann_path.resolve()), "size": size, "mtime_ns": ann_path.stat().st_mtime_ns,
            "images": str(images.resolve()) if images else None, "embed_images": embed,
            "shard_bytes": shard_bytes, "max_images_per_shard": max_rows, "select": list(select),
            "check_files": check_files, "verify_images": verify, "buckets": self.nb, "format": FORMAT,
            "checksums": CHECKSUMS,  # a folder converted without them (an older release) is converted again
            "shuffle_seed": self.shuffle_seed,  # as is one of an older release (rows not shuffled)
            "bucketing": BUCKETING,  # (a finished folder bucketed by `id % buckets` is kept: _same_input)
        }
        self._logged = 0
        self._said_outside = False  # an image name outside the image root was warned about

    def say(self, msg: str) -> None:
        if self.progress:
            print(msg, flush=True)
        else:
            log.info(msg)

    # -- passes --------------------------------------------------------------------
    def scan(self) -> dict[str, Any]:
        t0 = time.time()
        args = (self.ann_path, self.images, self.work, self.nb, self.select)
        if self.parallel:
            parent, child = mp.get_context("spawn").Pipe(duplex=False)
            proc = mp.get_context("spawn").Process(target=_images_child, args=(child, args), daemon=True)
            proc.start()
            child.close()
            try:
                ann = scan_annotations(self.ann_path, self.work, self.nb, self.say)
                try:
                    status, meta = parent.recv()
                except EOFError:  # the child died without a word: killed (memory), or could not start
                    proc.join(timeout=10)
                    raise ConversionError(
                        f"the image pass (a child process, used for annotation files of 64 MB and more) ended "
                        f"without a result, exit code {proc.exitcode} (killed for memory? a script calling "
                        f"convert_coco needs an `if __name__ == \"__main__\":` guard for its spawned child); "
                        f"pass parallel=False to run it in this process") from None
            except BaseException:
                proc.terminate()
                raise
            finally:
                proc.join()
            if status == "err":
                raise meta
        else:
            meta = scan_images(*args)
            ann = scan_annotations(self.ann_path, self.work, self.nb, self.say)
        known = {c["id"] for c in meta["categories"]}
        unknown = [c for c in ann.pop("seen_categories") if c not in known]
        if unknown:
            ids = sorted(unknown, key=lambda c: (isinstance(c, str), c))
            raise ConversionError(
                f"{self.ann_path}: annotations use category ids that are not in 'categories': "
                f"{ids[:100]}{' ...' if len(ids) > 100 else ''} (known: {len(known)} ids, "
                f"{min(known)}..{max(known)}); fix the file or its category list")
        part = "" if tuple(self.select) == (0, None) else f" for {self.out.name}"  # the file's annotations all
        self.say(f"{self.ann_path.name}: {len(known)} categories, {meta['num_images']:,} images{part}, "
                 f"{ann['boxes_in']:,} annotations in the file, read in {time.time() - t0:.0f}s; writing shards "
                 f"to {self.out}")
        return {"signature": self.signature, **meta, "ann": ann}

    # -- write ---------------------------------------------------------------------
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

    # -- driver --------------------------------------------------------------------
    def _written_before(self, signature: Any, *added: str) -> bool:
        """Whether ``signature`` is this conversion's as a release before the keys ``added`` wrote it:
        the same input and settings, none of those keys."""
        return (isinstance(signature, dict) and not any(k in signature for k in added)
                and signature == {k: v for k, v in self.signature.items() if k not in added})

    def _same_input(self, signature: Any) -> bool:
        """Whether ``signature`` is this conversion's, or one an earlier release wrote for the same
        input and settings before ``bucketing`` was kept (images bucketed by ``id % buckets``: a
        finished dataset is as usable; only an unfinished work folder is planned again)."""
        return signature == self.signature or self._written_before(signature, "bucketing")

    def _converted_before_shuffling(self, signature: Any) -> bool:
        """Whether ``signature`` is this conversion's as an earlier release wrote it: the same
        input and settings, without ``shuffle_seed`` (rows in file order, always)."""
        return self._written_before(signature, "shuffle_seed", "bucketing")

    def run(self) -> dict[str, Any]:
        made = not self.out.exists()
        # one conversion of a folder at a time; and none that rewrites a folder a running job reads
        with folder_lock(self.out / LOCK_NAME, self.say, str(self.out)), contextlib.ExitStack() as rewrite:
            try:
                return self._run(rewrite)
            except (ConversionError, MalformedJSONError):  # the input refused: nothing in the folder to resume
                if made:
                    self._remove_made_folder()
                raise

    def _remove_made_folder(self) -> None:
        """Remove the output folder this conversion made (the lock held: a conversion waiting on it
        then makes the folder anew, :func:`~.shards.folder_lock`), when it holds only the lock and a
        work folder without a finished scan (no plan, shard, manifest or anything else): a refused
        input left ``.lock`` and ``.convert-work/`` behind. A scan that finished is kept (resumable)."""
        entries = {p.name for p in self.out.iterdir()} if self.out.is_dir() else {"?"}
        if entries - {LOCK_NAME, CONVERT_WORK_NAME} or shard_files(self.out) or (self.work / PLAN_NAME).exists():
            return
        shutil.rmtree(self.work, ignore_errors=True)
        (self.out / LOCK_NAME).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.out.rmdir()

    def _run(self, rewrite: contextlib.ExitStack) -> dict[str, Any]:
        manifest_path = self.out / MANIFEST_NAME
        stage = self.out / STAGING_DIR
        if finish_swap(self.out):  # a staged conversion finished, its swap cut short
            self.say(f"{self.out}: finished putting the conversion staged in {stage.name}/ in place")
        if manifest_path.is_file():
            why = "its manifest is unreadable"
            try:
                old = read_manifest(self.out)
            except ManifestError:  # cut short or edited: nothing in it can be trusted, but the file it
                raw = read_json_or_none(manifest_path)  # names (another release's format) still counts
                self._refuse_another_dataset(raw if isinstance(raw, dict) else {})
                self.say(f"{manifest_path}: unreadable or not a dataset manifest; converting again")
                old = {}
            self._refuse_another_dataset(old)
            unshuffled = self._converted_before_shuffling(old.get("signature"))
            same = self._same_input(old.get("signature"))
            back = self._skipped_files_back(old) if same else []
            if back:
                why = f"{len(back)} image file(s) skipped at its conversion are there now or changed since"
                self.say(f"{self.out}: {len(back)} image file(s) skipped at the last conversion (missing, empty, "
                         f"unreadable ...) are there now or changed since (e.g. {back[0]}); converting again")
            elif old and not same and not unshuffled:
                why = "the annotation file or the settings changed since its conversion"
                self.say(f"{self.out}: the annotation file or the settings changed since its conversion; "
                         f"converting again")
            intact = bool(old)  # readable: its shards are checked below only when it is kept as it is
            if not back and (same or unshuffled):
                try:  # the same input, but its shards must still be there, whole, with sound footers
                    preflight_shards(self.out)  # (sizes alone passed a footer damaged in place)
                    self.say(f"{self.out}: already converted" + (
                        " by an earlier release, rows in file order (not shuffled): kept, as converting "
                        "again can take hours; remove the folder to convert it with shuffled rows"
                        if unshuffled else ""))
                    if stage.exists():  # a conversion with other settings, given up: its partial output
                        shutil.rmtree(stage)
                        self.say(f"{self.out}: removed {stage.name}/, an unfinished conversion with other settings")
                    return old
                except ShardError as e:
                    why, intact = e.detail, False
                    self.say(f"{self.out}: {e.detail}; converting again")
            rewrite.enter_context(rewriting_dataset(self.out, why))  # held to the end: new readers wait
            if intact:  # converted anew beside it, swapped in once usable (needs room for both)
                return self._staged(stage)
            manifest_path.unlink()
        return self._convert()

    def _staged(self, stage: Path) -> dict[str, Any]:
        """Convert into ``stage`` (resuming there), then swap the result into place."""
        self.say(f"{self.out}: the current dataset stays until the new one is complete (converting into "
                 f"{stage.name}/: room for both is needed)")
        out, self.out, self.work = self.out, stage, stage / CONVERT_WORK_NAME
        try:
            manifest = self._convert()
        except ConversionError:  # not usable (an image folder without the images ...): the dataset stays
            shutil.rmtree(stage, ignore_errors=True)
            self.say(f"{out}: the new conversion is not usable; the dataset converted before is kept as it was")
            raise
        finally:
            self.out, self.work = out, out / CONVERT_WORK_NAME
        finish_swap(self.out)
        return manifest

    def _convert(self) -> dict[str, Any]:
        manifest_path = self.out / MANIFEST_NAME
        self.out.mkdir(parents=True, exist_ok=True)
        plan_path = self.work / PLAN_NAME
        plan = read_json_or_none(plan_path)  # absent, or cut short by a crash: planned again
        if not isinstance(plan, dict) or plan.get("signature") != self.signature:
            if self.work.exists():
                shutil.rmtree(self.work)
            for p, _ in shard_files(self.out):
                p.unlink()
            self.work.mkdir(parents=True)
            plan = self.scan()
            write_json_atomic(plan_path, plan)
        else:
            self.say(f"{self.out}: resuming after {len(load_progress(self.out, self.work))} finished shards")
        records, totals = self.write(plan)
        manifest = self._manifest(plan, records, totals)
        self._check_usable(manifest)
        tmp = manifest_path.with_name(MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(manifest_path)
        shutil.rmtree(self.work, ignore_errors=True)
        return manifest

    def _skipped_files_back(self, manifest: dict[str, Any]) -> list[str]:
        """File names of images the conversion behind ``manifest`` skipped for their files (among
        the first :data:`_MAX_LISTED` listed) that may be usable now: a ``missing_file`` or
        ``empty_file`` now there with content, and a file skipped for what it held (corrupt,
        unreadable, too large, of another size) that was replaced or had its permissions changed
        since (its ctime is past the manifest's). The same command again used to answer "already
        converted" and keep them skipped after the user put the files right (an archive unpacked
        late, a file downloaded again)."""
        if self.images is None or not (self.embed or self.check_files):
            return []
        try:
            converted_at = (self.out / MANIFEST_NAME).stat().st_mtime_ns
        except OSError:
            return []
        back = []
        for entry in manifest.get("skipped_images") or []:
            name, reason = entry.get("file_name"), entry.get("reason")
            if reason not in _FILE_REASONS or not name:
                continue
            try:
                path = resolve_image_path(self.images, name)
                stat = path.stat() if path is not None else None
            except OSError:
                continue
            if stat is not None and stat.st_size > 0 and (
                    reason in ("missing_file", "empty_file") or stat.st_ctime_ns > converted_at):
                back.append(name)
        return back

    def _refuse_another_dataset(self, old: dict[str, Any]) -> None:
        """:class:`ConversionError` when ``out`` holds the dataset of another annotation file: it
        was replaced without a word (converting its own file again, edited or with other
        settings, is fine)."""
        signature = old.get("signature")
        source = signature.get("annotations") if isinstance(signature, dict) else None
        if source is None or source == self.signature["annotations"]:
            return
        raise ConversionError(
            f"{self.out} holds the dataset converted from {source} ({old.get('num_images', '?')} images): converting "
            f"{self.ann_path} there would replace it; choose another output folder, or remove that one first")

    def _check_usable(self, manifest: dict[str, Any]) -> None:
        """:class:`ConversionError` when the result cannot be trained on, converted "successfully"
        (exit 0) all the same: no image listed (no ``images`` list), none usable (for reasons of
        their files: an ``--images`` folder that is not the one holding them; or of their entries),
        or annotations listed and every one dropped (``bbox`` or ``image_id`` of another format).
        The partial output is removed, so that the next run converts afresh."""
        skipped, dropped = manifest["images_skipped"], manifest["boxes_dropped"]
        problem = None
        if not manifest["images_in"]:
            if tuple(self.select) != (0, None):  # --o365-val-split past the file's images: an empty split, said
                self.say(f"{self.out}: no image of {self.ann_path} falls in this split (images "
                         f"{self.select[0]}..{'end' if self.select[1] is None else self.select[1] - 1}): empty")
                return
            problem = (f"{self.ann_path} lists no image (its 'images' must be a list of "
                       f"{{id, file_name, width, height}} entries)")
        elif not manifest["num_images"]:
            if set(skipped) <= _FILE_REASONS:
                problem = (f"none of the {manifest['images_in']} images of {self.ann_path} could be used from the "
                           f"image folder {self.images} ({_counts(skipped)}): is it the folder that holds the files "
                           f"the annotation file names (with their sub-folders)?")
            else:
                problem = (f"none of the {manifest['images_in']} images of {self.ann_path} could be used "
                           f"({_counts(skipped)}; the log above names the images and why)")
        elif manifest["boxes_in"] and not manifest["num_boxes"]:
            problem = (f"every one of the {manifest['boxes_in']} annotations of {self.ann_path} was dropped "
                       f"({_counts(dropped)}): a dataset without a single box trains on nothing (each must have "
                       f"an integer image_id of a listed image and a bbox [x, y, w, h] of numbers)")
        if problem is None:
            if manifest["num_images"] and manifest["num_boxes"] <= manifest.get("num_crowd_boxes", 0):
                # was silent (exit 0): a misspelled or non-list "annotations", or crowd boxes only, which
                # training removes: every target empty, a model trained on nothing
                log.warning("%s: no box to train on in %s (%d boxes, %d of them crowd): is its 'annotations' a "
                            "list of {image_id, bbox, category_id}? Fine for images to predict on, not to train on",
                            self.out, self.ann_path, manifest["num_boxes"], manifest.get("num_crowd_boxes", 0))
            return
        shutil.rmtree(self.work, ignore_errors=True)
        for p, _ in shard_files(self.out):
            p.unlink()
        raise ConversionError(problem)

    def _crowd_boxes(self, record: dict[str, Any]) -> int:
        """Crowd boxes written to a shard (skipped images' boxes are not); a progress record from
        before the count was kept has its shard read."""
        if "num_crowd_boxes" in record or not record["file"]:
            return int(record.get("num_crowd_boxes", 0))
        return crowd_boxes(pq.read_table(self.out / record["file"], columns=["iscrowd"]))

    def _manifest(self, plan: dict[str, Any], records: list[dict[str, Any]], totals: dict[str, int]) -> dict:
        skipped: dict[str, int] = {}
        listed: list[dict[str, Any]] = []
        for r in records:
            for k, v in r["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
            listed.extend(r["skipped_images"][: _MAX_LISTED - len(listed)])
        shards = [{k: r[k] for k in ("file", "num_images", "num_boxes", "bytes")} for r in records if r["file"]]
        dropped = dict(plan["ann"]["dropped"])  # of the whole file: less the sibling split's
        theirs = {r: totals.get(f"other_split_{r}", 0) for r in DROP_REASONS}
        dropped.update({r: dropped[r] - theirs[r] for r in DROP_REASONS})
        other_split = totals.get("other_split", 0) + sum(theirs.values())
        dropped.update(orphan=totals.get("orphan", 0), outside=totals.get("outside", 0),
                       skipped_image=sum(r["boxes_dropped_skipped_image"] for r in records)
                       + totals.get("skipped_meta", 0))
        m = {
            "format": FORMAT,
            "source": {"annotations": str(self.ann_path), "images": str(self.images) if self.images else None,
                       "select": list(self.select), "images_in_file": plan["num_images_in_file"],
                       "boxes_of_other_split": other_split},
            "embed_images": self.embed, "checksums": CHECKSUMS, "shuffle_seed": self.shuffle_seed,
            "image_root": str(self.images.resolve()) if self.images and not self.embed else None,
            "categories": plan["categories"],
            "num_images": sum(s["num_images"] for s in shards),
            "num_boxes": sum(s["num_boxes"] for s in shards),
            "num_crowd_boxes": sum(self._crowd_boxes(r) for r in records),
            "images_in": plan["num_images"], "images_skipped": skipped, "skipped_images": listed,
            "boxes_in": plan["ann"]["boxes_in"] - other_split, "boxes_dropped": dropped,
            "boxes_clipped": totals.get("clipped", 0),
            "boxes_repeated": totals.get("repeated", 0),  # kept: the same image, category and box as another
            "shards": shards, "signature": self.signature,
            "image_checks": plan.get("image_checks", {}),  # worded by image_check_warnings
        }
        for text in image_check_warnings(m["image_checks"]):  # here, not at the scan: a resumed run says it too
            log.warning("%s: %s", self.ann_path, text)
        if skipped:
            log.warning("%s: skipped %d images %s", self.out, sum(skipped.values()), skipped)
        if m["boxes_repeated"]:
            log.warning("%s: %d annotation(s) repeat another's image, category and box exactly (kept, as the "
                        "file lists them; a merged or doubly exported annotation file?)", self.out, m["boxes_repeated"])
        if any(dropped.values()):  # counted in the manifest; said here too (an all-malformed file was silent)
            log.warning("%s: dropped %d of %d boxes (%s)", self.out, sum(dropped.values()), m["boxes_in"],
                        _counts(dropped))
        if m["images_in"] != m["num_images"] + sum(skipped.values()) or \
                m["boxes_in"] != m["num_boxes"] + sum(dropped.values()):
            raise RuntimeError(f"internal error: manifest counts do not add up: {json.dumps(m)[:2000]}")
        return m


# image bytes a bucket's conversion holds before handing its rows on: buckets are sized by
# annotation bytes, so a small file of large images held every image at once (~3.4x their size)
_CHUNK_IMAGE_BYTES = 64 * 1024 * 1024

def _counts(counts: dict[str, int]) -> str:
    """``{"malformed": 3, "orphan": 0}`` -> ``"malformed: 3"`` (the non-zero ones)."""
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()) if v) or "none"


# skip reasons that come from the image files (not the annotations)
_FILE_REASONS = frozenset({"missing_file", "unreadable", "empty_file", "corrupt", "too_large", "size_mismatch"})


def _int_at_least(name: str, value: Any, least: int, more: str = "") -> int:
    """``value`` as a plain int; :class:`ValueError` unless it is an integer (numpy's too) >= ``least``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name} must be an int >= {least}{' ' + more if more else ''} (got {value!r})")
    return int(value)


def convert_coco(annotations: Union[str, Path], images: Optional[Union[str, Path]], out: Union[str, Path],
                 embed_images: bool = False, shard_size_mb: float = 256, max_images_per_shard: int = 10000,
                 o365_val_split: Optional[int] = None, progress: bool = True, check_files: bool = True,
                 verify_images: bool = True, parallel: Optional[bool] = None,
                 shuffle_seed: Optional[int] = 0) -> dict[str, Any]:
    """Convert a COCO-format annotation file to record shards in ``out``; returns the manifest.

    ``images``: the image root (``None``: no file checks; records keep file names).
    ``embed_images``: store the encoded bytes in the shards (each is decoded once to verify).
    ``check_files``: without embedding, skip records whose file is missing or empty.
    ``o365_val_split=N`` (the paper's Objects365 recipe, N=5000): the input is a val
    file; its first N images (file order) go to ``out/val`` and the rest to
    ``out/train_extra`` (then train on ``"<o365 train dir>,<out>/train_extra"``); returns
    ``{"val": manifest, "train_extra": manifest}``.
    ``parallel``: read images in a child process (default: for files >= 64 MB).
    ``shuffle_seed`` (an int >= 0, recorded in the manifest): write the images in a seeded
    random order (see the module doc), what training needs; ``None``: buckets in turn, file order
    within each. An Objects365 ``val`` split is never shuffled (evaluation reads it whole).
    Rerunning with the same arguments resumes after the last finished shard; the same
    input and seed always give byte-identical shards.
    """
    # '~' expanded once here: pyarrow's writers expand it and pathlib does not, so '~/out' made a
    # folder named '~' and then failed to open '<home>/out/.convert-work/...'
    ann_path = Path(annotations).expanduser()
    if ann_path.is_dir():  # was "annotation file not found" for a folder that is there
        raise IsADirectoryError(f"annotation file {ann_path} is a folder: give the JSON file in it "
                                f"(e.g. annotations/instances_train2017.json)")
    if not ann_path.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann_path}")
    root = Path(images).expanduser() if images is not None else None
    if root is not None and not root.is_dir() and (embed_images or check_files):
        if root.exists():
            raise NotADirectoryError(f"image folder {root} is not a folder")
        raise FileNotFoundError(f"image folder not found: {root}")
    if embed_images and root is None:
        raise ValueError("embed_images needs the image folder")
    # plain ints: a numpy integer went into the plan and failed its JSON write after the whole scan
    shuffle_seed = None if shuffle_seed is None else _int_at_least("shuffle_seed", shuffle_seed, 0, "or None")
    max_images_per_shard = _int_at_least("max_images_per_shard", max_images_per_shard, 1)
    if o365_val_split is not None:  # 0 made an empty val set, which every evaluation then scored as nothing
        o365_val_split = _int_at_least("o365_val_split", o365_val_split, 1, "(the first N images are the val set)")
    if isinstance(shard_size_mb, bool) or not isinstance(shard_size_mb, (int, float, np.number)) or \
            not (shard_size_mb > 0 and math.isfinite(shard_size_mb)):
        raise ValueError(f"shard_size_mb must be a number > 0 (got {shard_size_mb!r})")
    kw = dict(embed=embed_images, shard_bytes=int(shard_size_mb * (1 << 20)), max_rows=max_images_per_shard,
              check_files=check_files, verify=verify_images, progress=progress, parallel=parallel)
    out = Path(out).expanduser()
    if o365_val_split is not None:
        made = not out.exists()
        try:
            return {"val": _Converter(ann_path, root, out / "val", select=(0, o365_val_split), shuffle_seed=None,
                                      **kw).run(),
                    "train_extra": _Converter(ann_path, root, out / "train_extra", select=(o365_val_split, None),
                                              shuffle_seed=shuffle_seed, **kw).run()}
        except (ConversionError, MalformedJSONError):  # each part removed the folder it made; the parent too
            if made:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only when empty
            raise
    return _Converter(ann_path, root, out, select=(0, None), shuffle_seed=shuffle_seed, **kw).run()

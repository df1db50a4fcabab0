"""COCO-format annotation JSON (COCO 2017, Objects365 v1/v2) -> Parquet record shards.

Memory stays bounded whatever the file size. The JSON is streamed with ijson
(:mod:`.convert_passes`): categories + images in a child process while the annotations
are read in this one; both spill to per-bucket files (bucket: a hash of ``image_id`` modulo
the bucket count, about one bucket per 16 MB of JSON). The write pass (:mod:`.convert_write`)
joins each bucket's images and annotations (vectorized, :mod:`.convert_buckets`), clips boxes
to the image, optionally reads / verifies / embeds the image files, and hands rows to
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
conversion before anything is written. The manifest (:mod:`.convert_manifest`) satisfies
``images_in == num_images + sum(images_skipped.values())`` and
``boxes_in == num_boxes + sum(boxes_dropped.values())``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .convert_child import images_child
from .convert_manifest import _FILE_REASONS, _ManifestAssembly, refuse_mixed_layout
from .convert_passes import BUCKETING, ConversionError, scan_annotations, scan_images
from .convert_write import _WritePass
from .image_paths import resolve_image_path
from .json_stream import MalformedJSONError
from .integrity import CHECKSUMS
from .manifest import CONVERT_WORK_NAME, FORMAT, MANIFEST_NAME, ManifestError, ShardError, read_manifest
from .preflight import preflight_shards
from .readers import rewriting_dataset
from .shards import (STAGING_DIR, finish_swap, folder_lock, load_progress, read_json_or_none, shard_files,
                     write_json_atomic)

__all__ = ["convert_coco", "ConversionError"]

log = logging.getLogger(__name__)

_BUCKET_BYTES = 16 << 20  # JSON bytes per bucket
_PARALLEL_MIN_BYTES = 64 << 20  # below this, one process reads everything
PLAN_NAME = "plan.json"  # in the work folder: the finished scan (resumable)
LOCK_NAME = ".lock"  # in the output folder: one conversion of it at a time (shards.folder_lock)


class _Converter(_WritePass, _ManifestAssembly):
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
            proc = mp.get_context("spawn").Process(target=images_child, args=(child, args, os.getpid()), daemon=True)
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
        held = False  # the exclusive readers' lock (taken once: a second flock of this process refuses itself)
        if (stage / MANIFEST_NAME).is_file():  # a staged conversion finished, its swap cut short
            # not under a running job (its shards would change under it), and not another command's settings
            rewrite.enter_context(rewriting_dataset(self.out, "a conversion staged beside it is to be put in place"))
            held = True
            staged = read_json_or_none(stage / MANIFEST_NAME)
            if manifest_path.is_file() and not self._same_input((staged or {}).get("signature")):
                shutil.rmtree(stage)  # the swap had not begun: the dataset in place is whole
                self.say(f"{self.out}: removed {stage.name}/, a finished conversion with other settings than "
                         f"this command's, not put in place")
            elif finish_swap(self.out):
                self.say(f"{self.out}: finished putting the conversion staged in {stage.name}/ in place")
        if manifest_path.is_file():
            if self.work.exists():  # the last conversion wrote its manifest and was stopped removing its work
                shutil.rmtree(self.work, ignore_errors=True)  # folder: not resumed over shards found damaged
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
            if not held:
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
        the first :data:`~.convert_manifest._MAX_LISTED` listed) that may be usable now: a ``missing_file`` or
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
    refuse_mixed_layout(out, split=o365_val_split is not None)
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

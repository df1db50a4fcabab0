"""The manifest of a conversion (:mod:`.convert`): assembled from the plan, the written shards and
the write pass's counts, its counts checked to add up, what was skipped or dropped said, and a
result that cannot be trained on refused.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from .convert_passes import DROP_REASONS, ConversionError, image_check_warnings
from .integrity import CHECKSUMS
from .manifest import DATASET_PARTS, FORMAT, holds_dataset
from .shards import crowd_boxes, shard_files

log = logging.getLogger("dino_scale.data.convert")  # the conversion's logger, whichever module of it logs

_MAX_LISTED = 1000  # skipped image ids listed in the manifest
# skip reasons that come from the image files (not the annotations)
_FILE_REASONS = frozenset({"missing_file", "unreadable", "empty_file", "corrupt", "too_large", "size_mismatch"})


def _counts(counts: dict[str, int]) -> str:
    """``{"malformed": 3, "orphan": 0}`` -> ``"malformed: 3"`` (the non-zero ones)."""
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()) if v) or "none"


def refuse_mixed_layout(out: Path, split: bool) -> None:
    """:class:`ConversionError` when ``out`` holds the other layout: a dataset (``split``: an
    Objects365 split would go in its ``val/`` and ``train_extra/``), or datasets in ``train/``,
    ``train_extra/`` or ``val/`` (not ``split``: ``out`` would become a dataset itself). A folder that
    is a dataset is read as that one dataset, its parts never: such a conversion exited 0 and
    ``--data out`` went on reading the other dataset, the val images among the training ones."""
    if not out.is_dir():
        return
    if split and holds_dataset(out):
        raise ConversionError(
            f"{out} holds a dataset converted without --o365-val-split: the split would go in its val/ and "
            f"train_extra/, which `--data {out}` never reads (the folder is read as that dataset); give another "
            f"output folder, or remove that dataset first")
    parts = [name for name in DATASET_PARTS if holds_dataset(out / name)]
    if not split and parts:
        raise ConversionError(
            f"{out} holds the datasets {', '.join(p + '/' for p in parts)} (a folder given as --data): converting "
            f"into it would make {out} a dataset itself, read by `--data {out}` in their place; give another "
            f"output folder (e.g. {out / 'train'})")


class _ManifestAssembly:
    """Manifest assembly and the usability check of :class:`~.convert._Converter` (its ``out``, ``work``,
    ``ann_path``, ``images``, ``select``, ``signature`` ... and ``say``)."""

    def _check_usable(self, manifest: dict[str, Any]) -> None:
        """:class:`ConversionError` when the result cannot be trained on, converted "successfully"
        (exit 0) all the same: no image listed (no ``images`` list), none usable (for reasons of
        their files: an ``--images`` folder that is not the one holding them; or of their entries),
        or annotations listed and every one dropped (``bbox`` or ``image_id`` of another format).
        The partial output is removed, so that the next run converts afresh."""
        skipped, dropped = manifest["images_skipped"], manifest["boxes_dropped"]
        problem = None
        if not manifest["images_in"]:
            # --o365-val-split past the file's images: an empty train_extra, said. The val part starts
            # at the first image: empty only for a file listing none (was exit 0, both parts empty)
            if self.select[0] > 0:
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
            # absolute, links kept (manifest.py's rule for dataset folders): "/data/imgs" over a link
            # /data -> /mnt/nfs-a still finds the images once the link points at their new place
            "image_root": os.path.abspath(self.images) if self.images and not self.embed else None,
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

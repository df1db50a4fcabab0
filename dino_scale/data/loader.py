"""Single-process loading without Ray: records -> samples -> collated batches.

``LocalLoader`` is what unit tests, overfit checks and benchmarks use; it runs the same
:class:`~.transforms.DetectionTransform` as the Ray Data datasets, so samples are equal
for the same (seed, epoch, image_id). Undecodable images are skipped, counted in
``loader.skips`` and logged with their image id; so are, for training, records holding a
category id their manifest does not list (``unknown_category``).

Records that reference image files resolve them against the image root of their own
dataset folder (:func:`folder_image_roots`), also when several folders are joined.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from .collate import collate
from .decode import ImageDecodeError
from .image_paths import Roots, folder_image_roots, val_image_roots
from .manifest import PathLike, category_ids, data_dirs, read_manifest
from .records import iter_records
from .transforms import DetectionTransform

__all__ = ["LocalLoader", "iter_samples", "folder_image_roots", "iter_rooted_records"]

log = logging.getLogger(__name__)



def iter_rooted_records(data_dir: Union[PathLike, Sequence[PathLike]], image_root: Roots = None,
                        **kw) -> Iterator[dict[str, Any]]:
    """:func:`~.records.iter_records` of every folder, each record with its folder's
    ``image_root`` (:func:`folder_image_roots`) for :class:`~.transforms.DetectionTransform`."""
    roots = folder_image_roots(data_dir, image_root)
    category_ids([d for d, _ in roots])  # the folders' categories must agree
    for folder, root in roots:
        for rec in iter_records(folder, **kw):
            rec["image_root"] = root
            yield rec


def count_skip(skips: dict[str, Any], seen: set, image_id: int, reason: str, epoch: int) -> None:
    """Count an image dropped in ``epoch`` in ``skips`` (``count``, ``by_reason``, ``image_ids``
    each once) unless ``seen`` (the (epoch, id, reason) counted) holds it: as the Ray path counts
    (:meth:`~.run_stats._DataStats.record_skip`); a second pass over one epoch counted it again."""
    key = (int(epoch), int(image_id), reason)
    if key in seen:
        return
    seen.add(key)
    skips["count"] = skips.get("count", 0) + 1
    skips.setdefault("by_reason", {})[reason] = skips.get("by_reason", {}).get(reason, 0) + 1
    if image_id not in skips.setdefault("image_ids", []):
        skips["image_ids"].append(image_id)


def iter_samples(data_dir, transform: DetectionTransform, epoch: int = 0, skips: Optional[dict[str, Any]] = None,
                 image_root: Roots = None, seen: Optional[set] = None) -> Iterator[dict[str, Any]]:
    """Transformed samples in record order; bad images are skipped and counted in ``skips``
    (:func:`count_skip`, with ``seen``). Records resolve files against their folder's image root
    (``image_root``: an override, as in :func:`folder_image_roots`); ``transform.image_root``
    serves folders that recorded none."""
    seen = set() if seen is None else seen
    for rec in iter_rooted_records(data_dir, image_root):
        try:
            yield transform(rec, epoch=epoch)
        except ImageDecodeError as e:
            if skips is not None:
                count_skip(skips, seen, rec["image_id"], e.reason, epoch)
            log.warning("decode: skipping image id %s (%s)", rec["image_id"], e)


class LocalLoader:
    """Iterate collated batches ``(images uint8 (B,3,H,W), masks (B,H,W), targets)``.

    ``shuffle`` orders samples by a permutation seeded with (seed, epoch) (records are
    read in full for that; fine at test/demo scale). ``set_epoch(e)`` changes both the
    order and the augmentation draws. ``normalize=True`` yields float images.
    ``image_root`` (else ``data_cfg.image_root``; for ``train=False`` ``data.val_image_root``
    first, as the Ray eval dataset reads it) overrides the image roots recorded in the folders'
    manifests, one for all folders or one per folder (:func:`folder_image_roots`). ``skips``
    counts an image once per epoch it is skipped in, however many passes read it.
    """

    def __init__(self, data_dir, data_cfg, train: bool = True, batch_size: Optional[int] = None,
                 shuffle: Optional[bool] = None, drop_last: bool = False, epoch: int = 0,
                 image_root: Roots = None, pad_multiple: Optional[int] = None, normalize: bool = False):
        self.data_dir = data_dir
        self.image_root = image_root or (data_cfg.image_root if train else val_image_roots(data_cfg))
        folder_image_roots(data_dir, self.image_root)  # a bad or ambiguous override fails here
        # training checks each record's category ids against the manifest's: one it lacks would
        # reach the loss outside the class head (a counted skip, as an undecodable image)
        self.transform = DetectionTransform(data_cfg, train=train, image_root=None,
                                            category_ids=category_ids(data_dir) if train else None)
        self.batch_size = int(batch_size or data_cfg.batch_size)
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last, self.epoch, self.seed = drop_last, epoch, int(data_cfg.seed)
        self.pad_multiple, self.normalize = pad_multiple, normalize
        self.skips: dict[str, Any] = {"count": 0, "by_reason": {}, "image_ids": []}
        self._seen: set = set()  # (epoch, id, reason) counted

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = sum(int(read_manifest(d)["num_images"]) for d in data_dirs(self.data_dir))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _samples(self) -> Iterator[dict[str, Any]]:
        if not self.shuffle:
            yield from iter_samples(self.data_dir, self.transform, self.epoch, self.skips, self.image_root, self._seen)
            return
        recs = list(iter_rooted_records(self.data_dir, self.image_root))
        order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(len(recs))
        for i in order:
            try:
                yield self.transform(recs[i], epoch=self.epoch)
            except ImageDecodeError as e:
                count_skip(self.skips, self._seen, recs[i]["image_id"], e.reason, self.epoch)
                log.warning("decode: skipping image id %s (%s)", recs[i]["image_id"], e)

    def __iter__(self):
        buf = []
        for s in self._samples():
            buf.append(s)
            if len(buf) == self.batch_size:
                yield collate(buf, self.pad_multiple, self.normalize)
                buf = []
        if buf and not self.drop_last:
            yield collate(buf, self.pad_multiple, self.normalize)

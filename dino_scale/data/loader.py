"""Single-process loading without Ray: records -> samples -> collated batches.

``LocalLoader`` is what unit tests, overfit checks and benchmarks use; it runs the same
:class:`~.transforms.DetectionTransform` as the Ray Data datasets, so samples are equal
for the same (seed, epoch, image_id). Undecodable images are skipped, counted in
``loader.skips`` and logged with their image id.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from .collate import collate
from .decode import ImageDecodeError
from .records import PathLike, data_dirs, iter_records, read_manifest
from .transforms import DetectionTransform

__all__ = ["LocalLoader", "iter_samples", "manifest_image_root"]

log = logging.getLogger(__name__)


def manifest_image_root(data_dir: Union[PathLike, Sequence[PathLike]]) -> Optional[str]:
    """Image root recorded at conversion (for records that reference files)."""
    return read_manifest(data_dirs(data_dir)[0]).get("image_root")


def iter_samples(data_dir, transform: DetectionTransform, epoch: int = 0,
                 skips: Optional[dict[str, Any]] = None) -> Iterator[dict[str, Any]]:
    """Transformed samples in record order; bad images are skipped and counted in ``skips``."""
    for rec in iter_records(data_dir):
        try:
            yield transform(rec, epoch=epoch)
        except ImageDecodeError as e:
            if skips is not None:
                skips["count"] = skips.get("count", 0) + 1
                skips.setdefault("by_reason", {})[e.reason] = skips.get("by_reason", {}).get(e.reason, 0) + 1
                skips.setdefault("image_ids", []).append(rec["image_id"])
            log.warning("decode: skipping image id %s (%s)", rec["image_id"], e)


class LocalLoader:
    """Iterate collated batches ``(images uint8 (B,3,H,W), masks (B,H,W), targets)``.

    ``shuffle`` orders samples by a permutation seeded with (seed, epoch) (records are
    read in full for that; fine at test/demo scale). ``set_epoch(e)`` changes both the
    order and the augmentation draws. ``normalize=True`` yields float images.
    """

    def __init__(self, data_dir, data_cfg, train: bool = True, batch_size: Optional[int] = None,
                 shuffle: Optional[bool] = None, drop_last: bool = False, epoch: int = 0,
                 image_root: Optional[str] = None, pad_multiple: Optional[int] = None, normalize: bool = False):
        self.data_dir = data_dir
        root = image_root or data_cfg.image_root or manifest_image_root(data_dir)
        self.transform = DetectionTransform(data_cfg, train=train, image_root=root)
        self.batch_size = int(batch_size or data_cfg.batch_size)
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last, self.epoch, self.seed = drop_last, epoch, int(data_cfg.seed)
        self.pad_multiple, self.normalize = pad_multiple, normalize
        self.skips: dict[str, Any] = {"count": 0, "by_reason": {}, "image_ids": []}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = sum(int(read_manifest(d)["num_images"]) for d in data_dirs(self.data_dir))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _samples(self) -> Iterator[dict[str, Any]]:
        if not self.shuffle:
            yield from iter_samples(self.data_dir, self.transform, self.epoch, self.skips)
            return
        recs = list(iter_records(self.data_dir))
        order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(len(recs))
        for i in order:
            try:
                yield self.transform(recs[i], epoch=self.epoch)
            except ImageDecodeError as e:
                self.skips["count"] += 1
                self.skips["by_reason"][e.reason] = self.skips["by_reason"].get(e.reason, 0) + 1
                self.skips["image_ids"].append(recs[i]["image_id"])
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

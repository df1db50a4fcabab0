"""Ray Data datasets over record shards: decode + DINO augmentation in Ray tasks.

Rows after preprocessing (numpy): ``image`` uint8 (3,H,W), ``boxes`` float32 (n,4)
normalized cx,cy,w,h (crowd boxes removed), ``labels`` int64 (n,) raw ids,
``image_id`` int64, ``orig_size`` int64 (2,) annotated (h,w), ``size`` int64 (2,),
``epoch`` int64. Normalize on the consumer's device with :func:`normalize_batch`.

Per-worker splits for Ray Train: pass the dataset as ``TorchTrainer(datasets={"train":
ds})`` and, in the worker loop, ``ray.train.get_dataset_shard("train")`` gives this
worker's share (a streaming split; every row goes to exactly one worker per epoch)::

    it = ray.train.get_dataset_shard("train")
    for batch in it.iter_batches(batch_size=cfg.data.batch_size, batch_format="numpy",
                                 local_shuffle_buffer_size=64, local_shuffle_seed=seed + epoch):
        images, masks, targets = collate_numpy_batch(batch, pad_multiple=cfg.data.pad_multiple)

Augmentation is seeded by (seed, epoch, image_id): the same image in the same epoch
gets the same draws on any worker count. Which epoch: by default (``epoch=None``) a
small named actor (one per ``stats_name``, on the driver's node; it also keeps the counts
below) holds the current epoch of the dataset, and the training loop calls
``set_epoch(e)`` (from any or every worker, before iterating its shard for epoch ``e``);
each preprocessing batch reads it once. Or fix it: ``epoch=e``; ``num_epochs > 1``
then gives the union of epochs ``e .. e+num_epochs-1``. Rows carry ``epoch``.
Shard order (drawn in the read, which streams): seeded by ``data_cfg.seed`` and the epoch, so
every epoch reads the shards in a new order and a resumed run replays the shard orders of the
first (:class:`EpochFileOrder`; which rows reach which worker follows the read's timing, except in
deterministic mode, where every worker reads the whole stream). Within each block of the read (rows
of one shard or more, up to Ray's block size) the rows come in an order drawn per epoch
(:class:`BlockOrder`), then the workers' ``data.shuffle_buffer`` and the split across workers mix
them further; in deterministic mode they keep the order the conversion drew for them (seeded,
once), as block boundaries are Ray's and differ between clusters. Neither is the full permutation
of every image that the official DINO's sampler draws.
Images that fail to decode are dropped from the stream, logged with their id and
counted by that actor: :func:`decode_skips`; so are training records that hold a category
id their manifest does not list (reason ``unknown_category``). Images whose EXIF orientation the
annotated size cannot decide (a tie under ``data.exif_orientation=auto``: turned upright, not
dropped) are counted apart, once per image id: :func:`exif_ties`.
"""
from __future__ import annotations

import logging
import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import ray

from .decode import ImageDecodeError
from .preflight import preflight_shards
from .image_paths import Roots, folder_image_roots, val_image_roots
from .manifest import ShardError, category_ids, shard_paths
from .records import arrow_rows, record_from_row
from .run_stats import (  # noqa: F401 - re-exported: the datasets' bookkeeping, long imported from here
    _new_run_stats, _stats, current_epoch, decode_skips, describe_skips, exif_ties, set_epoch, skip_metrics,
    skip_reasons, skips_at_end,
)

# Not imported here: .transforms (torch, torchvision). Ray's SplitCoordinator, DatasetManager
# and TrainController actors unpickle the datasets' plans, so they import this module, but only
# the map tasks run _ToSample: it imports the transform where it runs (each such actor was
# importing torch and torchvision, ~5 s of CPU and a few hundred MB each, on the driver's node).

__all__ = ["build_train_dataset", "build_eval_dataset", "decode_skips", "exif_ties", "set_epoch", "current_epoch",
           "EpochFileOrder", "epoch_seed", "unreadable_shard"]

log = logging.getLogger(__name__)


class _ToSample:
    """Picklable batch function: record rows -> sample rows (bad images dropped and counted)."""

    def __init__(self, data_cfg, train: bool, image_root: Optional[str], epoch: Optional[int], stats_name: str,
                 known_ids: Optional[list[int]] = None):
        self._args = (data_cfg, bool(train), image_root, known_ids)
        self.epoch, self.stats_name = epoch, stats_name
        self._transform = self._build()  # bad settings fail here, where the dataset is built

    def _build(self):
        from .transforms import DetectionTransform

        data_cfg, train, image_root, known_ids = self._args
        return DetectionTransform(data_cfg, train=train, image_root=image_root, category_ids=known_ids)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_transform": None}  # built again where the batches are mapped

    @property
    def transform(self):
        if self._transform is None:
            self._transform = self._build()
        return self._transform

    def __call__(self, batch: pa.Table) -> dict[str, Any]:
        """``batch``: record rows as an Arrow table (``batch_format="pyarrow"``: the rows are
        converted here, ``file_name`` as bytes, so a damaged shard's bytes reach the checksum
        check instead of failing Ray's numpy conversion of the whole batch)."""
        epoch = self.epoch if self.epoch is not None else current_epoch(self.stats_name)
        out: dict[str, list] = {k: [] for k in ("image", "boxes", "labels", "image_id", "orig_size", "size",
                                                "epoch")}
        for row in arrow_rows(batch):
            try:
                rec = record_from_row(row)
            except (TypeError, ValueError) as e:  # a column of another type: the shard's footer was changed
                log.warning("decode: skipping a record of image id %r (damaged: %s)", row.get("image_id"), e)
                _stats(self.stats_name).record_skip.remote(_int_or_none(row.get("image_id")), "damaged", epoch)
                continue
            try:
                s = self.transform(rec, epoch=epoch)
            except ImageDecodeError as e:
                log.warning("decode: skipping image id %s (%s)", rec["image_id"], e)
                _stats(self.stats_name).record_skip.remote(rec["image_id"], e.reason, epoch)
                continue
            out["image"].append(np.ascontiguousarray(s["image"].numpy()))
            out["boxes"].append(s["boxes"].numpy())
            out["labels"].append(s["labels"].numpy())
            out["image_id"].append(s["image_id"])
            out["orig_size"].append(s["orig_size"].numpy())
            out["size"].append(s["size"].numpy())
            out["epoch"].append(epoch)
        ties = self.transform.take_new_exif_ties()
        if ties:
            _stats(self.stats_name).add_ties.remote(ties)
        return {k: (_column(v) if k in ("image", "boxes", "labels") else np.asarray(v, dtype=np.int64).reshape(
            len(v), 2) if k in ("orig_size", "size") else np.asarray(v, dtype=np.int64)) for k, v in out.items()}


def _int_or_none(value: Any) -> Optional[int]:
    """``value`` as an image id, or None (no id: a damaged record's)."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _column(arrays: list) -> np.ndarray:
    """Variable-shaped arrays -> 1-D object array (Ray stores it as a variable-shaped tensor column)."""
    col = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        col[i] = a
    return col


_BATCH = 8  # images per preprocessing call (one epoch-clock lookup each)


# Ray Data's Parquet reader lists files through a pool of FooterReader actors, 32 by default,
# provisioned anew by every execution (each epoch, each evaluation), while it hands each actor
# batches of 10 files: a dataset of a few shards started up to 32 processes per pass to use one.
_FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
_FOOTER_BATCH_ENV = "RAY_DATA_PARQUET_FOOTER_BATCH_SIZE"
_MAX_FOOTER_ACTORS = 32
_env_lock = threading.Lock()


def footer_reader_count(num_files: int) -> int:
    """FooterReader actors a read of ``num_files`` shards can use: one per footer batch
    (``RAY_DATA_PARQUET_FOOTER_BATCH_SIZE``, Ray's default 10 files), at most 32."""
    per_actor = max(1, int(os.environ.get(_FOOTER_BATCH_ENV) or 10))
    return max(1, min(_MAX_FOOTER_ACTORS, math.ceil(num_files / per_actor)))


@contextmanager
def _footer_readers(num_files: int):
    """Size the footer-reader pool of the Parquet read created inside this block (Ray reads
    the variable when the read is planned, in this process). A value the user set wins."""
    with _env_lock:  # checked under the lock: another thread's temporary value is not the user's
        if os.environ.get(_FOOTER_ACTORS_ENV):
            yield
            return
        os.environ[_FOOTER_ACTORS_ENV] = str(footer_reader_count(num_files))
        try:
            yield
        finally:
            os.environ.pop(_FOOTER_ACTORS_ENV, None)


def _read(files: list[str], override_num_blocks: Optional[int],
          order: Optional["ray.data.FileShuffleConfig"] = None, include_paths: bool = False):
    kw = {"override_num_blocks": override_num_blocks} if override_num_blocks else {}
    with _footer_readers(len(files)):
        return ray.data.read_parquet(files, shuffle=order, include_paths=include_paths, **kw)


def _path_key(path: str) -> str:
    """A shard's path as Ray's ``include_paths`` column gives it: without a ``scheme://``."""
    return str(path).split("://", 1)[-1]


def image_root_from_path(table: pa.Table, roots: dict[str, Optional[str]]) -> pa.Table:
    """Record rows (n rows) read with their shard's ``path`` -> the same rows with an
    ``image_root`` string column (n,) instead: the root of the shard's folder (``roots``: path
    key -> root; null for ``None``, embedded images)."""
    paths = table.column("path").to_pylist()
    try:
        column = [roots[_path_key(p)] for p in paths]
    except KeyError as e:  # Ray reports a path we did not give it
        raise ValueError(f"Ray read a row of {e.args[0]!r}, which is not one of the dataset's shards") from None
    table = table.drop_columns(["path"])
    return table.append_column("image_root", pa.array(column, pa.string()))


def _read_records(data_dir, image_root: Roots, override_num_blocks: Optional[int],
                  order: Optional["ray.data.FileShuffleConfig"] = None) -> tuple["ray.data.Dataset", Optional[str]]:
    """(record rows of every folder, the image root for :class:`_ToSample`).

    One read over the shards of every folder, in the file order ``order`` draws (``None``: as
    listed): one folder's rows as they are, with its root; several folders' rows each given its
    own folder's root (``image_root`` column, :func:`image_root_from_path`), and ``None``: every
    folder resolves file names against its own root. (Drawing the order in the read keeps the
    pass streaming: ``randomize_block_order`` is an all-to-all step that waits for every shard
    to be read, so each epoch held the whole dataset in the object store before its first batch.)"""
    roots = folder_image_roots(data_dir, image_root)
    category_ids([d for d, _ in roots])  # the folders' categories must agree
    # footers read before Ray plans the read (once per process: the engine's check already did)
    files = [[str(p) for p in preflight_shards(d)] for d, _ in roots]
    if not sum(map(len, files)):
        raise ValueError(f"{data_dir}: the dataset has no shards (no images?)")
    if len(roots) == 1:
        return _read(files[0], override_num_blocks, order), roots[0][1]
    root_of = {_path_key(f): root for folder, (_, root) in zip(files, roots) for f in folder}
    ds = _read([f for folder in files for f in folder], override_num_blocks, order, include_paths=True)
    return ds.map_batches(image_root_from_path, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                          fn_kwargs={"roots": root_of}), None


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s shard order (the same in every process and run)."""
    return hash((int(seed), int(epoch))) % 2 ** 32  # ints hash alike everywhere (PYTHONHASHSEED is for str)


@dataclass
class EpochFileOrder(ray.data.FileShuffleConfig):
    """A shard order drawn anew for each epoch and always the same for the same epoch: Ray asks
    for the seed when a pass over the dataset starts (where it lists the files), and gets
    :func:`epoch_seed` of ``seed`` and the epoch clock's epoch (``stats_name``). So a resumed
    run (whose restart executes the dataset from pass 0 again) sees the orders of the first, and
    every epoch a new one; with Ray's execution index instead, those two could not both hold."""
    stats_name: str = "train"

    def get_seed(self, execution_idx: int = 0) -> int:
        return epoch_seed(self.seed, current_epoch(self.stats_name))


class BlockOrder:
    """Picklable batch function: the record rows of one read block (``batch_size=None``: the whole
    block, images still encoded) in an order drawn anew each epoch, seeded by (``seed``, the epoch,
    the block's first image id and row count): the conversion's one order within a shard became an
    order per epoch, nearer the official sampler's permutation of every image, for the price of one
    take of encoded bytes per block. Which rows share a block is Ray's read's choice (rows of one
    shard or more, up to Ray's block size), so the order is not the same on every cluster: only where the
    order already follows the read's timing (not ``train.deterministic``)."""

    def __init__(self, seed: int, epoch: Optional[int], stats_name: str):
        self.seed, self.epoch, self.stats_name = int(seed), epoch, stats_name

    def __call__(self, block: pa.Table) -> pa.Table:
        """``block``: record rows (n,) as an Arrow table -> the same rows, permuted."""
        n = block.num_rows
        if n < 2:
            return block
        epoch = self.epoch if self.epoch is not None else current_epoch(self.stats_name)
        first = block.column("image_id")[0].as_py() if "image_id" in block.column_names else None
        key = [self.seed, int(epoch), int(first or 0) % 2 ** 63, n]
        return block.take(pa.array(np.random.default_rng(key).permutation(n)))


def build_train_dataset(data_dir, data_cfg, image_root: Roots = None, epoch: Optional[int] = None,
                        num_epochs: int = 1, stats_name: str = "train",
                        override_num_blocks: Optional[int] = None, block_order: bool = True) -> "ray.data.Dataset":
    """Augmented training rows (see module doc). ``data_dir``: folder(s) of shards; each
    folder's records resolve image files against the root recorded in its manifest, unless
    ``image_root`` (else ``data_cfg.image_root``) overrides it: one root for all folders, or one
    per folder (``"root_a,root_b"``; see :func:`~.loader.folder_image_roots`).

    The shards are read in an order drawn from (``data_cfg.seed``, epoch): the epoch clock's
    (:class:`EpochFileOrder`), or each fixed ``epoch``'s; the same order for an epoch either way.
    ``block_order``: each read block's rows in an order drawn per epoch (:class:`BlockOrder`);
    False (``train.deterministic``): in the conversion's order, the same on every cluster."""
    override = image_root or data_cfg.image_root
    known = category_ids(data_dir)  # a record holding another id is a counted skip (its label is bad)
    _new_run_stats(stats_name)  # created from the driver, on its node (tasks and workers find it by name)
    if epoch is None:
        if num_epochs != 1:
            raise ValueError("num_epochs > 1 needs a fixed start epoch")
        ds, root = _read_records(data_dir, override, override_num_blocks,
                                 EpochFileOrder(seed=int(data_cfg.seed), stats_name=stats_name))
        ds = _in_block_order(ds, data_cfg, None, stats_name) if block_order else ds
        return ds.map_batches(_ToSample(data_cfg, True, root, None, stats_name, known), batch_size=_BATCH,
                              batch_format="pyarrow")
    parts = []
    for e in range(int(epoch), int(epoch) + int(num_epochs)):
        ds, root = _read_records(data_dir, override, override_num_blocks, order=ray.data.FileShuffleConfig(
            seed=epoch_seed(data_cfg.seed, e), reseed_after_execution=False))
        ds = _in_block_order(ds, data_cfg, e, stats_name) if block_order else ds
        parts.append(ds.map_batches(_ToSample(data_cfg, True, root, e, stats_name, known), batch_size=_BATCH,
                                    batch_format="pyarrow"))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def _in_block_order(ds: "ray.data.Dataset", data_cfg, epoch: Optional[int], stats_name: str) -> "ray.data.Dataset":
    return ds.map_batches(BlockOrder(data_cfg.seed, epoch, stats_name), batch_size=None, batch_format="pyarrow",
                          zero_copy_batch=True)


def build_eval_dataset(data_dir, data_cfg, image_root: Roots = None, stats_name: str = "eval",
                       override_num_blocks: Optional[int] = None) -> "ray.data.Dataset":
    """Eval rows (resize to ``eval_size``/``eval_max_size``, no flip/crop), in shard order.
    Image roots per folder as in :func:`build_train_dataset`; the override is ``image_root``, else
    ``data_cfg.val_image_root``, else ``data_cfg.image_root`` (so that a training folder and a
    validation folder can both be moved: one ``data.image_root`` served both)."""
    ds, root = _read_records(data_dir, image_root or val_image_roots(data_cfg), override_num_blocks)
    _new_run_stats(stats_name)
    return ds.map_batches(_ToSample(data_cfg, False, root, 0, stats_name), batch_size=_BATCH,
                          batch_format="pyarrow")


def unreadable_shard(exc: BaseException, data_dirs: list) -> Optional[ShardError]:
    """The :class:`ShardError` behind a failed run whose datasets hit a shard Parquet cannot
    read (damage to a page header or a compressed column: the record checksums cover the
    values, not the file's structure), else ``None``.

    ``exc``: what ``TorchTrainer.fit`` raised (a ``WorkerGroupError`` whose
    ``worker_failures`` hold Ray Data's ``RayTaskError``, whose text names the file it failed
    to read); ``data_dirs``: the run's dataset folders (any form :func:`shard_paths` takes).
    Without this the run ended with ``WorkerGroupError: Training failed due to worker errors:``
    and the file's name only in Ray's logs (seen)."""
    failures = [*(getattr(exc, "worker_failures", None) or {}).values(), exc]  # the workers' errors first
    texts = [(f, str(f)) for f in failures]
    for data in (d for d in data_dirs if d):
        try:
            paths = shard_paths(data)
        except (ShardError, ValueError, OSError) as gone:  # changed since the run began: that is the answer
            return gone if isinstance(gone, ShardError) else None
        for path in paths:
            for failure, text in texts:
                if str(path) in text:
                    cause = getattr(failure, "cause", None) or failure
                    lines = str(cause).strip().splitlines() or [""]
                    return ShardError(path.parent, f"{path.name} cannot be read: {type(cause).__name__}: "
                                                   f"{lines[0][:300]} (changed after conversion? "
                                                   f"`dino-scale check-data {path.parent}` reads it in full)")
    return None

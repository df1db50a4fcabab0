"""Micro-batches of a worker's Ray Data shard for the training loop: columnar batches to rows,
a seeded local shuffle, and the per-worker slice of each global batch."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

__all__ = ["rows_of", "shuffled_rows", "iter_micro_batches", "read_window", "agreed_window"]


def rows_of(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """Columnar Ray Data batch (dict of arrays/lists) -> list of row dicts."""
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: batch[k][i] for k in keys} for i in range(n)]


def shuffled_rows(batches: Iterable[dict[str, Any]], buffer: int, seed: int) -> Iterator[dict[str, Any]]:
    """The rows of columnar ``batches`` through a local shuffle buffer of ``buffer`` rows drawn
    with ``seed``: the order out depends on the row stream and the seed only, not on how the
    stream is cut into batches (``buffer`` 0: unshuffled)."""
    if buffer < 1:
        for batch in batches:
            yield from rows_of(batch)
        return
    rng = np.random.default_rng(seed)
    pool: list[dict[str, Any]] = []
    for batch in batches:
        for row in rows_of(batch):
            if len(pool) < buffer:
                pool.append(row)
                continue
            j = int(rng.integers(buffer))
            yield pool[j]
            pool[j] = row
    rng.shuffle(pool)
    yield from pool


def iter_micro_batches(shard, micro_bs: int, world: int, rank: int, deterministic: bool, *, epoch: int = 0,
                       seed: int = 0, pad_multiple: Optional[int] = None, shuffle_buffer: int = 16) -> Iterator:
    """``(images uint8, masks, targets)`` per micro-batch of this worker, locally shuffled
    with a (seed, epoch) seed.

    Deterministic mode reads the whole (unsplit, order-preserving) stream, shuffles its rows
    with :func:`shuffled_rows` and keeps slice ``rank`` of each run of ``micro_bs * world``
    rows: the epoch's sample order is the same on every worker count, so a run resumed on
    another count sees exactly the samples the first did not. (Ray's own local shuffle drains
    its buffer per batch, and the batch is ``micro_bs * world`` rows here.)"""
    from dino_scale.data.collate import collate

    shuffle_seed = int(seed) * 1000 + int(epoch)
    if deterministic:
        group = micro_bs * world
        batches = shard.iter_batches(batch_size=group, drop_last=False, batch_format="numpy", prefetch_batches=1)
        pending: list[dict[str, Any]] = []
        for row in shuffled_rows(batches, shuffle_buffer, shuffle_seed):
            pending.append(row)
            if len(pending) == group:  # an incomplete last group is dropped, as drop_last does
                yield collate(pending[rank * micro_bs:(rank + 1) * micro_bs], pad_multiple=pad_multiple)
                pending = []
        return
    kw = dict(drop_last=True, batch_format="numpy", prefetch_batches=2)
    if shuffle_buffer:
        kw.update(local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=shuffle_seed)
    for batch in shard.iter_batches(batch_size=micro_bs, **kw):
        yield collate(rows_of(batch), pad_multiple=pad_multiple)


def read_window(batches: Iterator, count: int, add_wait: Optional[Callable[[float], None]] = None) -> list:
    """The next ``count`` micro-batches of ``batches`` (fewer where it runs out), read ahead so
    that the box count of a whole accumulation window is known before its first loss;
    ``add_wait`` gets the seconds each read waited."""
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        batch = next(batches, None)
        if add_wait is not None:
            add_wait(time.perf_counter() - t0)
        if batch is None:
            break
        out.append(batch)
    return out


def agreed_window(window: list, device) -> list:
    """``window`` (this rank's micro-batches of one optimizer step, :func:`read_window`) cut to
    the shortest on any rank (one MIN all-reduce and a read-back; identity without a group).

    For deterministic mode, where every rank reads the whole stream and a row dropped on one
    rank only (an image read failing there, e.g. a network file system's EIO) leaves that rank a
    group short at the epoch's end: its window was shorter, so the ranks' collectives (the box
    count, then one rank's backward and optimizer step against another's next all-reduce) no
    longer paired, and the run hung. The split of the default mode gives every rank the same
    number of rows."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return window
    n = torch.full((1,), len(window), dtype=torch.int64, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return window[:int(n.item())]

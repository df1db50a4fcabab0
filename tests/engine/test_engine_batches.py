"""The loop's micro-batching (dino_scale.engine.batches): the deterministic-mode row shuffle
does not depend on how the stream is batched, so every worker count sees one sample order."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np

from dino_scale.engine.batches import read_window, rows_of, shuffled_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_fixtures import run_ranks  # noqa: E402


def _batches(ids: list[int], size: int):
    """The row stream ``ids`` cut into columnar batches of ``size`` rows (the last shorter)."""
    for i in range(0, len(ids), size):
        chunk = np.asarray(ids[i:i + size])
        yield {"image_id": chunk, "twice": chunk * 2}


def _order(ids, size, buffer=16, seed=7):
    rows = list(shuffled_rows(_batches(ids, size), buffer, seed))
    assert all(int(r["twice"]) == 2 * int(r["image_id"]) for r in rows)  # rows stay whole
    return [int(r["image_id"]) for r in rows]


def test_rows_of_splits_columns_into_rows():
    assert [{k: int(v) for k, v in r.items()} for r in rows_of(next(_batches([4, 5], 2)))] == [
        {"image_id": 4, "twice": 8}, {"image_id": 5, "twice": 10}]
    assert rows_of({}) == []


def test_shuffled_rows_depend_on_the_stream_and_seed_only():
    ids = list(range(100, 203))
    ref = _order(ids, 1)
    assert sorted(ref) == ids and ref != ids  # a permutation, and a real one
    for size in (2, 3, 4, 16, 17, 64, 500):  # micro-batch x worker counts cut the stream differently
        assert _order(ids, size) == ref, size
    assert _order(ids, 4, seed=8) != ref
    assert _order(ids, 4, buffer=0) == ids
    # a local shuffle: no row moves earlier than its position minus the buffer size
    assert all(pos >= ids.index(i) - 16 for pos, i in enumerate(ref))
    assert _order(ids[:5], 2) != ids[:5] and sorted(_order(ids[:5], 2)) == ids[:5]  # fewer rows than the buffer
    assert _order([], 4) == []


def test_read_window_reads_ahead_the_rest_of_a_window_and_stops_where_the_data_ends():
    """The loop reads a whole accumulation window before its first loss (its box count
    normalizes every micro-batch's loss); the stream continues after it, a short end is kept."""
    stream = iter(range(5))
    waits: list[float] = []
    assert read_window(stream, 2, waits.append) == [0, 1] and len(waits) == 2
    assert read_window(stream, 2) == [2, 3]
    assert read_window(stream, 2, waits.append) == [4] and len(waits) == 4  # the end's wait counted too
    assert read_window(stream, 2) == []


# Deterministic mode: every rank reads the whole stream, so a row one rank could not read (an
# EIO on a network file system) leaves it a micro-batch short at the epoch's end. The loop reads
# each optimizer step's window, all-reduces its box count, then runs one backward (standing in:
# an all-reduce) per micro-batch and one step. Without agreeing on the window, the short rank's
# next window all-reduce met the other rank's backward: the collectives no longer paired.
_WINDOWS = textwrap.dedent("""
    import datetime, json, sys
    import torch
    import torch.distributed as dist
    from dino_scale.engine.batches import agreed_window, read_window

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    accum, agree = 2, sys.argv[1] == "agree"
    stream = iter([f"mb{i}" for i in range(5 if rank == 0 else 4)])  # rank 1: one micro-batch short
    used, steps = [], 0
    while True:
        window = read_window(stream, accum)
        if agree:
            window = agreed_window(window, torch.device("cpu"))
        boxes = torch.tensor([float(len(window))])
        dist.all_reduce(boxes)  # window_num_boxes
        if not window:
            break
        for mb in window:
            grad = torch.ones(1)
            dist.all_reduce(grad)  # backward
            used.append(mb)
        steps += 1
    dist.barrier()
    print("REPORT " + json.dumps({"rank": rank, "used": used, "steps": steps}), flush=True)
    dist.destroy_process_group()
""")


def test_agreed_window_keeps_the_ranks_collectives_paired():
    """Ranks whose streams end a micro-batch apart take the same windows (the shorter one's),
    so every collective pairs and the epoch ends together; one rank alone keeps its window."""
    import torch

    from dino_scale.engine.batches import agreed_window

    assert agreed_window(["a", "b"], torch.device("cpu")) == ["a", "b"]  # no process group
    (report,) = run_ranks(_WINDOWS, 2, "agree", timeout=120)
    assert report == {"rank": 0, "used": ["mb0", "mb1", "mb2", "mb3"], "steps": 2}

"""Shard order of the training dataset across epochs, checked on the plan without Ray."""
from __future__ import annotations

from dino_scale.config import preset


class _PlanStub:
    """Stands in for a ray.data.Dataset: records the calls that build the training plan."""

    def __init__(self, calls: list):
        self.calls = calls

    def map_batches(self, fn, **kw):
        self.calls.append(("map_batches", fn))
        return self

    def union(self, *others):
        return self


def test_data_epoch_shard_order_is_drawn_per_epoch(monkeypatch):
    """The read draws the shard order from (seed, epoch): the epoch clock's when it is read
    (a new order every epoch, the same for the same epoch on any pass, so a restarted run replays
    its orders), or each fixed epoch's, with the same seed the clock gives for that epoch."""
    import ray.data

    from dino_scale.data import ray_data

    calls: list = []

    def read_records(data_dir, image_root, override_num_blocks, order=None):
        calls.append(("read", order))
        return _PlanStub(calls), None

    clock = {"epoch": 0}
    monkeypatch.setattr(ray_data, "_read_records", read_records)
    monkeypatch.setattr(ray_data, "category_ids", lambda data_dir: [1])  # no manifest to read
    monkeypatch.setattr(ray_data, "_new_run_stats", lambda name: None)  # the bookkeeping actor: no Ray here
    monkeypatch.setattr(ray_data, "current_epoch", lambda name: clock["epoch"] if name == "trainset" else -1)
    cfg = preset("tiny").data
    ray_data.build_train_dataset("unused", cfg, stats_name="trainset")
    (_, order), = [c for c in calls if c[0] == "read"]
    assert isinstance(order, ray_data.EpochFileOrder) and isinstance(order, ray.data.FileShuffleConfig)
    seeds = {}
    for epoch in (0, 1, 2, 1, 0):
        clock["epoch"] = epoch
        for execution in (0, 5):  # Ray's execution index does not matter
            seeds.setdefault(epoch, set()).add(order.get_seed(execution))
    assert all(len(s) == 1 for s in seeds.values()) and len({s.pop() for s in seeds.values()}) == 3
    calls.clear()
    ray_data.build_train_dataset("unused", cfg, epoch=3, num_epochs=2)
    fixed = [c[1] for c in calls if c[0] == "read"]
    assert [(o.seed, o.reseed_after_execution) for o in fixed] == [
        (ray_data.epoch_seed(cfg.seed, 3), False), (ray_data.epoch_seed(cfg.seed, 4), False)]
    clock["epoch"] = 4
    assert order.get_seed() == fixed[1].get_seed(7)


def test_data_epoch_seed_is_the_same_in_every_process():
    import subprocess
    import sys

    from dino_scale.data.ray_data import epoch_seed

    code = "from dino_scale.data.ray_data import epoch_seed; print(epoch_seed(42, 3))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.split()[-1]
    assert int(other) == epoch_seed(42, 3) and epoch_seed(42, 3) != epoch_seed(42, 4) != epoch_seed(43, 4)

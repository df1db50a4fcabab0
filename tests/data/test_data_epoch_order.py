"""Block order of the training dataset across epochs, checked on the plan without Ray."""
from __future__ import annotations

import pytest

from dino_scale.config import preset


class _PlanStub:
    """Stands in for a ray.data.Dataset: records the calls that build the training plan."""

    def __init__(self, calls: list):
        self.calls = calls

    def randomize_block_order(self, seed=None):
        self.calls.append(("randomize_block_order", seed))
        return self

    def map_batches(self, fn, **kw):
        self.calls.append(("map_batches", fn))
        return self


@pytest.mark.parametrize("reshuffle", [True, False])
def test_data_epoch_block_order_reseeds_only_when_asked(monkeypatch, reshuffle):
    """An int seed is Ray's RandomSeedConfig(reseed_after_execution=False): the same block order
    every epoch. Non-deterministic training asks for a new, seeded order per pass; deterministic
    training keeps the fixed order (a restart re-executes from pass 0)."""
    import ray.data

    from dino_scale.data import ray_data

    calls: list = []
    monkeypatch.setattr(ray_data, "_read_records", lambda *a: (_PlanStub(calls), None))
    monkeypatch.setattr(ray_data, "category_ids", lambda data_dir: [1])  # no manifest to read
    monkeypatch.setattr(ray_data, "_stats", lambda name: None)  # the bookkeeping actor: no Ray here
    cfg = preset("tiny").data
    kw = {"reshuffle_each_epoch": reshuffle} if reshuffle else {}  # the default keeps the fixed order
    ray_data.build_train_dataset("unused", cfg, **kw)
    (name, seed), = [c for c in calls if c[0] == "randomize_block_order"]
    assert isinstance(seed, ray.data.RandomSeedConfig)
    assert seed.seed == cfg.seed and seed.reseed_after_execution is reshuffle
    # a fixed start epoch seeds each epoch's order itself (seed + epoch)
    calls.clear()
    ray_data.build_train_dataset("unused", cfg, epoch=3, num_epochs=1, reshuffle_each_epoch=reshuffle)
    assert [c[1] for c in calls if c[0] == "randomize_block_order"] == [cfg.seed + 3]


def test_data_block_order_seed_config():
    from dino_scale.data.ray_data import block_order_seed

    assert block_order_seed(7, True).reseed_after_execution and block_order_seed(7, True).seed == 7
    assert not block_order_seed(7, False).reseed_after_execution

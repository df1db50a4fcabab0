"""Cached level-shape tensors (dino_scale.ops.level_shapes) and host_to_device."""
from __future__ import annotations

import random
import sys
import threading
import time

import pytest
import torch

from dino_scale.ops import level_index_tensors, level_shapes_of, ms_deform_attn_pytorch
from dino_scale.ops import level_shapes as cache_module
from dino_scale.ops.transfer import host_to_device

# what torch (2.x) raises when a meta tensor is read back: .tolist()/.cpu() ("Cannot copy out of
# meta tensor; no data!", NotImplementedError) or .item()/int() ("... cannot be called on meta tensors")
META_READ_BACK = r"Cannot copy out of meta tensor; no data!|cannot be called on meta tensors"


def test_values_and_cache_hit():
    shapes, starts = level_index_tensors([(4, 6), (2, 3)], "cpu")
    assert shapes.tolist() == [[4, 6], [2, 3]] and starts.tolist() == [0, 24]
    again = level_index_tensors(((4, 6), (2, 3)), torch.device("cpu"))
    assert again[0] is shapes and again[1] is starts


def test_shapes_of_cached_tensor_needs_no_read_back():
    shapes, _ = level_index_tensors([(5, 7), (3, 4)], "meta")
    assert level_shapes_of(shapes) == [(5, 7), (3, 4)]  # a meta tensor cannot be read: served from cache
    with pytest.raises((RuntimeError, NotImplementedError), match=META_READ_BACK):
        level_shapes_of(torch.empty(2, 2, dtype=torch.long, device="meta"))
    assert level_shapes_of(torch.tensor([[2, 2]])) == [(2, 2)]  # any other tensor: read back


def test_lru_eviction_forgets_evicted_tensors(monkeypatch):
    monkeypatch.setattr(cache_module, "CACHE_SIZE", 2)
    cache_module.clear_level_cache()
    first, _ = level_index_tensors([(1, 1)], "cpu")
    level_index_tensors([(2, 2)], "cpu")
    level_index_tensors([(3, 3)], "cpu")
    assert len(cache_module._CACHE) == 2 and id(first) not in cache_module._SHAPES_BY_ID
    assert level_index_tensors([(1, 1)], "cpu")[0] is not first
    with pytest.raises(ValueError, match="no levels"):
        level_index_tensors([], "cpu")
    cache_module.clear_level_cache()


def test_large_kinds_keep_fewer_entries_and_snapshots_keep_evicted_ones():
    # dn attention masks (~8.4 MB each with dn_number=1000) filled the 64-entry cache: ~0.5 GB a GPU
    from dino_scale.models.denoising import cached_dn_attn_mask

    cache_module.clear_level_cache()
    tables, _ = level_index_tensors([(2, 3)], "cpu")
    snapshot = cache_module.cache_snapshot()
    masks = [cached_dn_attn_mask(2 * k, 5, 2, "cpu") for k in range(1, 12)]
    kinds = [key[0] for key in cache_module._CACHE]
    assert kinds.count("dn_attn_mask") == cache_module.KIND_LIMITS["dn_attn_mask"] == 8
    assert kinds.count("index") == 1  # other kinds are not pushed out by the masks
    assert cached_dn_attn_mask(22, 5, 2, "cpu") is masks[-1]  # the newest stay cached
    assert cached_dn_attn_mask(2, 5, 2, "cpu") is not masks[0]  # the oldest were dropped
    cache_module.clear_level_cache()
    assert any(tables is entry[0] for entry in snapshot)  # a graph's snapshot still holds them
    cache_module.clear_level_cache()


def test_made_in_inference_mode_still_usable_in_training():
    cache_module.clear_level_cache()
    with torch.inference_mode():
        shapes, starts = level_index_tensors([(4, 4), (2, 2)], "cpu")
    value = torch.randn(1, 20, 2, 4, requires_grad=True)
    locs = torch.rand(1, 3, 2, 2, 2, 2, requires_grad=True)
    weights = torch.rand(1, 3, 2, 2, 2, requires_grad=True)
    ms_deform_attn_pytorch(value, shapes, starts, locs, weights).sum().backward()
    assert value.grad is not None and locs.grad is not None


def test_host_to_device_same_device_is_identity():
    t = torch.arange(4)
    assert host_to_device(t, "cpu") is t
    assert host_to_device(t, "meta").device.type == "meta"


def test_concurrent_use_from_threads_never_loses_an_entry():
    """Threads sharing one model (a server) hit and fill the cache at once: a key evicted by one
    thread between another's ``get`` and ``move_to_end`` was a KeyError there (and iterating the
    cache for a kind's limit or a snapshot while another thread inserted, a RuntimeError). A
    switch interval of 1 us makes the interleaving that raised common."""
    cache_module.clear_level_cache()
    errors: list = []
    stop = time.monotonic() + 1.5

    def build(shapes, device):
        table = torch.tensor(shapes, device=device)
        return table, table.prod(1)

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while time.monotonic() < stop:
                shapes = [(rng.randint(1, 12), rng.randint(1, 12))]  # 144 sizes: more than CACHE_SIZE
                kind = rng.choice(("index", "dn_attn_mask", "other"))
                got = cache_module.cached_level_tensors(kind, shapes, "cpu", build)
                assert got[0].tolist() == [list(hw) for hw in shapes]
                if rng.random() < 0.05:
                    cache_module.cache_snapshot()
        except Exception as e:  # noqa: BLE001 - any exception in a thread fails the test
            errors.append(e)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old_interval)
        cache_module.clear_level_cache()
    assert not errors, f"{len(errors)} thread(s) failed: {sorted({repr(e) for e in errors})}"

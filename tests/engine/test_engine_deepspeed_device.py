"""DeepSpeed trains on the worker's own GPU: ``LOCAL_RANK`` is set to the index of the device
Ray Train gives the worker (``init_deepspeed(..., device)``).

No GPU is needed: the first test replays Ray Train's own numbering of a 12-GPU node (its
worker sort and its shared ``CUDA_VISIBLE_DEVICES``) to show the two numbers differ there."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from dino_scale.engine.deepspeed_utils import _use_device_as_local_rank


def test_ray_train_local_rank_is_not_the_device_index_on_a_node_with_12_gpus():
    from ray.train.v2._internal.callbacks.accelerators import _get_visible_accelerator_ids_per_worker
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

    workers = [SimpleNamespace(metadata=SimpleNamespace(node_id="n0", accelerator_ids={"GPU": [str(g)]}))
               for g in (7, 10, 0, 2, 11, 1, 3, 4, 5, 6, 8, 9)]  # as the actors happened to start
    ordered = WorkerGroup._sort_workers_by_gpu_id_grouped_by_node(workers)  # local rank = position
    visible = _get_visible_accelerator_ids_per_worker([w.metadata for w in ordered], "GPU")[0].split(",")
    device_index = {w.metadata.accelerator_ids["GPU"][0]: visible.index(w.metadata.accelerator_ids["GPU"][0])
                    for w in ordered}  # what ray.train.torch.get_device() returns, as cuda:<index>
    local_rank = {w.metadata.accelerator_ids["GPU"][0]: rank for rank, w in enumerate(ordered)}
    assert local_rank["2"] == 2 and device_index["2"] == 4  # "0,1,10,11,2,...": GPU 2 is cuda:4
    assert sorted(device_index.values()) == sorted(local_rank.values())  # a permutation of the local ranks


@pytest.mark.parametrize("before", ["2", None])
def test_a_cuda_device_becomes_local_rank(monkeypatch, caplog, before):
    if before is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", before)
    with caplog.at_level("INFO", logger="dino_scale.engine"):
        _use_device_as_local_rank(torch.device("cuda", 4))
    assert os.environ["LOCAL_RANK"] == "4"
    assert f"LOCAL_RANK {before} -> 4" in caplog.text


@pytest.mark.parametrize("device", [torch.device("cpu"), torch.device("cuda", 3), None])
def test_cpu_or_an_agreeing_device_leaves_local_rank_alone(monkeypatch, caplog, device):
    monkeypatch.setenv("LOCAL_RANK", "3")
    with caplog.at_level("INFO", logger="dino_scale.engine"):
        _use_device_as_local_rank(device)
    assert os.environ["LOCAL_RANK"] == "3"
    assert "LOCAL_RANK" not in caplog.text

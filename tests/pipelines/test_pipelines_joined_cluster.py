"""A pipeline under ``RAY_ADDRESS`` (``ray job submit``) with no ``--gpus``: the GPU default is
the joined cluster's, not the head node's (a real local Ray with logical GPUs)."""
from __future__ import annotations

import torch

from pipelines import _common as common
from test_pipelines_common import _parse


def test_pipelines_gpu_default_looks_at_the_joined_cluster(monkeypatch, ray_lock):
    """A job submitted with ``--preset`` and no ``--gpus`` trained on CPU on a GPU cluster: the
    config (whose GPU default asks Ray for GPUs) was built before the pipeline joined the
    cluster, so only the head node's torch was asked. It now joins first unless the user chose
    (``--gpus``, ``train.use_gpu``), and a run that trains on CPU there says so."""
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert common.config_needs_cluster(_parse(["--preset", "tiny"]))
    assert common.config_needs_cluster(_parse([]))
    assert not common.config_needs_cluster(_parse(["--preset", "tiny", "--gpus", "1"]))
    assert not common.config_needs_cluster(_parse(["--preset", "tiny", "--set", "train.use_gpu=false"]))
    monkeypatch.delenv("RAY_ADDRESS")
    assert not common.config_needs_cluster(_parse(["--preset", "tiny"]))

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what the pipelines read (ray.init is done here)
    ray.init(address="local", num_cpus=1, num_gpus=2, include_dashboard=False)  # a cluster with (logical) GPUs
    try:
        args = _parse(["--preset", "tiny"])
        cfg = common.build_config(args)
        assert cfg.train.use_gpu and common.device_note(cfg, args) is None
        args = _parse(["--preset", "tiny", "--gpus", "0"])
        assert not common.build_config(args).train.use_gpu
        assert common.device_note(common.build_config(args), args) is None  # asked for
    finally:
        ray.shutdown()
    if not torch.cuda.is_available():  # joined, no GPU there: the run says it trains on CPU
        args = _parse(["--preset", "tiny"])
        cfg = common.build_config(args)
        assert not cfg.train.use_gpu and "training on CPU" in common.device_note(cfg, args)

"""Multi-node on one machine: a head plus two worker nodes (``ray.cluster_utils.Cluster``).

One Ray Train worker per worker node trains the tiny DINO on the project's Ray Data
pipeline (synthetic COCO-like shards -> ``build_train_dataset`` -> ``get_dataset_shard``
-> ``collate_numpy_batch`` -> ``train_step``), and proves:

- data sharding: the two workers see disjoint sets of image ids whose union is the
  whole dataset;
- checkpoint storage across nodes: both workers (on different nodes) put files into one
  reported checkpoint, which lands under the shared ``storage_path`` and loads strictly
  into a fresh model; DDP kept both replicas identical.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NUM_IMAGES = 8
NUM_WORKERS = 2
BATCH = 2


def sharded_training_loop(config: dict) -> None:
    import torch
    import ray.train
    import ray.train.torch

    from dino_scale.config import from_dict
    from dino_scale.data.collate import collate_numpy_batch
    from dino_scale.engine.checkpoint import save_weights
    from dino_scale.engine.train_step import train_step
    from dino_scale.models import build_dino

    cfg = from_dict(config["config"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(0)  # same init on every rank (DDP also broadcasts rank 0's)
    model, criterion, _ = build_dino(cfg.model)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    shard = ray.train.get_dataset_shard("train")
    seen, losses = [], []
    for step, batch in enumerate(shard.iter_batches(batch_size=BATCH, batch_format="numpy", drop_last=False)):
        images, masks, targets = collate_numpy_batch(batch, normalize=True)
        seen += [int(i) for i in batch["image_id"]]
        if step < config["train_steps"]:  # a few real steps; the rest of the epoch is only read
            out = train_step(model, criterion, optimizer, (images, masks, targets),
                             clip_max_norm=cfg.train.clip_max_norm, step=step)
            losses.append(float(out.loss))
    core = model.module if hasattr(model, "module") else model
    checksum = float(sum(p.detach().double().sum() for p in core.parameters()))
    record = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "image_ids": seen,
              "losses": losses, "param_checksum": checksum}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(record))
        if rank == 0:
            save_weights(tmp, {k: v.detach().cpu() for k, v in core.state_dict().items()})
        ray.train.report({"step": len(losses)}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name="final")


@pytest.fixture
def coco_like_shards(tmp_path):
    from dino_scale.data import convert_coco, to_coco_gt
    from dino_scale.data.synthetic import generate

    root, ann = generate(tmp_path / "raw", flavour="coco-like", num_images=NUM_IMAGES, seed=3,
                         image_size=((96, 128), (112, 160)))
    out = tmp_path / "shards"
    convert_coco(ann, root, out, embed_images=True, progress=False, max_images_per_shard=4)
    ids = sorted(img["id"] for img in to_coco_gt(out)["images"])
    assert len(ids) == NUM_IMAGES
    return out, ids


def test_cluster_two_nodes_shard_data_and_share_checkpoints(ray_lock, tmp_path, monkeypatch, coco_like_shards):
    from ray.cluster_utils import Cluster
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dino_scale.config import preset, to_dict
    from dino_scale.data import build_train_dataset
    from dino_scale.engine.checkpoint import load_weights
    from dino_scale.models import build_dino

    shards, all_ids = coco_like_shards
    cfg = preset("tiny", ["data.batch_size=2", "data.train_scales=[96,112]", "data.train_max_size=160",
                          "data.crop_resize_scales=[96]", "data.crop_size_range=[80,96]"])
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    # The head runs no training (like the cluster YAMLs: CPU 0); each worker node offers one
    # `trainer_slot`, so the two Ray Train workers land on different nodes, and spare
    # logical CPUs for the Ray Data tasks.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(NUM_WORKERS):
            cluster.add_node(num_cpus=2, resources={"trainer_slot": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        head_id = ray.get_runtime_context().get_node_id()
        storage = tmp_path / "shared-storage"
        trainer = TorchTrainer(
            sharded_training_loop,
            train_loop_config={"config": to_dict(cfg), "train_steps": 2},
            scaling_config=ScalingConfig(num_workers=NUM_WORKERS,
                                         resources_per_worker={"CPU": 1, "trainer_slot": 1}),
            datasets={"train": build_train_dataset(str(shards), cfg.data)},
            run_config=RunConfig(name=f"multinode-{uuid.uuid4().hex[:8]}", storage_path=str(storage)),
        )
        result = trainer.fit()
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert result.error is None and result.checkpoint is not None
    ckpt = Path(result.checkpoint.path)
    assert storage in ckpt.parents, f"checkpoint {ckpt} is not under the storage path {storage}"
    records = [json.loads((ckpt / f"rank{r}.json").read_text()) for r in range(NUM_WORKERS)]

    # One worker per worker node, none on the head.
    nodes = [r["node_id"] for r in records]
    assert len(set(nodes)) == NUM_WORKERS and head_id not in nodes
    # Sharding: disjoint, and together the whole dataset.
    a, b = (set(r["image_ids"]) for r in records)
    assert len(a) == len(records[0]["image_ids"]) and len(b) == len(records[1]["image_ids"])
    assert a and b and not (a & b)
    assert sorted(a | b) == all_ids
    # Real steps ran on both nodes, and DDP kept the replicas identical.
    for r in records:
        assert len(r["losses"]) == 2 and all(0 < v < 1e4 for v in r["losses"])
    assert records[0]["param_checksum"] == pytest.approx(records[1]["param_checksum"], rel=1e-9)
    # The checkpoint written on node 1 loads strictly into a fresh model.
    model, _, _ = build_dino(cfg.model)
    model.load_state_dict(load_weights(ckpt), strict=True)
    loaded = float(sum(p.detach().double().sum() for p in model.parameters()))
    assert loaded == pytest.approx(records[0]["param_checksum"], rel=1e-9)

"""Ray Train + DeepSpeed on CPU: 2 workers (gloo), the tiny DINO, synthetic shards.

One Ray session (and the host-wide Ray lock) serves the module. Runs: NaN steps skipped (the lr
following the data position) then an abort under bf16 + ZeRO-1; the evaluation pipeline of a
registered model (an eval-only run); the validation split, the sample order on several worker
counts, the tracking relay and the engine datasets' progress bars. The ZeRO-3 runs (MLflow server
outage, exact resume after a worker kill) are in test_engine_ray_zero3.py.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracking"))
from engine_fixtures import small_cfg, unique  # noqa: E402
from mlflow_store import seeded_store  # noqa: E402

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(600)
def test_nan_steps_skipped_lr_follows_the_data_position_then_abort(ray_session, data, tmp_path, monkeypatch):
    """bf16 + ZeRO-1, accumulation 2, 2 steps per epoch, 2 epochs, lr x0.1 at epoch 1. Non-finite
    micro-batches 1, 2 (the first window: skipped whole), 6 (a window applied with its other
    micro-batch), 7, 8 (with 6: 3 in a row, across a window boundary): skips are counted and
    training goes on, the lr of each applied step is that of its data position (step 2, the
    first of epoch 1, at 0.1x; was 1x: the scheduler counted applied steps only, so the drop
    came a step late), 3 in a row abort clearly, and the abort's checkpoint resumes at the
    aborted window's start with the guard as it was there."""
    from mlflow.tracking import MlflowClient

    from dino_scale.engine import fit
    from dino_scale.engine.train_step import BadStepError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train_dir, _ = data
    cfg = small_cfg(**{"train.zero_stage": 1, "train.precision": "bf16", "train.max_bad_steps": 3,
                       "train.global_batch_size": 8, "train.epochs": 2, "train.schedule": "step",
                       "train.lr_drop_epochs": [1], "train.warmup_steps": 0, "train.lr": 1e-3})
    # 4 micro-batches per worker and epoch (8 in the run), windows [1 2] [3 4] | [5 6] [7 8]
    hooks = {"nan_micro_steps": [1, 2, 6, 7, 8]}
    seeded_store(tmp_path / "work")
    with pytest.raises(BadStepError, match=r"3 consecutive micro-batches with a non-finite loss.*5 skipped in total"):
        fit(cfg, train_dir, None, tmp_path / "work", unique("nan"), experiment="engine-test", test_hooks=hooks,
            progress=False)
    # the abort's checkpoint resumes at the start of the aborted window (epoch 1, micro-batch 2),
    # with the guard as it was there (micro-batch 6 bad, the last before the window)
    (final,) = (tmp_path / "work" / "ray").glob("*/final_*/trainer_state.json")
    state = json.loads(final.read_text())
    assert (state["global_step"], state["epoch"], state["micro_in_epoch"], state["finished"]) == (2, 1, 2, False), state
    assert state["bad_steps"] == {"total": 3, "consecutive": 1, "grad_consecutive": 0}, state
    # and with the RNG streams of that window's start: those the step-2 checkpoint saved just before it
    # (was: the streams after the aborted window's draws, so a rerun replayed it with other noise)
    (step2,) = (tmp_path / "work" / "ray").glob("*/ckpt_*2_*")
    for rank in (0, 1):
        at_abort, at_start = (torch.load(f / f"rng_rank{rank}.pt", weights_only=True) for f in (final.parent, step2))
        assert torch.equal(at_abort["torch"], at_start["torch"]) and at_abort["python"] == at_start["python"], rank
    client = MlflowClient(f"sqlite:///{(tmp_path / 'work' / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("engine-test").experiment_id])
    assert runs[0].info.status == "FAILED" and "micro-batches with a non-finite loss" in runs[0].data.tags["error"]
    run_id = runs[0].info.run_id
    lrs = {m.step: m.value for m in client.get_metric_history(run_id, "lr")}
    assert sorted(lrs) == [1, 2], lrs  # the skipped first window is no step
    assert [lrs[1], lrs[2]] == pytest.approx([1e-3, 1e-4], rel=1e-9), lrs
    # counted as training went on (step 1 logged at the step and at the epoch's end), the abort's total last
    bad = {(m.step, m.value) for m in client.get_metric_history(run_id, "bad_steps_total")}
    assert bad == {(1, 2), (2, 3), (2, 5)}, bad


@pytest.mark.timeout(600)
def test_evaluate_pipeline_of_a_registered_model_matches_single_process(ray_session, data, tmp_path, monkeypatch,
                                                                        capfd, mlflow_store_restored):
    """``pipelines.evaluate --model models:/...@champion`` (2 workers, no training, bf16 autocast,
    the registered model's own config): the same detections and AP as one process evaluating the
    same fp32 weights under the same autocast (no DeepSpeed: its bf16 mode rounded the weights);
    no copy of the weights is kept anywhere (not in the run, its work folder or Ray's checkpoint).
    One val image no longer decodes (corrupted after conversion): the run counts it and says so
    (was: its objects counted as misses without a word). Another was missing at conversion: the
    run reports the image and boxes the ground truth lacks (was: a higher AP, without a word). Runs
    in this module's Ray session (the pipeline joins an initialized Ray); ``ray job submit`` of the
    pipelines is tests/pipelines/test_pipelines_ray_job.py."""
    from mlflow import MlflowClient

    from dino_scale.config import to_dict
    from dino_scale.data import LocalLoader, convert_coco, to_coco_gt
    from dino_scale.engine.checkpoint import save_weights
    from dino_scale.engine.evaluate import coco_evaluate, evaluate_batches
    from dino_scale.models import build_dino
    from dino_scale.tracking import ResilientLogger, register_model, set_alias
    from pipelines import evaluate as evaluate_pipeline

    raw = tmp_path / "raw_val"  # the images by path, one of them broken after conversion
    shutil.copytree(Path(data[1]).parent / "raw_val", raw)
    val_dir = str(tmp_path / "val")
    gone = sorted((raw / "images").glob("*.jpg"))[-1]  # missing at conversion: skipped and counted there
    doc = json.loads((raw / "annotations.json").read_text())
    gone_id = next(im["id"] for im in doc["images"] if Path(im["file_name"]).name == gone.name)
    gone_boxes = sum(a["image_id"] == gone_id for a in doc["annotations"])
    gone.unlink()
    convert_coco(raw / "annotations.json", raw / "images", val_dir, embed_images=False, progress=False)
    sorted((raw / "images").glob("*.jpg"))[0].write_bytes(b"\xff\xd8 not a jpeg any more")
    work = tmp_path / "work"
    work.mkdir()
    uri = seeded_store(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = small_cfg(**{"train.precision": "bf16", "train.zero_stage": 3})
    torch.manual_seed(11)
    model, _, post = build_dino(cfg.model)
    # the model was trained from ImageNet weights at a path of its training cluster, absent here:
    # the workers must not read them (was: WorkerGroupError, "backbone weights not found")
    stored = to_dict(cfg)
    stored["model"]["backbone_weights"] = str(tmp_path / "cluster-only" / "resnet18.pth")
    weights = save_weights(tmp_path / "w", model.state_dict(), config=stored)
    logger = ResilientLogger(uri)
    source_run = logger.start_run("train", "source")
    logger.log_artifacts(weights.parent, "model")
    logger.end_run()
    assert logger.close(timeout_s=10)
    set_alias("dino-tiny-coco", "champion", register_model(source_run, "dino-tiny-coco", tracking_uri=uri),
              tracking_uri=uri)
    run_name = unique("eval")
    trained_final = work / "runs" / run_name / "final"  # a training run of that name in the same work folder
    trained_final.mkdir(parents=True)
    (trained_final / "config.json").write_text("the training run's")
    out = evaluate_pipeline.run(["--model", "models:/dino-tiny-coco@champion", "--data", val_dir,
                                 "--work-dir", str(work), "--workers", "2", "--run-name", run_name])
    printed = capfd.readouterr()
    assert "COCO box AP (%) of models:/dino-tiny-coco@champion" in printed.out
    assert f"detections and lineage in {work / 'evaluations' / run_name / 'final'}" in printed.out  # where, on disk
    assert "Average Precision" not in printed.out + printed.err  # pycocotools' lines stay in the debug log

    assert "1 val image(s) could not be decoded" in printed.out
    # the worker's warning names the reason (was: the ids only; the reasons were in no log or metric)
    assert re.search(r"could not be decoded and were not evaluated \(their objects count as misses; reasons: "
                     r"(damaged|corrupt)\)", printed.out + printed.err), printed.err[-3000:]
    # the image missing at conversion is not in the ground truth: reported beside the AP (was: not a word)
    assert f"lost 1 image(s) and {gone_boxes} box(es) at conversion" in printed.out and gone_boxes > 0

    loader = LocalLoader(val_dir, cfg.data, train=False, batch_size=1, normalize=True)
    local = evaluate_batches(model.eval(), post, loader, torch.device("cpu"), amp_dtype=torch.bfloat16)
    assert loader.skips["count"] == 1  # the same image, skipped here too
    direct = coco_evaluate(to_coco_gt(val_dir), local)
    metrics = out["metrics"]
    assert metrics["step"] == 0 and metrics["num_detections"] == len(local)
    assert metrics["images_unevaluated"] == 1
    assert (metrics["val_images_skipped_at_conversion"], metrics["val_boxes_dropped_at_conversion"]) == (1, gone_boxes)
    for key, value in direct.items():
        assert metrics[key] == pytest.approx(value, abs=1e-3), key

    def top_scores(dets):
        by_image: dict = {}
        for d in dets:
            by_image.setdefault(d["image_id"], []).append(d["score"])
        return {k: sorted(v, reverse=True)[:20] for k, v in by_image.items()}

    run_dir = work / "evaluations" / run_name  # not under runs/, where a training run of that name lives
    assert (trained_final / "config.json").read_text() == "the training run's"
    assert sorted(p.name for p in (work / "runs" / run_name).iterdir()) == ["final"]
    (final,) = run_dir.glob("ray-evaluations/*/final_*")  # Ray's checkpoint: the detections only
    assert sorted(p.name for p in final.iterdir()) == ["detections.json"]
    ours, ref = top_scores(json.loads((final / "detections.json").read_text())), top_scores(local)
    assert ours.keys() == ref.keys()
    gap = max(abs(a - b) for k in ref for a, b in zip(ours[k], ref[k]))
    assert gap < 1e-5, f"eval-only scores differ from the same weights evaluated directly by {gap}"
    # no copy of the weights: not downloaded into the work dir, not in the run folder or Ray's
    # checkpoint, not in the run's artifacts; the GT went through the object store
    assert not (work / "eval" / run_name).exists()
    assert not list(run_dir.rglob("*.safetensors")) and not list(run_dir.rglob("*.pt"))
    assert not list(work.rglob("val_gt.json"))
    client = MlflowClient(tracking_uri=uri)
    ev_run = client.get_run(out["run_id"])
    assert client.get_experiment(ev_run.info.experiment_id).name == "evaluate"
    assert ev_run.info.status == "FINISHED" and ev_run.data.tags["stage"] == "evaluate"
    assert ev_run.data.tags["source.uri"] == "models:/dino-tiny-coco@champion"
    assert ev_run.data.metrics["final/AP"] == pytest.approx(metrics["AP"])
    assert ev_run.data.metrics["final/val_images_skipped_at_conversion"] == 1
    assert [a.path for a in client.list_artifacts(out["run_id"])] == ["config.json", "evaluation"]
    assert {a.path for a in client.list_artifacts(out["run_id"], "evaluation")} == {
        "evaluation/config.json", "evaluation/detections.json", "evaluation/lineage.json"}


@pytest.mark.parametrize("deterministic", [False, True])
def test_val_split_covers_every_image_once(ray_session, data, tmp_path, deterministic):
    """6 val images on 4 workers: Ray's DataConfig split them with equal=True and dropped 2,
    which COCO AP then counted as missed. Every image must reach exactly one worker."""
    from dino_scale.data import build_eval_dataset, build_train_dataset, to_coco_gt
    from dino_scale.engine.trainer import build_trainer, loop_config

    train_dir, val_dir = data
    cfg = small_cfg(**{"train.num_workers": 4, "train.global_batch_size": 8, "train.deterministic": deterministic})
    datasets = {"train": build_train_dataset(train_dir, cfg.data, block_order=not deterministic),  # as fit builds it
                "val": build_eval_dataset(val_dir, cfg.data)}
    trainer = build_trainer(cfg, datasets, run_name=unique("split"), storage_path=str(tmp_path / "ray"),
                            train_loop_config=loop_config(cfg, steps_per_epoch=1, datasets=list(datasets)))
    splits = trainer.data_config.configure(datasets, world_size=4, worker_handles=None, worker_node_ids=None)
    seen: list[list[int]] = [[] for _ in range(4)]

    def consume(rank: int) -> None:  # the workers read their shards concurrently
        for batch in splits[rank]["val"].iter_batches(batch_size=1, drop_last=False, batch_format="numpy"):
            seen[rank].extend(int(i) for i in batch["image_id"])

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    ids = sorted(img["id"] for img in to_coco_gt(val_dir)["images"])
    assert len(ids) == 6 and sorted(sum(seen, [])) == ids


def test_deterministic_sample_order_is_the_same_on_every_worker_count(ray_session, data, tmp_path):
    """In deterministic mode every worker reads the whole order-preserving stream and keeps its
    slice of each global batch: the epoch's samples come in one order on 1 and on 2 workers, so a
    run resumed on another worker count (it skips the micro-batches its checkpoint consumed)
    sees exactly the samples the first did not. Ray's local shuffle drained its buffer per
    batch of micro x workers rows and gave each worker count its own order (this test failed
    with it)."""
    from dino_scale.data import build_train_dataset, set_epoch
    from dino_scale.engine.batches import iter_micro_batches
    from dino_scale.engine.trainer import build_trainer, loop_config

    train_dir, _ = data
    set_epoch(1)
    orders = {}
    for world in (1, 2):
        cfg = small_cfg(**{"train.num_workers": world, "train.deterministic": True})
        # several blocks, as a real dataset streams (these 16 images come as one block otherwise)
        datasets = {"train": build_train_dataset(train_dir, cfg.data, block_order=False).repartition(4)}  # as fit
        trainer = build_trainer(cfg, datasets, run_name=unique("order"), storage_path=str(tmp_path / "ray"),
                                train_loop_config=loop_config(cfg, steps_per_epoch=1, datasets=["train"]))
        splits = trainer.data_config.configure(datasets, world_size=world, worker_handles=None, worker_node_ids=None)
        micro = cfg.data.batch_size
        per_rank = [[[int(t["image_id"]) for t in targets]
                     for _, _, targets in iter_micro_batches(splits[rank]["train"], micro, world, rank, True,
                                                             epoch=1, seed=cfg.data.seed, shuffle_buffer=4)]
                    for rank in range(world)]
        assert len({len(p) for p in per_rank}) == 1 and all(len(b) == micro for p in per_rank for b in p)
        orders[world] = [i for group in zip(*per_rank) for batch in group for i in batch]
    ids = sorted(img for img in orders[1])
    assert len(set(ids)) == 16 and orders[1] != ids  # every image once, shuffled
    assert orders[2] == orders[1]


def test_tracking_relay_logs_from_the_drivers_node(ray_session, tmp_path, monkeypatch):
    """A node-local (sqlite) store is written only on the driver's machine: rank 0 logs through
    a relay actor pinned to the driver's node (workers on other nodes cannot open the file). The
    relay has the store client's variables of the driver's environment: a token exported after
    Ray started (as for a driver joining a running cluster) was not the relay's."""
    import os

    import ray
    from mlflow import MlflowClient

    from dino_scale.tracking.logger import ResilientLogger
    from dino_scale.tracking.relay import RelayClient, is_node_local, start_relay

    uri = seeded_store(tmp_path)
    assert is_node_local(uri) and is_node_local("file:///x/mlruns") and is_node_local("http://127.0.0.1:5000")
    assert not is_node_local("http://mlflow:5000")
    driver = ResilientLogger(uri)
    run_id = driver.start_run("relay-test", "r")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "only-the-drivers")  # Ray's processes were started without it
    monkeypatch.setenv("DINO_SCALE_NOT_FOR_THE_STORE", "x")
    relay = start_relay(uri, run_id)

    @ray.remote(num_cpus=0)
    def rank0(handle):  # what rank 0 does, from a task (which may run on any node)
        client = RelayClient(handle)
        for step in range(3):
            client.log_metrics({"loss": 3.0 - step}, step=step)
        client.set_tags({"from": "rank0"})
        return client.close(timeout_s=20)

    try:
        assert ray.get(rank0.remote(relay), timeout=120) is True
        node = ray.get(relay.__ray_call__.remote(lambda _self: ray.get_runtime_context().get_node_id()))
        assert node == ray.get_runtime_context().get_node_id()  # 1 node here; 3 in test_cluster_elastic
        env = ray.get(relay.__ray_call__.remote(lambda _self: {k: os.environ.get(k) for k in (
            "MLFLOW_TRACKING_TOKEN", "DINO_SCALE_NOT_FOR_THE_STORE")}))
        assert env == {"MLFLOW_TRACKING_TOKEN": "only-the-drivers", "DINO_SCALE_NOT_FOR_THE_STORE": None}
    finally:
        ray.kill(relay)
    driver.end_run()
    assert driver.close(timeout_s=10)
    client = MlflowClient(uri)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [3.0, 2.0, 1.0]
    assert client.get_run(run_id).data.tags["from"] == "rank0"


def test_tracking_relay_is_drained_before_it_is_ended(ray_session, tmp_path):
    """Rank 0 of a run that fails mid-run leaves in the relay the calls it buffered while the
    store was down (rank 0 flushes only at the run's end). ``drain_relay`` (what ``fit`` does
    when the run ends, fails or is interrupted) sends them once the store is back; was: the
    driver killed the relay at once and they were lost without a word."""
    import ray
    from mlflow import MlflowClient
    from mlflow_server import MlflowServer

    from dino_scale.tracking.logger import ResilientLogger
    from dino_scale.tracking.relay import RelayClient, drain_relay, start_relay

    server = MlflowServer(tmp_path / "server").start()
    try:
        driver = ResilientLogger(server.uri)
        run_id = driver.start_run("relay-drain", "r", wait_s=60)
        assert driver.close(timeout_s=10)
        relay = start_relay(server.uri, run_id)
        server.stop()

        @ray.remote(num_cpus=0)
        def rank0_then_crash(handle):  # logs, then dies without closing its client
            client = RelayClient(handle)
            for step in range(3):
                client.log_metrics({"loss": float(step)}, step=step)
            return ray.get(handle.__ray_call__.remote(lambda relay_self: relay_self.logger.pending))

        assert ray.get(rank0_then_crash.remote(relay), timeout=120) > 0  # buffered: the store is down
        server.start()
        assert drain_relay(relay, timeout_s=60)
        history = MlflowClient(server.uri).get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == [0, 1, 2]
    finally:
        server.stop()


def test_progress_bars_off_for_engine_datasets_only(ray_session, data, monkeypatch):
    """The engine quiets Ray Data's progress bars on the datasets it builds (a deterministic
    run printed ~50k progress lines), not in the process's DataContext; opt back in by env."""
    import ray.data

    from dino_scale.data import build_train_dataset
    from dino_scale.engine.api import quiet_progress_bars

    train_dir, _ = data
    cfg = small_cfg()
    ds = build_train_dataset(train_dir, cfg.data)
    assert ds.context.enable_progress_bars
    monkeypatch.setenv("DINO_SCALE_RAY_PROGRESS", "1")
    quiet_progress_bars(ds)
    assert ds.context.enable_progress_bars
    monkeypatch.delenv("DINO_SCALE_RAY_PROGRESS")
    quiet_progress_bars(ds)
    assert not ds.context.enable_progress_bars
    assert not ds.map_batches(lambda b: b).context.enable_progress_bars  # derived datasets too
    assert ray.data.DataContext.get_current().enable_progress_bars  # the process's default stays

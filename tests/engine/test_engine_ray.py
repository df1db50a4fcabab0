"""Ray Train + DeepSpeed on CPU: 2 workers (gloo), the tiny DINO, synthetic shards.

One Ray session (and the host-wide Ray lock) serves the module. Runs: ZeRO-3 with a
real MLflow server that is stopped mid-run, with distributed evaluation (also the reference
of the resume test); NaN steps skipped (the lr following the data position) then an abort
under bf16 + ZeRO-1; ZeRO-3 exact resume after a worker is SIGKILLed; the evaluation pipeline
of a registered model (an eval-only run).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracking"))
from engine_fixtures import (  # noqa: E402
    RaySession, make_data, paused_at, small_cfg, unique, watching,
)
from mlflow_server import MlflowServer  # noqa: E402
from mlflow_store import seeded_store  # noqa: E402

from dino_scale.engine.checkpoint import load_weights  # noqa: E402

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("engine_data"))


@pytest.fixture(scope="module")
def ray_session():
    with RaySession(num_cpus=4) as session:
        yield session


def _fixed_loss(cfg, state_dict, data_dir, seed=7):
    """Mean loss over the (un-augmented) images of ``data_dir`` with fixed denoising noise."""
    from dino_scale.data import LocalLoader
    from dino_scale.engine.train_step import compute_loss
    from dino_scale.models import build_dino

    model, criterion, _ = build_dino(cfg.model)
    model.load_state_dict(state_dict, strict=True)
    model.train()
    torch.manual_seed(seed)
    total, n = 0.0, 0
    with torch.no_grad():
        for images, masks, targets in LocalLoader(data_dir, cfg.data, train=False, batch_size=2, normalize=True):
            loss, _ = compute_loss(model, criterion, images, masks, targets)
            total, n = total + float(loss), n + 1
    return total / n


def _initial_state(cfg):
    from dino_scale.engine.loop import seed_everything
    from dino_scale.models import build_dino

    seed_everything(cfg.train.seed)  # the workers build the model under the same seed
    return {k: v.float() for k, v in build_dino(cfg.model)[0].state_dict().items()}


# One uninterrupted ZeRO-3 run serves two tests: its own checks (training, checkpoints, distributed
# evaluation, an MLflow server outage) and, as the reference, the kill/resume test below. Each
# Ray Train run costs ~1 min of fixed start-up on a 2-core CI box; ZeRO-2 runs in the
# fake-autoscaler test (tests/cluster/test_cluster_autoscale.py).
def _reference_cfg():
    # one epoch of 2 optimizer steps, each over 2 micro-batches per worker (gradient accumulation),
    # a checkpoint at each step; deterministic so a resumed run can be compared bit for bit
    return small_cfg(**{"train.zero_stage": 3, "train.deterministic": True, "train.max_failures": 1,
                        "train.lr": 1e-3, "train.lr_backbone": 1e-3, "train.global_batch_size": 8,
                        "train.checkpoint_every_steps": 1})


# Both runs skip the 3rd micro-batch (a NaN loss): the first of the epoch's second accumulation
# window, so that step holds one micro-batch. DeepSpeed's own accumulation counted successful
# micro-batches only: the skip shifted every later step (here 1 step in place of 2, the last
# micro-batch's gradient left pending at the epoch's end; with more epochs, steps across the
# epoch boundary and gradients lost on resume).
_REFERENCE_HOOKS = {"nan_micro_steps": [3]}


@pytest.fixture(scope="module")
def zero3_reference(ray_session, data, tmp_path_factory):
    """The uninterrupted ZeRO-3 run, with a real MLflow server that is stopped after the first
    checkpoint and restarted after the next one. Yields (cfg, result, storage, run_name, events,
    server); the server stays up until the module ends so the tests can query it."""
    from dino_scale.engine import fit

    train_dir, val_dir = data
    base = tmp_path_factory.mktemp("zero3_reference")
    cfg = _reference_cfg()
    server = MlflowServer(base / "mlflow").start()
    storage = base / "ray"
    events: list[str] = []

    def checkpoint_names() -> set[str]:  # step (ckpt_*) and final (final_*) checkpoints of the run
        return {p.name for p in storage.glob("*/*") if p.name.startswith(("ckpt_", "final_"))}

    def outage(done):  # stop the server after the first checkpoint, restart it after the next
        try:
            while not checkpoint_names():
                if done.wait(0.1):
                    return
            # by name, not count: with checkpoints_to_keep=2 the count stops growing. Taken before
            # the stop so the last step's checkpoint (written before the final flush) always counts as new.
            seen = checkpoint_names()
            server.stop()
            events.append("stopped")
            deadline = time.monotonic() + 120
            while not (checkpoint_names() - seen) and time.monotonic() < deadline:
                if done.wait(0.1):
                    return
            server.start()
            events.append("restarted")
        except Exception as exc:  # surfaced by the assertions of the test
            events.append(f"error {exc!r}")

    run_name = unique("zero3")
    try:
        with pytest.MonkeyPatch.context() as mp, watching(outage, join_s=180):
            mp.setenv("MLFLOW_TRACKING_URI", server.uri)
            result = fit(cfg, train_dir, val_dir, base / "work", run_name, experiment="engine-test",
                         storage_path=str(storage), tags={"purpose": "test"}, tracking_close_timeout_s=600,
                         test_hooks=_REFERENCE_HOOKS)
        yield cfg, result, storage, run_name, list(events), server
    finally:
        server.stop()


@pytest.mark.timeout(900)
def test_zero3_fit_eval_and_mlflow_server_outage(zero3_reference, data):
    """ZeRO-3: trains (fixed-noise loss drops), checkpoints, evaluates; MLflow server goes
    away mid-run and comes back; everything logged ends up on the server."""
    from mlflow.tracking import MlflowClient
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from dino_scale.data import LocalLoader, to_coco_gt
    from dino_scale.engine.evaluate import evaluate_batches
    from dino_scale.models import build_dino

    cfg, result, storage, run_name, events, server = zero3_reference
    train_dir, val_dir = data
    assert events == ["stopped", "restarted"], events

    # checkpoints (ZeRO-3: parameters and optimizer states partitioned over the 2 ranks) and final weights
    assert result.weights_path.is_file() and result.config_path.is_file()
    final_sd = load_weights(result.weights_path)
    ckpt_dirs = sorted(p.name for p in (storage / run_name).iterdir() if p.is_dir())
    assert any(n.startswith("ckpt_") for n in ckpt_dirs) and any(n.startswith("final_") for n in ckpt_dirs)
    final_ckpt = Path(result.checkpoint_path)
    assert {f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")} <= \
        set(os.listdir(final_ckpt / "ds"))
    assert result.metrics["step"] == 2 and result.metrics["bad_steps_total"] == 1
    assert result.metrics["resumes"] == 0 and result.metrics["epoch"] == 1
    # 2 workers x 2 images x 4 micro-batches, less the skipped one's 2 x 2
    assert result.metrics["images_seen"] == 12

    # the loss went down (same images, same denoising noise, before vs after)
    before = _fixed_loss(cfg, _initial_state(cfg), train_dir)
    after = _fixed_loss(cfg, final_sd, train_dir)
    assert after < before, (before, after)

    # evaluation: the engine's AP equals pycocotools run directly on its detections
    dets = json.loads((final_ckpt / "detections.json").read_text())
    gt_path = final_ckpt.parent / "gt.json"
    gt_path.write_text(json.dumps(to_coco_gt(val_dir)))
    coco = COCO(str(gt_path))
    ev = COCOeval(coco, coco.loadRes(dets), iouType="bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    for i, key in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
        assert result.metrics[key] == pytest.approx(float(ev.stats[i]), abs=1e-12), key
    # ...and the gathered detections are what one process predicts with the final weights
    model, _, post = build_dino(cfg.model)
    model.load_state_dict(final_sd)
    local = evaluate_batches(model, post, LocalLoader(val_dir, cfg.data, train=False, batch_size=1,
                                                      normalize=True), torch.device("cpu"))
    assert {d["image_id"] for d in dets} == {img["id"] for img in coco.dataset["images"]}
    assert len(dets) == len(local) == 6 * cfg.model.num_select
    for image_id in {d["image_id"] for d in dets}:
        a = sorted((d["score"] for d in dets if d["image_id"] == image_id), reverse=True)[:10]
        b = sorted((d["score"] for d in local if d["image_id"] == image_id), reverse=True)[:10]
        assert a == pytest.approx(b, abs=1e-4)

    # tracking: params, tags, per-step metrics (incl. those buffered during the outage), artifacts
    client = MlflowClient(server.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.zero_stage"] == "3" and run.data.params["model.hidden_dim"] == "64"
    assert {"preset", "git_sha", "workers", "gpus"} <= set(run.data.tags)
    assert run.data.tags["workers"] == "2" and run.data.tags["purpose"] == "test"
    steps = sorted(m.step for m in client.get_metric_history(result.run_id, "loss"))
    assert steps == [1, 2], steps
    for key in ("lr", "grad_norm", "img_per_s", "data_wait_share", "train/loss_ce", "eval/AP", "final/AP"):
        assert client.get_metric_history(result.run_id, key), key
    arts = {f.path for f in client.list_artifacts(result.run_id, "model")}
    assert {"model/model.safetensors", "model/config.json", "model/lineage.json"} <= arts


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
    with pytest.raises(BadStepError, match=r"3 consecutive non-finite loss steps.*5 skipped in total"):
        fit(cfg, train_dir, None, tmp_path / "work", unique("nan"), experiment="engine-test", test_hooks=hooks,
            progress=False)
    # the abort's checkpoint resumes at the start of the aborted window (epoch 1, micro-batch 2),
    # with the guard as it was there (micro-batch 6 bad, the last before the window)
    (final,) = (tmp_path / "work" / "ray").glob("*/final_*/trainer_state.json")
    state = json.loads(final.read_text())
    assert (state["global_step"], state["epoch"], state["micro_in_epoch"], state["finished"]) == (2, 1, 2, False), state
    assert state["bad_steps"] == {"total": 3, "consecutive": 1, "grad_consecutive": 0}, state
    client = MlflowClient(f"sqlite:///{(tmp_path / 'work' / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("engine-test").experiment_id])
    assert runs[0].info.status == "FAILED" and "consecutive non-finite" in runs[0].data.tags["error"]
    run_id = runs[0].info.run_id
    lrs = {m.step: m.value for m in client.get_metric_history(run_id, "lr")}
    assert sorted(lrs) == [1, 2], lrs  # the skipped first window is no step
    assert [lrs[1], lrs[2]] == pytest.approx([1e-3, 1e-4], rel=1e-9), lrs
    # counted as training went on (step 1 logged at the step and at the epoch's end), the abort's total last
    bad = {(m.step, m.value) for m in client.get_metric_history(run_id, "bad_steps_total")}
    assert bad == {(1, 2), (2, 3), (2, 5)}, bad


@pytest.mark.timeout(900)
def test_zero3_exact_resume_after_worker_kill(zero3_reference, data, tmp_path, monkeypatch):
    """ZeRO-3, deterministic, gradient accumulation and a skipped micro-batch: SIGKILL a worker
    mid-run; Ray restarts the group from the last checkpoint; the final weights equal those of
    the uninterrupted reference run."""
    from dino_scale.engine import fit

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train_dir, _ = data
    cfg, ref, *_ = zero3_reference
    assert ref.metrics["step"] == 2 and ref.metrics["resumes"] == 0

    pid_file = tmp_path / "worker.pid"
    run_name = unique("killed")
    run_dir = tmp_path / "killed" / "ray" / run_name
    killed: list[int] = []

    def killer(done):
        if paused_at(pid_file, run_dir, 1, done):
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    # rank 1 stops after step 2 (checkpoint at step 1, half-way through the epoch): the kill
    # resumes mid-epoch (the consumed micro-batches of the epoch are skipped, the augmentation
    # draws must line up) and replays the window with the NaN micro-batch. The kill waits until
    # the controller has registered the step-1 checkpoint (its snapshot file says so). No val
    # set: the comparison is of weights (evaluation would not change them).
    hooks = {**_REFERENCE_HOOKS, "pid_file": str(pid_file), "pid_rank": 1, "pid_after_step": 2, "pause_s": 120}
    seeded_store(tmp_path / "killed")
    with watching(killer):
        run = fit(cfg, train_dir, None, tmp_path / "killed", run_name, experiment="engine-test",
                  test_hooks=hooks, progress=False)
    assert killed, "the worker was never killed (its pid or the step-1 checkpoint never appeared)"
    assert run.metrics["step"] == 2 and run.metrics["resumes"] == 1  # restarted once, from a checkpoint
    a, b = load_weights(ref.weights_path), load_weights(run.weights_path)
    assert a.keys() == b.keys()
    init = _initial_state(cfg)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained
    diff = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"resumed run differs from the uninterrupted one: {sorted(diff.items())[:5]}"


def test_zero3_restart_on_another_worker_count_is_refused_on_the_driver(zero3_reference, data, tmp_path):
    """Re-using the reference run's name resumes its latest checkpoint: on another worker count
    its ZeRO-3 partitions cannot load, which the driver says before any worker starts (read in
    place from Ray's run folder); the same count, or a new name, is fine."""
    from dino_scale.config import ConfigError
    from dino_scale.engine import fit
    from dino_scale.engine.elastic import check_restart

    train_dir, _ = data
    _, _, storage, run_name, *_ = zero3_reference
    check_restart(str(storage), run_name, 2, 3)
    check_restart(str(storage), unique("new"), 1, 3)
    check_restart(str(storage), run_name, 1, 2)  # ZeRO-2 converts
    one = small_cfg(**{"train.zero_stage": 3, "train.num_workers": 1, "train.global_batch_size": 8})
    before = sorted(p.name for p in (storage / run_name).iterdir())
    with pytest.raises(ConfigError, match=r"written by 2 workers and cannot resume on 1") as err:
        fit(one, train_dir, None, tmp_path / "work", run_name, storage_path=str(storage), progress=False)
    assert run_name in str(err.value)
    assert sorted(p.name for p in (storage / run_name).iterdir()) == before  # Ray Train never started


@pytest.mark.timeout(600)
def test_evaluate_pipeline_of_a_registered_model_matches_single_process(ray_session, data, tmp_path, monkeypatch,
                                                                        capfd, mlflow_store_restored):
    """``pipelines.evaluate --model models:/...@champion`` (2 workers, no training, bf16 autocast,
    the registered model's own config): the same detections and AP as one process evaluating the
    same fp32 weights under the same autocast (no DeepSpeed: its bf16 mode rounded the weights);
    no copy of the weights is kept anywhere (not in the run, its work folder or Ray's checkpoint).
    One val image no longer decodes (corrupted after conversion): the run counts it and says so
    (was: its objects counted as misses without a word). Runs in this module's Ray session (the pipeline joins an initialized Ray); ``ray job submit``
    of the pipelines is tests/pipelines/test_pipelines_ray_job.py."""
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
    out = evaluate_pipeline.run(["--model", "models:/dino-tiny-coco@champion", "--data", val_dir,
                                 "--work-dir", str(work), "--workers", "2", "--run-name", run_name])
    printed = capfd.readouterr()
    assert "COCO box AP (%) of models:/dino-tiny-coco@champion" in printed.out
    assert "Average Precision" not in printed.out + printed.err  # pycocotools' lines stay in the debug log

    assert "1 val image(s) could not be decoded" in printed.out

    loader = LocalLoader(val_dir, cfg.data, train=False, batch_size=1, normalize=True)
    local = evaluate_batches(model.eval(), post, loader, torch.device("cpu"), amp_dtype=torch.bfloat16)
    assert loader.skips["count"] == 1  # the same image, skipped here too
    direct = coco_evaluate(to_coco_gt(val_dir), local)
    metrics = out["metrics"]
    assert metrics["step"] == 0 and metrics["num_detections"] == len(local)
    assert metrics["images_unevaluated"] == 1
    for key, value in direct.items():
        assert metrics[key] == pytest.approx(value, abs=1e-3), key

    def top_scores(dets):
        by_image: dict = {}
        for d in dets:
            by_image.setdefault(d["image_id"], []).append(d["score"])
        return {k: sorted(v, reverse=True)[:20] for k, v in by_image.items()}

    run_dir = work / "runs" / run_name
    (final,) = run_dir.glob("ray/*/final_*")  # Ray's checkpoint: the detections only
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
    datasets = {"train": build_train_dataset(train_dir, cfg.data), "val": build_eval_dataset(val_dir, cfg.data)}
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
        datasets = {"train": build_train_dataset(train_dir, cfg.data).repartition(4)}
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


def test_tracking_relay_logs_from_the_drivers_node(ray_session, tmp_path):
    """A node-local (sqlite) store is written only on the driver's machine: rank 0 logs through
    a relay actor pinned to the driver's node (workers on other nodes cannot open the file)."""
    import ray
    from mlflow import MlflowClient

    from dino_scale.tracking.logger import ResilientLogger
    from dino_scale.tracking.relay import RelayClient, is_node_local, start_relay

    uri = seeded_store(tmp_path)
    assert is_node_local(uri) and is_node_local("file:///x/mlruns") and is_node_local("http://127.0.0.1:5000")
    assert not is_node_local("http://mlflow:5000")
    driver = ResilientLogger(uri)
    run_id = driver.start_run("relay-test", "r")
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
        assert node == ray.get_runtime_context().get_node_id()  # pinned to the driver's node
    finally:
        ray.kill(relay)
    driver.end_run()
    assert driver.close(timeout_s=10)
    client = MlflowClient(uri)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [3.0, 2.0, 1.0]
    assert client.get_run(run_id).data.tags["from"] == "rank0"


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

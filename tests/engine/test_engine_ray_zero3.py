"""Ray Train + DeepSpeed ZeRO-3 on CPU: 2 workers (gloo), the tiny DINO, synthetic shards.

One Ray session (and the host-wide Ray lock) serves the module, and one uninterrupted ZeRO-3
run serves its three tests: that run's own checks (training, checkpoints, distributed
evaluation, a real MLflow server stopped mid-run), the exact resume after a worker is
SIGKILLed (compared with it), and the driver's refusal to resume its checkpoint on another
worker count. The other Ray Train runs of the engine are in test_engine_ray.py.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracking"))
from engine_fixtures import paused_at, small_cfg, unique, watching  # noqa: E402
from mlflow_server import MlflowServer  # noqa: E402
from mlflow_store import seeded_store  # noqa: E402

from dino_scale.engine.checkpoint import load_weights  # noqa: E402

pytestmark = [pytest.mark.slow]


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
def _reference_cfg(**overrides):
    # one epoch of 2 optimizer steps, each over 2 micro-batches per worker (gradient accumulation),
    # a checkpoint at each step; deterministic so a resumed run can be compared bit for bit
    return small_cfg(**{"train.zero_stage": 3, "train.deterministic": True, "train.max_failures": 1,
                        "train.lr": 1e-3, "train.lr_backbone": 1e-3, "train.global_batch_size": 8,
                        "train.checkpoint_every_steps": 1, **overrides})


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


@pytest.mark.timeout(1500)  # counts the module's reference run (the fixture): 168-361 s on the CI box
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
    assert result.metrics["data_skipped"] == 0  # with data_skipped/<reason> for each reason when some were
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
    hooks = {**_REFERENCE_HOOKS, "pid_file": str(pid_file), "pid_rank": 1, "pid_after_step": 2, "pause_s": 600}
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
    one = _reference_cfg(**{"train.num_workers": 1})  # the run's settings, on 1 worker
    before = sorted(p.name for p in (storage / run_name).iterdir())
    with pytest.raises(ConfigError, match=r"written by 2 workers and cannot resume on 1") as err:
        fit(one, train_dir, None, tmp_path / "work", run_name, storage_path=str(storage), progress=False)
    assert run_name in str(err.value)
    assert sorted(p.name for p in (storage / run_name).iterdir()) == before  # Ray Train never started
    # the same run on 1 worker with ZeRO-2: the stage change is what the driver says (was "cannot
    # resume on 1 ... or train with train.zero_stage <= 2", judged by the new stage, advice refused next)
    two = _reference_cfg(**{"train.zero_stage": 2, "train.num_workers": 1})
    with pytest.raises(ConfigError, match=r"other settings: train\.zero_stage \(checkpoint layout\) 'ZeRO-3' -> "
                                          r"'ZeRO-1/2'\. "):
        check_restart(str(storage), run_name, 1, 2, config=two)
    with pytest.raises(ConfigError, match=r"cannot resume on 1.*another run name"):  # its own stage, fewer workers
        check_restart(str(storage), run_name, 1, 3, config=one)

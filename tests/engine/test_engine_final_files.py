"""engine.final_files: the final checkpoint's files copied to the work folder (weights, config,
detections to ``final/``; the EMA weights to ``ema/``), and what ``fit`` does after training (the
EMA's lineage; the MLflow run ended whatever fails or interrupts it), with a stand-in trainer."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_fixtures import small_cfg, unique  # noqa: E402

from dino_scale.engine.checkpoint import atomic_write_text, save_weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_refused")


def test_final_copy_drops_an_earlier_runs_detections(tmp_path):
    """A rerun into the same work folder without evaluation left the earlier run's
    ``detections.json`` in ``final/``, logged in the new run's ``model`` artifact though computed
    from other weights. The final copy now holds what the checkpoint holds."""
    from ray.train import Checkpoint

    from dino_scale.engine.final_files import copy_final

    evaluated, trained = tmp_path / "ckpt_a", tmp_path / "ckpt_b"
    for folder in (evaluated, trained):
        save_weights(folder, {"w": torch.ones(2)}, config={"name": "tiny"})
    atomic_write_text(evaluated / "detections.json", "[]")
    final = tmp_path / "final"
    copy_final(Checkpoint.from_directory(str(evaluated)), final)
    assert (final / "detections.json").read_text() == "[]"
    copy_final(Checkpoint.from_directory(str(trained)), final)
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        copy_final(Checkpoint.from_directory(str(tmp_path / "empty")), final)


def test_a_failed_final_copy_leaves_the_earlier_files_whole(tmp_path):
    """The final copy wrote each file straight over the earlier run's: one that failed half-way
    (a full disk; here a checkpoint without its config, found after the weights were copied) left
    new weights beside the old config, or a truncated weights file where a good one was. Now
    everything is staged beside ``final/`` and renamed in once all of it is copied."""
    from ray.train import Checkpoint

    from dino_scale.engine.final_files import copy_final

    earlier, broken = tmp_path / "ckpt_a", tmp_path / "ckpt_b"
    save_weights(earlier, {"w": torch.ones(2)}, config={"name": "tiny"})
    atomic_write_text(earlier / "detections.json", "[]")
    save_weights(broken, {"w": torch.zeros(2)})  # no config.json
    final = tmp_path / "work" / "final"
    copy_final(Checkpoint.from_directory(str(earlier)), final)
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        copy_final(Checkpoint.from_directory(str(broken)), final)
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    assert [p.name for p in final.parent.iterdir()] == ["final"]  # no staging folder left
    killed = final.parent / ".final.incoming-0badc0de"  # of a copy whose process was killed
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"x" * 100)
    copy_final(Checkpoint.from_directory(str(earlier)), final)
    assert [p.name for p in final.parent.iterdir()] == ["final"]


def test_the_ema_weights_are_copied_beside_final_with_the_runs_lineage(data, tmp_path, monkeypatch):
    """With ``train.ema_decay`` the EMA weights stayed in the Ray checkpoint's ``ema/`` with a
    config only: ``evaluate --model <that folder>`` (the README's advice) found no lineage and
    scored them on a generated synthetic set, not the run's validation set. ``fit`` copies them
    to ``<work_dir>/ema`` with the run's lineage; a rerun of the work folder without EMA removes
    it. The trainer is a stand-in that returns a checkpoint at once. A metric that was not measured
    (AP NaN) is null in lineage.json: a bare NaN is no JSON (other readers refused the file)."""
    from types import SimpleNamespace

    import ray.train

    import dino_scale.data
    import dino_scale.engine.trainer
    import dino_scale.tracking.relay
    from dino_scale.engine import api, fit

    checkpoint = tmp_path / "final_000000001_w1"

    class Trainer:
        def fit(self):
            return SimpleNamespace(metrics={"step": 1, "AP": float("nan")},  # no AP measured
                                   checkpoint=ray.train.Checkpoint(str(checkpoint)), metrics_dataframe=None)

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(api, "ensure_ray", lambda *args: None)
    monkeypatch.setattr(api, "quiet_progress_bars", lambda ds: None)
    monkeypatch.setattr(dino_scale.data, "build_train_dataset", lambda *args, **kwargs: object())
    monkeypatch.setattr(dino_scale.tracking.relay, "start_relay", lambda *args: None)
    monkeypatch.setattr(dino_scale.engine.trainer, "build_trainer", lambda *args, **kwargs: Trainer())
    save_weights(checkpoint, {"w": torch.ones(2)}, config={"name": "tiny"})
    save_weights(checkpoint / "ema", {"w": torch.full((2,), 0.5)}, config={"name": "tiny"})
    train_dir, val_dir = data
    work = tmp_path / "work"

    def run():
        return fit(small_cfg(**{"train.ema_decay": 0.9}), train_dir, val_dir, work, unique("ema"), evaluate=False,
                   progress=False, experiment="engine-test", storage_path=str(tmp_path / "ray"),
                   tracking_close_timeout_s=5)  # evaluate=False: no ray.put of the val set (Ray would start)

    run()
    assert sorted(p.name for p in (work / "ema").iterdir()) == ["config.json", "lineage.json", "model.safetensors"]
    lineage = json.loads((work / "ema" / "lineage.json").read_text())
    assert (lineage["val_dir"], lineage["train_dir"], lineage["weights"]) == (val_dir, train_dir, "ema")
    assert "metrics" not in lineage  # the final weights' AP is not the EMA's
    final = json.loads((work / "final" / "lineage.json").read_text(), parse_constant=pytest.fail)  # was bare NaN
    assert "weights" not in final and final["metrics"] == {"step": 1, "AP": None}
    from dino_scale.engine.checkpoint import load_weights

    assert torch.equal(load_weights(work / "ema")["w"], torch.full((2,), 0.5))
    shutil.rmtree(checkpoint / "ema")  # a later run of the work folder without EMA: no stale copy
    run()
    assert not (work / "ema").exists() and (work / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("failure", ["no_checkpoint", "copy_failed", "interrupt", "terminated"])
def test_a_failure_while_the_results_are_saved_ends_the_run(data, tmp_path, monkeypatch, failure):
    """After ``trainer.fit()`` returns, the driver copies the final weights out of the checkpoint
    and logs them. A failure there (no checkpoint, a copy that fails, Ctrl-C during a multi-GB
    copy) left the MLflow run RUNNING for ever; it now ends FAILED (KILLED for an interrupt),
    tagged with the reason, and the error still reaches the caller. The trainer is a stand-in
    that returns a result at once: what runs is the driver's code after training. ``terminated``:
    SIGTERM to the process group during training (Ray's handler: SystemExit 15) killed the
    tracking relay too, and the driver died draining it before the run was ended (RUNNING)."""
    from types import SimpleNamespace

    import ray.train
    from mlflow import MlflowClient

    import dino_scale.data
    import dino_scale.engine.trainer
    import dino_scale.tracking.relay
    from dino_scale.engine import api, fit

    class Trainer:
        def fit(self):
            if failure == "terminated":
                raise SystemExit(15)
            path = tmp_path / "checkpoint_000001"
            path.mkdir(exist_ok=True)  # holds no weights: the copy fails
            checkpoint = None if failure == "no_checkpoint" else ray.train.Checkpoint(str(path))
            return SimpleNamespace(metrics={"step": 1}, checkpoint=checkpoint, metrics_dataframe=None)

    def interrupted_copy(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(api, "ensure_ray", lambda *args: None)
    monkeypatch.setattr(api, "quiet_progress_bars", lambda ds: None)
    monkeypatch.setattr(dino_scale.data, "build_train_dataset", lambda *args, **kwargs: object())
    monkeypatch.setattr(dino_scale.tracking.relay, "start_relay", lambda *args: object())
    monkeypatch.setattr(dino_scale.engine.trainer, "build_trainer", lambda *args, **kwargs: Trainer())
    drained = []

    def drain(relay, timeout_s):
        drained.append(relay)
        if relay is not None and failure == "terminated":
            raise RuntimeError("the relay actor died with its process group")

    monkeypatch.setattr(api, "_drain", drain)
    if failure == "interrupt":
        monkeypatch.setattr(api, "copy_final", interrupted_copy)
    train_dir, _ = data
    error = {"no_checkpoint": RuntimeError, "copy_failed": FileNotFoundError, "interrupt": KeyboardInterrupt,
             "terminated": SystemExit}
    with pytest.raises(error[failure]):
        fit(small_cfg(), train_dir, None, tmp_path / "work", unique("after-fit"), evaluate=False, progress=False,
            experiment="engine-test", storage_path=str(tmp_path / "ray"), tracking_close_timeout_s=5)
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("engine-test").experiment_id])
    expected = {"interrupt": ("KILLED", "interrupted while the results were saved"),
                "terminated": ("KILLED", "SystemExit: interrupted before training finished")}.get(
        failure, ("FAILED", f"{error[failure].__name__} after training"))
    assert (run.info.status, expected[1] in run.data.tags.get("error", "")) == (expected[0], True), run.data.tags
    assert drained and drained[0] is not None  # the relay was drained (after the run ended, when terminated)

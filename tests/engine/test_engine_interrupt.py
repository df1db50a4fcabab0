"""Ctrl-C during training (engine.api.fit on a real local Ray): the MLflow run ends KILLED and the
interrupt reaches the caller."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_fixtures import small_cfg, unique  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_interrupted_run_is_marked_killed_not_left_running(data, tmp_path, monkeypatch):
    """Ctrl-C (SIGINT) during training: the MLflow run ends KILLED, tagged with the reason, and the
    interrupt still reaches the caller. Was: ``fit`` ended the run only for an ``Exception``, so a
    KeyboardInterrupt (or the SystemExit Ray raises for it inside ray.get) left it RUNNING for
    ever (the MLflow UI showed a live run that was long dead)."""
    import os
    import signal

    from mlflow import MlflowClient

    from dino_scale.engine import fit
    from engine_fixtures import RaySession, watching
    from mlflow_store import seeded_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    seeded_store(tmp_path / "work")  # an empty store: no migrations inside the run
    train_dir, _ = data
    pid_file = tmp_path / "paused.pid"
    cfg = small_cfg(**{"train.num_workers": 1, "train.global_batch_size": 2, "train.zero_stage": 0,
                       "train.max_steps": 50, "train.checkpoint_every_steps": 50})

    def interrupt(done):
        while not pid_file.exists():  # the worker trained a step and paused
            if done.wait(0.05):
                return
        os.kill(os.getpid(), signal.SIGINT)

    with RaySession(num_cpus=4), watching(interrupt):
        with pytest.raises((KeyboardInterrupt, SystemExit)):  # Ray's ray.get raises SystemExit on SIGINT
            fit(cfg, train_dir, None, tmp_path / "work", unique("interrupted"), evaluate=False, progress=False,
                experiment="engine-test", test_hooks={"pid_file": str(pid_file), "pid_rank": 0,
                                                      "pid_after_step": 1, "pause_s": 120})
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("engine-test").experiment_id])
    assert run.info.status == "KILLED" and "interrupted" in run.data.tags["error"]

"""One live job per run folder: a second job under a run name a live job uses is refused before
it reads or writes anything (it resumed from, wrote and pruned the first job's checkpoints)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dino_scale.config import preset
from dino_scale.engine.run_lock import LOCK_NAME, RunInUseError, run_lock

_HOLD = ("import sys, time; from dino_scale.engine.run_lock import run_lock\n"
         "with run_lock(sys.argv[1], 'run'):\n"
         "    print('held', flush=True); time.sleep(120)\n")


@pytest.fixture
def held_elsewhere(tmp_path):
    """Another process holding ``tmp_path / 'runs' / 'r1'``; yields (folder, process)."""
    folder = tmp_path / "runs" / "r1"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield folder, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_run_folder_held_by_a_live_job_is_refused_and_freed_when_it_dies(held_elsewhere):
    folder, proc = held_elsewhere
    with pytest.raises(RunInUseError, match=rf"run 'r1' is in use by another job \(process {proc.pid} on .*"
                                            rf"Wait for that job to end, or use another run name"):
        with run_lock(folder, "run 'r1'"):
            pytest.fail("entered a held run")
    proc.kill()  # killed, as by the OOM killer: no cleanup ran, the kernel frees the lock
    proc.wait()
    with run_lock(folder, "run 'r1'") as path:
        assert path == folder / LOCK_NAME


def test_the_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    folder = tmp_path / "runs" / "r2"
    check = [sys.executable, "-c", "import sys; from dino_scale.engine.run_lock import run_lock\n"
             "with run_lock(sys.argv[1], 'run'): pass\n", str(folder)]
    with run_lock(folder, "run 'r2'"):
        with run_lock(folder, "run 'r2'"):  # a pipeline holds it, fit inside takes it again
            pass
        # still held by the outer block: another process is refused, by the lock (not any crash)
        refused = subprocess.run(check, capture_output=True, text=True)
        assert refused.returncode != 0
        assert (f"RunInUseError: run is in use by another job (process {os.getpid()} on " in refused.stderr
                and f"its folder {folder.resolve()} is locked" in refused.stderr), refused.stderr[-2000:]
    assert subprocess.run(check, capture_output=True, text=True).returncode == 0


def test_a_run_folder_left_empty_goes_with_its_lock(tmp_path):
    """A run refused before it wrote anything left ``runs/<name>/.run.lock`` per attempt: a
    folder the lock made that holds only the lock when it is released goes; one that holds
    anything else, or was there before, stays as it is."""
    empty, used, before = tmp_path / "runs" / "a", tmp_path / "runs" / "b", tmp_path / "runs" / "c"
    with pytest.raises(ValueError, match="refused"):
        with run_lock(empty, "run 'a'"):
            with run_lock(empty, "run 'a'"):  # re-entered (a pipeline around fit): removed at the outer end
                pass
            assert (empty / LOCK_NAME).is_file()
            raise ValueError("refused")
    assert not empty.exists() and (tmp_path / "runs").is_dir()
    with run_lock(used, "run 'b'"):
        (used / "final").mkdir()
    assert sorted(p.name for p in used.iterdir()) == [LOCK_NAME, "final"]
    before.mkdir()
    with run_lock(before, "run 'c'"):
        pass
    assert sorted(p.name for p in before.iterdir()) == [LOCK_NAME]


def test_a_lock_taken_on_a_file_its_last_holder_unlinked_is_taken_again(tmp_path, monkeypatch):
    """A holder releasing an empty run folder unlinks the lock file: a job that had opened that file
    just before, then locked it, held a file no later job sees, and a third job then took the new
    file: two live jobs in one run folder. The lock is taken again on the file at the path."""
    import fcntl

    from dino_scale.engine import run_lock as module

    folder = tmp_path / "runs" / "r"
    folder.mkdir(parents=True)
    (folder / LOCK_NAME).write_text("")
    real_flock, calls = fcntl.flock, []

    def flock_then_released_meanwhile(fd, op):
        real_flock(fd, op)
        calls.append(fd)
        if len(calls) == 1:  # the last holder's release: its file unlinked, a new one made by a third job
            os.unlink(folder / LOCK_NAME)
            (folder / LOCK_NAME).write_text("")

    monkeypatch.setattr(fcntl, "flock", flock_then_released_meanwhile)
    with run_lock(folder, "run 'r'") as path:
        monkeypatch.setattr(fcntl, "flock", real_flock)
        assert len(calls) == 2  # taken again
        check = [sys.executable, "-c", "import sys; from dino_scale.engine.run_lock import run_lock\n"
                 "with run_lock(sys.argv[1], 'run'): pass\n", str(folder)]
        refused = subprocess.run(check, capture_output=True, text=True)
        assert refused.returncode != 0 and "RunInUseError" in refused.stderr  # the file at the path is held
        assert path == folder / LOCK_NAME and module._held[str(path)][0] == calls[1]


def test_fit_refuses_a_run_a_live_job_uses_before_any_work(held_elsewhere, tmp_path):
    from dino_scale.engine import fit

    folder, proc = held_elsewhere
    with pytest.raises(RunInUseError, match=f"process {proc.pid}"):  # before the data (none there) is read
        fit(preset("tiny"), str(tmp_path / "no-data"), None, folder, "r1", progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]  # nothing written


def test_a_pipeline_with_a_run_name_in_use_exits_2_before_any_work(held_elsewhere, tmp_path, capsys, monkeypatch):
    from pipelines import _common as common
    from pipelines import pretrain_o365

    def no_ray(*args, **kwargs):
        raise AssertionError("the pipeline got as far as starting Ray")

    monkeypatch.setattr(common, "connect_ray", no_ray)
    folder, proc = held_elsewhere
    work = folder.parent.parent
    code = common.run_main(pretrain_o365.main, ["--work-dir", str(work), "--preset", "tiny", "--run-name", "r1"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"run 'r1' is in use by another job (process {proc.pid}" in err and "Traceback" not in err
    assert sorted(p.name for p in work.iterdir()) == ["runs"]  # no synthetic data, no store


def test_fit_holds_its_datasets_against_a_rewrite_while_it_runs(tmp_path, monkeypatch):
    """While ``fit`` runs, its train and val folders are held (shared): a conversion that would
    rewrite one is refused (tests/data/test_data_convert.py has the conversion side)."""
    from dino_scale.engine import api

    train, val = tmp_path / "train", tmp_path / "val"
    for folder in (train, val):
        folder.mkdir()
    probe = ("import sys; from dino_scale.data.readers import DatasetInUseError, rewriting_dataset\n"
             "try:\n    with rewriting_dataset(sys.argv[1], 'changed'): print('free')\n"
             "except DatasetInUseError: print('held')\n")
    seen = {}

    def run_probe(*args, **kwargs):
        for folder in (train, val):
            seen[folder.name] = subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True,
                                               text=True).stdout.strip()
        raise RuntimeError("stop here")

    monkeypatch.setattr(api, "_run", run_probe)
    with pytest.raises(RuntimeError, match="stop here"):
        api.fit(preset("tiny"), str(train), str(val), tmp_path / "runs" / "r", "r", progress=False)
    assert seen == {"train": "held", "val": "held"}
    assert subprocess.run([sys.executable, "-c", probe, str(train)], capture_output=True,
                          text=True).stdout.strip() == "free"  # released when fit returned


def test_the_evaluate_pipeline_locks_its_run_before_it_downloads(tmp_path, capsys, mlflow_store_restored):
    """The evaluate pipeline downloads a registry model into ``eval/<run>`` and removes that folder
    at the end: a second job of the same --run-name replaced the first one's download, then
    removed it. Its run is locked before anything is read or written."""
    import torch

    from dino_scale.config import to_dict
    from dino_scale.engine.checkpoint import save_weights
    from dino_scale.models import build_dino
    from pipelines import _common as common
    from pipelines import evaluate

    from mlflow.tracking import MlflowClient
    from mlflow_store import seeded_store

    cfg = preset("tiny")
    torch.manual_seed(0)
    save_weights(tmp_path / "model", build_dino(cfg.model)[0].state_dict(), config=to_dict(cfg))
    work = tmp_path / "work"
    uri = seeded_store(work)  # the work folder's own store, where the pipeline looks
    client = MlflowClient(uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("lock-test"))
    client.log_artifacts(run.info.run_id, str(tmp_path / "model"), "model")
    client.create_registered_model("dino-tiny-coco")
    client.create_model_version("dino-tiny-coco", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(work / "evaluations" / "e1")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = common.run_main(evaluate.main, ["--work-dir", str(work), "--model", "models:/dino-tiny-coco/1",
                                               "--run-name", "e1"])
        assert code == 2 and f"evaluation run 'e1' is in use by another job (process {holder.pid}" in (
            capsys.readouterr().err)
        assert not (work / "eval").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_pipeline_holds_its_datasets_until_it_has_registered(tmp_path, monkeypatch, mlflow_store_restored):
    """The pipelines read the data before ``fit`` (its categories: the class count) and after it
    (the val set's fingerprint at registration): a rewrite in between gave a stale class count or
    an AP registered with another set's fingerprint. They hold the folders from the moment they
    are resolved."""
    import dino_scale.engine
    from pipelines import _common as common
    from pipelines import pretrain_o365

    probe = ("import sys; from dino_scale.data.readers import DatasetInUseError, rewriting_dataset\n"
             "try:\n    with rewriting_dataset(sys.argv[1], 'changed'): print('free')\n"
             "except DatasetInUseError: print('held')\n")
    seen = []

    def probing_fit(cfg, train, val, *args, **kwargs):
        for folder in (train, val):
            seen.append(subprocess.run([sys.executable, "-c", probe, folder], capture_output=True,
                                       text=True).stdout.strip())
        raise RuntimeError("stop before training")

    monkeypatch.setattr(common, "connect_ray", lambda *a, **k: "not started (test)")
    monkeypatch.setattr(dino_scale.engine, "fit", probing_fit)
    with pytest.raises(RuntimeError, match="stop before training"):
        pretrain_o365.run(["--work-dir", str(tmp_path / "w"), "--preset", "tiny", "--synthetic-images", "8",
                           "--gpus", "0", "--run-name", "p1"])
    assert seen == ["held", "held"]

"""One live job per run folder: a second job under a run name a live job uses is refused before
it reads or writes anything (it resumed from, wrote and pruned the first job's checkpoints)."""
from __future__ import annotations

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
        # still held by the outer block: another process is refused
        assert subprocess.run(check, capture_output=True, text=True).returncode != 0
    assert subprocess.run(check, capture_output=True, text=True).returncode == 0


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

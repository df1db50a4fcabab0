"""`ray job submit` of pretrain_o365 then finetune_coco on a real `ray start --head`
cluster on 127.0.0.1; the registry is checked with the MLflow client afterwards. (The
evaluation pipeline of a registered model runs in tests/engine/test_engine_ray.py: a third
job cost ~80 s of Ray start-up on the 2-core CI box for what the in-process run checks.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow_store import seeded_store

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXCLUDES = [".git", ".venv", "tests/reference", "runs", "benchmarks/results", "build", "*.egg-info",
            ".pytest_cache", "csrc/build"]


def _free_port() -> int:
    from free_ports import listen_port  # bound later by `ray start`: outside the ephemeral range

    return listen_port()


def _env(token_path: Path) -> dict:
    """The cluster's and the client's environment: token auth on, with this test's own token file
    (``ray start --head`` makes no token: it refuses to start in token mode without one, and in a
    fresh home this test passed only where an earlier ``ray.init`` had written ~/.ray/auth_token)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token_path)}
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    return env


def _submit(dash_port: int, runtime_env: dict, entrypoint: list[str], token_path: Path) -> subprocess.CompletedProcess:
    """``ray job submit``; resubmitted while the new head's job agent has not registered yet (Ray
    refuses with 'No available agent to submit job' before it creates a job: seen on a loaded
    2-core box a few seconds after ``ray start``), for up to 90 s."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash_port}",
           "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    deadline = time.monotonic() + 90
    while True:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(token_path), capture_output=True, text=True, timeout=480)
        if proc.returncode == 0 or "No available agent to submit job" not in proc.stderr + proc.stdout \
                or time.monotonic() > deadline:
            return proc
        time.sleep(3)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipelines_ray_job_submit_pretrain_then_finetune(tmp_path, ray_lock):
    from mlflow import MlflowClient

    import secrets

    gcs, dash = _free_port(), _free_port()
    token = tmp_path / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    uri = seeded_store(tmp_path)
    work = tmp_path / "work"
    runtime_env = {"excludes": EXCLUDES,
                   "env_vars": {"MLFLOW_TRACKING_URI": uri, "DS_ACCELERATOR": "cpu",
                                "RAY_USAGE_STATS_ENABLED": "0"}}
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
         "--disable-usage-stats", "--port", str(gcs), "--dashboard-port", str(dash), "--num-cpus", "4"],
        env=_env(token), capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        common = ["--work-dir", str(work), "--preset", "tiny", "--max-steps", "2", "--synthetic-images", "8",
                  "--set", "data.batch_size=2", "--set", "train.global_batch_size=2"]
        pre = _submit(dash, runtime_env, ["python", "-m", "pipelines.pretrain_o365", *common,
                                          "--run-name", f"job-pre-{gcs}"], token)
        assert pre.returncode == 0, pre.stdout[-4000:] + pre.stderr[-2000:]
        assert "succeeded" in (pre.stdout + pre.stderr).lower()
        assert "joined Ray cluster" in pre.stdout  # the job used the cluster, not an embedded Ray
        assert "models:/dino-tiny-o365@pretrained" in pre.stdout
        # no --gpus on a cluster without GPUs: CPU workers, and the run says why (was: the GPU
        # default asked the head node's torch only, before joining: CPU on a GPU cluster too)
        assert "1 CPU worker(s)" in pre.stdout and "training on CPU: the joined cluster has no GPU" in pre.stdout
        ft = _submit(dash, runtime_env, ["python", "-m", "pipelines.finetune_coco", *common,
                                         "--run-name", f"job-ft-{gcs}"], token)
        assert ft.returncode == 0, ft.stdout[-4000:] + ft.stderr[-2000:]
        assert "succeeded" in (ft.stdout + ft.stderr).lower()
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=_env(token), capture_output=True, timeout=120)

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    pre_versions = client.search_model_versions("name='dino-tiny-o365'")
    assert [str(v.version) for v in pre_versions] == ["1"]
    pretrained = client.get_model_version_by_alias("dino-tiny-o365", "pretrained")
    assert str(pretrained.version) == "1" and pretrained.tags["synthetic_data"] == "true"
    pre_run = client.get_run(pretrained.run_id)
    assert pre_run.info.status == "FINISHED"
    assert client.get_experiment(pre_run.info.experiment_id).name == "pretrain-o365"
    # the job's cwd is Ray's temporary copy of the working dir: the registered weights must
    # live next to the sqlite DB instead (MLflow's default ./mlruns would put them in that copy)
    assert pretrained.source.startswith((tmp_path / "mlartifacts" / "pretrain-o365").as_uri())
    assert list((tmp_path / "mlartifacts").rglob("model.safetensors"))

    coco_versions = client.search_model_versions("name='dino-tiny-coco'")
    assert [str(v.version) for v in coco_versions] == ["1"]
    v = coco_versions[0]
    # lineage: source model name/version/run id, on the registered version and on the run
    assert v.tags["source.model_name"] == "dino-tiny-o365"
    assert v.tags["source.model_version"] == "1"
    assert v.tags["source.run_id"] == pretrained.run_id
    ft_run = client.get_run(v.run_id)
    assert ft_run.data.tags["source.run_id"] == pretrained.run_id
    assert ft_run.data.tags["source.uri"] == "models:/dino-tiny-o365@pretrained"
    assert client.get_experiment(ft_run.info.experiment_id).name == "finetune-coco"
    # COCO/Objects365 boxes lie on the stored pixels: both stages read them so (the official reading)
    assert pre_run.data.params["data.exif_orientation"] == ft_run.data.params["data.exif_orientation"] == "stored"
    # the class-mapped initial weights are kept with the run; the downloaded source copy is not
    init_dir = work / "init" / f"job-ft-{gcs}"
    assert (init_dir / "model.safetensors").is_file() and not (init_dir / "source").exists()
    # the first fine-tuned version with a measured AP becomes champion, AP tagged
    assert "AP" in v.tags and 0.0 <= float(v.tags["AP"]) <= 1.0
    assert len(v.tags["eval.data"]) == 16 and v.tags["eval.tta"] == "false"  # what the AP was measured on
    assert v.tags["synthetic_data"] == "true"  # a real-data version takes @champion from it
    assert str(client.get_model_version_by_alias("dino-tiny-coco", "champion").version) == "1"


"""Bad use of the pipelines: one `error: ...` line, non-zero exit, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", *args, "--work-dir", str(tmp_path / "w")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err_lines) == 1, proc.stderr[-2000:]
    assert err_lines[0].startswith("error: "), err_lines
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in err_lines[0], err_lines[0]


@pytest.mark.parametrize("args,needles", [
    (["pipelines.pretrain_o365", "--preset", "tinny"], ["unknown preset 'tinny'", "tiny"]),
    (["pipelines.finetune_coco", "--preset", "r50_4scal"], ["unknown preset"]),
    (["pipelines.pretrain_o365", "--set", "model.hidden_dims=64"], ["unknown config key 'model.hidden_dims'"]),
    (["pipelines.finetune_coco", "--set", "train.lr"], ["section.key=value"]),
    (["pipelines.pretrain_o365", "--set", "train.max_steps=two"], ["bad value"]),
    (["pipelines.pretrain_o365", "--data", "/nonexistent/o365"], ["dataset path not found: /nonexistent/o365"]),
    (["pipelines.evaluate", "--model", "/nonexistent/model.pth"], ["model not found: /nonexistent/model.pth"]),
])
def test_pipelines_bad_use_fails_fast(args, needles, tmp_path):
    _assert_one_line_error(_run(args, tmp_path), *needles)


def test_pipelines_bad_use_unknown_registry_name(tmp_path):
    proc = _run(["pipelines.finetune_coco", "--preset", "tiny", "--init", "models:/no-such-model@pretrained"],
                tmp_path)
    _assert_one_line_error(proc, "models:/no-such-model@pretrained", "not found")


def test_pipelines_bad_use_data_not_a_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = _run(["pipelines.finetune_coco", "--init", "none", "--data", str(tmp_path / "empty")], tmp_path)
    _assert_one_line_error(proc, "not a dataset folder")
    ann = tmp_path / "ann.json"
    ann.write_text("{}")
    proc = _run(["pipelines.pretrain_o365", "--data", str(ann)], tmp_path)
    _assert_one_line_error(proc, "--images")

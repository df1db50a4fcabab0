"""benchmarks/train_step.py: steps that train_step skipped (non-finite loss: no weight update)
are counted, and a row that timed one is an error row, not a throughput; the
inference row's peak comes after the training state is freed."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_module import load_benchmark  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--device", "cpu", "--preset", "tiny", "--iters", "2", "--warmup", "1", "--height", "64", "--width", "64",
        "--batch-sizes", "1"]


def _train_step_module():
    return load_benchmark("train_step")


def test_row_counts_skipped_steps_warmup_apart():
    row_of = _train_step_module().train_row
    ok = row_of("tiny", 2, "fp32", [0.2, 0.1, 0.3], [False] * 4, 1.0)
    assert ok.skipped_steps == 0 and ok.median_s == 0.2 and ok.throughput == 10 and ok.note == ""
    warm = row_of("tiny", 2, "fp32", [0.2, 0.1, 0.3], [True, False, False, False], 1.0)
    assert warm.skipped_steps == 0 and warm.warmup_skipped == 1 and warm.median_s == 0.2 and "warm-up" in warm.note
    bad = row_of("tiny", 2, "fp32", [0.2, 0.1, 0.3], [False, False, True, False], 1.0)
    assert bad.skipped_steps == 1 and math.isnan(bad.median_s) and math.isnan(bad.throughput)
    assert bad.note.startswith("error: 1 of 3 timed steps skipped")


@pytest.mark.parametrize("check", ["host", "device"])
def test_a_non_finite_loss_makes_an_error_row(tmp_path, monkeypatch, check):
    # the loss (not the benchmark) made NaN: one loss weight NaN, so the real train_step skips;
    # checked on the device (fused AdamW), each step's verdict is read after the timed loop
    module = _train_step_module()
    real_build = module.build

    def build_with_nan_loss(*args, **kwargs):
        cfg, model, criterion, post = real_build(*args, **kwargs)
        key = next(iter(criterion.weight_dict))
        criterion.weight_dict = {**criterion.weight_dict, key: float("nan")}
        return cfg, model, criterion, post

    monkeypatch.setattr(module, "build", build_with_nan_loss)
    out = tmp_path / "rows.json"
    rows = module.main(TINY + ["--out", str(out), "--finite-check", check])
    train = [r for r in rows if r.mode == "train"]
    assert [(r.skipped_steps, r.warmup_skipped) for r in train] == [(2, 1)]
    assert math.isnan(train[0].throughput) and train[0].note.startswith("error:")
    saved = json.loads(out.read_text())["rows"][0]
    assert saved["skipped_steps"] == 2 and saved["note"].startswith("error:")


def test_finite_run_skips_nothing_and_frees_the_optimizer_before_inference(tmp_path, monkeypatch):
    module = _train_step_module()
    freed = []
    real_free = module.free_training_state

    def free(opt, model, device):
        real_free(opt, model, device)
        freed.append((len(opt.state), sum(p.grad is not None for p in model.parameters())))

    monkeypatch.setattr(module, "free_training_state", free)
    rows = module.main(TINY + ["--out", str(tmp_path / "rows.json")])
    assert [(r.mode, r.skipped_steps, r.note) for r in rows] == [("train", 0, ""), ("infer", 0, "")]
    assert freed == [(0, 0)]
    assert all(torch.isfinite(torch.tensor(r.throughput)) for r in rows)


def test_the_recorder_reads_a_device_verdict_only_once_it_is_ready():
    class Verdict:
        def __init__(self, skipped):
            self.is_ready, self.skipped = False, skipped

        def ready(self):
            return self.is_ready

    class Output:
        def __init__(self, verdict):
            self.verdict = verdict
            self.reads = 0

        @property
        def skipped(self):
            self.reads += 1
            return self.verdict.skipped

    outputs = [Output(Verdict(k == 1)) for k in range(3)]
    it = iter(outputs)
    recorder = _train_step_module().StepRecorder(lambda: next(it))
    recorder()
    recorder()  # the first verdict has not reached the host: not read (a read would wait)
    assert outputs[0].reads == 0 and recorder.flags[0] is outputs[0]
    outputs[0].verdict.is_ready = outputs[1].verdict.is_ready = True
    recorder()  # both ready now: read without a wait and dropped (their pinned buffers are freed)
    assert recorder.flags[:2] == [False, True] and recorder.flags[2] is outputs[2]
    assert recorder.skipped == [False, True, False]  # after the timing: the last one is read, waiting

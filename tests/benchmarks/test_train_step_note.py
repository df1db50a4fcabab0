"""benchmarks/train_step.py's note on a ``--cuda-graphs`` row: "cuda graph", or why not - the
capture failure itself (type, message, where), so the results JSON keeps it (it was "cuda graph
not used (see log)" while the log was not kept)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_module import load_benchmark  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _train_step_module():
    return load_benchmark("train_step")


def _graphed(replays=0, failure=None):
    return SimpleNamespace(stats={"replays": replays}, last_capture_failure=failure)


def test_note_names_the_capture_failure_and_keeps_its_place():
    note_of = _train_step_module().graph_note
    cuda = torch.device("cuda")
    assert note_of(_graphed(replays=3), cuda) == "cuda graph"
    short = "RuntimeError: CUDA error: operation not permitted when stream is capturing (at models/swin.py:71)"
    assert note_of(_graphed(failure=short), cuda) == "cuda graph not used: " + short
    long = "BackendCompilerFailed: " + "x" * 400 + " (at _inductor/foo.py:12; dino_scale models/swin.py:71)"
    note = note_of(_graphed(failure=long), cuda)
    assert len(note) <= 220 and note.startswith("cuda graph not used: BackendCompilerFailed: xxx")
    assert note.endswith("... (at _inductor/foo.py:12; dino_scale models/swin.py:71)")
    assert note_of(_graphed(), torch.device("cpu")) == "cuda graph not used: cpu device, ran eagerly"


def test_cpu_run_writes_the_note_to_the_json(tmp_path):
    out = tmp_path / "rows.json"
    rows = _train_step_module().main(["--device", "cpu", "--preset", "tiny", "--batch-sizes", "", "--cuda-graphs",
                                      "--iters", "1", "--warmup", "0", "--height", "64", "--width", "64",
                                      "--out", str(out)])
    assert [r.note for r in rows] == ["cuda graph not used: cpu device, ran eagerly"]
    assert json.loads(out.read_text())["rows"][0]["note"] == rows[0].note


def test_each_row_is_in_the_json_as_soon_as_it_is_measured(tmp_path, monkeypatch):
    """The rows were written once every preset was done: a step killed by gpu_check's time limit
    during the inference row lost its finished training rows too. The JSON is rewritten after
    each row, and says which deformable-attention kernel the rows ran (a failed build falls back
    to the PyTorch backend, whose numbers must not be read as the CUDA kernel's)."""
    module = _train_step_module()
    out = tmp_path / "rows.json"
    seen = []

    class Killed(Exception):
        pass

    def killed_at_inference(*args, **kwargs):  # the time limit, reached in the inference row
        seen.append(json.loads(out.read_text()))
        raise Killed

    monkeypatch.setattr(module, "synthetic_batch", _killed_on_second_call(module.synthetic_batch, killed_at_inference))
    try:
        module.main(["--device", "cpu", "--preset", "tiny", "--batch-sizes", "1", "--iters", "1", "--warmup", "0",
                     "--height", "64", "--width", "64", "--out", str(out)])
    except Killed:
        pass
    (saved,) = seen
    assert [(r["mode"], r["batch_size"]) for r in saved["rows"]] == [("train", 1)]
    assert saved["msda"]["cuda_extension_loaded"] is False  # (no GPU here: the PyTorch backend ran)


def _killed_on_second_call(real, kill):
    calls = []

    def batch(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) if len(calls) == 1 else kill()
    return batch

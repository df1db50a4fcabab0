"""benchmarks/train_step.py's note on a ``--cuda-graphs`` row: "cuda graph", or why not - the
capture failure itself (type, message, where), so the results JSON keeps it (it was "cuda graph
not used (see log)" while the log was not kept)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[2]


def _train_step_module():
    name = "bench_train_step"  # the name test_bench_commands.py loads it under
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "train_step.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return module


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

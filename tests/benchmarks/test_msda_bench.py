"""benchmarks/msda.py: the level tables the model uses, the output check before timing, the timer
recorded in the JSON, MiB labels."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_module import load_benchmark  # noqa: E402

# what torch (2.x) raises when a meta tensor is read back: .tolist()/.cpu() ("Cannot copy out of
# meta tensor; no data!", NotImplementedError) or .item()/int() ("... cannot be called on meta tensors")
META_READ_BACK = r"Cannot copy out of meta tensor; no data!|cannot be called on meta tensors"

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(batch=1, levels=[(6, 8), (3, 4)], heads=2, dim=4, points=2, queries=5)


def _msda():
    return load_benchmark("msda")


def test_pytorch_rows_read_no_level_sizes_back_per_call():
    # meta tensors stand in for GPU ones (as in tests/ops): reading one back raises, where on a GPU
    # it would be a sync per call that the model, which passes the cached pair, never pays
    msda = _msda()
    inputs = msda.make_inputs(**SMALL, device="meta")
    rows = [(n, d, fn) for n, d, fn in msda.implementations("cpu", ["fp32"]) if n == "pytorch"]
    assert rows
    timer, _, _ = msda._timer("cpu", 0, 1)
    for _, dname, fn in rows:
        fwd, fb, peak = msda.bench_one(fn, msda.as_dtype(inputs, msda.DTYPES[dname]), "meta", timer)
        assert fwd >= 0 and fb >= 0 and peak is None
    # the tables the script used to build (plain .to(device)) are read back on every call
    value, _, _, loc, w = inputs
    uncached = torch.tensor(SMALL["levels"]).to("meta"), torch.tensor([0, 48]).to("meta")
    with pytest.raises((RuntimeError, NotImplementedError), match=META_READ_BACK):
        rows[0][2](value, *uncached, loc, w)


def test_a_row_whose_output_is_wrong_is_failed_not_timed():
    msda = _msda()
    inputs = msda.make_inputs(**SMALL, device="cpu")
    ref = msda.reference(inputs)
    timer, _, _ = msda._timer("cpu", 0, 1)
    good = msda.run_row("decoder", 5, "pytorch", "fp32", lambda *a: msda.ms_deform_attn(*a, backend="pytorch"),
                        inputs, ref, "cpu", timer)
    assert good["checked"] and good["max_rel_err"] == 0 and good["error"] is None and good["fwd_ms"] >= 0
    off = msda.run_row("decoder", 5, "off", "fp32", lambda *a: msda.ms_deform_attn(*a, backend="pytorch") * 1.01,
                       inputs, ref, "cpu", timer)
    assert not off["checked"] and off["fwd_ms"] is None and "output check failed" in off["error"]
    assert off["max_rel_err"] == pytest.approx(0.01, rel=1e-3)
    nan = msda.run_row("decoder", 5, "nan", "bf16", lambda *a: torch.full_like(ref, float("nan")),
                       inputs, ref, "cpu", timer)
    assert not nan["checked"] and nan["fwd_ms"] is None
    # bf16 value: compared with the fp32 backend on the same (rounded) value, within 2e-2
    bf16 = msda.as_dtype(inputs, torch.bfloat16)
    row = msda.run_row("decoder", 5, "pytorch", "bf16", lambda *a: msda.ms_deform_attn(*a, backend="pytorch"),
                       bf16, msda.reference(bf16), "cpu", timer)
    assert row["checked"] and 0 < row["max_rel_err"] <= 2e-2


def test_cpu_json_records_the_timer_the_check_and_mib(tmp_path):
    out = tmp_path / "msda.json"
    assert _msda().main(["--device", "cpu", "--small", "--warmup", "0", "--reps", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["timer"] == "time.perf_counter"
    assert set(report["msda"]) == {"cuda_extension_loaded", "load_error"}  # which kernel the CUDA rows ran
    assert report["timer_settings"] == {"warmup": 0, "reps": 1, "return_mode": "median"}
    assert [r["call"] for r in report["rows"]] == ["encoder", "decoder"]
    for row in report["rows"]:
        assert row["checked"] and row["max_rel_err"] == 0 and row["error"] is None
        assert "bwd_peak_extra_mib" in row and "bwd_peak_extra_mb" not in row


def test_gpu_timer_settings_are_what_runs():
    # built only (nothing is timed): the JSON's settings are those the timer is called with
    msda = _msda()
    pytest.importorskip("triton.testing")
    _, name, settings = msda._timer("cuda", 3, 20, "do_bench")
    assert name == "triton.testing.do_bench" and settings["warmup_ms"] == 25 and settings["rep_ms"] == 100
    _, name, settings = msda._timer("cuda", 3, 20, "events")
    assert name == "cuda_events" and settings == {"warmup": 3, "reps": 20, "return_mode": "median"}

"""Benchmark of multi-scale deformable attention at the DINO shapes.

    python benchmarks/msda.py                       # GPU: our kernel (fp32/bf16/fp16), PyTorch, deformops
    python benchmarks/msda.py --timer events --warmup 5 --reps 50   # GPU, CUDA events over --reps runs
    python benchmarks/msda.py --device cpu --small  # CPU: the PyTorch backend at a reduced shape

Times forward and forward+backward for the encoder (all tokens as queries) and decoder (1100
queries) calls, and on CUDA the peak extra memory of the backward in MiB (peak allocated during
backward minus allocated before it). Timers (``--timer``; the JSON's ``timer`` and
``timer_settings`` say which ran, with its settings):

- ``do_bench`` (GPU, the default when triton imports): ``triton.testing.do_bench(warmup=25,
  rep=100, return_mode="median")``: about 25 ms of warm-up runs, then as many runs as fit in
  about 100 ms (the count comes from a 5-run estimate), queued back to back with the L2 cache
  flushed before each; median ms. ``--warmup`` and ``--reps`` do not apply.
- ``events`` (GPU; the default without triton): ``--warmup`` runs, then ``--reps`` runs, each
  timed by CUDA events and synchronized (L2 not flushed); median ms.
- on CPU: ``--warmup`` runs, then ``--reps`` runs timed by ``time.perf_counter``; median ms.

Every implementation uses the level tables the model uses (``level_index_tensors``: cached, so
the PyTorch backend reads no sizes back from the device per call). Before it is timed at a shape,
its forward output is compared with the fp32 PyTorch backend's on the same inputs (value rounded
to the row's dtype first): max |out - ref| / max |ref| at most 1e-4 (fp32) or 2e-2 (bf16/fp16).
A row that fails the check, or raises, is reported as failed and not timed. Prints a table and
writes JSON (default benchmarks/results/msda.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dino_scale.ops import level_index_tensors, ms_deform_attn, ms_deform_attn_pytorch  # noqa: E402

DINO_LEVELS = [(100, 150), (50, 75), (25, 38), (13, 19)]
SMALL_LEVELS = [(25, 38), (13, 19), (7, 10), (4, 5)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# output check against the fp32 PyTorch backend: max |out - ref| / max |ref|
CHECK_TOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}
DO_BENCH = dict(warmup=25, rep=100, return_mode="median")  # triton.testing.do_bench's settings here


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_inputs(batch, levels, heads, dim, points, queries, device, seed=0):
    """fp32 (value, spatial_shapes, level_start_index, sampling_locations, attention_weights) on
    ``device``. The level tables are the model's: the cached pair of ``level_index_tensors``
    (tables made with a plain ``.to(device)`` make the PyTorch backend read the sizes back from
    the device on every call, a GPU sync the model never pays)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = sum(h * w for h, w in levels)
    n_lvl = len(levels)
    value = torch.randn(batch, s, heads, dim, generator=g).to(device)
    loc = torch.rand(batch, queries, heads, n_lvl, points, 2, generator=g).to(device)
    w = torch.rand(batch, queries, heads, n_lvl * points, generator=g).softmax(-1)
    w = w.view(batch, queries, heads, n_lvl, points).to(device)
    shapes, starts = level_index_tensors(levels, device)
    return value, shapes, starts, loc, w


def as_dtype(inputs, dtype):
    """``inputs`` with value in ``dtype`` (locations and weights stay fp32, as the model passes them)."""
    value, shapes, starts, loc, w = inputs
    return (value.to(dtype), shapes, starts, loc, w)


def reference(inputs) -> torch.Tensor:
    """The fp32 PyTorch backend's forward output on ``inputs`` (value upcast to fp32)."""
    value, shapes, starts, loc, w = inputs
    with torch.no_grad():
        return ms_deform_attn_pytorch(value.float(), shapes, starts, loc.float(), w.float())


def output_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (inf for a wrong shape; NaN when out has NaN)."""
    if tuple(out.shape) != tuple(ref.shape):
        return float("inf")
    scale = ref.abs().max().clamp_min(1e-30)
    return float((out.float() - ref).abs().max() / scale)


def deformops_fns() -> dict:
    """`deformops` (PyPI 3.0.1, Python >= 3.12) backends when importable: name -> fn.

    Its functional entry point is ``deformops.registry.msda(value, spatial_shapes,
    level_start_index, sampling_locations, attention_weights, backend=Backend.X)``; it wants the
    attention weights in value's dtype."""
    try:
        from deformops.registry import Backend, msda
    except Exception as exc:  # noqa: BLE001
        print(f"deformops: not importable ({type(exc).__name__}); skipped")
        return {}

    def make(backend):
        def fn(v, s, i, l_, w):
            return msda(v, s, i, l_, w.to(v.dtype), backend=backend)
        return fn
    return {"deformops-triton": make(Backend.TRITON), "deformops-cuda": make(Backend.CUDA)}


def _timer(device: str, warmup: int, reps: int, kind: str = "auto"):
    """(timer fn -> median ms, timer name, its settings) for ``device`` and ``--timer kind``."""
    if device == "cuda":
        if kind in ("auto", "do_bench"):
            try:
                from triton.testing import do_bench
            except Exception as exc:  # noqa: BLE001
                if kind == "do_bench":
                    raise ImportError(f"{type(exc).__name__}: {exc}") from exc
            else:
                return (lambda fn: float(do_bench(fn, **DO_BENCH)), "triton.testing.do_bench",
                        {"warmup_ms": DO_BENCH["warmup"], "rep_ms": DO_BENCH["rep"],
                         "return_mode": DO_BENCH["return_mode"], "l2_flushed_per_run": True})

        def cuda_events(fn):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(); fn(); b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            return statistics.median(times)
        return cuda_events, "cuda_events", {"warmup": warmup, "reps": reps, "return_mode": "median"}

    def cpu_timer(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter(); fn(); times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return cpu_timer, "time.perf_counter", {"warmup": warmup, "reps": reps, "return_mode": "median"}


def bench_one(fn, inputs, device, timer):
    value, shapes, starts, loc, w = inputs
    with torch.no_grad():
        fwd_ms = timer(lambda: fn(value, shapes, starts, loc, w))
    v, l_, w_ = (t.detach().clone().requires_grad_() for t in (value, loc, w))
    gout = torch.randn_like(fn(value, shapes, starts, loc, w))

    def fwd_bwd():
        v.grad = l_.grad = w_.grad = None
        fn(v, shapes, starts, l_, w_).backward(gout)
    fb_ms = timer(fwd_bwd)
    peak_mib = None
    if device == "cuda":
        v.grad = l_.grad = w_.grad = None
        out = fn(v, shapes, starts, l_, w_)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out.backward(gout)
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    return fwd_ms, fb_ms, peak_mib


def implementations(device: str, dtypes: list, cpp_cpu: bool = False) -> list:
    """[(name, dtype name, fn(value, spatial_shapes, level_start_index, locations, weights))]."""
    impls = []
    if device == "cuda":
        for name in dtypes:
            impls.append(("ours-cuda", name, lambda *a: ms_deform_attn(*a, backend="cuda")))
    impls.append(("pytorch", "fp32", lambda *a: ms_deform_attn(*a, backend="pytorch")))
    if device == "cpu" and cpp_cpu:
        from dino_scale.ops import ms_deform_attn_cuda
        ms_deform_attn_cuda.load()
        impls.append(("ours-cpp-cpu", "fp32", torch.ops.dino_scale.ms_deform_attn_forward))
    if device == "cuda":
        impls.append(("pytorch", "bf16", lambda *a: ms_deform_attn(*a, backend="pytorch")))
        for name, dfn in deformops_fns().items():
            impls += [(name, "fp32", dfn), (name, "bf16", dfn)]
    return impls


def run_row(call, queries, name, dname, fn, inputs, ref, device, timer) -> dict:
    """One table row: the output check, then (passed) the timings; a failure is recorded, not raised."""
    row = dict(call=call, impl=name, dtype=dname, queries=queries, checked=False, max_rel_err=None,
               check_tol=CHECK_TOL[dname], fwd_ms=None, fwd_bwd_ms=None, bwd_peak_extra_mib=None, error=None)
    try:
        with torch.no_grad():
            err = output_error(fn(*inputs), ref)
        row["max_rel_err"] = err
        if not err <= CHECK_TOL[dname]:  # NaN fails too
            row["error"] = f"output check failed: max rel err {err:.3g} > {CHECK_TOL[dname]:g}"
            return row
        row["checked"] = True
        row["fwd_ms"], row["fwd_bwd_ms"], row["bwd_peak_extra_mib"] = bench_one(fn, inputs, device, timer)
    except Exception as exc:  # noqa: BLE001 - one failing implementation must not hide the rest
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="reduced shape (batch 1, levels /4)")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16", help="dtypes for the CUDA kernel")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--timer", choices=("auto", "do_bench", "events"), default="auto",
                    help="GPU timer: triton.testing.do_bench (auto when triton imports; ignores --warmup/--reps) "
                         "or CUDA events over --reps runs after --warmup; CPU: always time.perf_counter")
    ap.add_argument("--cpp-cpu", action="store_true",
                    help="on CPU, also time the compiled library's CPU kernel (loads it; builds it if missing)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "msda.json"))
    args = ap.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    unknown = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown:  # found only at its turn otherwise, after the dtypes before it were timed
        ap.error(f"--dtypes: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(DTYPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no GPU is visible")

    levels = SMALL_LEVELS if args.small else DINO_LEVELS
    batch = 1 if args.small else 2
    heads, dim, points = 8, 32, 4
    calls = {"encoder": sum(h * w for h, w in levels), "decoder": 300 if args.small else 1100}
    try:
        timer, timer_name, timer_settings = _timer(args.device, args.warmup, args.reps, args.timer)
    except ImportError as exc:
        ap.error(f"--timer do_bench: triton.testing does not import ({exc})")
    impls = implementations(args.device, args.dtypes.split(","), args.cpp_cpu)

    rows = []
    for call, queries in calls.items():
        base = make_inputs(batch, levels, heads, dim, points, queries, args.device)
        refs = {}  # dtype name -> the fp32 PyTorch backend's output on the inputs of that dtype
        for name, dname, fn in impls:
            inputs = as_dtype(base, DTYPES[dname])
            if dname not in refs:
                refs[dname] = reference(inputs)
            row = run_row(call, queries, name, dname, fn, inputs, refs[dname], args.device, timer)
            if row["error"]:
                print(f"{name} {dname} {call}: failed: {row['error']}")
            rows.append(row)
        del base, refs

    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(f"\nms_deform_attn on {args.device} ({dev_name}); batch {batch}, levels {levels}, "
          f"{heads} heads x {dim}, {points} points; {timer_name} {timer_settings}; median ms")
    print(f"{'call':8} {'impl':16} {'dtype':5} {'queries':>7} {'max rel err':>11} {'fwd ms':>9} {'fwd+bwd ms':>11} "
          f"{'bwd peak MiB':>12}")
    for r in rows:
        err = "-" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        head = f"{r['call']:8} {r['impl']:16} {r['dtype']:5} {r['queries']:>7} {err:>11}"
        if r["error"]:
            print(f"{head} failed: {r['error']}")
            continue
        peak = "-" if r["bwd_peak_extra_mib"] is None else f"{r['bwd_peak_extra_mib']:.1f}"
        print(f"{head} {r['fwd_ms']:>9.3f} {r['fwd_bwd_ms']:>11.3f} {peak:>12}")
    from dino_scale.ops import ms_deform_attn_cuda  # which kernel the ours-cuda rows ran, as train_step.py says

    report = dict(device=args.device, device_name=dev_name, torch=torch.__version__,
                  msda={"cuda_extension_loaded": ms_deform_attn_cuda.is_loaded(),
                        "load_error": ms_deform_attn_cuda.load_error()},
                  cpu_threads=torch.get_num_threads(), load_avg_1m=os.getloadavg()[0], batch=batch, levels=levels,
                  heads=heads, head_dim=dim, points=points, small=args.small,
                  timer=timer_name, timer_settings=timer_settings,
                  command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                  rows=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

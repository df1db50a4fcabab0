"""Benchmark of multi-scale deformable attention at the DINO shapes.

    python benchmarks/msda.py                       # GPU: our kernel (fp32/bf16/fp16), PyTorch, deformops
    python benchmarks/msda.py --device cpu --small  # CPU: the PyTorch backend at a reduced shape

Times forward and forward+backward (median over --reps runs after --warmup; CUDA events, or
triton.testing.do_bench when available; time.perf_counter on CPU) for the encoder (all
tokens as queries) and decoder (1100 queries) calls, and on CUDA the peak extra memory of the
backward (peak allocated during backward minus allocated before it). Prints a table and
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
from dino_scale.ops import ms_deform_attn  # noqa: E402

DINO_LEVELS = [(100, 150), (50, 75), (25, 38), (13, 19)]
SMALL_LEVELS = [(25, 38), (13, 19), (7, 10), (4, 5)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_inputs(batch, levels, heads, dim, points, queries, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.int64)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    s, n_lvl = int(areas.sum()), len(levels)
    value = torch.randn(batch, s, heads, dim, generator=g).to(device=device, dtype=dtype)
    loc = torch.rand(batch, queries, heads, n_lvl, points, 2, generator=g).to(device)
    w = torch.rand(batch, queries, heads, n_lvl * points, generator=g).softmax(-1)
    w = w.view(batch, queries, heads, n_lvl, points).to(device)
    return value, shapes.to(device), starts.to(device), loc, w


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


def _timer(device: str, warmup: int, reps: int):
    if device == "cuda":
        try:
            from triton.testing import do_bench
            return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except Exception:  # noqa: BLE001
            pass

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
        return cuda_events

    def cpu_timer(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter(); fn(); times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return cpu_timer


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
    peak_mb = None
    if device == "cuda":
        v.grad = l_.grad = w_.grad = None
        out = fn(v, shapes, starts, l_, w_)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out.backward(gout)
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    return fwd_ms, fb_ms, peak_mb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="reduced shape (batch 1, levels /4)")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16", help="dtypes for the CUDA kernel")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
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
    timer = _timer(args.device, args.warmup, args.reps)

    impls = []  # (name, dtype name, fn)
    if args.device == "cuda":
        for name in args.dtypes.split(","):
            impls.append(("ours-cuda", name, lambda *a: ms_deform_attn(*a, backend="cuda")))
    impls.append(("pytorch", "fp32", lambda *a: ms_deform_attn(*a, backend="pytorch")))
    if args.device == "cpu" and args.cpp_cpu:
        from dino_scale.ops import ms_deform_attn_cuda
        ms_deform_attn_cuda.load()
        impls.append(("ours-cpp-cpu", "fp32", torch.ops.dino_scale.ms_deform_attn_forward))
    if args.device == "cuda":
        impls.append(("pytorch", "bf16", lambda *a: ms_deform_attn(*a, backend="pytorch")))
        for name, dfn in deformops_fns().items():
            impls += [(name, "fp32", dfn), (name, "bf16", dfn)]

    rows = []
    for call, queries in calls.items():
        for name, dname, fn in impls:
            inputs = make_inputs(batch, levels, heads, dim, points, queries, DTYPES[dname], args.device)
            try:
                fwd, fb, peak = bench_one(fn, inputs, args.device, timer)
            except Exception as exc:  # noqa: BLE001 - one failing implementation must not hide the rest
                print(f"{name} {dname} {call}: failed: {type(exc).__name__}: {exc}")
                continue
            rows.append(dict(call=call, impl=name, dtype=dname, queries=queries, fwd_ms=fwd,
                             fwd_bwd_ms=fb, bwd_peak_extra_mb=peak))

    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(f"\nms_deform_attn on {args.device} ({dev_name}); batch {batch}, levels {levels}, "
          f"{heads} heads x {dim}, {points} points; median ms")
    print(f"{'call':8} {'impl':16} {'dtype':5} {'queries':>7} {'fwd ms':>9} {'fwd+bwd ms':>11} {'bwd peak MB':>12}")
    for r in rows:
        peak = "-" if r["bwd_peak_extra_mb"] is None else f"{r['bwd_peak_extra_mb']:.1f}"
        print(f"{r['call']:8} {r['impl']:16} {r['dtype']:5} {r['queries']:>7} {r['fwd_ms']:>9.3f} "
              f"{r['fwd_bwd_ms']:>11.3f} {peak:>12}")
    report = dict(device=args.device, device_name=dev_name, torch=torch.__version__,
                  cpu_threads=torch.get_num_threads(), load_avg_1m=os.getloadavg()[0], batch=batch, levels=levels,
                  heads=heads,
                  head_dim=dim, points=points, small=args.small, reps=args.reps,
                  command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                  rows=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

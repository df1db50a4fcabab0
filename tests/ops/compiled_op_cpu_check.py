"""Checks of the compiled ms_deform_attn library on the CPU, run in a fresh process by
tests/ops/test_ops_msda_build.py after it has built csrc/ (the library is loaded through the
production loader with JIT disabled). Prints one ``REPORT {json}`` line; asserts nothing
itself, so the test shows every result.

What it checks: the operator schemas; fake kernels and the C++ autograd on meta tensors; the
CPU kernels (float64/float32) against the float64 loop reference on the shared shapes
(odd sizes, 1-5 levels, 1-8 points, locations outside [0, 1] and on borders), forward and
backward, and on 20 small levels (no cap on the number of levels); float64 gradcheck; that
the autograd node is the C++ one; torch.compile (fullgraph, aot_eager) of forward+backward;
the C++ argument checks raising; CPU timing next to the PyTorch backend (reported, not
asserted); that the model's compiled regions trace without graph breaks when this op is their
MSDA backend; that a rebuild in the process that loaded the ops is refused, not an abort.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _msda_cases import SHAPES, make_inputs, naive_ms_deform_attn  # noqa: E402

from dino_scale.ops import ms_deform_attn_cuda, ms_deform_attn_pytorch  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def cpu_errors(op, cases) -> dict:
    """Largest relative error of the CPU kernels (float64, float32) over ``cases`` (argument
    tuples of make_inputs): [forward vs the float64 loop reference, max over the three
    gradients vs the float64 PyTorch backend]."""
    errors = {"float64": [0.0, 0.0], "float32": [0.0, 0.0]}
    for index, case in enumerate(cases):
        for dtype in (torch.float64, torch.float32):  # one case: the same inputs at both precisions
            v, sh, st, lo, wt = make_inputs(*case, dtype=dtype, seed=index)
            lo, wt = lo.to(dtype), wt.to(dtype)
            v.requires_grad_(), lo.requires_grad_(), wt.requires_grad_()
            got = op(v, sh, st, lo, wt)
            ref = naive_ms_deform_attn(v, sh, st, lo, wt)
            grad = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            g_got = torch.autograd.grad(got, (v, lo, wt), grad.to(dtype))
            v64, lo64, wt64 = (t.detach().double().requires_grad_() for t in (v, lo, wt))
            g_ref = torch.autograd.grad(ms_deform_attn_pytorch(v64, sh, st, lo64, wt64), (v64, lo64, wt64), grad)
            key = "float64" if dtype == torch.float64 else "float32"
            errors[key][0] = max(errors[key][0], rel_err(got, ref))
            errors[key][1] = max(errors[key][1], max(rel_err(a, b) for a, b in zip(g_got, g_ref)))
    return errors


def main() -> dict:
    lib = ms_deform_attn_cuda.load(build_if_missing=False)
    op = torch.ops.dino_scale.ms_deform_attn_forward
    report: dict = {"lib": str(lib), "compiled": "torch.utils.cpp_extension" in sys.modules}
    report["schemas"] = [str(op.default._schema), str(torch.ops.dino_scale.ms_deform_attn_backward.default._schema)]

    meta = dict(device="meta")
    value = torch.empty(2, 40, 4, 32, dtype=torch.bfloat16, **meta).requires_grad_()
    shapes = torch.empty(2, 2, dtype=torch.int64, **meta)
    starts = torch.empty(2, dtype=torch.int64, **meta)
    loc = torch.empty(2, 7, 4, 2, 3, 2, dtype=torch.float32, **meta).requires_grad_()
    w = torch.empty(2, 7, 4, 2, 3, dtype=torch.float32, **meta).requires_grad_()
    out = op(value, shapes, starts, loc, w)
    report["meta_out"] = [list(out.shape), str(out.dtype), out.device.type]
    out.sum().backward()
    report["meta_grads"] = [[list(t.grad.shape), str(t.grad.dtype)] for t in (value, loc, w)]

    # CPU kernels vs the float64 loop reference (forward) and the PyTorch backend (backward)
    report["cpu_rel_err"] = cpu_errors(op, SHAPES)  # [forward, max over the three gradients]
    # more levels than the 16 the op once took (it raised "at most 16 levels" even on the CPU):
    # 20 small maps, 1x1 up to 5x4
    many = [(1 + i % 5, 1 + (3 * i) % 4) for i in range(20)]
    try:
        report["many_levels"] = {"L": len(many), "rel_err": cpu_errors(op, [(2, many, 2, 5, 3, 2)])}
    except RuntimeError as exc:
        report["many_levels"] = {"L": len(many), "raised": str(exc).splitlines()[0][:160]}

    v, sh, st, lo, wt = make_inputs(1, [(3, 4), (2, 3)], 2, 3, 2, 2, dtype=torch.float64, edges=False)
    inputs = tuple(t.requires_grad_() for t in (v, lo, wt))
    report["gradcheck"] = bool(torch.autograd.gradcheck(lambda a, b, c: op(a, sh, st, b, c), inputs))
    report["grad_fn"] = op(v, sh, st, lo, wt).grad_fn.name()

    compiled = torch.compile(lambda a, b, c: op(a, sh, st, b, c), fullgraph=True, backend="aot_eager")
    eager_out = op(v, sh, st, lo, wt)
    comp_out = compiled(v, lo, wt)
    g1 = torch.autograd.grad(eager_out.sum(), inputs)
    g2 = torch.autograd.grad(comp_out.sum(), inputs)
    report["compile_err"] = max([rel_err(comp_out, eager_out)] + [rel_err(a, b) for a, b in zip(g2, g1)])

    raised = {}
    bad_calls = {
        "bf16_on_cpu": lambda: op(v.detach().bfloat16(), sh, st, lo.detach().float(), wt.detach().float()),
        "bad_weights_shape": lambda: op(v.detach(), sh, st, lo.detach(), wt.detach()[:, :1]),
        "levels_mismatch": lambda: op(v.detach(), sh[:1], st[:1], lo.detach(), wt.detach()),
        # the last level runs past value's rows: was read (and in backward written) out of bounds
        "level_past_value": lambda: op(v.detach()[:, :-1].contiguous(), sh, st, lo.detach(), wt.detach()),
        "level_start_negative": lambda: op(v.detach(), sh, st - 1, lo.detach(), wt.detach()),
    }
    for name, call in bad_calls.items():
        try:
            call()
            raised[name] = "returned"
        except RuntimeError as exc:
            raised[name] = str(exc).splitlines()[0][:160]
    report["errors_raised"] = raised

    # create_graph=True: first-order gradients as without it; differentiating them again raises
    # (was: the backward op's autograd fallback returned zeros with a warning)
    out = op(v, sh, st, lo, wt)
    g_plain = torch.autograd.grad((out ** 2).sum(), inputs, retain_graph=True)
    g_graph = torch.autograd.grad((out ** 2).sum(), inputs, create_graph=True)
    report["create_graph_err"] = max(rel_err(a, b) for a, b in zip(g_graph, g_plain))
    try:
        torch.autograd.grad(g_graph[1].sum(), wt)
        report["double_backward"] = "returned"
    except RuntimeError as exc:
        report["double_backward"] = str(exc).splitlines()[0][:160]

    # torch.use_deterministic_algorithms: the CPU kernels are deterministic (no atomics), so the
    # backward runs; the CUDA backward alerts (tests/ops/test_ops_msda_cuda.py)
    torch.use_deterministic_algorithms(True)
    try:
        out = op(v, sh, st, lo, wt)
        torch.autograd.grad(out.sum(), inputs)
        report["deterministic_mode_cpu"] = "ran"
    except RuntimeError as exc:
        report["deterministic_mode_cpu"] = str(exc).splitlines()[0][:160]
    finally:
        torch.use_deterministic_algorithms(False)

    # timing on this CPU (one DINO decoder-like call, 300 queries): reported only
    v, sh, st, lo, wt = make_inputs(1, [(50, 75), (25, 38), (13, 19), (7, 10)], 8, 32, 300, 4,
                                    dtype=torch.float32, edges=False)
    lo, wt = lo.float(), wt.float()
    times = {}
    for name, fn in (("cpp", lambda: op(v, sh, st, lo, wt)),
                     ("pytorch", lambda: ms_deform_attn_pytorch(v, sh, st, lo, wt))):
        fn()
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        times[name] = sorted(samples)[2] * 1000
    report["cpu_forward_ms_median"] = times
    report["regions"] = region_graph_breaks()
    report["rebuild_while_loaded"] = rebuild_while_loaded()
    return report


def rebuild_while_loaded() -> str:
    """A forced build in this process, which has the ops loaded, into another folder: refused
    with a BuildError (it aborted the process: a second TORCH_LIBRARY(dino_scale) at load)."""
    import tempfile

    from dino_scale.ops import _build

    with tempfile.TemporaryDirectory() as other:
        try:
            _build.build_extension(build_dir=Path(other), arch_list="9.0", force=True)
        except _build.BuildError as exc:
            return str(exc)
    return "built"


def region_graph_breaks() -> dict:
    """The model's compiled regions (compile_regions + compile_criterion, aot_eager) with the
    compiled op as the MSDA backend (its CPU kernels here; the CUDA ones on a GPU): a training
    step and an eval forward of the tiny preset. On a GPU these regions trace the same way, so a
    graph break here (host read-back, untraceable call) would also split them there."""
    import dataclasses

    from torch._dynamo.utils import counters

    from dino_scale.config import preset
    from dino_scale.models import build_dino
    from dino_scale.models.compile import compile_criterion, compile_regions

    # the production wrapper refuses CPU tensors; its op call (argument preparation included) is
    # what the regions trace, so route backend "cuda" to it here
    ms_deform_attn_cuda.ms_deform_attn_cuda = ms_deform_attn_cuda.call_compiled_op
    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("tiny").model, msda_backend="cuda")
    model, criterion, _ = build_dino(cfg)
    names = compile_regions(model, backend="aot_eager") + compile_criterion(criterion, backend="aot_eager")
    images, masks = torch.randn(2, 3, 160, 224), torch.zeros(2, 160, 224, dtype=torch.bool)
    masks[1, :, 190:] = True
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
               {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.3]])}]
    counters.clear()
    model.train()
    losses = criterion(model(images, masks, targets), targets)
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images, masks)
    return {"names": names, "graph_breaks": {str(k): int(v) for k, v in counters["graph_break"].items()},
            "unique_graphs": int(counters["stats"]["unique_graphs"]),
            "finite": bool(torch.isfinite(out["pred_boxes"]).all() and torch.isfinite(sum(losses.values())))}


if __name__ == "__main__":
    print("REPORT " + json.dumps(main()))

"""GPU correctness of the CUDA ms_deform_attn backend (skipped without CUDA).

Reference: the PyTorch backend evaluated in float64 on the same inputs (itself checked against
an independent loop implementation in test_ops_msda_reference.py). Error metric:
max |got - ref| / max |ref| over the whole tensor."""
from __future__ import annotations

import warnings

import pytest
import torch

import dino_scale.ops as ops
from dino_scale.ops import ms_deform_attn, ms_deform_attn_pytorch
from _msda_cases import SHAPES, make_inputs, naive_ms_deform_attn, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}
# extra cases for the GPU paths: DINO-like head dim 32 (vector fast path), D=64/256 (several
# chunks per lane), odd D (scalar path), many queries (many blocks), Lq not a multiple of a warp
GPU_SHAPES = SHAPES + [
    (2, [(25, 38), (13, 19), (7, 10), (4, 5)], 8, 32, 333, 4),
    (1, [(17, 23), (9, 12)], 4, 64, 97, 2),
    (1, [(6, 9)], 2, 256, 20, 3),
    (2, [(11, 7), (6, 4), (3, 2)], 3, 24, 41, 6),
]


@pytest.fixture(scope="module", autouse=True)
def _extension():
    from dino_scale.ops import ms_deform_attn_cuda
    ms_deform_attn_cuda.load()  # builds on first use; failing here fails the suite loudly


def _poison_allocator(numel: int) -> None:
    """Leave NaN in memory the caching allocator will hand out next, so an output element the
    kernel forgets to write shows up as NaN instead of a lucky zero."""
    t = torch.full((numel + 1024,), float("nan"), device=DEV)
    del t


def _reference(value, shapes, starts, loc, w, gout=None):
    args = [t.detach().double().to(DEV) for t in (value, loc, w)]
    v, l_, w_ = (t.requires_grad_() for t in args)
    out = ms_deform_attn_pytorch(v, shapes.to(DEV), starts.to(DEV), l_, w_)
    if gout is None:
        return out, None
    out.backward(gout.double())
    return out.detach(), (v.grad, l_.grad, w_.grad)


def _run_cuda(value, shapes, starts, loc, w, gout):
    v, l_, w_ = (t.detach().clone().requires_grad_() for t in (value, loc, w))
    _poison_allocator(value.numel() * 4)
    out = ms_deform_attn(v, shapes, starts, l_, w_, backend="cuda")
    _poison_allocator(value.numel() * 4)
    out.backward(gout)
    return out.detach(), (v.grad, l_.grad, w_.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", range(len(GPU_SHAPES)))
def test_cuda_forward_backward_match_float64_reference(case, dtype):
    n, levels, m, d, lq, p = GPU_SHAPES[case]
    value, shapes, starts, loc, w = make_inputs(n, levels, m, d, lq, p, device=DEV, seed=case)
    value = value.to(dtype)
    loc, w = (t.float() if dtype != torch.float64 else t for t in (loc, w))
    gout = torch.randn(n, lq, m * d, device=DEV, dtype=torch.float64).to(dtype)
    ref_out, ref_grads = _reference(value, shapes, starts, loc, w, gout)
    out, grads = _run_cuda(value, shapes, starts, loc, w, gout)
    assert out.dtype == dtype and out.shape == (n, lq, m * d)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref_out) <= TOL[dtype]
    for g, r, name in zip(grads, ref_grads, ("value", "loc", "weight")):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) <= TOL[dtype], (name, rel_err(g, r))
    assert grads[0].dtype == dtype and grads[1].dtype == loc.dtype


# Any number of levels: the kernels keep the level table in dynamic shared memory, filled by a
# loop over the block's threads. 20 levels (more than the 16 the op once took: 1x1 up to 5x4)
# and 300 levels of 1x1 / 1x2 (more levels than the 256 threads of a block).
MANY_LEVELS = {
    "L20": (2, [(1 + i % 5, 1 + (3 * i) % 4) for i in range(20)], 2, 32, 37, 2),
    "L300": (1, [(1, 1 + i % 2) for i in range(300)], 2, 8, 5, 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(MANY_LEVELS))
def test_cuda_many_levels_match_float64_reference(name, dtype):
    n, levels, m, d, lq, p = MANY_LEVELS[name]
    value, shapes, starts, loc, w = make_inputs(n, levels, m, d, lq, p, device=DEV, seed=21)
    value = value.to(dtype)
    loc, w = (t.to(dtype) for t in (loc, w))
    gout = torch.randn(n, lq, m * d, device=DEV, dtype=torch.float64).to(dtype)
    ref_out, ref_grads = _reference(value, shapes, starts, loc, w, gout)
    out, grads = _run_cuda(value, shapes, starts, loc, w, gout)
    assert out.shape == (n, lq, m * d) and torch.isfinite(out).all()
    assert rel_err(out, ref_out) <= TOL[dtype]
    for g, r, label in zip(grads, ref_grads, ("value", "loc", "weight")):
        assert torch.isfinite(g).all(), label
        assert rel_err(g, r) <= TOL[dtype], (label, rel_err(g, r))
    if name == "L20":  # the independent loop reference too
        assert rel_err(out, naive_ms_deform_attn(value, shapes, starts, loc, w)) <= TOL[dtype]


def test_cuda_too_many_levels_for_shared_memory_raise():
    # 5000 levels need 60000 bytes of level table (12 per level), above the 48 KiB a block may
    # use: a clear error naming the limit, not a failed launch
    levels = [(1, 1)] * 5000
    value, shapes, starts, loc, w = make_inputs(1, levels, 1, 4, 2, 1, device=DEV, edges=False)
    limit = r"5000 levels need .* bytes per block \(at most \d+ levels on CUDA\)"
    with pytest.raises(RuntimeError, match=limit):
        ms_deform_attn(value.float(), shapes, starts, loc.float(), w.float(), backend="cuda")


def test_cuda_exact_sampling_cutoff_matches_loop_reference():
    # points exactly at h_im = -1 / w_im = -1 are not sampled (official cut-off)
    n, levels, m, d, lq, p = GPU_SHAPES[3]
    value, shapes, starts, loc, w = make_inputs(n, levels, m, d, lq, p, seed=4, exact_minus_one=True)
    ref = naive_ms_deform_attn(value, shapes, starts, loc, w)
    out = ms_deform_attn(value.float().to(DEV), shapes.to(DEV), starts.to(DEV), loc.float().to(DEV),
                         w.float().to(DEV), backend="cuda")
    assert rel_err(out, ref) <= 1e-5


def test_cuda_backward_alerts_deterministic_mode():
    """The value gradient's atomics make the CUDA backward's bits depend on thread order; it said
    nothing under torch.use_deterministic_algorithms (train.deterministic promised exact resume).
    It now raises there, and warns with warn_only=True, as PyTorch's grid_sample backward does."""
    value, shapes, starts, loc, w = make_inputs(1, [(3, 5), (2, 3)], 2, 32, 3, 2, device=DEV, seed=3)
    value.requires_grad_()
    try:
        torch.use_deterministic_algorithms(True)
        out = ms_deform_attn(value, shapes, starts, loc, w, backend="cuda")
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward"):
            out.sum().backward()
        torch.use_deterministic_algorithms(True, warn_only=True)
        out = ms_deform_attn(value, shapes, starts, loc, w, backend="cuda")
        with pytest.warns(UserWarning, match="ms_deform_attn_backward"):
            out.sum().backward()
        assert value.grad is not None and torch.isfinite(value.grad).all()
    finally:
        torch.use_deterministic_algorithms(False)


def test_cuda_gradcheck_float64():
    value, shapes, starts, loc, w = make_inputs(1, [(3, 5), (2, 3)], 2, 4, 3, 2, device=DEV, seed=7,
                                                edges=False)

    def fn(v, l_, w_):
        return ms_deform_attn(v, shapes, starts, l_, w_, backend="cuda")

    assert torch.autograd.gradcheck(fn, (value.requires_grad_(), loc.requires_grad_(),
                                         w.requires_grad_()), eps=1e-6, atol=1e-7,
                                   nondet_tol=1e-12)  # value-grad atomics: order varies


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_noncontiguous_inputs_and_grads(dtype):
    n, levels, m, d, lq, p = GPU_SHAPES[6]
    value, shapes, starts, loc, w = make_inputs(n, levels, m, d, lq, p, device=DEV, seed=9)
    value, loc, w = value.to(dtype), loc.float(), w.float()
    gout = torch.randn(n, lq, m * d, device=DEV).to(dtype)
    ref_out, ref_grads = _run_cuda(value, shapes, starts, loc, w, gout)
    v_nc = value.transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    l_nc = loc.permute(1, 0, 2, 3, 4, 5).contiguous().permute(1, 0, 2, 3, 4, 5).requires_grad_()
    w_nc = w.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    g_nc = gout.transpose(0, 1).contiguous().transpose(0, 1)
    assert not any(t.is_contiguous() for t in (v_nc, l_nc, w_nc, g_nc))
    out = ms_deform_attn(v_nc, shapes, starts, l_nc, w_nc, backend="cuda")
    out.backward(g_nc)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    # value-grad atomics: summation order may differ between runs (one rounding of the fp32
    # buffer; for bf16 also one rounding of the final cast, i.e. up to one bf16 ulp)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for g, r, name in zip((v_nc.grad, l_nc.grad, w_nc.grad), ref_grads, ("value", "loc", "weight")):
        assert rel_err(g, r) <= tol, (name, rel_err(g, r))


def test_cuda_half_locations_are_upcast():
    n, levels, m, d, lq, p = GPU_SHAPES[6]
    value, shapes, starts, loc, w = make_inputs(n, levels, m, d, lq, p, device=DEV, seed=11)
    l_h = loc.to(torch.bfloat16).requires_grad_()
    out = ms_deform_attn(value.to(torch.bfloat16), shapes, starts, l_h, w.to(torch.bfloat16),
                         backend="cuda")
    out.float().sum().backward()
    assert l_h.grad.dtype == torch.bfloat16 and torch.isfinite(l_h.grad).all()


def test_cuda_misaligned_value_uses_scalar_path():
    n, levels, m, d, lq, p = GPU_SHAPES[6]
    value, shapes, starts, loc, w = make_inputs(n, levels, m, d, lq, p, device=DEV, seed=12)
    value = value.float()
    storage = torch.empty(value.numel() + 1, device=DEV)
    shifted = storage[1:].view_as(value)  # contiguous but 4-byte (not 16-byte) aligned
    shifted.copy_(value)
    ref = ms_deform_attn_pytorch(value.double(), shapes, starts, loc, w)
    out = ms_deform_attn(shifted, shapes, starts, loc.float(), w.float(), backend="cuda")
    assert rel_err(out, ref) <= 1e-5


def test_cuda_misaligned_locations_are_handled():
    n, levels, m, d, lq, p = GPU_SHAPES[6]
    value, shapes, starts, loc, w = make_inputs(n, levels, m, d, lq, p, device=DEV, seed=15)
    storage = torch.empty(loc.numel() + 1, device=DEV)
    shifted = storage[1:].view_as(loc)  # contiguous, 4-byte aligned: (x, y) pairs straddle 8 B
    shifted.copy_(loc)
    shifted.requires_grad_()
    out = ms_deform_attn(value.float(), shapes, starts, shifted, w.float(), backend="cuda")
    ref = ms_deform_attn_pytorch(value, shapes, starts, loc, w)
    assert rel_err(out, ref) <= 1e-5
    out.sum().backward()
    assert torch.isfinite(shifted.grad).all()


def test_cuda_empty_and_zero_query_inputs():
    value, shapes, starts, loc, w = make_inputs(2, [(4, 5)], 2, 32, 0, 2, device=DEV)
    out = ms_deform_attn(value.float(), shapes, starts, loc.float(), w.float(), backend="cuda")
    assert out.shape == (2, 0, 64)


def test_cuda_rejects_bad_shapes():
    value, shapes, starts, loc, w = make_inputs(1, [(4, 5), (2, 2)], 2, 8, 3, 2, device=DEV)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value.float(), shapes[:1], starts[:1], loc.float(), w.float(), backend="cuda")
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value.float(), shapes, starts, loc.float(), w[..., :1].float(), backend="cuda")


def test_cuda_raw_op_checks_raise_not_crash():
    """The C++ TORCH_CHECKs (behind the Python checks) must raise, not take the process down:
    run in a child process so a crash is a failure here, not the end of the test session."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    script = Path(__file__).with_name("raw_op_check.py")
    res = subprocess.run([sys.executable, "-X", "faulthandler", str(script)], cwd=root,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(("RAISED", "NO ERROR"))]
    assert len(lines) == 3 and all(ln.startswith("RAISED") for ln in lines), res.stdout


def test_cuda_auto_backend_and_fallback_warning_once(monkeypatch):
    from dino_scale.ops import ms_deform_attn_cuda
    value, shapes, starts, loc, w = make_inputs(1, [(6, 7)], 2, 32, 9, 3, device=DEV, seed=13)
    value, loc, w = value.float(), loc.float(), w.float()
    auto = ms_deform_attn(value, shapes, starts, loc, w)
    forced = ms_deform_attn(value, shapes, starts, loc, w, backend="cuda")
    torch.testing.assert_close(auto, forced, rtol=0, atol=0)
    # simulate a machine without the extension: one warning, PyTorch results
    monkeypatch.setattr(ms_deform_attn_cuda, "is_loaded", lambda: False)
    monkeypatch.setattr(ms_deform_attn_cuda, "load",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no toolkit")))
    monkeypatch.setattr(ops, "_fallback_warned", False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        a = ms_deform_attn(value, shapes, starts, loc, w)
        ms_deform_attn(value, shapes, starts, loc, w)
    assert sum("pure-PyTorch" in str(r.message) for r in record) == 1
    torch.testing.assert_close(a, ms_deform_attn_pytorch(value, shapes, starts, loc, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_op_under_torch_compile(dtype):
    n, levels, m, d, lq, p = GPU_SHAPES[7]
    value, shapes, starts, loc, w = make_inputs(n, levels, m, d, lq, p, device=DEV, seed=14)
    value, loc, w = value.to(dtype), loc.float(), w.float()

    def fn(v, l_, w_):
        return ms_deform_attn(v * 2, shapes, starts, l_.clamp(-1, 2), w_, backend="cuda").relu()

    compiled = torch.compile(fn, fullgraph=True)
    args_e = [t.clone().requires_grad_() for t in (value, loc, w)]
    args_c = [t.clone().requires_grad_() for t in (value, loc, w)]
    out_e, out_c = fn(*args_e), compiled(*args_c)
    torch.testing.assert_close(out_c, out_e)
    out_e.float().square().sum().backward()
    out_c.float().square().sum().backward()
    for a, b in zip(args_c, args_e):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_cuda_off_map_points_with_non_finite_weights_get_zero_location_gradients():
    """A point sampled nowhere (off every map) takes no part: its location gradient is 0 as in the
    CPU kernel and the official op, whatever its weight; it was ``w * 0``, NaN for an inf or NaN
    weight, spreading into the sampling-offset weights. The rest match the reference."""
    n, levels, m, d, lq, p = GPU_SHAPES[3]
    value, shapes, starts, loc, w = make_inputs(n, levels, m, d, lq, p, seed=6)
    loc, w = loc.float().clone(), w.float().clone()
    loc[:, ::3, :, :, 0] = 5.0  # every third query: its first point of every level off the map
    w[:, ::3, :, :, 0] = float("inf")
    gout = torch.randn(n, lq, m * d, device=DEV)
    _, (gv, gl, gw) = _run_cuda(value.float().to(DEV), shapes.to(DEV), starts.to(DEV), loc.to(DEV), w.to(DEV), gout)
    assert torch.all(gl[:, ::3, :, :, 0] == 0)
    # the gradients of the same inputs with those weights 0 (the reference's grid_sample would
    # multiply its zero sample by inf)
    _, ref = _reference(value, shapes, starts, loc, torch.where(torch.isinf(w), 0.0, w), gout)
    for got, want in zip((gv, gl, gw), ref):
        assert torch.isfinite(got).all() and rel_err(got, want) <= TOL[torch.float32]

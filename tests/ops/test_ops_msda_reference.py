"""CPU tests of the pure-PyTorch ms_deform_attn backend and of the backend dispatch."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

import dino_scale.ops as ops
from dino_scale.ops import ms_deform_attn, ms_deform_attn_pytorch
from _msda_cases import (SHAPES, make_inputs, naive_ms_deform_attn,
                         naive_ms_deform_attn_backward, rel_err)

# what torch (2.x) raises when a meta tensor is read back: .tolist()/.cpu() ("Cannot copy out of
# meta tensor; no data!", NotImplementedError) or .item()/int() ("... cannot be called on meta tensors")
META_READ_BACK = r"Cannot copy out of meta tensor; no data!|cannot be called on meta tensors"


@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_pytorch_backend_matches_naive_float64(case):
    n, levels, m, d, lq, p = SHAPES[case]
    value, shapes, starts, loc, w = make_inputs(n, levels, m, d, lq, p, seed=case,
                                                exact_minus_one=True)
    out = ms_deform_attn_pytorch(value, shapes, starts, loc, w)
    ref = naive_ms_deform_attn(value, shapes, starts, loc, w)
    assert out.shape == (n, lq, m * d) and out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-12


def test_naive_reference_is_not_trivially_zero():
    # guards the comparison above: border/outside points must not make everything vanish
    value, shapes, starts, loc, w = make_inputs(*SHAPES[2], seed=3)
    ref = naive_ms_deform_attn(value, shapes, starts, loc, w)
    assert ref.abs().max() > 0.1
    loc_out = torch.full_like(loc, 5.0)  # far outside every map: exactly zero
    assert naive_ms_deform_attn(value, shapes, starts, loc_out, w).abs().max() == 0
    assert ms_deform_attn_pytorch(value, shapes, starts, loc_out, w).abs().max() == 0


def test_pytorch_backend_single_pixel_values():
    # a 1x1 map sampled at its centre returns the pixel; a 2x2 map at the centre the mean
    value = torch.arange(1 * 5 * 1 * 2, dtype=torch.float64).view(1, 5, 1, 2)
    shapes = torch.tensor([[1, 1], [2, 2]])
    starts = torch.tensor([0, 1])
    loc = torch.full((1, 1, 1, 2, 1, 2), 0.5, dtype=torch.float64)
    w = torch.tensor([0.25, 0.75], dtype=torch.float64).view(1, 1, 1, 2, 1)
    out = ms_deform_attn_pytorch(value, shapes, starts, loc, w)
    expected = 0.25 * value[0, 0, 0] + 0.75 * value[0, 1:5, 0].mean(0)
    torch.testing.assert_close(out.view(2), expected)


def _grads(fn, value, shapes, starts, loc, w, gout):
    v, l_, w_ = (t.clone().requires_grad_() for t in (value, loc, w))
    (fn(v, shapes, starts, l_, w_) * gout).sum().backward()
    return v.grad, l_.grad, w_.grad


@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_pytorch_backend_gradients_match_naive(case):
    n, levels, m, d, lq, p = SHAPES[case]
    value, shapes, starts, loc, w = make_inputs(n, levels, m, d, lq, p, seed=10 + case)
    gout = torch.randn(n, lq, m * d, dtype=torch.float64)
    got = _grads(ms_deform_attn_pytorch, value, shapes, starts, loc, w, gout)
    ref = naive_ms_deform_attn_backward(value, shapes, starts, loc, w, gout)
    for g, r, name in zip(got, ref, ("value", "loc", "weight")):
        assert r.abs().max() > 0, name
        assert rel_err(g, r) < 1e-10, name


def test_pytorch_backend_non_finite_locations_contribute_zero():
    # the official op (and the compiled one) skips a location off the map, NaN/inf included;
    # grid_sample alone would return NaN there and poison the whole output row
    n, levels, m, d, lq, p = SHAPES[2]
    value, shapes, starts, loc, w = make_inputs(n, levels, m, d, lq, p, seed=31)
    bad = (float("nan"), float("inf"), float("-inf"), 1e30, -1e30)
    flat = loc.view(-1)
    for i, x in enumerate(bad):
        flat[7 * i] = x  # x or y of a few points
    flat[-1] = float("nan")
    out = ms_deform_attn_pytorch(value, shapes, starts, loc, w)
    ref = naive_ms_deform_attn(value, shapes, starts, loc, w)
    assert torch.isfinite(out).all() and ref.abs().max() > 0.1
    assert rel_err(out, ref) < 1e-12
    gout = torch.randn(n, lq, m * d, dtype=torch.float64)
    got = _grads(ms_deform_attn_pytorch, value, shapes, starts, loc, w, gout)
    want = naive_ms_deform_attn_backward(value, shapes, starts, loc, w, gout)
    for g, r, name in zip(got, want, ("value", "loc", "weight")):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < 1e-10, name


def test_pytorch_backend_off_map_points_never_touch_a_one_pixel_map():
    # a 1x1 level holding inf: a NaN / -inf / far-off location must skip it (0), not add 0 * inf
    value = torch.tensor([float("inf"), 2.0], dtype=torch.float64).view(1, 2, 1, 1)
    shapes, starts = torch.tensor([[1, 1], [1, 1]]), torch.tensor([0, 1])
    for x in (float("nan"), float("-inf"), -1e30, float("inf"), 1e30):
        loc = torch.tensor([[x, 0.5], [0.5, 0.5]], dtype=torch.float64).view(1, 1, 1, 2, 1, 2)
        w = torch.ones(1, 1, 1, 2, 1, dtype=torch.float64)
        out = ms_deform_attn_pytorch(value, shapes, starts, loc, w)
        assert out.item() == 2.0, (x, out)


def test_naive_backward_matches_finite_differences():
    # validates the hand-derived loop gradients on a few random elements of each input
    value, shapes, starts, loc, w = make_inputs(1, [(5, 7), (3, 2)], 2, 3, 3, 2, seed=21)
    gout = torch.randn(1, 3, 6, dtype=torch.float64)
    ref = naive_ms_deform_attn_backward(value, shapes, starts, loc, w, gout)
    gen = torch.Generator().manual_seed(0)
    eps = 1e-6
    for base, r in zip((value, loc, w), ref):
        flat, r_flat = base.view(-1), r.view(-1)
        for i in torch.randint(0, flat.numel(), (12,), generator=gen).tolist():
            old = float(flat[i])
            flat[i] = old + eps
            up = float((naive_ms_deform_attn(value, shapes, starts, loc, w) * gout).sum())
            flat[i] = old - eps
            dn = float((naive_ms_deform_attn(value, shapes, starts, loc, w) * gout).sum())
            flat[i] = old
            assert abs((up - dn) / (2 * eps) - float(r_flat[i])) < 1e-6


def test_pytorch_backend_gradcheck_float64():
    value, shapes, starts, loc, w = make_inputs(1, [(3, 5), (2, 3)], 2, 3, 2, 2, seed=7, edges=False)
    inputs = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), w.requires_grad_())
    assert torch.autograd.gradcheck(ms_deform_attn_pytorch, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_pytorch_backend_reduced_precision_keeps_fp32_locations(dtype):
    value, shapes, starts, loc, w = make_inputs(1, [(100, 150), (50, 75)], 2, 8, 64, 4, seed=5)
    ref = ms_deform_attn_pytorch(value, shapes, starts, loc, w)
    out = ms_deform_attn_pytorch(value.to(dtype), shapes, starts, loc.float(), w.float())
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(out, ref) < tol


def test_pytorch_backend_noncontiguous_inputs():
    value, shapes, starts, loc, w = make_inputs(2, [(5, 6), (3, 3)], 2, 4, 5, 2, seed=2)
    ref = ms_deform_attn_pytorch(value, shapes, starts, loc, w)
    v_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    l_nc = loc.permute(1, 0, 2, 3, 4, 5).contiguous().permute(1, 0, 2, 3, 4, 5)
    w_nc = w.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (v_nc.is_contiguous() or l_nc.is_contiguous() or w_nc.is_contiguous())
    torch.testing.assert_close(ms_deform_attn(v_nc, shapes, starts, l_nc, w_nc), ref)


def test_dispatch_cpu_tensors():
    value, shapes, starts, loc, w = make_inputs(1, [(4, 5)], 2, 4, 3, 2, dtype=torch.float32)
    ref = ms_deform_attn_pytorch(value, shapes, starts, loc, w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CPU tensors with backend=None: no warning
        torch.testing.assert_close(ms_deform_attn(value, shapes, starts, loc, w), ref)
        torch.testing.assert_close(ms_deform_attn(value, shapes, starts, loc, w, backend="pytorch"), ref)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ms_deform_attn(value, shapes, starts, loc, w, backend="cuda")
    with pytest.raises(ValueError, match="unknown ms_deform_attn backend"):
        ms_deform_attn(value, shapes, starts, loc, w, backend="triton")


def test_fallback_warning_is_emitted_once(monkeypatch, caplog):
    monkeypatch.setattr(ops, "_fallback_warned", False)
    with caplog.at_level(logging.WARNING, logger="dino_scale.ops"):
        with pytest.warns(RuntimeWarning, match="pure-PyTorch backend") as record:
            ops._warn_fallback("no nvcc")
            ops._warn_fallback("no nvcc")
    assert len(record) == 1 and "no nvcc" in str(record[0].message)
    assert sum("pure-PyTorch" in r.getMessage() for r in caplog.records) == 1


def test_import_does_not_compile():
    import subprocess
    import sys
    code = ("import sys, dino_scale.ops; "
            "assert 'torch.utils.cpp_extension' not in sys.modules; "
            "assert 'dino_scale.ops.ms_deform_attn_cuda' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("backend", [None, "pytorch"])
def test_pytorch_backend_rejects_inputs_that_do_not_match(backend):
    # the CPU default path once took these and returned a full-size output: spatial_shapes for
    # fewer levels than the locations sample (levels silently dropped), weights without the P
    # axis or in (N, M, Lq, L, P) order (broadcast / reshaped into the wrong queries)
    value, shapes, starts, loc, w = make_inputs(1, [(4, 4), (2, 2), (1, 1)], 2, 4, 3, 1, seed=2)
    bad = {
        "spatial_shapes": (value[:, :16], shapes[:1], starts[:1], loc, w),
        "attention_weights": (value, shapes, starts, loc, w[..., 0]),
        "attention_weights ": (value, shapes, starts, loc, w.transpose(1, 2)),
        "level_start_index": (value, shapes, starts[:2], loc, w),
        "sampling_locations": (value, shapes, starts, loc[..., :1], w),
        "value has S": (value[:, :20], shapes, starts, loc, w),
    }
    for name, args in bad.items():
        with pytest.raises(ValueError, match=name.strip()):
            ms_deform_attn(*args, backend=backend)
    # the matching inputs still pass
    assert ms_deform_attn(value, shapes, starts, loc, w, backend=backend).shape == (1, 3, 8)


@pytest.mark.parametrize("backend", [None, "pytorch", "compiled"])
def test_inputs_of_a_wrong_dtype_or_device_are_refused_by_name(backend, monkeypatch):
    """A float level table was truncated (4.7 read as 4) and integer locations taken silently;
    an integer value raised torch's NotImplementedError from deep inside grid_sample, and
    inputs on two devices torch's own device error. Each now names the input."""
    from dino_scale.ops import ms_deform_attn_cuda

    def must_not_load(*a, **k):
        raise AssertionError("reached the compiled op")

    monkeypatch.setattr(ms_deform_attn_cuda, "load", must_not_load)
    call = ms_deform_attn_cuda.call_compiled_op if backend == "compiled" else \
        (lambda *a: ms_deform_attn(*a, backend=backend))
    value, shapes, starts, loc, w = make_inputs(1, [(4, 5), (2, 2)], 2, 4, 3, 2, seed=2)
    wrong_dtype = {
        "spatial_shapes": (value, shapes.float() + 0.7, starts, loc, w),
        "level_start_index": (value, shapes, starts.float(), loc, w),
        "sampling_locations": (value, shapes, starts, (loc * 4).long(), w),
        "attention_weights": (value, shapes, starts, loc, w.bool()),
    }
    if backend != "compiled":  # the compiled wrapper names value's dtype itself
        wrong_dtype["value"] = (value.long(), shapes, starts, loc, w)
    for name, args in wrong_dtype.items():
        with pytest.raises(TypeError, match=name):
            call(*args)
    with pytest.raises(ValueError, match="attention_weights is on meta"):
        call(value, shapes, starts, loc, w.to("meta"))


@pytest.mark.parametrize("backend", [None, "pytorch", "compiled"])
def test_level_table_that_disagrees_with_value_is_refused_by_every_backend(backend, monkeypatch):
    # the PyTorch backend split value by spatial_shapes alone and ignored level_start_index,
    # which the compiled kernels follow (and they took S > sum(H*W)): one call, two results.
    # "compiled" is the CUDA backend's wrapper (call_compiled_op): it checks before loading
    from dino_scale.ops import ms_deform_attn_cuda

    def must_not_load(*a, **k):
        raise AssertionError("reached the compiled op")

    monkeypatch.setattr(ms_deform_attn_cuda, "load", must_not_load)
    call = ms_deform_attn_cuda.call_compiled_op if backend == "compiled" else \
        (lambda *a: ms_deform_attn(*a, backend=backend))
    value, shapes, starts, loc, w = make_inputs(1, [(4, 4), (2, 2), (1, 1)], 2, 4, 3, 2, seed=2)
    assert starts.tolist() == [0, 16, 20]
    bad = {
        "level_start_index": (value, shapes, torch.tensor([0, 10, 20]), loc, w),
        "level_start_index ": (value, shapes, torch.tensor([1, 17, 21]), loc, w),
        "negative size": (value, torch.tensor([[4, 4], [2, 2], [-1, 1]]), starts, loc, w),
        "value has S": (torch.cat([value, value[:, :3]], 1), shapes, starts, loc, w),
    }
    for name, args in bad.items():
        with pytest.raises(ValueError, match=name.strip()):
            call(*args)
    if backend != "compiled":  # int32 tables of the right values still pass
        ref = naive_ms_deform_attn(value, shapes, starts, loc, w)
        torch.testing.assert_close(call(value, shapes.int(), starts.int(), loc, w), ref)


def test_level_table_values_are_checked_without_a_device_read_back(monkeypatch):
    # meta tensors stand in for GPU ones: reading them back raises, as a sync would cost
    from dino_scale.ops import level_index_tensors, ms_deform_attn_cuda
    from dino_scale.ops import ms_deform_attn_torch as torch_backend

    shapes, starts = level_index_tensors([(4, 4), (2, 2)], "meta")  # the model's cached pair
    value = torch.empty(1, 20, 2, 4, device="meta")
    assert torch_backend.check_levels(value, shapes, starts) == [(4, 4), (2, 2)]
    with pytest.raises(ValueError, match="value has S = 21"):
        torch_backend.check_levels(torch.empty(1, 21, 2, 4, device="meta"), shapes, starts)
    # a pair made elsewhere: unchecked on the CUDA backend's path (no sync) ...
    other = torch.zeros(2, dtype=torch.long, device="meta")
    assert torch_backend.check_levels(value, shapes, other) is None
    monkeypatch.setattr(ms_deform_attn_cuda, "load", lambda *a, **k: (_ for _ in ()).throw(LookupError("load")))
    loc, w = torch.empty(1, 3, 2, 2, 2, 2, device="meta"), torch.empty(1, 3, 2, 2, 2, device="meta")
    with pytest.raises(LookupError, match="load"):
        ms_deform_attn_cuda.call_compiled_op(value, shapes, other, loc, w)
    # ... read back when the caller reads anyway (PyTorch backend) or DINO_SCALE_MSDA_CHECK=1
    with pytest.raises((RuntimeError, NotImplementedError), match=META_READ_BACK):
        torch_backend.check_levels(value, shapes, other, read_back=True)
    monkeypatch.setattr(torch_backend, "CHECK_DEVICE_LEVELS", True)
    with pytest.raises((RuntimeError, NotImplementedError), match=META_READ_BACK):
        torch_backend.check_levels(value, shapes, other)


@pytest.mark.parametrize("empty", [(0, 3), (3, 0), (0, 0)])
def test_pytorch_backend_empty_level_contributes_zero(empty):
    # the compiled kernels (and the official op) read an H or W = 0 level as sampling nothing;
    # this backend raised grid_sampler's "expected input to have non-empty spatial dimensions"
    value, shapes, starts, loc, w = make_inputs(2, [(4, 5), empty, (2, 2)], 2, 4, 3, 2, seed=4)
    value.requires_grad_(), loc.requires_grad_(), w.requires_grad_()
    out = ms_deform_attn(value, shapes, starts, loc, w, backend="pytorch")
    torch.testing.assert_close(out, naive_ms_deform_attn(value, shapes, starts, loc, w))
    gv, gl, gw = torch.autograd.grad(out.square().sum(), (value, loc, w))
    assert not (gl[:, :, :, 1].any() or gw[:, :, :, 1].any())  # nothing sampled, nothing to learn
    assert gv.abs().sum() > 0 and torch.isfinite(gl).all()


@pytest.mark.parametrize("levels", [[], [(0, 5), (3, 0)]])
def test_pytorch_backend_no_sampled_level_gives_zeros_with_zero_gradients(levels):
    # no level at all: a wrong "level_start_index [] does not match ... [0]", then torch.stack([]);
    # only empty levels: an output not connected to value/locations (autograd.grad raised). The
    # compiled op returns zeros and zero gradients for both.
    n, lq, m, d, p = 2, 3, 2, 4, 2
    value = torch.randn(n, 0, m, d, dtype=torch.float64, requires_grad=True)
    shapes = torch.tensor(levels, dtype=torch.long).reshape(len(levels), 2)
    starts = torch.zeros(len(levels), dtype=torch.long)
    loc = torch.rand(n, lq, m, len(levels), p, 2, dtype=torch.float64)
    loc[0, 0] = float("nan")  # not turned into a NaN output
    loc.requires_grad_()
    w = torch.rand(n, lq, m, len(levels), p, dtype=torch.float64, requires_grad=True)
    out = ms_deform_attn(value, shapes, starts, loc, w, backend="pytorch")
    assert out.shape == (n, lq, m * d) and out.dtype == torch.float64 and not out.any()
    grads = torch.autograd.grad(out.sum(), (value, loc, w))
    assert [g.shape for g in grads] == [value.shape, loc.shape, w.shape]
    assert not any(g.any() for g in grads)


def test_fallback_reason_of_a_compile_failure_is_the_compiler_error():
    # the warning showed the failure's first line: for a compile error, the nvcc command line
    text = ("BuildError: building the ms_deform_attn extension failed: Error building extension "
            "'dino_scale_msda': [1/4] /usr/local/cuda/bin/nvcc --generate-dependencies-with-compile -c a.cu\n"
            "FAILED: msda_forward.cuda.o\n/usr/local/cuda/bin/nvcc -c msda_forward.cu\n"
            "msda_forward.cu(12): error: identifier \"foo\" is undefined\n1 error detected\n")
    reason = ops.failure_reason(text)
    assert "nvcc" not in reason and reason.endswith('msda_forward.cu(12): error: identifier "foo" is undefined')
    assert reason.startswith("BuildError: building the ms_deform_attn extension failed")
    plain = "BuildError: no CUDA toolkit found (nvcc)"
    assert ops.failure_reason(plain + "\n") == plain

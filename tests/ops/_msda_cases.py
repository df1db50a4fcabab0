"""Shared inputs and an independent float64 loop-based reference for the ms_deform_attn tests."""
from __future__ import annotations

import math

import torch

# (N, level shapes, M, D, Lq, P): odd H/W, 1-5 levels, 1-8 points, D not a multiple of 4/8
SHAPES = [
    (1, [(5, 7)], 1, 4, 3, 1),
    (2, [(6, 4), (3, 2)], 2, 8, 5, 2),
    (1, [(9, 11), (5, 6), (3, 3)], 3, 5, 4, 4),
    (2, [(7, 9), (4, 5), (2, 3), (1, 1)], 2, 16, 6, 3),
    (1, [(8, 13), (4, 7), (2, 4), (1, 2), (1, 1)], 2, 3, 3, 8),
    (3, [(3, 5), (2, 2)], 1, 32, 2, 5),
]


def make_inputs(n, levels, m, d, lq, p, dtype=torch.float64, device="cpu", seed=0,
                edges=True, exact_minus_one=False):
    """Random inputs; locations span [-0.3, 1.3] and, with ``edges``, include exact 0 and 1
    borders; ``exact_minus_one`` adds points exactly at h_im = -1 / w_im = -1 (the official
    sampling cut-off, where grid_sample's gradient differs, so only for forward checks)."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.int64)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    s = int(areas.sum())
    L = len(levels)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    loc = torch.rand(n, lq, m, L, p, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    if edges:
        flat = loc.view(-1, 2)
        k = flat.shape[0]
        idx = torch.randperm(k, generator=g)
        flat[idx[: k // 8], 0] = 0.0
        flat[idx[k // 8: k // 4], 1] = 1.0
        flat[idx[k // 4: k // 4 + k // 16]] = 1.0
        flat[idx[k // 4 + k // 16: k // 4 + k // 8]] = torch.tensor([-0.9, 2.0], dtype=torch.float64)
    if exact_minus_one:
        # x * W - 0.5 == -1  <=>  x == -0.5 / W  (exactly representable when W is a power of 2
        # is not needed: the test compares with the same float64 arithmetic)
        for lvl, (h, w) in enumerate(levels):
            loc[:, 0, :, lvl, 0, 0] = -0.5 / w
            loc[:, 0, :, lvl, 0, 1] = -0.5 / h
    logits = torch.randn(n, lq, m, L * p, generator=g, dtype=torch.float64)
    weights = logits.softmax(-1).view(n, lq, m, L, p)
    cast = dict(device=device)
    return (value.to(dtype=dtype, **cast), shapes.to(**cast), starts.to(**cast),
            loc.to(**cast), weights.to(**cast))


def naive_ms_deform_attn(value, shapes, starts, loc, weights):
    """Loop-based float64 evaluation of the official op (bilinear, h_im = y*H - 0.5,
    sampled only if -1 < h_im < H and -1 < w_im < W, zero outside). Returns (N, Lq, M*D)."""
    value = value.detach().double().cpu()
    loc = loc.detach().double().cpu()
    weights = weights.detach().double().cpu()
    n_, _, m_, d_ = value.shape
    _, lq_, _, l_, p_, _ = loc.shape
    out = torch.zeros(n_, lq_, m_, d_, dtype=torch.float64)
    for n in range(n_):
        for q in range(lq_):
            for m in range(m_):
                acc = torch.zeros(d_, dtype=torch.float64)
                for lvl in range(l_):
                    h, w = (int(v) for v in shapes[lvl])
                    start = int(starts[lvl])
                    for p in range(p_):
                        x, y = float(loc[n, q, m, lvl, p, 0]), float(loc[n, q, m, lvl, p, 1])
                        a = float(weights[n, q, m, lvl, p])
                        h_im, w_im = y * h - 0.5, x * w - 0.5
                        if not (-1 < h_im < h and -1 < w_im < w):
                            continue
                        h0, w0 = math.floor(h_im), math.floor(w_im)
                        lh, lw = h_im - h0, w_im - w0
                        for hi, wi, cw in ((h0, w0, (1 - lh) * (1 - lw)), (h0, w0 + 1, (1 - lh) * lw),
                                           (h0 + 1, w0, lh * (1 - lw)), (h0 + 1, w0 + 1, lh * lw)):
                            if 0 <= hi < h and 0 <= wi < w:
                                acc += a * cw * value[n, start + hi * w + wi, m]
                out[n, q, m] = acc
    return out.view(n_, lq_, m_ * d_)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b the float64 reference)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def naive_ms_deform_attn_backward(value, shapes, starts, loc, weights, grad_out):
    """Loop-based float64 gradients of the official op with respect to value, sampling
    locations and attention weights (derived by hand from the bilinear formula)."""
    value = value.detach().double().cpu()
    loc = loc.detach().double().cpu()
    weights = weights.detach().double().cpu()
    n_, _, m_, d_ = value.shape
    _, lq_, _, l_, p_, _ = loc.shape
    gout = grad_out.detach().double().cpu().view(n_, lq_, m_, d_)
    g_val, g_loc, g_w = torch.zeros_like(value), torch.zeros_like(loc), torch.zeros_like(weights)
    for n in range(n_):
        for q in range(lq_):
            for m in range(m_):
                go = gout[n, q, m]
                for lvl in range(l_):
                    h, w = (int(v) for v in shapes[lvl])
                    start = int(starts[lvl])
                    for p in range(p_):
                        x, y = float(loc[n, q, m, lvl, p, 0]), float(loc[n, q, m, lvl, p, 1])
                        a = float(weights[n, q, m, lvl, p])
                        h_im, w_im = y * h - 0.5, x * w - 0.5
                        if not (-1 < h_im < h and -1 < w_im < w):
                            continue
                        h0, w0 = math.floor(h_im), math.floor(w_im)
                        lh, lw = h_im - h0, w_im - w0
                        hh, hw = 1 - lh, 1 - lw
                        # (row, col, bilinear weight, d weight / d lw, d weight / d lh)
                        corners = ((h0, w0, hh * hw, -hh, -hw), (h0, w0 + 1, hh * lw, hh, -lw),
                                   (h0 + 1, w0, lh * hw, -lh, hw), (h0 + 1, w0 + 1, lh * lw, lh, lw))
                        for hi, wi, cw, dlw, dlh in corners:
                            if not (0 <= hi < h and 0 <= wi < w):
                                continue
                            s = start + hi * w + wi
                            dot = float(go @ value[n, s, m])
                            g_val[n, s, m] += a * cw * go
                            g_w[n, q, m, lvl, p] += cw * dot
                            g_loc[n, q, m, lvl, p, 0] += a * dlw * w * dot
                            g_loc[n, q, m, lvl, p, 1] += a * dlh * h * dot
    return g_val, g_loc, g_w

"""Sine position encodings against a direct, loop-based evaluation of the formulas."""
from __future__ import annotations

import math

import pytest
import torch

from dino_scale.models.position_encoding import PositionEmbeddingSine, gen_sineembed_for_position


def _feature(v: float, i: int, n: int, temperature: float) -> float:
    """Feature i of the sine/cos embedding of scalar v (sin on even i, cos on odd i)."""
    angle = v / temperature ** (2 * (i // 2) / n)
    return math.sin(angle) if i % 2 == 0 else math.cos(angle)


def test_sine_embedding_matches_formula_with_padding():
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1, 3:, :] = True  # image 1: valid 3 x 4
    mask[1, :, 4:] = True
    n = 8
    pos = PositionEmbeddingSine(num_pos_feats=n, temperature_h=20, temperature_w=20)(mask)
    assert pos.shape == (2, 2 * n, 5, 7) and pos.dtype == torch.float32
    for b, (vh, vw) in enumerate([(5, 7), (3, 4)]):
        for y in range(vh):
            for x in range(vw):
                ye = (y + 1) / (vh + 1e-6) * 2 * math.pi  # cumsum, normalized, no -0.5 offset
                xe = (x + 1) / (vw + 1e-6) * 2 * math.pi
                expect = [_feature(ye, i, n, 20) for i in range(n)] + [_feature(xe, i, n, 20) for i in range(n)]
                torch.testing.assert_close(pos[b, :, y, x], torch.tensor(expect), atol=1e-5, rtol=1e-5)
    # the last valid row/column reaches 2*pi (normalized over the valid area, not the padded one)
    assert abs(math.sin(2 * math.pi) - pos[1, 0, 2, 0].item()) < 1e-4


def test_gen_sineembed_order_and_values():
    box = torch.tensor([[[0.1, 0.7, 0.3, 0.2]]])  # x, y, w, h
    emb = gen_sineembed_for_position(box)
    assert emb.shape == (1, 1, 512)
    parts = emb[0, 0].split(128)
    for part, v in zip(parts, [0.7, 0.1, 0.3, 0.2]):  # order (y, x, w, h)
        expect = [_feature(v * 2 * math.pi, i, 128, 10000) for i in range(128)]
        torch.testing.assert_close(part, torch.tensor(expect), atol=1e-5, rtol=1e-5)
    emb2 = gen_sineembed_for_position(box[..., :2])
    assert emb2.shape == (1, 1, 256)
    torch.testing.assert_close(emb2, emb[..., :256])


def test_gen_sineembed_one_pass_equals_per_coordinate_bit_for_bit():
    from dino_scale.models.position_encoding import _interleave_sin_cos
    torch.manual_seed(0)
    for n in (2, 4):
        pos = torch.rand(3, 7, n)
        dim = torch.arange(128, dtype=torch.float32)
        dim_t = 10000.0 ** (2 * torch.div(dim, 2, rounding_mode="floor") / 128)
        per = [_interleave_sin_cos((pos[..., i] * (2 * math.pi))[..., None] / dim_t) for i in range(n)]
        want = torch.cat([per[1], per[0]] + per[2:], -1)
        assert torch.equal(gen_sineembed_for_position(pos), want)
    with pytest.raises(ValueError, match="shape"):
        gen_sineembed_for_position(torch.rand(2, 3))

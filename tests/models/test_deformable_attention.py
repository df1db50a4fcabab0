"""MSDeformAttn module: argument checks at construction and shape checks at forward (CPU)."""
from __future__ import annotations

import re

import pytest
import torch

from dino_scale.models.deformable_attention import MSDeformAttn
from dino_scale.ops import level_index_tensors


def test_unknown_backend_is_rejected_at_construction():
    # a typo in ModelConfig.msda_backend built the whole model and only failed in the first
    # forward (after the cluster, data pipeline and checkpoint load had started)
    for bad in ("torch", "CUDA", "triton"):
        with pytest.raises(ValueError, match="unknown ms_deform_attn backend"):
            MSDeformAttn(32, n_levels=2, n_heads=4, n_points=2, backend=bad)
    for ok in (None, "pytorch", "cuda"):
        assert MSDeformAttn(32, n_levels=2, n_heads=4, n_points=2, backend=ok).backend == ok


def test_levels_of_the_input_must_match_n_levels():
    # one level's spatial_shapes into a 2-level module with 1 point: was a full-size output on
    # the CPU path (level 0 sampled, weighted by the weights of both levels); now a ValueError
    # from the op's shape check
    torch.manual_seed(0)
    m = MSDeformAttn(32, n_levels=2, n_heads=4, n_points=1, backend="pytorch")
    query, ref = torch.randn(2, 5, 32), torch.rand(2, 5, 2, 4)
    shapes, starts = level_index_tensors([(4, 4)], "cpu")
    with pytest.raises(ValueError, match=r"spatial_shapes \(1, 2\) must be \(2, 2\)"):
        m(query, ref, torch.randn(2, 16, 32), shapes, starts)
    shapes2, starts2 = level_index_tensors([(4, 4), (1, 2)], "cpu")
    out = m(query, ref, torch.randn(2, 18, 32), shapes2, starts2)
    assert out.shape == (2, 5, 32) and torch.isfinite(out).all()


def test_msdeform_attn_inputs_of_another_level_count_are_refused_by_name():
    """Inputs built for another number of levels than the layer's: a raw broadcast error
    ("size of tensor a (4) must match ... (3)"), or, for reference points of one level, a silent
    broadcast to every level. Each is refused naming the input and the layer's n_levels."""
    layer = MSDeformAttn(32, n_levels=4, n_heads=4, n_points=2, backend="pytorch")
    shapes, start = level_index_tensors([(6, 8), (3, 4), (2, 2), (1, 1)], "cpu")
    S = 48 + 12 + 4 + 1
    query, value = torch.randn(2, 5, 32), torch.randn(2, S, 32)
    assert layer(query, torch.rand(2, 5, 4, 2), value, shapes, start).shape == (2, 5, 32)
    with pytest.raises(ValueError, match=r"spatial_shapes \(3, 2\) must be \(4, 2\).*n_levels=4"):
        layer(query, torch.rand(2, 5, 4, 2), value, shapes[:3], start[:3])
    for levels in (3, 1):
        with pytest.raises(ValueError, match=rf"reference_points \(2, 5, {levels}, 2\) must be \(2, 5, 4, 2 or 4\)"):
            layer(query, torch.rand(2, 5, levels, 2), value, shapes, start)


def test_padding_mask_or_value_of_another_batch_is_refused_by_name():
    """A (1,S) or (S,) padding mask was broadcast silently to every image (each image masked as
    the first one), and a value of another batch than the query's failed with a raw ``view``
    error. Both are refused naming the shapes (shapes only: no read-back)."""
    layer = MSDeformAttn(32, n_levels=2, n_heads=4, n_points=2, backend="pytorch")
    shapes, start = level_index_tensors([(4, 4), (2, 2)], "cpu")
    query, ref, value = torch.randn(2, 5, 32), torch.rand(2, 5, 2, 2), torch.randn(2, 20, 32)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[1, 12:16] = True
    assert layer(query, ref, value, shapes, start, mask).shape == (2, 5, 32)
    for bad in (mask[:1], mask[0], mask[:, :19]):
        with pytest.raises(ValueError, match=rf"padding_mask {re.escape(str(tuple(bad.shape)))} must be \(2, 20\)"):
            layer(query, ref, value, shapes, start, bad)
    for bad in (value[:1], value[0], value[..., :16]):
        with pytest.raises(ValueError, match=rf"value_in {re.escape(str(tuple(bad.shape)))} must be \(2, S, 32\)"):
            layer(query, ref, bad, shapes, start)

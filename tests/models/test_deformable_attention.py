"""MSDeformAttn module: argument checks at construction and shape checks at forward (CPU)."""
from __future__ import annotations

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
    with pytest.raises(ValueError, match="spatial_shapes must be"):
        m(query, ref, torch.randn(2, 16, 32), shapes, starts)
    shapes2, starts2 = level_index_tensors([(4, 4), (1, 2)], "cpu")
    out = m(query, ref, torch.randn(2, 18, 32), shapes2, starts2)
    assert out.shape == (2, 5, 32) and torch.isfinite(out).all()

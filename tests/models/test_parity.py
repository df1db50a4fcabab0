"""Numerical parity with the official DINO: golden weights + batch -> golden outputs (1e-4)."""
from __future__ import annotations

import pytest
import torch

from dino_scale.models.official import load_official_state_dict
from dino_scale.models.postprocess import PostProcess
from dino_model_cache import cached_model, golden_weights

TOL = 1e-4


def _check_parity(golden, name):
    model = cached_model(name)
    load_official_state_dict(model, golden_weights(golden, name))
    model.eval()
    images, masks, sizes = golden.golden_batch()
    ref = torch.load(golden.golden_path(name), weights_only=True)
    with torch.no_grad():
        out = model(images, masks)
    rel = golden.relative_error
    errors = {
        "pred_logits": rel(out["pred_logits"], ref["pred_logits"]),
        "pred_boxes": rel(out["pred_boxes"], ref["pred_boxes"]),
        "aux_pred_boxes": rel(torch.stack([a["pred_boxes"] for a in out["aux_outputs"]]), ref["aux_pred_boxes"]),
        "aux_pred_logits_first100": rel(torch.stack([a["pred_logits"][:, :100] for a in out["aux_outputs"]]),
                                        ref["aux_pred_logits_first100"]),
        "interm_pred_boxes": rel(out["interm_outputs"]["pred_boxes"], ref["interm_pred_boxes"]),
        "interm_pred_logits_first100": rel(out["interm_outputs"]["pred_logits"][:, :100],
                                           ref["interm_pred_logits_first100"]),
    }
    post = PostProcess(300)(out, sizes)
    for i, (ours, theirs) in enumerate(zip(post, ref["post"])):
        assert ours["boxes"].shape == (300, 4) and ours["labels"].dtype == torch.int64
        errors[f"post[{i}]"] = golden.match_post(ours, theirs)
    assert out["dn_meta"] is None
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"{name}: relative errors above {TOL}: {bad} (all: {errors})"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["r50_4scale", "r50_5scale"])
def test_parity_r50(golden, name):
    _check_parity(golden, name)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_parity_swinl_4scale(golden):
    _check_parity(golden, "swinl_4scale")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(300)
def test_parity_r50_4scale_cuda(golden):
    """The same golden check on the GPU (TF32 off; default ms_deform_attn backend)."""
    from dino_scale.config import preset
    from dino_scale.models import build_model

    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model = build_model(preset("r50_4scale").model).cuda().eval()
        load_official_state_dict(model, golden_weights(golden, "r50_4scale"))
        images, masks, sizes = golden.golden_batch()
        ref = torch.load(golden.golden_path("r50_4scale"), weights_only=True)
        with torch.no_grad():
            out = model(images.cuda(), masks.cuda())
        assert golden.relative_error(out["pred_logits"].cpu(), ref["pred_logits"]) <= TOL
        assert golden.relative_error(out["pred_boxes"].cpu(), ref["pred_boxes"]) <= TOL
        post = PostProcess(300)(out, sizes.cuda())
        for ours, theirs in zip(post, ref["post"]):
            assert golden.match_post({k: v.cpu() for k, v in ours.items()}, theirs) <= TOL
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev

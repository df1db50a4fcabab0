"""Numerical parity with the official DINO: golden weights + batch -> golden outputs (1e-4).

Two-stage query selection ranks ~2-3k encoder tokens and keeps 900; each kept slot is paired
with its own learned content query, so two tokens whose scores differ by ~1e-7 and swap rank
change those slots' outputs completely. Such near-ties exist in the golden batch, and other
hardware (another CPU's BLAS, a GPU, another torch) rounds differently: on an H100 a handful of
slots swapped and 9% of the boxes moved. So each check first compares as is; if that fails,
it verifies that the selection differs from the official one (``parity_selection.pt``: the
indices the official run selected, recorded where this code matched its goldens to 3e-7) only
between tokens whose scores agree to 1e-4, forces the official selection and requires 1e-4
parity of everything else (backbone, encoder, deformable attention, decoder, heads).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import dino_scale.models.transformer as transformer_mod
from dino_scale.models.official import load_official_state_dict
from dino_scale.models.postprocess import PostProcess
from dino_model_cache import cached_model, golden_weights

TOL = 1e-4
NEAR_TIE = 1e-4  # relative score gap under which a rank swap is a rounding effect
SELECTION = Path(__file__).with_name("parity_selection.pt")


def _run(model, golden, name, device, forced=None):
    """Forward the golden batch; returns (errors dict, selected indices (B,900), scores (B,S))."""
    captured = {}
    original = transformer_mod.select_topk_queries

    def select(class_logits, k):
        idx = original(class_logits, k) if forced is None else forced.to(class_logits.device)
        captured["idx"], captured["scores"] = idx.cpu(), class_logits.max(-1)[0].float().cpu()
        return idx

    images, masks, sizes = golden.golden_batch()
    ref = torch.load(golden.golden_path(name), weights_only=True)
    transformer_mod.select_topk_queries = select
    try:
        with torch.no_grad():
            out = model(images.to(device), masks.to(device))
    finally:
        transformer_mod.select_topk_queries = original
    rel = golden.relative_error
    cpu = lambda t: t.detach().float().cpu()  # noqa: E731
    errors = {
        "pred_logits": rel(cpu(out["pred_logits"]), ref["pred_logits"]),
        "pred_boxes": rel(cpu(out["pred_boxes"]), ref["pred_boxes"]),
        "aux_pred_boxes": rel(torch.stack([cpu(a["pred_boxes"]) for a in out["aux_outputs"]]), ref["aux_pred_boxes"]),
        "aux_pred_logits_first100": rel(torch.stack([cpu(a["pred_logits"][:, :100]) for a in out["aux_outputs"]]),
                                        ref["aux_pred_logits_first100"]),
        "interm_pred_boxes": rel(cpu(out["interm_outputs"]["pred_boxes"]), ref["interm_pred_boxes"]),
        "interm_pred_logits_first100": rel(cpu(out["interm_outputs"]["pred_logits"][:, :100]),
                                           ref["interm_pred_logits_first100"]),
    }
    post = PostProcess(300)(out, sizes.to(device))
    for i, (ours, theirs) in enumerate(zip(post, ref["post"])):
        assert ours["boxes"].shape == (300, 4) and ours["labels"].dtype == torch.int64
        errors[f"post[{i}]"] = golden.match_post({k: v.cpu() for k, v in ours.items()}, theirs)
    assert out["dn_meta"] is None
    return errors, captured["idx"], captured["scores"]


def _swaps_are_near_ties(ours: torch.Tensor, official: torch.Tensor, scores: torch.Tensor) -> float:
    """Largest relative score gap between the tokens ours and the official run put in the
    same slot (0 when the selections agree)."""
    worst = 0.0
    scale = scores.abs().max().item()
    for b in range(ours.shape[0]):
        diff = ours[b] != official[b]
        if diff.any():
            gap = (scores[b, ours[b][diff]] - scores[b, official[b][diff]]).abs().max().item()
            worst = max(worst, gap / scale)
    return worst


def check_parity(golden, name, model, device="cpu"):
    errors, selected, scores = _run(model, golden, name, device)
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    if not bad:
        return errors
    official = torch.load(SELECTION, weights_only=True)[name]
    assert not torch.equal(selected, official), \
        f"{name}: same query selection as the official run, yet errors above {TOL}: {bad} (all: {errors})"
    gap = _swaps_are_near_ties(selected, official, scores)
    assert gap <= NEAR_TIE, f"{name}: query selection differs beyond near-ties (gap {gap:.2e}); errors {bad}"
    forced, _, _ = _run(model, golden, name, device, forced=official)
    bad = {k: v for k, v in forced.items() if not v <= TOL}
    assert not bad, f"{name}: with the official query selection, errors above {TOL}: {bad} (all: {forced})"
    n_swapped = int((selected != official).sum())
    warnings.warn(f"{name} on {device}: {n_swapped} near-tied query slots ranked differently than in the "
                  f"official run (score gap <= {gap:.1e}); parity holds with the official selection")
    return forced


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["r50_4scale", "r50_5scale"])
def test_parity_r50(golden, name):
    model = cached_model(name)
    load_official_state_dict(model, golden_weights(golden, name))
    check_parity(golden, name, model.eval())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_parity_swinl_4scale(golden):
    model = cached_model("swinl_4scale")
    load_official_state_dict(model, golden_weights(golden, "swinl_4scale"))
    check_parity(golden, "swinl_4scale", model.eval())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["r50_4scale", "swinl_4scale"])
def test_parity_cuda(golden, name):
    """The same golden check on the GPU (TF32 off; default ms_deform_attn backend: the kernel)."""
    from dino_scale.config import preset
    from dino_scale.models import build_model

    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model = build_model(preset(name).model)
        load_official_state_dict(model, golden_weights(golden, name))
        check_parity(golden, name, model.cuda().eval(), device="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def test_near_tie_measure():
    scores = torch.tensor([[3.0, 2.0, 2.0 + 1e-7, 1.0]])
    official = torch.tensor([[0, 2, 1]])
    assert _swaps_are_near_ties(official, official, scores) == 0.0
    assert _swaps_are_near_ties(torch.tensor([[0, 1, 2]]), official, scores) < 1e-6
    assert _swaps_are_near_ties(torch.tensor([[0, 3, 1]]), official, scores) > 0.1


def check_bf16_close_to_fp32(golden, model, device: str) -> None:
    """Eval outputs of ``model`` (golden weights loaded, eval mode, on ``device``) under bf16
    autocast stay within 1e-2 relative of its fp32 outputs on the golden batch. The query
    selection is pinned to the fp32 one (a near-tie can swap ranks under bf16 rounding, see
    the module docstring)."""
    images, masks, _ = golden.golden_batch()
    images, masks = images.to(device), masks.to(device)
    captured = {}
    original = transformer_mod.select_topk_queries

    def select(class_logits, k):
        if "idx" not in captured:
            captured["idx"] = original(class_logits, k)
        return captured["idx"]

    transformer_mod.select_topk_queries = select
    try:
        with torch.no_grad():
            ref = model(images, masks)
            with torch.autocast(device, dtype=torch.bfloat16):
                out = model(images, masks)
    finally:
        transformer_mod.select_topk_queries = original
    for key in ("pred_logits", "pred_boxes"):
        assert out[key].dtype in (torch.bfloat16, torch.float32)
        err = golden.relative_error(out[key].float().cpu(), ref[key].cpu())
        print(f"bf16 vs fp32 on {device} {key}: relative error {err:.2e}")
        assert err <= 1e-2, (device, key, err)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bf16_eval_outputs_within_1e_2_of_fp32(golden):
    """Same (official golden) weights and batch: eval outputs under bf16 autocast stay within
    1e-2 relative of fp32 (CPU)."""
    name = "r50_4scale"
    model = cached_model(name)
    load_official_state_dict(model, golden_weights(golden, name))
    check_bf16_close_to_fp32(golden, model.eval(), "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["r50_4scale", "swinl_4scale"])
def test_bf16_eval_outputs_within_1e_2_of_fp32_cuda(golden, name):
    """Issue 8's accuracy guard on the GPU path itself: bf16 autocast with the bf16 MSDA kernel
    against fp32 (TF32 off) on the same golden weights."""
    from dino_scale.config import preset
    from dino_scale.models import build_model

    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model = build_model(preset(name).model)
        load_official_state_dict(model, golden_weights(golden, name))
        check_bf16_close_to_fp32(golden, model.to("cuda").eval(), "cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev

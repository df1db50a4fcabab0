"""Regional torch.compile (dino_scale.models.compile): same outputs and gradients as eager,
unchanged state-dict keys (checkpoints and the official loader keep working)."""
from __future__ import annotations

import pytest
import torch

from dino_scale.config import preset
from dino_scale.models import build_dino
from dino_scale.models.compile import compile_regions


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_layers_match_eager_and_keep_keys():
    torch.manual_seed(0)
    cfg = preset("tiny").model
    model, criterion, _ = build_dino(cfg)
    images = torch.randn(2, 3, 192, 256)
    masks = torch.zeros(2, 192, 256, dtype=torch.bool)
    masks[1, :, 200:] = True
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
               {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.3]])}]
    model.eval()
    with torch.no_grad():
        ref = model(images, masks)
    keys = list(model.state_dict())
    names = compile_regions(model, backbone=False)
    assert len(names) == cfg.enc_layers + 3
    assert names[-3:] == ["transformer.decoder.step", "transformer.flatten_levels", "transformer.select_queries"]
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        out = model(images, masks)
    for k in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4)
    # training: gradients flow through the compiled layers to every encoder/decoder weight
    model.train()
    torch.manual_seed(1)
    losses = criterion(model(images, masks, targets), targets)
    sum(losses.values()).backward()
    layer = model.transformer.encoder.layers[0]
    assert layer.linear1.weight.grad is not None and torch.isfinite(layer.linear1.weight.grad).all()
    assert model.transformer.decoder.layers[-1].cross_attn.value_proj.weight.grad is not None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stack_granularity_matches_eager():
    torch.manual_seed(0)
    cfg = preset("tiny").model
    model, _, _ = build_dino(cfg)
    model.eval()
    images = torch.randn(1, 3, 160, 224)
    masks = torch.zeros(1, 160, 224, dtype=torch.bool)
    with torch.no_grad():
        ref = model(images, masks)
    names = compile_regions(model, backbone=False, granularity="stack")
    assert names == ["transformer.encoder", "transformer.decoder", "transformer.flatten_levels",
                     "transformer.select_queries"]
    with torch.no_grad():
        out = model(images, masks)
    for k in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="granularity"):
        compile_regions(model, granularity="model")
    with pytest.raises(ValueError, match="compile mode"):
        compile_regions(model, mode="fastest")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_backbone_regions_compile_level_encodings_and_match_eager():
    """backbone=True compiles the backbone body and, as its own region, every level's mask and
    position embedding (one call per forward); outputs match eager at two input sizes (the
    second with padding: the masks' cumulative sums matter), and state-dict keys are unchanged."""
    torch.manual_seed(0)
    cfg = preset("tiny").model
    model, _, _ = build_dino(cfg)
    model.eval()
    inputs = []
    for h, w, pad in ((160, 224, 0), (192, 256, 40)):
        masks = torch.zeros(2, h, w, dtype=torch.bool)
        if pad:
            masks[1, :, w - pad:] = True
            masks[0, h - pad // 2:, :] = True
        inputs.append((torch.randn(2, 3, h, w), masks))
    with torch.no_grad():
        refs = [model(i, m) for i, m in inputs]
        ref_levels = [model.backbone.level_encodings(m, model._features(i, m)[0]) for i, m in inputs]
    keys = list(model.state_dict())
    # aot_eager: dynamo + AOT autograd without code generation (the inductor path of the layers is
    # covered above; compiling the backbone with inductor would cost CI minutes)
    names = compile_regions(model, backbone=True, granularity="stack", backend="aot_eager")
    assert "backbone.level_encodings" in names and "backbone.0" in names
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        for (i, m), ref, (ref_masks, ref_pos) in zip(inputs, refs, ref_levels):
            out = model(i, m)
            for k in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4)
            masks, pos = model.backbone.level_encodings(m, model._features(i, m)[0])
            assert all(torch.equal(a, b) for a, b in zip(masks, ref_masks))
            for a, b in zip(pos, ref_pos):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    compiled = model.backbone.level_encodings
    again = compile_regions(model, backbone=True, granularity="stack", backend="aot_eager")
    assert "backbone.level_encodings" not in again and model.backbone.level_encodings is compiled  # not twice

"""DINO forward/backward on a padded batch of different image sizes (tiny preset)."""
from __future__ import annotations

import math
import re

import pytest
import torch

from dino_scale.config import preset
from dino_scale.models import build_dino


def _batch():
    """Two images (96x128 and 80x96) padded into one (2,3,96,128) batch, as a collate would."""
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(2, 3, 96, 128)
    masks = torch.ones(2, 96, 128, dtype=torch.bool)
    for i, (h, w) in enumerate([(96, 128), (80, 96)]):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        masks[i, :h, :w] = False
    targets = [{"labels": torch.tensor([3, 17]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.2, 0.3, 0.1, 0.2]])},
               {"labels": torch.tensor([90]), "boxes": torch.tensor([[0.6, 0.4, 0.5, 0.5]])}]
    return images, masks, targets


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = preset("tiny").model
    model, criterion, post = build_dino(cfg)
    return cfg, model, criterion, post


def _loss(criterion, out, targets):
    losses = criterion(out, targets)
    return sum(criterion.weight_dict[k] * v for k, v in losses.items() if k in criterion.weight_dict), losses


def test_train_forward_backward_with_denoising(tiny):
    cfg, model, criterion, _ = tiny
    images, masks, targets = _batch()
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(images, masks, targets)
    Q, C, L = cfg.num_queries, cfg.num_classes, cfg.dec_layers
    assert out["pred_logits"].shape == (2, Q, C) and out["pred_boxes"].shape == (2, Q, 4)
    assert len(out["aux_outputs"]) == L - 1
    assert out["interm_outputs"]["pred_boxes"].shape == (2, Q, 4)
    meta = out["dn_meta"]
    groups = cfg.dn_number // 2  # max 2 boxes per image
    assert meta["num_dn_group"] == groups and meta["pad_size"] == 2 * 2 * groups
    dn = meta["output_known_lbs_bboxes"]
    assert dn["pred_logits"].shape == (2, meta["pad_size"], C) and len(dn["aux_outputs"]) == L - 1
    loss, losses = _loss(criterion, out, targets)
    assert math.isfinite(loss.item()) and "loss_bbox_dn" in losses
    loss.backward()
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in ["label_enc.weight", "transformer.tgt_embed.weight",
                 "transformer.decoder.ref_point_head.layers.0.weight", "bbox_embed.0.layers.2.weight",
                 "transformer.enc_out_class_embed.weight",
                 "input_proj.3.0.weight", "backbone.0.body.layer2.0.conv1.weight",
                 "transformer.encoder.layers.0.self_attn.sampling_offsets.weight"]:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert params["backbone.0.body.layer1.0.conv1.weight"].grad is None  # frozen


def test_eval_mode_forward_with_targets_has_no_dn_and_backward_works(tiny):
    _, model, criterion, post = tiny
    images, masks, targets = _batch()
    model.eval()
    model.zero_grad(set_to_none=True)
    out = model(images, masks, targets)
    assert out["dn_meta"] is None
    loss, losses = _loss(criterion, out, targets)
    loss.backward()
    assert model.transformer.tgt_embed.weight.grad.abs().sum() > 0
    res = post(out, torch.tensor([[480, 640], [400, 480]]))
    assert res[1]["boxes"].shape == (50, 4) and (res[1]["boxes"][:, 2:] >= res[1]["boxes"][:, :2] - 1e-4).all()


def test_batch_without_boxes_trains(tiny):
    _, model, criterion, _ = tiny
    images, masks, _ = _batch()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(images, masks, empty)
    assert out["pred_logits"].shape[1] == model.num_queries
    loss, _ = _loss(criterion, out, empty)
    loss.backward()
    assert math.isfinite(loss.item()) and model.label_enc.weight.grad is not None


def test_encoder_checkpointing_gives_same_outputs_and_grads(checkpointed):
    cfg = preset("tiny", {"model.enc_layers": 2, "model.dec_layers": 1}).model
    torch.manual_seed(0)
    model, _, _ = build_dino(cfg)
    model.eval()
    images, masks, _ = _batch()
    results, calls = [], []
    for ckpt in (False, True):
        model.transformer.encoder.checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        checkpointed.clear()
        out = model(images, masks)
        (out["pred_boxes"].sum() + out["pred_logits"].sum()).backward()
        calls.append(list(checkpointed))
        results.append((out["pred_logits"].detach(), model.transformer.encoder.layers[0].linear1.weight.grad.clone()))
    assert calls[0] == []  # off: never checkpointed
    assert [id(f) for f in calls[1]] == [id(layer) for layer in model.transformer.encoder.layers]  # on: each layer once
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_bad_inputs_are_rejected(tiny):
    _, model, _, _ = tiny
    with pytest.raises(ValueError, match="masks"):
        model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 32, 32, dtype=torch.bool))


def test_bf16_autocast_train_step(tiny):
    """Mixed precision (as precision=bf16 runs it): finite loss and gradients."""
    _, model, criterion, _ = tiny
    images, masks, targets = _batch()
    model.train()
    model.zero_grad(set_to_none=True)
    device = images.device.type
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(images, masks, targets)
        loss, _ = _loss(criterion, out, targets)
    loss.backward()
    assert math.isfinite(loss.item())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("share_cls", [True, False])
def test_class_scores_are_fp32_under_bf16_autocast(share_cls):
    """Under bf16 autocast (precision=bf16 training and evaluation) every class head runs in fp32:
    the decoder's logits (final and aux), the encoder head's scores the two-stage top-k selects
    from and its interm outputs. Was: bf16 logits, whose 8-bit mantissa tied many detections'
    scores (COCOeval then ranks ties by list position) and the encoder tokens top-k chose from."""
    torch.manual_seed(0)
    cfg = preset("tiny").model
    cfg = type(cfg)(**{**cfg.__dict__, "dec_pred_class_embed_share": share_cls})
    model = build_dino(cfg)[0].eval()
    head_outputs = []
    heads = list({id(h): h for h in [model.transformer.enc_out_class_embed, *model.class_embed]}.values())
    hooks = [h.register_forward_hook(lambda m, i, o: head_outputs.append((i[0].dtype, o.dtype))) for h in heads]
    images, masks, _ = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, masks)
    for h in hooks:
        h.remove()
    assert head_outputs and set(head_outputs) == {(torch.float32, torch.float32)}
    assert len(head_outputs) == 2 + (1 if share_cls else len(model.class_embed))
    logits = [out["pred_logits"], out["interm_outputs"]["pred_logits"], *(a["pred_logits"] for a in out["aux_outputs"])]
    assert all(t.dtype == torch.float32 for t in logits)
    final = out["pred_logits"]
    assert (final.to(torch.bfloat16).float() != final).float().mean() > 0.9  # not bf16 values
    assert final.unique().numel() > 0.9 * final.numel()


@pytest.mark.parametrize("share_box,share_cls", [(True, True), (False, True), (False, False)])
def test_decoder_heads_batched_when_shared_equal_per_layer(share_box, share_cls):
    """A head shared by all decoder layers runs once on the stacked layers; the values equal the
    per-layer formulation (rows are independent), and unshared heads keep one head per layer."""
    import dataclasses

    from dino_scale.models.box_ops import inverse_sigmoid

    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("tiny").model, dec_pred_bbox_embed_share=share_box,
                              dec_pred_class_embed_share=share_cls)
    model, _, _ = build_dino(cfg)
    L = cfg.dec_layers
    assert (model.bbox_embed[0] is model.bbox_embed[1]) == share_box
    with torch.no_grad():
        for head in {id(m): m for m in model.bbox_embed}.values():
            head.layers[-1].weight.normal_(0, 0.05)
    hs = [torch.randn(2, 7, cfg.hidden_dim, requires_grad=True) for _ in range(L)]
    refs = [torch.rand(2, 7, 4) for _ in range(L + 1)]
    logits, boxes = model._decoder_heads(hs, refs)
    assert logits.shape == (L, 2, 7, cfg.num_classes) and boxes.shape == (L, 2, 7, 4)
    for l in range(L):
        torch.testing.assert_close(boxes[l], (model.bbox_embed[l](hs[l]) + inverse_sigmoid(refs[l])).sigmoid(),
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(logits[l], model.class_embed[l](hs[l]), rtol=1e-6, atol=1e-6)
    (logits.sum() + boxes.sum()).backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in hs)


def test_more_classes_than_the_denoising_label_book_is_refused_at_build():
    """Label noise draws classes in [0, num_classes) and embeds them with ``label_enc``
    (dn_labelbook_size + 1 rows): a larger class count used to pass the build and fail at the
    first training step ('index out of range in self'; a device assert on a GPU)."""
    with pytest.raises(ValueError, match="dn_labelbook_size"):
        build_dino(preset("tiny", ["model.num_classes=100", "model.dn_labelbook_size=91"]).model)
    build_dino(preset("tiny", ["model.num_classes=100", "model.dn_labelbook_size=91", "model.dn_number=0"]).model)
    model = build_dino(preset("tiny", ["model.num_classes=92", "model.dn_labelbook_size=91"]).model)[0]
    images, masks, targets = _batch()
    targets[0]["labels"] = torch.tensor([91, 0])  # the largest class id the label book embeds
    model.train()
    out = model(images, masks, targets)
    assert out["dn_meta"]["pad_size"] > 0


@pytest.mark.parametrize("setting, value", [("dn_label_noise_ratio", 50.0), ("dn_label_noise_ratio", -0.1),
                                            ("dn_box_noise_scale", -1.0), ("dn_box_noise_scale", float("nan"))])
def test_denoising_noise_out_of_range_is_refused_at_build_and_before_training(setting, value):
    """A label noise ratio of 50 (meant as percent) replaced every denoising label by a random
    class, a negative box noise scale turned the box noise off: both trained without a word.
    Refused by the build and by the driver's check before a run starts; 0 and 1 stay valid."""
    from dino_scale.config import ConfigError
    from dino_scale.engine.trainer import check_training_config

    cfg = preset("tiny", [f"model.{setting}={value}"])
    with pytest.raises(ValueError, match=setting):
        build_dino(cfg.model)
    with pytest.raises(ConfigError, match=f"model.{setting}"):
        check_training_config(cfg)
    check_training_config(preset("tiny", ["model.dn_label_noise_ratio=1", "model.dn_box_noise_scale=0"]))
    with pytest.raises(ConfigError, match="model.num_select"):
        check_training_config(preset("tiny", ["model.num_select=0"]))


@pytest.mark.parametrize("override, needle, build_fails", [
    # build_fails: the ValueError the build or forward raises without the check (None: it builds)
    ("model.backbone=resnet51", "model.backbone 'resnet51' is not one of resnet50", "unknown backbone 'resnet51'"),
    ("model.activation=gelux", "model.activation 'gelux' is not one of relu, gelu", "unknown activation 'gelux'"),
    ("model.msda_backend=pytorchx", "model.msda_backend 'pytorchx' is not one of none, pytorch, cuda",
     "unknown ms_deform_attn backend 'pytorchx'"),
    ("model.hidden_dim=100", "model.hidden_dim 100 must be a multiple of 32",  # GroupNorm(32, .)
     "num_channels (100) must be divisible by num_groups (32)"),
    ("model.nheads=3", "of model.nheads 3", "d_model must be divisible by n_heads, got 64 and 3"),
    ("model.num_queries=0", "model.num_queries must be >= 1", None),  # no detections at all
    ("model.num_classes=0", "model.num_classes must be >= 1", None),
    ("model.dec_n_points=0", "model.dec_n_points must be >= 1", None),  # attends to nothing
    ("model.dn_number=-1", "model.dn_number must be >= 0", None),  # was: denoising off, without a word
    ("model.dropout=1.5", "model.dropout must be in [0, 1)", None),
    ("model.dropout=nan", "model.dropout must be in [0, 1), got nan", None),
])
def test_a_model_setting_that_cannot_build_is_refused_before_training(override, needle, build_fails):
    """These passed the driver's checks: the run converted its data, started Ray and an MLflow
    run, then failed in the workers' build, or trained something that detects nothing, with
    denoising off or with NaN dropout. Each is named before anything starts."""
    from dino_scale.config import ConfigError
    from dino_scale.engine.trainer import check_training_config

    cfg = preset("tiny", [override])
    with pytest.raises(ConfigError, match=re.escape(needle)):
        check_training_config(cfg)
    if build_fails:
        with pytest.raises(ValueError, match=re.escape(build_fails)):  # what the check stands in for
            model = build_dino(cfg.model)[0]
            model.eval()
            model(*_batch()[:2])
    build_dino(preset("tiny", ["model.enc_layers=0", "model.hidden_dim=96", "model.nheads=3"]).model)
    check_training_config(preset("tiny", ["model.enc_layers=0", "model.hidden_dim=96", "model.nheads=3"]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_module_runs_without_autocast(dtype):
    """A module cast to half precision (``model.half()``; what compute_loss / predict_batch feed
    images of the parameters' dtype for) runs without autocast: the decoder's float32 sine
    embedding of the reference boxes used to meet the half ``ref_point_head`` ('mat1 and mat2
    must have the same dtype')."""
    torch.manual_seed(0)
    model = build_dino(preset("tiny").model)[0].to(dtype)
    images, masks, targets = _batch()
    model.train()
    out = model(images.to(dtype), masks, targets)
    assert out["pred_logits"].dtype == dtype and torch.isfinite(out["pred_boxes"]).all()
    model.eval()
    with torch.no_grad():
        out = model(images.to(dtype), masks)
    assert out["pred_logits"].shape == (2, model.num_queries, model.num_classes)


def test_input_with_fewer_tokens_than_queries_runs_as_in_a_larger_batch(tiny):
    """An image whose feature maps hold fewer tokens than ``num_queries`` (a 16x16 thumbnail at
    the tiny preset; a 1:42 banner resized to 32x1333 at r50's 900 queries) used to raise
    'input too small' alone, while the same image batched with a larger one ran: predict,
    evaluation and batch-1 inference died on it. Such a batch is now padded (mask True) to the
    size a batch with a 64x64 image would have: the results equal that batch's, whatever the
    batch composition."""
    _, model, _, post = tiny
    model.eval()
    g = torch.Generator().manual_seed(3)
    small = torch.randn(1, 3, 16, 16, generator=g)
    with torch.no_grad():
        alone = model(small, torch.zeros(1, 16, 16, dtype=torch.bool))
        images = torch.zeros(2, 3, 64, 64)
        masks = torch.ones(2, 64, 64, dtype=torch.bool)
        images[0, :, :16, :16], masks[0, :16, :16] = small[0], False
        images[1], masks[1] = torch.randn(3, 64, 64, generator=g), False
        batched = model(images, masks)
    assert alone["pred_logits"].shape == (1, model.num_queries, model.num_classes)
    torch.testing.assert_close(alone["pred_logits"][0], batched["pred_logits"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alone["pred_boxes"][0], batched["pred_boxes"][0], rtol=1e-4, atol=1e-4)
    boxes = post(alone, torch.tensor([[16, 16]]))[0]["boxes"]
    assert torch.isfinite(boxes).all()
    # a strip: 8x320 gives 40+20+10+5 = 75 tokens, fewer than 100 queries
    torch.manual_seed(0)
    wide = build_dino(preset("tiny", ["model.num_queries=100", "model.num_select=100"]).model)[0].eval()
    with torch.no_grad():
        out = wide(torch.randn(1, 3, 8, 320, generator=g), torch.zeros(1, 8, 320, dtype=torch.bool))
    assert out["pred_boxes"].shape == (1, 100, 4) and torch.isfinite(out["pred_boxes"]).all()


def test_integer_or_wrong_channel_images_are_refused_clearly(tiny):
    """uint8 pixels (an image not yet normalized) failed deep in the backbone with 'expected
    scalar type Byte but found Float', naming neither the images nor the fix; grayscale/RGBA
    tensors with conv1's channel message. Both are now a ValueError naming the images."""
    _, model, _, _ = tiny
    model.eval()
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    with pytest.raises(ValueError, match="floating-point.*normalized"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), masks)
    for channels in (1, 4):
        with pytest.raises(ValueError, match=f"3 channels.*got {channels}"):
            model(torch.zeros(1, channels, 64, 64), masks)


def test_denoising_queries_do_not_leak_into_the_matching_queries(tiny, monkeypatch):
    """The denoising mask was only compared with the reference's example, never checked inside
    the model: dropped or transposed in the decoder, the matching queries would see the noised
    ground truth and every other test would pass. A training forward with targets (denoising
    queries present) gives the matching queries the outputs of one without; without the mask
    they differ."""
    cfg, model, _, _ = tiny
    images, masks, targets = _batch()
    model.train()

    def matching(with_targets: bool) -> dict:
        torch.manual_seed(5)
        with torch.no_grad():
            out = model(images, masks, targets if with_targets else None)
        assert (out["dn_meta"] is not None) == with_targets
        return out

    plain, with_dn = matching(False), matching(True)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(with_dn[key], plain[key], atol=1e-5, rtol=1e-5), key
    # the test can fail: the same forward with the decoder's mask dropped
    forward = model.transformer.forward
    monkeypatch.setattr(model.transformer, "forward", lambda *a: forward(*a[:-1], None))
    leaked = matching(True)
    assert not torch.allclose(leaked["pred_logits"], plain["pred_logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("override", [{}, {"num_feature_levels": 1}, {"enc_layers": 0}])
def test_every_trainable_parameter_gets_a_gradient(override):
    """With one feature level, or no encoder layer, ``transformer.level_embed`` was made and never
    trained (only the encoder reads the position embedding it is added to): a parameter left at
    its random init, and a key the official checkpoints of such a config lack. It is made, as the
    official makes it, for several levels read by an encoder only."""
    import dataclasses

    torch.manual_seed(0)
    model, criterion, _ = build_dino(dataclasses.replace(preset("tiny").model, **override))
    images, masks, targets = _batch()
    model.train()
    loss, _ = _loss(criterion, model(images, masks, targets), targets)
    loss.backward()
    untrained = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert untrained == [] and ("transformer.level_embed" in model.state_dict()) == (not override)

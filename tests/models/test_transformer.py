"""Encoder proposals, two-stage query selection, and look-forward-twice refinement (autograd)."""
from __future__ import annotations

import math

import torch
from torch import nn

import dino_scale.models.level_tables as level_tables
import dino_scale.models.transformer as transformer_mod
from dino_scale.config import preset
from dino_scale.models import build_model
from dino_scale.models.box_ops import inverse_sigmoid
from dino_scale.models.transformer import (MLP, DeformableTransformer, gen_encoder_output_proposals,
                                           select_topk_queries)


def test_proposals_valid_padded_and_border():
    # one level 4 x 60 (border columns fall outside (0.01, 0.99)), one level 2 x 30
    shapes = torch.tensor([[4, 60], [2, 30]])
    mask = torch.zeros(2, 4 * 60 + 2 * 30, dtype=torch.bool)
    m0 = mask[1, :240].view(4, 60)
    m0[3:, :] = True  # image 1 valid 3 x 40 at level 0
    m0[:, 40:] = True
    m1 = mask[1, 240:].view(2, 30)
    m1[:, 20:] = True
    memory = torch.randn(2, 300, 8)
    out, props = gen_encoder_output_proposals(memory, mask, shapes)
    sig = props.sigmoid()
    # image 0, level 0, token (y=1, x=7): center ((7.5)/60, 1.5/4), wh 0.05
    torch.testing.assert_close(sig[0, 1 * 60 + 7], torch.tensor([7.5 / 60, 1.5 / 4, 0.05, 0.05]))
    # image 1, level 1 token (y=0, x=3): normalized by the VALID size 20 x 2, wh 0.1
    torch.testing.assert_close(sig[1, 240 + 3], torch.tensor([3.5 / 20, 0.5 / 2, 0.1, 0.1]))
    assert torch.isinf(props[0, 0]).all()  # x = 0.5/60 < 0.01: invalid border token
    assert torch.isinf(props[1][mask[1]]).all()  # every padded token
    invalid = torch.isinf(props).any(-1)
    assert (out[invalid] == 0).all() and torch.equal(out[~invalid], memory[~invalid])
    assert torch.isfinite(props[~invalid]).all()


def test_select_topk_by_max_class_logit():
    torch.manual_seed(0)
    logits = torch.randn(3, 50, 7)
    idx = select_topk_queries(logits, 10)
    best = logits.max(-1).values
    for b in range(3):
        assert idx[b].tolist() == best[b].argsort(descending=True)[:10].tolist()


def _small_transformer(num_queries=6):
    torch.manual_seed(0)
    t = DeformableTransformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64,
                              num_feature_levels=2, num_queries=num_queries)
    t.enc_out_class_embed = nn.Linear(32, 5)
    t.enc_out_bbox_embed = MLP(32, 32, 4, 3)
    box = MLP(32, 32, 4, 3)
    t.decoder.bbox_embed = nn.ModuleList([box, box])
    return t.eval()


def test_padded_tokens_never_win(monkeypatch):
    """Padded tokens are zeroed before the encoder heads, so their (possibly huge) features never
    decide the selection: they get the logit of an all-zero token, which here is the minimum."""
    t = _small_transformer()
    with torch.no_grad():
        t.enc_output.bias.zero_()  # zero memory -> LayerNorm(0) = 0 -> logits = class bias
        t.enc_out_class_embed.bias.fill_(-20.0)
    chosen = []
    orig = transformer_mod.select_topk_queries
    monkeypatch.setattr(transformer_mod, "select_topk_queries", lambda lg, k: chosen.append(orig(lg, k)) or chosen[-1])
    masks = [torch.zeros(2, 8, 10, dtype=torch.bool), torch.zeros(2, 4, 5, dtype=torch.bool)]
    masks[0][1, :, 3:] = True  # image 1: most tokens are padding
    masks[1][1, :, 2:] = True
    srcs = [torch.randn(2, 32, 8, 10), torch.randn(2, 32, 4, 5)]
    for s, m in zip(srcs, masks):
        s[m[:, None].expand_as(s)] = 1e4  # would dominate any selection if not masked
    pos = [torch.randn_like(s) for s in srcs]
    with torch.no_grad():
        _, _, _, ref_enc, init_props = t(srcs, masks, pos)
    flat_mask = torch.cat([m.flatten(1) for m in masks], 1)
    for b in range(2):
        assert not flat_mask[b, chosen[0][b]].any(), "a padded token was selected"
    assert torch.isfinite(inverse_sigmoid(init_props)).all() and (init_props < 1).all()


def test_look_forward_twice_with_autograd():
    """Layer l+1's boxes are built on layer l's UNDETACHED refinement (so its loss reaches layer
    l's box head output), while the reference layer l+1 takes as input is detached."""
    cfg = preset("tiny").model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-zero box deltas so the refinement moves the boxes
        model.bbox_embed[0].layers[-1].weight.normal_(0, 0.05)
    calls, dec = [], {}
    model.bbox_embed[0].register_forward_hook(lambda m, i, o: calls.append(o))
    model.transformer.decoder.register_forward_hook(lambda m, i, o: dec.update(hs=o[0], refs=o[1]))
    images = torch.randn(1, 3, 96, 128)
    out = model(images, torch.zeros(1, 96, 128, dtype=torch.bool))
    L = cfg.dec_layers
    # L refinements inside the decoder, then the L predictions in one call of the shared head
    assert len(calls) == L + 1 and calls[L].shape[0] == L
    refine, predict = calls[:L], list(calls[L])
    hs, refs = dec["hs"], dec["refs"]
    boxes = [a["pred_boxes"] for a in out["aux_outputs"]] + [out["pred_boxes"]]

    # values: refs[l+1] = sigmoid(delta_l(raw output) + logit(refs[l])); boxes_l = sigmoid(pred_l + logit(refs[l]))
    for l in range(L):
        torch.testing.assert_close(refs[l + 1], (refine[l] + inverse_sigmoid(refs[l])).sigmoid())
        torch.testing.assert_close(boxes[l], (predict[l] + inverse_sigmoid(refs[l])).sigmoid())
    assert not torch.allclose(refine[0], predict[0])  # refinement uses the pre-norm output

    # gradients: layer 1's box loss reaches layer 0's refinement ...
    g = torch.autograd.grad(boxes[1].sum(), [refine[0], refs[1]], retain_graph=True)
    assert g[0].abs().sum() > 0 and g[1].abs().sum() > 0
    # ... but layer 1's decoder output does not depend on the (undetached) refs[1]: its input is detached
    g_hs = torch.autograd.grad(hs[1].sum(), [refs[1], refine[0]], retain_graph=True, allow_unused=True)
    assert g_hs[0] is None and g_hs[1] is None
    # layer 0's own boxes come from the initial references, not from its refinement
    # (outputs of all layers are stacked, so the graph connects them: the gradient is zero, not None)
    g0 = torch.autograd.grad(boxes[0].sum(), [refine[0]], retain_graph=True, allow_unused=True)[0]
    assert g0 is None or g0.abs().sum() == 0
    # the initial references (encoder proposals) are detached from the encoder box head
    enc_w = model.transformer.enc_out_bbox_embed.layers[-1].weight
    g_enc = torch.autograd.grad(out["pred_boxes"].sum(), [enc_w], retain_graph=True, allow_unused=True)[0]
    assert g_enc is None or g_enc.abs().sum() == 0
    g_int = torch.autograd.grad(out["interm_outputs"]["pred_boxes"].sum(), [enc_w])[0]
    assert g_int.abs().sum() > 0 and math.isfinite(g_int.abs().sum().item())


def test_look_forward_twice_reaches_previous_layer_box_head():
    """With one box head per layer: layer 1's box loss trains layer 0's head (through the
    undetached refinement), while layer 1's decoder output is independent of that head."""
    cfg = preset("tiny", {"model.dec_pred_bbox_embed_share": False}).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.bbox_embed[0] is not model.bbox_embed[1]
    assert model.transformer.decoder.bbox_embed[1] is model.bbox_embed[1]
    dec = {}
    model.transformer.decoder.register_forward_hook(lambda m, i, o: dec.update(hs=o[0]))
    out = model(torch.randn(1, 3, 96, 128), torch.zeros(1, 96, 128, dtype=torch.bool))
    head0 = list(model.bbox_embed[0].parameters())
    g = torch.autograd.grad(out["pred_boxes"].sum(), head0, retain_graph=True, allow_unused=True)
    assert all(x is not None for x in g) and sum(x.abs().sum() for x in g) > 0
    g_hs = torch.autograd.grad(dec["hs"][1].sum(), head0, retain_graph=True, allow_unused=True)
    assert all(x is None for x in g_hs)


def test_select_topk_queries_orders_ties_by_descending_index_on_every_device():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 500, 7, generator=g)
    logits[:, 100:400] = 0.25  # 300 tied tokens (as padded / invalid tokens are)
    logits[1, 7] = 0.25
    idx = select_topk_queries(logits, 350)
    scores = logits.max(-1)[0]
    for b in range(2):
        picked = scores[b, idx[b]]
        assert (picked[1:] <= picked[:-1]).all()  # descending scores
        tied = idx[b][picked == 0.25]
        assert (tied[1:] < tied[:-1]).all()  # ties: descending index
        above = (scores[b] > 0.25).nonzero().flatten().tolist()
        assert set(above) <= set(idx[b].tolist())  # every strictly better token is selected
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        assert torch.equal(select_topk_queries(logits.to(dev), 350).cpu(), idx)


def _per_level_reference(memory, mask, level_shapes):
    """The per-level formulation (one meshgrid per level, counts read from the flat mask):
    proposals (B,S,4) before the logit, and the encoder reference points (B,S,L,2)."""
    B = memory.shape[0]
    props, refs, ratios, cur = [], [], [], 0
    for lvl, (h, w) in enumerate(level_shapes):
        m = mask[:, cur:cur + h * w].view(B, h, w)
        vh, vw = (~m[:, :, 0]).sum(1), (~m[:, 0, :]).sum(1)
        ratios.append(torch.stack([vw.float() / w, vh.float() / h], -1))
        gy, gx = torch.meshgrid(torch.linspace(0, h - 1, h), torch.linspace(0, w - 1, w), indexing="ij")
        grid = (torch.stack([gx, gy], -1)[None] + 0.5) / torch.stack([vw, vh], 1).view(B, 1, 1, 2)
        props.append(torch.cat((grid, torch.ones_like(grid) * 0.05 * (2.0 ** lvl)), -1).view(B, -1, 4))
        cur += h * w
    ratios = torch.stack(ratios, 1)
    for lvl, (h, w) in enumerate(level_shapes):
        ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, w - 0.5, w), indexing="ij")
        refs.append(torch.stack((rx.reshape(-1)[None] / (ratios[:, None, lvl, 0] * w),
                                 ry.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)), -1))
    return torch.cat(props, 1), torch.cat(refs, 1)[:, :, None] * ratios[:, None], ratios


def test_vectorized_token_grids_equal_the_per_level_formulation_bit_for_bit():
    shapes = [(7, 9), (4, 5), (2, 3), (1, 2)]
    masks = []
    for h, w in shapes:
        m = torch.zeros(2, h, w, dtype=torch.bool)
        m[1, max(1, h - 2):, :] = True
        m[1, :, max(1, w - 3):] = True
        masks.append(m)
    flat = torch.cat([m.flatten(1) for m in masks], 1)
    memory = torch.randn(2, flat.shape[1], 4)
    want_props, want_refs, want_ratios = _per_level_reference(memory, flat, shapes)
    counts = level_tables.valid_counts(masks)
    ratios = counts.float() / level_tables.token_tables(shapes, "cpu")[2]
    assert torch.equal(ratios, want_ratios)
    assert torch.equal(transformer_mod.DeformableEncoder.reference_points(shapes, ratios), want_refs)
    for given in (counts, None):  # counts passed in, or read from the flat mask
        _, props = gen_encoder_output_proposals(memory, flat, shapes, given)
        raw = want_props
        expect = torch.log(raw / (1 - raw)).masked_fill(flat[..., None], float("inf"))
        expect = expect.masked_fill(~((raw > 0.01) & (raw < 0.99)).all(-1, keepdim=True), float("inf"))
        assert torch.equal(props, expect)


def test_flat_valid_counts_equal_the_per_level_counts():
    """valid_counts_flat (one gather + index_add over the flattened mask) == valid_counts of the
    per-level masks, for top-left images, odd sizes, a fully padded image and an irregular mask."""
    shapes = [(7, 9), (4, 5), (2, 3), (1, 2), (1, 1)]
    g = torch.Generator().manual_seed(0)
    masks = []
    for h, w in shapes:
        m = torch.zeros(4, h, w, dtype=torch.bool)
        m[1, max(1, h - 2):, :] = True
        m[1, :, max(1, w - 3):] = True
        m[2] = True                                     # nothing valid
        m[3] = torch.rand(h, w, generator=g) < 0.4      # not a rectangle: counts its first row/column
        masks.append(m)
    flat = torch.cat([m.flatten(1) for m in masks], 1)
    got = level_tables.valid_counts_flat(flat, shapes)
    assert got.dtype == torch.long and got.shape == (4, len(shapes), 2)
    assert torch.equal(got, level_tables.valid_counts(masks))
    assert torch.equal(level_tables.valid_counts_flat(flat, torch.tensor(shapes)), got)  # shapes as a tensor

"""Contrastive denoising: attention mask, noise bounds, label noise rate, slot layout,
dn targets and the empty batch."""
import re

import pytest
import torch
from torch import nn

from dino_scale.models.box_ops import box_cxcywh_to_xyxy
from dino_scale.models.denoising import (build_dn_attn_mask, cached_dn_attn_mask, dn_post_process,
                                         dn_slot_indices, dn_slot_targets, dn_targets, noised_queries,
                                         num_dn_groups, prepare_for_cdn)
from dino_scale.models.matcher import pad_targets
from dino_scale.ops.level_shapes import clear_level_cache


def _one_hot_encoder(num_classes: int) -> nn.Embedding:
    """label_enc whose embedding of class k is the unit vector e_k: argmax recovers labels."""
    enc = nn.Embedding(num_classes + 1, num_classes + 1)
    with torch.no_grad():
        enc.weight.copy_(torch.eye(num_classes + 1))
    return enc


def _facts_mask(reference_dir) -> torch.Tensor:
    """The 12x12 example of DINO-FACTS.md as a bool tensor (True = blocked)."""
    text = (reference_dir / "DINO-FACTS.md").read_text()
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s*([0-9A-F])-([0-9A-F])\s+((?:[#.]\s*){12})", line)
        if m:
            marks = m.group(3).split()
            count = int(m.group(2), 16) - int(m.group(1), 16) + 1
            rows += [[c == "#" for c in marks]] * count
    assert len(rows) == 12, "12x12 example not found in DINO-FACTS.md"
    return torch.tensor(rows)


def test_attention_mask_equals_facts_example(reference_dir):
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2],
                                                                       [0.6, 0.6, 0.2, 0.3]])}]
    # dn_number 4 with 2 boxes -> 2 groups; 4 matching queries.
    _, _, mask, meta = prepare_for_cdn(targets, 4, 0.5, 1.0, 4, 5, 6, _one_hot_encoder(5))
    assert meta["num_dn_group"] == 2 and meta["pad_size"] == 8 and meta["single_pad"] == 2
    assert mask.dtype == torch.bool
    assert torch.equal(mask, _facts_mask(reference_dir))


def test_group_count_rule():
    assert num_dn_groups(100, 7) == 14
    assert num_dn_groups(100, 0) == 1
    assert num_dn_groups(100, 300) == 1
    assert num_dn_groups(20, 3) == 6


def _corner_noise(scale: float):
    """Many copies of two small central boxes -> per-corner noise in units of
    (w/2, h/2, w/2, h/2) * scale, split into positives and negatives."""
    torch.manual_seed(0)
    gt = torch.tensor([[0.5, 0.5, 0.1, 0.08], [0.4, 0.6, 0.06, 0.1]])
    targets = [{"labels": torch.tensor([0, 1]), "boxes": gt}, {"labels": torch.tensor([2]), "boxes": gt[:1]}]
    _, bbox, _, meta = prepare_for_cdn(targets, 400, 0.0, scale, 3, 3, 4, _one_hot_encoder(3))
    groups, max_gt = meta["num_dn_group"], meta["single_pad"]
    cxcywh = torch.sigmoid(bbox[0]).view(groups, 2, max_gt, 4)  # image 0
    noised = box_cxcywh_to_xyxy(cxcywh)
    orig = box_cxcywh_to_xyxy(gt)
    half = (gt[:, 2:] / 2).repeat(1, 2)
    units = (noised - orig) / (half * scale)  # (groups, pos/neg, box, corner)
    # With scale 1 corners can cross (x1 > x2, negatives) or nearly meet: the width goes <= 0 and
    # inverse_sigmoid clamps it to eps, so its corners cannot be recovered; skip those.
    ok = (cxcywh[..., 2:] > 2e-3).all(-1)
    assert ok[:, 0].float().mean() > 0.95 and ok.float().mean() > 0.7
    return units[:, 0][ok[:, 0]], units[:, 1][ok[:, 1]]


@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_corner_noise_bounds(scale):
    pos, neg = _corner_noise(scale)
    tol = 2e-3  # float32 through sigmoid(inverse_sigmoid(.))
    assert pos.abs().max() < 1 + tol
    assert neg.abs().min() > 1 - tol and neg.abs().max() < 2 + tol
    # the draws really spread over the ranges, with both signs
    assert pos.abs().max() > 0.95 and pos.abs().min() < 0.05
    assert neg.abs().min() < 1.05 and neg.abs().max() > 1.95
    assert (pos > 0).float().mean().item() == pytest.approx(0.5, abs=0.1)
    assert (neg > 0).float().mean().item() == pytest.approx(0.5, abs=0.1)


def test_no_box_noise_keeps_boxes_and_clamps_to_unit_square():
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.05, 0.95, 0.3, 0.3]])
    targets = [{"labels": torch.tensor([0, 1]), "boxes": gt}]
    _, bbox, _, meta = prepare_for_cdn(targets, 4, 0.0, 0.0, 2, 3, 4, _one_hot_encoder(3))
    assert torch.allclose(torch.sigmoid(bbox[0, :2]), gt, atol=1e-5)
    torch.manual_seed(1)
    _, bbox, _, _ = prepare_for_cdn(targets, 40, 0.0, 1.0, 2, 3, 4, _one_hot_encoder(3))
    corners = box_cxcywh_to_xyxy(torch.sigmoid(bbox[0]))
    assert corners.min() >= -1e-3 and corners.max() <= 1 + 1e-3


def test_label_replacement_frequency_near_half_ratio():
    torch.manual_seed(0)
    num_classes, ratio = 10, 0.6
    labels = torch.arange(num_classes).repeat(5)  # 50 boxes in one image
    targets = [{"labels": labels, "boxes": torch.full((50, 4), 0.3)}]
    enc = _one_hot_encoder(num_classes)
    changed = drawn = 0
    seen = torch.zeros(num_classes + 1, dtype=torch.long)
    for _ in range(20):
        query_label, _, _, meta = prepare_for_cdn(targets, 50 * 50, ratio, 0.0, 1, num_classes,
                                                  num_classes + 1, enc)
        got = query_label[0].argmax(-1).view(meta["num_dn_group"] * 2, 50)
        changed += (got != labels).sum().item()
        drawn += got.numel()
        seen += torch.bincount(got.flatten(), minlength=num_classes + 1)
    # replaced with prob ratio/2 by a uniform class, which equals the original w.p. 1/C
    expected = ratio / 2 * (1 - 1 / num_classes)
    rate = changed / drawn  # drawn = 100_000: std ~0.0014
    assert abs(rate - expected) < 0.01, (rate, expected)
    assert seen[num_classes] == 0  # replacements stay in [0, num_classes)
    query_label, _, _, _ = prepare_for_cdn(targets, 200, 0.0, 0.0, 1, num_classes, num_classes + 1, enc)
    assert torch.equal(query_label[0].argmax(-1).view(-1, 50), labels.expand(8, 50))


def test_slot_layout_padding_and_dn_targets_use_original_labels():
    torch.manual_seed(0)
    num_classes = 7
    t0 = {"labels": torch.tensor([3, 5, 6]), "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1],
                                                                   [0.5, 0.5, 0.2, 0.2],
                                                                   [0.7, 0.3, 0.1, 0.3]])}
    t1 = {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.4, 0.6, 0.3, 0.2]])}
    enc = _one_hot_encoder(num_classes)
    # label noise ratio 1.0: half of the input labels are replaced ...
    query_label, bbox, _, meta = prepare_for_cdn([t0, t1], 9, 1.0, 0.0, 5, num_classes, 8, enc)
    groups, max_gt, pad = meta["num_dn_group"], meta["single_pad"], meta["pad_size"]
    assert (groups, max_gt, pad) == (3, 3, 18)
    assert query_label.shape == (2, 18, 8) and bbox.shape == (2, 18, 4)
    # image 1 has one box: slots 1,2 of each half are zero-filled
    view = query_label[1].view(groups, 2, max_gt, 8)
    assert view[:, :, 1:].abs().sum() == 0 and view[:, :, 0].abs().sum() > 0
    assert bbox[1].view(groups, 2, max_gt, 4)[:, :, 1:].abs().sum() == 0
    # boxes (no box noise) sit in slot g*2*max_gt + j for positives and + max_gt for negatives
    boxes0 = torch.sigmoid(bbox[0]).view(groups, 2, max_gt, 4)
    assert torch.allclose(boxes0, t0["boxes"].expand(groups, 2, max_gt, 4), atol=1e-5)
    # ... but the dn targets keep the originals: positives labelled, negatives background
    labels, boxes, positive = dn_targets([t0, t1], meta, num_classes)
    lab = labels.view(2, groups, 2, max_gt)
    assert torch.equal(lab[0, :, 0], t0["labels"].expand(groups, 3))
    assert (lab[:, :, 1] == num_classes).all()
    assert (lab[1, :, 0, 0] == 4).all() and (lab[1, :, 0, 1:] == num_classes).all()
    pos = positive.view(2, groups, 2, max_gt)
    assert pos[0, :, 0].all() and not pos[:, :, 1].any() and pos[1].sum() == groups
    assert torch.allclose(boxes.view(2, groups, 2, max_gt, 4)[0, :, 0], t0["boxes"].expand(groups, 3, 4))
    noised = query_label[0].argmax(-1).view(groups, 2, max_gt)
    assert (noised != t0["labels"]).any()  # ratio 1.0 replaced some input labels


def test_slot_targets_from_padded_targets_equal_the_per_image_reference():
    """The criterion's vectorized dn targets (padded targets -> slot layout, tensors only) equal
    dn_targets' per-image construction, with uneven counts and an image without boxes."""
    torch.manual_seed(0)
    num_classes = 11
    targets = [{"labels": torch.randint(0, num_classes, (n,)), "boxes": torch.rand(n, 4) * 0.5 + 0.1}
               for n in (4, 0, 1, 3)]
    _, _, _, meta = prepare_for_cdn(targets, 10, 0.5, 1.0, 6, num_classes, num_classes + 1,
                                    _one_hot_encoder(num_classes))
    labels, boxes, positive = dn_targets(targets, meta, num_classes)
    gt_labels, gt_boxes, sizes = pad_targets(targets, "cpu")
    got = dn_slot_targets(gt_labels, gt_boxes, torch.tensor(sizes), meta["num_dn_group"], num_classes)
    for ref, new in zip((labels, boxes, positive), got):
        assert new.shape == ref.shape and torch.equal(new, ref)


def test_noised_queries_is_the_tensor_part_of_prepare_for_cdn():
    """prepare_for_cdn hands its tensor part to ``make_queries`` (DINO's compiled region) with
    the slot indices; the default is noised_queries with the same draws in the same order."""
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.2, 0.3]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    enc = _one_hot_encoder(3)
    torch.manual_seed(3)
    ref_label, ref_bbox, _, meta = prepare_for_cdn(targets, 6, 0.5, 1.0, 4, 3, 4, enc)
    seen = []

    def make_queries(labels, boxes, image, slot, batch, pad_size, blocks):
        seen.append((labels.tolist(), image.tolist(), slot.tolist(), batch, pad_size, blocks))
        return noised_queries(labels, boxes, image, slot, batch, pad_size, blocks, 0.5, 1.0, 3, enc)

    torch.manual_seed(3)
    label, bbox, _, _ = prepare_for_cdn(targets, 6, 0.5, 1.0, 4, 3, 4, enc, make_queries=make_queries)
    assert torch.equal(label, ref_label) and torch.equal(bbox, ref_bbox)
    groups = meta["num_dn_group"]
    assert seen == [([1, 2, 0], [0, 0, 1] * 2 * groups, dn_slot_indices([2, 1], 2 * groups)[1].tolist(), 2,
                     meta["pad_size"], 2 * groups)]
    with pytest.raises(ValueError, match="hidden_dim"):
        prepare_for_cdn(targets, 6, 0.5, 1.0, 4, 3, 8, enc)


def test_zero_box_batch():
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    query_label, bbox, mask, meta = prepare_for_cdn([empty, empty], 100, 0.5, 1.0, 6, 3, 4,
                                                    _one_hot_encoder(3))
    assert meta == {"pad_size": 0, "num_dn_group": 1, "single_pad": 0}
    assert query_label.shape == (2, 0, 4) and bbox.shape == (2, 0, 4)
    assert mask.shape == (6, 6) and not mask.any()
    cls, coord = torch.randn(3, 2, 6, 3), torch.rand(3, 2, 6, 4)
    c2, b2 = dn_post_process(cls, coord, meta)
    assert c2 is cls and b2 is coord and "output_known_lbs_bboxes" not in meta
    assert prepare_for_cdn([empty], 0, 0.5, 1.0, 6, 3, 4, _one_hot_encoder(3)) == (None,) * 4


def test_dn_post_process_splits_layers():
    meta = {"pad_size": 4, "num_dn_group": 2, "single_pad": 1}
    cls, coord = torch.randn(3, 2, 4 + 5, 7), torch.rand(3, 2, 4 + 5, 4)
    c2, b2 = dn_post_process(cls, coord, meta)
    assert torch.equal(c2, cls[:, :, 4:]) and torch.equal(b2, coord[:, :, 4:])
    known = meta["output_known_lbs_bboxes"]
    assert torch.equal(known["pred_logits"], cls[-1, :, :4])
    assert torch.equal(known["pred_boxes"], coord[-1, :, :4])
    assert len(known["aux_outputs"]) == 2
    assert torch.equal(known["aux_outputs"][0]["pred_logits"], cls[0, :, :4])
    assert torch.equal(known["aux_outputs"][1]["pred_boxes"], coord[1, :, :4])


def test_gradients_reach_label_embedding():
    enc = nn.Embedding(4, 8)
    t = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)}]
    query_label, _, _, _ = prepare_for_cdn(t, 10, 0.5, 1.0, 3, 3, 8, enc)
    query_label.sum().backward()
    assert enc.weight.grad is not None and enc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("sizes", [[3, 1], [0, 4, 2], [5], [1, 0, 0, 2]])
def test_slot_indices_follow_the_documented_layout(sizes):
    """Query q = block k, box j of image b (in labels.repeat(blocks) order) -> (b, k*max_gt + j)."""
    blocks = 6
    max_gt = max(sizes)
    expected = [(b, k * max_gt + j) for k in range(blocks) for b, n in enumerate(sizes) for j in range(n)]
    got = dn_slot_indices(sizes, blocks)
    assert got.dtype.name == "int64" and got.shape == (2, blocks * sum(sizes))
    assert list(zip(got[0].tolist(), got[1].tolist())) == expected
    assert len(set(expected)) == len(expected)  # no two queries share a slot


def test_cached_attention_mask_is_reused_and_equal():
    clear_level_cache()
    a = cached_dn_attn_mask(24, 10, 6, "cpu")
    assert torch.equal(a, build_dn_attn_mask(24, 10, 6))
    assert cached_dn_attn_mask(24, 10, 6, "cpu") is a       # same sizes: no new tensor
    b = cached_dn_attn_mask(24, 10, 4, "cpu")               # another group size: another mask
    assert b is not a and torch.equal(b, build_dn_attn_mask(24, 10, 4))
    t = [{"labels": torch.tensor([1, 2, 0]), "boxes": torch.rand(3, 4) * 0.5 + 0.2}]
    _, _, mask, meta = prepare_for_cdn(t, 12, 0.5, 1.0, 10, 3, 4, _one_hot_encoder(3))
    assert torch.equal(mask, build_dn_attn_mask(meta["pad_size"], 10, 2 * meta["single_pad"]))
    clear_level_cache()

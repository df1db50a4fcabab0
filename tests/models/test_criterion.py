"""SetCriterion: hand-computed loss terms, normalization, empty images, aux / interm / dn
keys and the denoising supervision (negatives: background, no box loss)."""
import math

import pytest
import torch

from dino_scale.config import preset
from dino_scale.models.criterion import (SetCriterion, build_criterion, build_weight_dict,
                                         weighted_loss)
from dino_scale.models.denoising import dn_post_process
from dino_scale.models.matcher import HungarianMatcher

ALPHA = 0.25


def _focal(logit, target):
    """Focal loss of one logit, written out by hand (alpha 0.25, gamma 2)."""
    p = 1 / (1 + math.exp(-logit))
    if target:
        return ALPHA * (1 - p) ** 2 * -math.log(p)
    return (1 - ALPHA) * p ** 2 * -math.log(1 - p)


def _criterion(num_classes=2, dec_layers=1, dn=False):
    weights = build_weight_dict(dec_layers=dec_layers, dn=dn)
    return SetCriterion(num_classes, HungarianMatcher(), weights, dn_losses=dn)


def test_hand_computed_final_layer_terms():
    # 1 image, 2 queries, 2 classes, 1 target (class 1). Query 0 is the obvious match.
    logits = torch.tensor([[[-1.0, 2.0], [0.5, -3.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.55, 0.5, 0.2, 0.2]])}]
    losses = _criterion()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    ce = _focal(-1.0, 0) + _focal(2.0, 1) + _focal(0.5, 0) + _focal(-3.0, 0)  # / num_boxes 1
    assert losses["loss_ce"].item() == pytest.approx(ce, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.05, rel=1e-5)
    # pred (0.4,0.4,0.6,0.6), target (0.45,0.4,0.65,0.6): inter .03, union .05, hull .05; the
    # official divides by union + 1e-6 and hull + 1e-6
    giou = 0.03 / (0.05 + 1e-6) - (0.05 - 0.05) / (0.05 + 1e-6)
    assert losses["loss_giou"].item() == pytest.approx(1 - giou, rel=1e-6)
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou"}


def test_normalized_by_number_of_boxes():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3)
    boxes = torch.rand(2, 5, 4) * 0.4 + 0.3
    t = [{"labels": torch.tensor([0, 2]), "boxes": torch.rand(2, 4) * 0.4 + 0.3},
         {"labels": torch.tensor([1]), "boxes": torch.rand(1, 4) * 0.4 + 0.3}]
    crit = _criterion(num_classes=3)
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, t)
    indices = crit.matcher({"pred_logits": logits, "pred_boxes": boxes}, t)
    l1 = sum((boxes[b, r] - t[b]["boxes"][c]).abs().sum() for b, (r, c) in enumerate(indices))
    assert losses["loss_bbox"].item() == pytest.approx(l1.item() / 3, rel=1e-5)
    ce = 0.0
    for b in range(2):
        matched = dict(zip(indices[b][0].tolist(), indices[b][1].tolist()))
        for q in range(5):
            label = int(t[b]["labels"][matched[q]]) if q in matched else None
            ce += sum(_focal(logits[b, q, k].item(), k == label) for k in range(3))
    assert losses["loss_ce"].item() == pytest.approx(ce / 3, rel=1e-5)


def test_images_without_boxes():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, requires_grad=True)
    boxes = (torch.rand(2, 4, 4) * 0.4 + 0.3).requires_grad_()
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    one = {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}
    crit = _criterion(num_classes=3)
    for targets in ([empty, one], [empty, empty]):
        losses = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
        assert all(torch.isfinite(v) for v in losses.values())
        weighted_loss(losses, crit.weight_dict).backward()
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
        logits.grad = None
    # all-background: ce is every logit's negative focal term (num_boxes clamped to 1)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    ce = sum(_focal(x, 0) for x in logits.detach().flatten().tolist())
    assert losses["loss_ce"].item() == pytest.approx(ce, rel=1e-5)


def _model_like_outputs(targets, cfg, seed=0, dn_pad=None):
    """Outputs shaped like the model's (with the dn part split by dn_post_process)."""
    from dino_scale.models.denoising import prepare_for_cdn
    torch.manual_seed(seed)
    enc = torch.nn.Embedding(cfg.dn_labelbook_size + 1, cfg.hidden_dim)
    _, _, _, meta = prepare_for_cdn(targets, cfg.dn_number, 0.5, 1.0, cfg.num_queries,
                                    cfg.num_classes, cfg.hidden_dim, enc)
    L, B, Q, C = cfg.dec_layers, len(targets), cfg.num_queries, cfg.num_classes
    P = meta["pad_size"]
    cls = torch.randn(L, B, P + Q, C, requires_grad=True)
    coord = (torch.rand(L, B, P + Q, 4) * 0.4 + 0.3).requires_grad_()
    c, b = dn_post_process(cls, coord, meta)
    out = {"pred_logits": c[-1], "pred_boxes": b[-1],
           "aux_outputs": [{"pred_logits": c[i], "pred_boxes": b[i]} for i in range(L - 1)],
           "interm_outputs": {"pred_logits": torch.randn(B, Q, C), "pred_boxes": torch.rand(B, Q, 4) * 0.4 + 0.3},
           "dn_meta": meta}
    return out, cls, coord, meta


def test_key_set_is_stable_and_weighted():
    cfg = preset("tiny").model
    crit = build_criterion(cfg)
    t = [{"labels": torch.tensor([3, 5]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])},
         {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    with_dn = crit(_model_like_outputs(t, cfg)[0], t)
    no_dn = crit(_model_like_outputs(empty, cfg)[0], empty)
    expected = {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou")
                for s in ["", "_dn", "_interm"] + [f"_{i}" for i in range(cfg.dec_layers - 1)]
                + [f"_dn_{i}" for i in range(cfg.dec_layers - 1)]}
    assert set(with_dn) == set(no_dn) == set(crit.weight_dict) == expected
    assert all(no_dn[k].item() == 0 for k in no_dn if "_dn" in k)
    assert with_dn["loss_ce_dn"].item() > 0 and with_dn["loss_giou_dn_0"].item() > 0
    total = weighted_loss(with_dn, crit.weight_dict)
    ref = sum(with_dn[k].item() * crit.weight_dict[k] for k in with_dn)
    assert total.item() == pytest.approx(ref, rel=1e-5)
    # the aux and interm terms are each their own matching problem
    out = _model_like_outputs(t, cfg)[0]
    losses = crit(out, t)
    nb = 3.0
    assert losses["loss_giou_0"].item() == pytest.approx(
        crit.matched_losses(out["aux_outputs"][0], t, nb)["loss_giou"].item(), rel=1e-6)
    assert losses["loss_ce_interm"].item() == pytest.approx(
        crit.matched_losses(out["interm_outputs"], t, nb)["loss_ce"].item(), rel=1e-6)


def test_dn_negatives_get_no_box_loss_and_positives_their_label():
    cfg = preset("tiny", ["model.dec_layers=2", "model.dn_number=4"]).model
    crit = build_criterion(cfg)
    t = [{"labels": torch.tensor([3, 5]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])},
         {"labels": torch.tensor([7]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    out, cls, coord, meta = _model_like_outputs(t, cfg)
    assert (meta["num_dn_group"], meta["single_pad"]) == (2, 2)
    losses = crit(out, t)
    (losses["loss_bbox_dn"] + losses["loss_giou_dn"]).backward(retain_graph=True)
    g = coord.grad[-1, :, :meta["pad_size"]].abs().sum(-1).view(2, 2, 2, 2)  # B, group, pos/neg, slot
    assert (g[0, :, 0] > 0).all() and (g[1, :, 0, 0] > 0).all()  # positives get box gradients
    assert (g[:, :, 1] == 0).all() and (g[1, :, 0, 1] == 0).all()  # negatives / empty slots none
    assert coord.grad[:, :, meta["pad_size"]:].abs().sum() == 0  # matching queries untouched
    coord.grad = None
    losses["loss_ce_dn"].backward()
    gc = cls.grad[-1, :, :meta["pad_size"]].view(2, 2, 2, 2, -1)
    # focal gradient is negative only on a positive target's class: the original label
    assert (gc[0, :, 0, 0, 3] < 0).all() and (gc[0, :, 0, 1, 5] < 0).all() and (gc[1, :, 0, 0, 7] < 0).all()
    assert (gc[:, :, 1] > 0).all()  # negatives: every class pushed down (background)
    assert (gc[1, :, 0, 1] > 0).all()  # empty slot: background too
    # hand check of the dn box term: positives only, / (num_boxes * groups)
    dn_boxes = coord[-1, :, :meta["pad_size"]].detach().view(2, 2, 2, 2, 4)
    l1 = sum((dn_boxes[0, gr, 0, j] - t[0]["boxes"][j]).abs().sum() for gr in range(2) for j in range(2))
    l1 = l1 + sum((dn_boxes[1, gr, 0, 0] - t[1]["boxes"][0]).abs().sum() for gr in range(2))
    assert losses["loss_bbox_dn"].item() == pytest.approx(l1.item() / (3 * 2), rel=1e-5)
    # dn_meta built for other targets (here: one box more in an image) is a clear error
    more = [t[0], {"labels": torch.tensor([7, 1, 2]), "boxes": torch.rand(3, 4) * 0.3 + 0.3}]
    with pytest.raises(ValueError, match="does not match targets"):
        crit(out, more)


def test_weighted_loss_requires_known_keys():
    with pytest.raises(ValueError, match="weighted_loss: no loss key has a weight"):
        weighted_loss({"nope": torch.tensor(1.0)}, {"loss_ce": 1.0})


def test_weight_dict_coefficients():
    cfg = preset("r50_4scale", ["model.interm_loss_coef=0.5"]).model
    w = build_criterion(cfg).weight_dict
    assert w["loss_bbox_4"] == 5.0 and w["loss_giou_dn_2"] == 2.0 and "loss_ce_5" not in w
    assert w["loss_bbox_interm"] == 2.5 and "loss_ce_dn_interm" not in w
    assert len(w) == 3 * (2 * 6 + 1)


def test_num_boxes_under_torch_distributed(tmp_path):
    """With a (1-process gloo) process group the normalizer is all-reduced as a tensor
    (no .item()) and the losses equal the single-process ones."""
    import torch.distributed as dist
    torch.manual_seed(0)
    logits, boxes = torch.randn(2, 4, 3), torch.rand(2, 4, 4) * 0.4 + 0.3
    t = [{"labels": torch.tensor([0, 2]), "boxes": torch.rand(2, 4) * 0.4 + 0.3},
         {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    crit = _criterion(num_classes=3)
    plain = crit({"pred_logits": logits, "pred_boxes": boxes}, t)
    assert dist.is_available()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        nb = crit._num_boxes(t, logits.device)
        assert torch.is_tensor(nb) and nb.item() == 2.0
        assert crit._num_boxes([t[1]], logits.device).item() == 1.0  # clamped
        dist_losses = crit({"pred_logits": logits, "pred_boxes": boxes}, t)
    finally:
        dist.destroy_process_group()
    for k in plain:
        assert dist_losses[k].item() == pytest.approx(plain[k].item(), rel=1e-6)


@pytest.mark.parametrize("empty_image", [False, True])
def test_stacked_sets_equal_per_set_reference_values_and_gradients(empty_image):
    """The one-pass loss over all output sets / dn layers equals the per-set reference,
    values and gradients, including an image without boxes."""
    cfg = preset("tiny", ["model.dec_layers=3", "model.dn_number=6"]).model
    crit = build_criterion(cfg)
    t = [{"labels": torch.tensor([3, 5, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4],
                                                                    [0.4, 0.7, 0.1, 0.2]])},
         {"labels": torch.tensor([7]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    if empty_image:
        t[1] = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    out, cls, coord, _ = _model_like_outputs(t, cfg)
    fast = crit(out, t)
    ref = crit.forward_per_set(out, t)
    assert list(fast) == list(ref)
    for k in ref:
        assert torch.allclose(fast[k], ref[k], rtol=1e-5, atol=1e-7), (k, fast[k], ref[k])
    g_fast = torch.autograd.grad(weighted_loss(fast, crit.weight_dict), [cls, coord], retain_graph=True)
    g_ref = torch.autograd.grad(weighted_loss(ref, crit.weight_dict), [cls, coord])
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_given_num_boxes_replaces_the_batch_count_in_every_term():
    """A micro-batch of an accumulated step is normalized by the step's box count: every term,
    the dn ones included (x the group count), scales by own count / given count."""
    cfg = preset("tiny", ["model.dec_layers=2", "model.dn_number=4"]).model
    crit = build_criterion(cfg)
    t = [{"labels": torch.tensor([3, 5]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])},
         {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    out = _model_like_outputs(t, cfg)[0]
    own = crit(out, t)
    given = crit(out, t, num_boxes=7.5)
    assert set(given) == set(own)
    for k in own:
        assert given[k].item() == pytest.approx(own[k].item() * 3 / 7.5, rel=1e-5), k
    assert own["loss_bbox_dn"].item() > 0 and own["loss_ce_interm"].item() > 0


def _num_boxes_rank(rank: int, path: str, counts: list, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=len(counts))
    try:
        crit = _criterion(num_classes=3)
        t = [{"labels": torch.zeros(counts[rank], dtype=torch.long), "boxes": torch.rand(counts[rank], 4)}]
        torch.save(crit._num_boxes(t, torch.device("cpu")), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("counts,expected", [([0, 3], 1.5), ([4, 6], 5.0)])
def test_num_boxes_is_the_mean_over_two_ranks(tmp_path, counts, expected):
    """The 1-process test above could not tell a sum from a mean: with 2 gloo ranks holding
    different box counts, both normalize by clamp(total / world, min=1), as the official code."""
    import torch.multiprocessing as mp

    mp.spawn(_num_boxes_rank, args=(str(tmp_path / "pg"), counts, str(tmp_path / "nb")), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"nb.{r}").item() for r in (0, 1)]
    assert got == [expected, expected], got

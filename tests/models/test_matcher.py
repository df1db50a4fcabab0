"""Hungarian matcher: costs against an independent formula, optimality against brute
force, zero targets, batched == per-image."""
import itertools
import math

import pytest
import torch

from dino_scale.models.matcher import HungarianMatcher


def _problem(seed, batch, queries, classes, sizes):
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(batch, queries, classes, generator=g) * 2,
               "pred_boxes": torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.2}
    targets = [{"labels": torch.randint(0, classes, (n,), generator=g),
                "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.2} for n in sizes]
    return outputs, targets


def _reference_cost(logit, box, label, tgt_box, matcher):
    """One (query, target) cost from scalars, written out independently."""
    p = 1 / (1 + math.exp(-logit))
    a = matcher.focal_alpha
    pos = a * (1 - p) ** 2 * -math.log(p + 1e-8)
    neg = (1 - a) * p ** 2 * -math.log(1 - p + 1e-8)
    l1 = sum(abs(x - y) for x, y in zip(box, tgt_box))

    def corners(b):
        return b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    x1, y1, x2, y2 = corners(box)
    u1, v1, u2, v2 = corners(tgt_box)
    inter = max(0, min(x2, u2) - max(x1, u1)) * max(0, min(y2, v2) - max(y1, v1))
    union = (x2 - x1) * (y2 - y1) + (u2 - u1) * (v2 - v1) - inter
    hull = (max(x2, u2) - min(x1, u1)) * (max(y2, v2) - min(y1, v1))
    giou = inter / union - (hull - union) / hull
    return matcher.cost_class * (pos - neg) + matcher.cost_bbox * l1 - matcher.cost_giou * giou


def test_cost_matrix_matches_scalar_formula():
    matcher = HungarianMatcher()
    outputs, targets = _problem(0, 2, 5, 4, [3, 2])
    from dino_scale.models.matcher import pad_targets
    labels, boxes, sizes = pad_targets(targets, "cpu")
    cost = matcher.cost_matrix(outputs["pred_logits"], outputs["pred_boxes"], labels, boxes)
    assert cost.shape == (2, 5, 3)
    for b, t in enumerate(targets):
        for q in range(5):
            for j in range(sizes[b]):
                c = int(t["labels"][j])
                ref = _reference_cost(outputs["pred_logits"][b, q, c].item(),
                                      outputs["pred_boxes"][b, q].tolist(), c,
                                      t["boxes"][j].tolist(), matcher)
                assert cost[b, q, j].item() == pytest.approx(ref, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_optimal_against_brute_force(seed):
    matcher = HungarianMatcher()
    queries = 6
    sizes = [(seed % 4) + 1, 3, 0]
    outputs, targets = _problem(seed, 3, queries, 5, sizes)
    result = matcher(outputs, targets)
    for b, (rows, cols) in enumerate(result):
        n = sizes[b]
        assert rows.dtype == torch.int64 and cols.dtype == torch.int64
        assert len(rows) == len(cols) == min(n, queries)
        if n == 0:
            continue
        assert sorted(cols.tolist()) == list(range(n))
        assert len(set(rows.tolist())) == n
        cost = [[_reference_cost(outputs["pred_logits"][b, q, int(targets[b]["labels"][j])].item(),
                                 outputs["pred_boxes"][b, q].tolist(), 0,
                                 targets[b]["boxes"][j].tolist(), matcher)
                 for j in range(n)] for q in range(queries)]
        got = sum(cost[r][c] for r, c in zip(rows.tolist(), cols.tolist()))
        best = min(sum(cost[q][j] for j, q in enumerate(perm))
                   for perm in itertools.permutations(range(queries), n))
        assert got == pytest.approx(best, rel=1e-5, abs=1e-5)


def test_more_targets_than_queries():
    matcher = HungarianMatcher()
    outputs, targets = _problem(3, 1, 3, 4, [5])
    rows, cols = matcher(outputs, targets)[0]
    assert len(rows) == 3 and len(set(cols.tolist())) == 3


def test_zero_targets():
    matcher = HungarianMatcher()
    outputs, targets = _problem(1, 2, 4, 3, [0, 0])
    for rows, cols in matcher(outputs, targets):
        assert rows.numel() == 0 and cols.numel() == 0 and rows.dtype == torch.int64
    outputs, targets = _problem(1, 3, 4, 3, [0, 2, 0])
    result = matcher(outputs, targets)
    assert [len(r) for r, _ in result] == [0, 2, 0]


def test_batched_equals_per_image():
    matcher = HungarianMatcher()
    outputs, targets = _problem(7, 4, 40, 11, [5, 0, 12, 1])
    batched = matcher(outputs, targets)
    single = matcher.forward_per_image(outputs, targets)
    for (r1, c1), (r2, c2) in zip(batched, single):
        assert torch.equal(r1, r2) and torch.equal(c1, c2)


def test_bad_labels_and_batch_size_are_clear_errors():
    matcher = HungarianMatcher()
    outputs, targets = _problem(2, 1, 4, 3, [2])
    targets[0]["labels"] = torch.tensor([0, 3])
    with pytest.raises(ValueError, match="labels"):
        matcher(outputs, targets)
    with pytest.raises(ValueError, match="targets"):
        matcher(outputs, targets + targets)


def test_non_finite_predictions_still_match():
    matcher = HungarianMatcher()
    outputs, targets = _problem(4, 1, 5, 3, [2])
    outputs["pred_logits"][0, 0] = float("nan")
    rows, cols = matcher(outputs, targets)[0]
    assert len(rows) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    matcher = HungarianMatcher()
    outputs, targets = _problem(5, 3, 50, 7, [4, 0, 9])
    cpu = matcher(outputs, targets)
    gpu = matcher({k: v.cuda() for k, v in outputs.items()},
                  [{k: v.cuda() for k, v in t.items()} for t in targets])
    for (r1, c1), (r2, c2) in zip(cpu, gpu):
        assert torch.equal(r1, r2) and torch.equal(c1, c2)


def test_match_many_equals_separate_calls():
    matcher = HungarianMatcher()
    sets = [_problem(s, 3, 20, 6, [4, 0, 7])[0] for s in range(3)]
    _, targets = _problem(0, 3, 20, 6, [4, 0, 7])
    many = matcher.match_many(sets, targets)
    assert len(many) == 3
    for out, got in zip(sets, many):
        for (r1, c1), (r2, c2) in zip(matcher(out, targets), got):
            assert torch.equal(r1, r2) and torch.equal(c1, c2)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 3
    assert all(len(r) == 0 for res in matcher.match_many(sets, empty) for r, _ in res)


def test_started_matching_survives_later_writes_and_mixed_shapes():
    """start_many copies the costs before returning control: overwriting the predictions while
    the match is pending (the device keeps working meanwhile) must not change the result."""
    matcher = HungarianMatcher()
    sets = [_problem(s, 2, 20, 6, [3, 5])[0] for s in range(2)] + [_problem(9, 2, 12, 6, [3, 5])[0]]
    _, targets = _problem(0, 2, 20, 6, [3, 5])
    expected = [matcher(out, targets) for out in sets]
    pending = matcher.start_many(sets, targets)
    for out in sets:
        out["pred_boxes"].uniform_()
    for got, want in zip(pending.result(), expected):
        for (r1, c1), (r2, c2) in zip(got, want):
            assert torch.equal(r1, r2) and torch.equal(c1, c2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_match_many_through_pinned_copy_matches_cpu():
    matcher = HungarianMatcher()
    sets = [_problem(s, 3, 40, 6, [4, 0, 7])[0] for s in range(4)]
    _, targets = _problem(0, 3, 40, 6, [4, 0, 7])
    cpu = matcher.match_many(sets, targets)
    gpu = matcher.match_many([{k: v.cuda() for k, v in o.items()} for o in sets],
                             [{k: v.cuda() for k, v in t.items()} for t in targets])
    for a, b in zip(cpu, gpu):
        for (r1, c1), (r2, c2) in zip(a, b):
            assert torch.equal(r1, r2) and torch.equal(c1, c2)


def test_pad_targets_places_every_box_and_pads_with_the_neutral_box():
    from dino_scale.models.matcher import pad_targets

    g = torch.Generator().manual_seed(3)
    sizes = [2, 0, 4, 1]
    targets = [{"labels": torch.randint(0, 9, (n,), generator=g), "boxes": torch.rand(n, 4, generator=g)}
               for n in sizes]
    labels, boxes, got = pad_targets(targets, "cpu", dtype=torch.float64)
    assert got == sizes and labels.shape == (4, 4) and boxes.shape == (4, 4, 4) and boxes.dtype == torch.float64
    for b, (t, n) in enumerate(zip(targets, sizes)):
        assert torch.equal(labels[b, :n], t["labels"]) and torch.equal(boxes[b, :n], t["boxes"].double())
        assert not labels[b, n:].any()
        assert torch.equal(boxes[b, n:], torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64).expand(4 - n, 4))
    empty_labels, empty_boxes, empty_sizes = pad_targets([{"labels": torch.zeros(0, dtype=torch.long),
                                                           "boxes": torch.zeros(0, 4)}], "cpu")
    assert empty_sizes == [0] and empty_labels.shape == (1, 1) and empty_boxes.tolist() == [[[0.5, 0.5, 1.0, 1.0]]]

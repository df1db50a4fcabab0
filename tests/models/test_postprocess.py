"""PostProcess top-k and scaling; TTA merge."""
from __future__ import annotations

import pytest
import torch

from dino_scale.models.postprocess import PostProcess, hflip_boxes, merge_tta


def test_topk_over_queries_and_classes_scaled_boxes():
    logits = torch.full((2, 3, 4), -10.0)
    logits[0, 2, 1] = 3.0  # best: query 2, class 1
    logits[0, 0, 3] = 2.0
    logits[1, 1, 0] = 1.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1], [0.25, 0.5, 0.5, 1.0]]]).repeat(2, 1, 1)
    sizes = torch.tensor([[100, 200], [50, 80]])  # (H, W)
    res = PostProcess(num_select=5)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert len(res) == 2 and res[0]["scores"].shape == (5,)
    assert res[0]["labels"][:2].tolist() == [1, 3]
    torch.testing.assert_close(res[0]["scores"][0], torch.sigmoid(torch.tensor(3.0)))
    torch.testing.assert_close(res[0]["boxes"][0], torch.tensor([0.0, 0.0, 100.0, 100.0]))  # x by W, y by H
    torch.testing.assert_close(res[0]["boxes"][1], torch.tensor([80.0, 40.0, 120.0, 60.0]))
    assert res[1]["labels"][0].item() == 0
    torch.testing.assert_close(res[1]["boxes"][0], torch.tensor([4.0, 2.5, 12.0, 7.5]))
    assert (res[0]["scores"][:-1] >= res[0]["scores"][1:]).all()


def test_merge_tta_keeps_best_of_all_views():
    """The views' copies of one object (same label, IoU > 0.6) become its best-scoring copy;
    another label on the same box, or the same label on another box, stays."""
    a = {"scores": torch.tensor([0.9, 0.2, 0.6]), "labels": torch.tensor([1, 2, 1]),
         "boxes": torch.tensor([[0.0, 0, 10, 10], [1, 1, 2, 2], [5.0, 0, 15, 10]])}  # IoU([0]) 1/3: kept
    flipped = {"scores": torch.tensor([0.5, 0.95]), "labels": torch.tensor([3, 1]),
               "boxes": hflip_boxes(torch.tensor([[0.0, 0, 10, 10], [90, 0, 100, 10]]), width=100)}
    merged = merge_tta([a, flipped], num_select=300)
    torch.testing.assert_close(merged["scores"], torch.tensor([0.95, 0.6, 0.5, 0.2]))
    assert merged["labels"].tolist() == [1, 1, 3, 2]
    torch.testing.assert_close(merged["boxes"][0], torch.tensor([0.0, 0, 10, 10]))  # flipped back
    torch.testing.assert_close(merged["boxes"][2], torch.tensor([90.0, 0, 100, 10]))
    torch.testing.assert_close(merge_tta([a, flipped], num_select=2)["scores"], torch.tensor([0.95, 0.6]))
    # one view: nothing to merge, whatever the threshold (its detections are the model's output)
    for threshold in (0.6, 0.3, 0.0):
        assert merge_tta([a], iou_threshold=threshold)["labels"].tolist() == [1, 1, 2]
    torch.testing.assert_close(merge_tta([a])["scores"], torch.tensor([0.9, 0.6, 0.2]))
    torch.testing.assert_close(merge_tta([a], num_select=2)["scores"], torch.tensor([0.9, 0.6]))


def test_merge_tta_keeps_two_same_class_objects_side_by_side():
    """Two people side by side (IoU 2/3), each found by both views: class-wise NMS over the union
    kept one of them (AP 0.5 for a perfect detector; with one view too). Each detection now takes
    only its own copy in the other view."""
    p, q = [0.0, 0, 10, 10], [2.0, 0, 12, 10]  # IoU 8/12
    plain = {"scores": torch.tensor([0.9, 0.85]), "labels": torch.tensor([1, 1]), "boxes": torch.tensor([p, q])}
    other = {"scores": torch.tensor([0.88, 0.83]), "labels": torch.tensor([1, 1]),
             "boxes": torch.tensor([[0.2, 0, 10.2, 10], [2.1, 0, 12.1, 10]])}
    merged = merge_tta([plain, other])
    torch.testing.assert_close(merged["scores"], torch.tensor([0.9, 0.85]))
    torch.testing.assert_close(merged["boxes"], torch.tensor([p, q]))
    assert merge_tta([plain])["scores"].tolist() == plain["scores"].tolist()
    # three views: the best copy takes one copy in each other view
    third = {"scores": torch.tensor([0.5]), "labels": torch.tensor([1]), "boxes": torch.tensor([[0.1, 0, 10.1, 10]])}
    merged = merge_tta([plain, other, third])
    torch.testing.assert_close(merged["scores"], torch.tensor([0.9, 0.85]))


def test_num_select_below_one_is_refused():
    """num_select 0 used to give every image an empty result: a finished run evaluated to AP 0
    with no error. It is refused when the postprocessor is built; 1 and numpy ints are fine."""
    import numpy as np
    import pytest

    for bad in (0, -3, 2.5, None):
        with pytest.raises(ValueError, match="num_select must be an int >= 1"):
            PostProcess(num_select=bad)
    logits, boxes = torch.zeros(1, 3, 2), torch.full((1, 3, 4), 0.5)
    res = PostProcess(num_select=np.int64(1))({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 20]]))
    assert res[0]["scores"].shape == (1,) and res[0]["boxes"].tolist() == [[5.0, 2.5, 15.0, 7.5]]


def test_half_precision_outputs_are_ranked_and_scaled_in_float32():
    """A half-precision module (supported: test_half_precision_module_runs_without_autocast) or
    autocast gives bf16 logits / boxes. Scores were ranked and returned in bf16 (ties: 40
    distinct of 50 here) and boxes scaled in bf16 (up to ~7 px off at 1333 px). Now the result
    equals float32 post-processing of the same values."""
    torch.manual_seed(0)
    logits = torch.full((1, 100, 2), -5.0)
    logits[0, :, 0] = torch.linspace(5, -5, 100)  # query i ranks i-th: no ties in float32
    boxes = (torch.rand(1, 100, 4) * 0.5 + 0.25).bfloat16()
    logits = logits.bfloat16()
    sizes = torch.tensor([[800, 1333]])
    got = PostProcess(50)({"pred_logits": logits, "pred_boxes": boxes}, sizes)[0]
    want = PostProcess(50)({"pred_logits": logits.float(), "pred_boxes": boxes.float()}, sizes)[0]
    assert got["scores"].dtype == got["boxes"].dtype == torch.float32
    assert torch.equal(got["labels"], want["labels"])
    torch.testing.assert_close(got["scores"], want["scores"], rtol=0, atol=0)
    torch.testing.assert_close(got["boxes"], want["boxes"], rtol=0, atol=1e-4)


def test_nan_scores_are_ranked_last_not_in_place_of_the_finite_detections():
    """``torch.topk`` and a descending sort put NaN first: 4 NaN queries of 900 filled all 300
    slots (the image's finite detections, a 0.998 one included, were lost, each of its objects a
    miss), and in the TTA merge a NaN detection claimed another view's finite copy of the object.
    NaN is ranked last now; one that is kept is still returned as NaN (counted and dropped)."""
    logits = torch.full((1, 900, 91), -9.0)
    logits[0, :4] = float("nan")
    logits[0, 10, 7] = 6.0
    boxes = torch.full((1, 900, 4), 0.25)
    res = PostProcess(num_select=300)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 100]]))[0]
    assert res["labels"][0].item() == 7 and res["scores"][0].item() > 0.99
    assert torch.isfinite(res["scores"]).all()  # 4 x 91 NaN pairs, all below the 300 kept
    everything = PostProcess(num_select=900 * 91)({"pred_logits": logits, "pred_boxes": boxes},
                                                 torch.tensor([[100, 100]]))[0]
    assert torch.isnan(everything["scores"]).sum() == 4 * 91 and torch.isnan(everything["scores"][-4 * 91:]).all()
    nan_view = {"scores": torch.tensor([float("nan")]), "labels": torch.tensor([1]),
                "boxes": torch.tensor([[0.0, 0, 10, 10]])}
    finite_view = {"scores": torch.tensor([0.9]), "labels": torch.tensor([1]),
                   "boxes": torch.tensor([[0.0, 0, 10, 10]])}
    merged = merge_tta([nan_view, finite_view])
    assert merged["scores"][0].item() == pytest.approx(0.9) and merged["labels"].tolist()[0] == 1

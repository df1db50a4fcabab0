"""Box conversions, IoU / GIoU against hand-computed values, inverse_sigmoid clamping."""
import math

import pytest
import torch

from dino_scale.models.box_ops import (box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                                       elementwise_generalized_box_iou, generalized_box_iou,
                                       inverse_sigmoid)


def test_conversions_round_trip_and_values():
    cxcywh = torch.tensor([[0.5, 0.4, 0.2, 0.6]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert torch.allclose(xyxy, torch.tensor([[0.4, 0.1, 0.6, 0.7]]))
    boxes = torch.rand(3, 7, 4)
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes, atol=1e-6)


def test_iou_and_giou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0],   # inter 1, union 7, hull 9
                      [4.0, 0.0, 5.0, 1.0],   # disjoint: inter 0, union 5, hull 10
                      [0.0, 0.0, 2.0, 2.0]])  # identical
    iou, union = box_iou(a, b)
    assert torch.allclose(iou, torch.tensor([[1 / 7, 0.0, 1.0]]))
    assert torch.allclose(union, torch.tensor([[7.0, 5.0, 4.0]]))
    giou = generalized_box_iou(a, b)
    expected = torch.tensor([[1 / 7 - 2 / 9, 0.0 - 5 / 10, 1.0]])
    assert torch.allclose(giou, expected)


def test_giou_matches_torchvision_and_elementwise_equals_diagonal():
    torchvision = pytest.importorskip("torchvision")
    g = torch.Generator().manual_seed(0)
    b1 = box_cxcywh_to_xyxy(torch.rand(6, 4, generator=g) * 0.5 + 0.1)
    b2 = box_cxcywh_to_xyxy(torch.rand(6, 4, generator=g) * 0.5 + 0.1)
    ours = generalized_box_iou(b1, b2)
    assert torch.allclose(ours, torchvision.ops.generalized_box_iou(b1, b2), atol=1e-6)
    assert torch.allclose(elementwise_generalized_box_iou(b1, b2), ours.diagonal(), atol=1e-6)
    # batched leading dims broadcast
    batched = generalized_box_iou(torch.stack([b1, b2]), torch.stack([b2, b1]))
    assert torch.allclose(batched[0], ours, atol=1e-6)
    assert torch.allclose(batched[1], ours.T, atol=1e-6)


def test_iou_and_giou_divide_with_the_official_eps():
    # official util/box_ops.py: inter / (union + 1e-6), (hull - union) / (hull + 1e-6); the
    # matcher's GIoU cost and the GIoU loss differed from it by ~1e-5 relative (more for small boxes)
    a = torch.tensor([[0.0, 0.0, 0.01, 0.01]], dtype=torch.float64)  # a small box: area 1e-4
    b = torch.tensor([[0.005, 0.005, 0.015, 0.015]], dtype=torch.float64)  # inter 2.5e-5, union 1.75e-4, hull 2.25e-4
    iou, union = box_iou(a, b)
    assert iou.item() == pytest.approx(2.5e-5 / (1.75e-4 + 1e-6), rel=1e-12)
    expected = 2.5e-5 / (1.75e-4 + 1e-6) - (2.25e-4 - 1.75e-4) / (2.25e-4 + 1e-6)
    assert generalized_box_iou(a, b).item() == pytest.approx(expected, rel=1e-12)
    assert elementwise_generalized_box_iou(a, b).item() == pytest.approx(expected, rel=1e-12)


def test_inverse_sigmoid_clamps_with_eps_1e3():
    x = torch.tensor([-0.5, 0.0, 0.0005, 0.25, 0.5, 0.9995, 1.0, 1.5])
    y = inverse_sigmoid(x)
    lim = math.log(1e-3)
    near = math.log(1e-3 / 0.9995)  # x clamped up to eps, 1 - x not clamped
    expected = torch.tensor([lim, lim, near, math.log(0.25 / 0.75), 0.0, -near, -lim, -lim])
    assert torch.allclose(y, expected, atol=1e-6)
    inner = torch.linspace(0.01, 0.99, 50)
    assert torch.allclose(torch.sigmoid(inverse_sigmoid(inner)), inner, atol=1e-6)

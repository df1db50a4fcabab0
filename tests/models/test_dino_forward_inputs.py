"""DINO.forward's input checks (tiny preset): masks that mark a whole image or its top-left as
padding, batches or images without pixels, and targets that do not fit the batch or the classes."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dino_scale.config import preset
from dino_scale.models import build_dino
from dino_scale.models import dino as dino_module


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, _ = build_dino(preset("tiny").model)
    return model


def _images(b: int = 2, h: int = 64, w: int = 96) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(0))


def _targets(*counts: int) -> list:
    return [{"labels": torch.arange(n) % 5, "boxes": torch.full((n, 4), 0.4)} for n in counts]


TOP_LEFT = r"top-left pixel of image\(s\) {} as padding: mask True means padding"


def test_masks_marking_the_top_left_as_padding_are_refused(tiny):
    """An inverted mask (Hugging Face's pixel_mask: 1 = valid) marks every pixel as padding: the
    reference points were NaN and every image got the same, image-independent boxes, without an
    error. Padding on the left/top (the valid extents are read from the first row/column) was as
    silent. Both are refused for host (CPU) masks, in eval and training, naming the images (a GPU
    mask is not read: that would be a device sync per call)."""
    images = _images()
    pixel_mask = torch.ones(2, 64, 96, dtype=torch.long)  # HF style: 1 = valid pixel
    pixel_mask[1, :, 80:] = 0
    left = torch.zeros(2, 64, 96, dtype=torch.bool)
    left[1, :, :16] = True  # image 1 padded on the left
    tiny.eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match=TOP_LEFT.format(r"\[0, 1\]") + r".*~mask\.bool\(\)"):
            tiny(images, torch.ones(2, 64, 96, dtype=torch.bool))
        with pytest.raises(ValueError, match=TOP_LEFT.format(r"\[0, 1\]")):
            tiny(images, pixel_mask)
        with pytest.raises(ValueError, match=TOP_LEFT.format(r"\[1\]")):
            tiny(images, left)
        out = tiny(images, ~pixel_mask.bool())  # the inverted mask is the right one
    assert torch.isfinite(out["pred_boxes"]).all()
    assert not torch.allclose(out["pred_boxes"][0], out["pred_boxes"][1])
    tiny.train()
    with pytest.raises(ValueError, match=TOP_LEFT.format(r"\[1\]")):  # checked in training too
        tiny(images, left, _targets(1, 2))


def test_mask_values_are_read_only_where_no_sync_break_or_capture_error_follows(monkeypatch):
    """The top-left check reads the mask on the host: never while compiling (a graph break), for
    meta or fake tensors (no data), or while a CUDA stream is capturing (an error)."""
    readable = dino_module._host_readable
    assert readable(torch.zeros(2, 3, 3, dtype=torch.bool))
    assert not readable(torch.zeros(2, 3, 3, dtype=torch.bool, device="meta"))
    with FakeTensorMode():
        assert not readable(torch.zeros(2, 3, 3, dtype=torch.bool))
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not readable(torch.zeros(2, 3, 3, dtype=torch.bool))
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert not readable(torch.zeros(2, 3, 3, dtype=torch.bool))


@pytest.mark.parametrize("shape", [(0, 3, 64, 96), (1, 3, 0, 96), (1, 3, 64, 0)])
def test_a_batch_or_image_without_pixels_is_refused(tiny, shape):
    """An empty batch failed in the backbone ('Non-empty 4D data tensor expected'); an image of
    height or width 0 'succeeded' with detections of nothing."""
    tiny.eval()
    with torch.no_grad(), pytest.raises(ValueError, match=rf"images \({shape[0]}, 3, {shape[2]}, {shape[3]}\) hold "
                                                          "no pixels"):
        tiny(torch.zeros(shape), torch.zeros(shape[0], *shape[2:], dtype=torch.bool))


def _with(targets: list, index: int, **changes) -> list:
    targets[index] = {**targets[index], **changes}
    return targets


@pytest.mark.parametrize("targets, needle", [
    (_targets(1), r"got 1 targets for 2 images"),  # was: torch.cat size mismatch
    (_targets(1, 2, 1), r"got 3 targets for 2 images"),
    (_with(_targets(1, 2), 1, boxes=torch.rand(2)), r"image 1: expected .* labels \(2,\) and boxes \(2,\)"),
    (_with(_targets(1, 2), 1, boxes=torch.rand(2, 5)), r"image 1: .* labels \(2,\) and boxes \(2, 5\)"),
    (_with(_targets(1, 2), 0, labels=torch.zeros(1, 1, dtype=torch.long)), r"image 0: .* labels \(1, 1\)"),
    (_with(_targets(1, 2), 1, labels=torch.zeros(3, dtype=torch.long)), r"image 1: .* \(3,\) and boxes \(2, 4\)"),
    (_with(_targets(1, 2), 1, labels=torch.tensor([0, 91])), r"image 1: label 91 is outside \[0, num_classes=91\)"),
    (_with(_targets(1, 2), 0, labels=torch.tensor([-1])), r"image 0: label -1 is outside \[0, num_classes=91\)"),
    (_with(_targets(1, 2), 1, labels=torch.tensor([0, 10 ** 6])), r"image 1: label 1000000 is outside"),
    ([_targets(1)[0], {"boxes": torch.rand(2, 4)}], r"image 1 must be a dict with 'labels'.*got keys \['boxes'\]"),
    (_with(_targets(1, 2), 1, boxes=torch.tensor([[80.0, 64, 40, 30], [0.5, 0.5, 0.2, 0.2]])),
     r"image 1: boxes must be \(cx, cy, w, h\) normalized .* got values in \[0.2, 80\]; divide pixel boxes"),
    (_with(_targets(1, 2), 0, boxes=torch.tensor([[0.5, 0.5, -0.1, 0.2]])), r"image 0: boxes must be .* got values"),
    (_with(_targets(1, 2), 0, boxes=torch.tensor([[0.5, float("nan"), 0.1, 0.2]])), r"image 0: .* a non-finite value"),
])
def test_targets_that_do_not_fit_the_batch_or_classes_are_refused_naming_the_image(tiny, targets, needle):
    """Were raw errors from inside the denoising queries: a torch.cat size mismatch, 'Tensors
    must have same number of dimensions', an IndexError in label_enc (or, for label ==
    num_classes, a box trained as background by the criterion). Boxes in pixels (or with a
    negative size, or NaN) trained without a word: denoising clamped every one into the image."""
    tiny.train()
    with pytest.raises(ValueError, match=needle):
        tiny(_images(), torch.zeros(2, 64, 96, dtype=torch.bool), targets)


def test_fitting_targets_still_train(tiny):
    tiny.train()
    targets = _targets(0, 3)
    targets[1]["labels"] = torch.tensor([0, 45, 90])  # the class range's ends
    targets[1]["boxes"] = torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.005, 0.5, 0.2, 0.0], [0.5, -0.005, 1.0, 1.0]])
    out = tiny(_images(), torch.zeros(2, 64, 96, dtype=torch.bool), targets)
    assert out["dn_meta"] is not None and torch.isfinite(out["pred_boxes"]).all()

"""CUDA-graph inference (dino_scale.models.cuda_graph) and the property it rests on: after one
call at a given size, DINO's forward makes no host read-back and feeds no host tensor to any op.

The property is checked on the meta device (CPU-only CI): a meta tensor has no data, so any
read-back (``.item()``, ``.tolist()``, ``nonzero``, a copy to the host) raises, and a
dispatch mode records every op that receives a host tensor. The real presets run there at
their real input size in milliseconds. The capture itself needs a GPU (tests at the bottom).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dino_scale.config import preset
from dino_scale.models import build_dino
from dino_scale.models.cuda_graph import GraphedDetector

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class HostTensorRecorder(TorchDispatchMode):
    """Records (op, stack summary) for every op that receives a CPU tensor."""

    def __init__(self):
        super().__init__()
        self.host_ops: list[str] = []
        self.host_to_device: int = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in leaves):
            self.host_ops.append(str(func))
        out = func(*args, **kwargs)
        if any(t.device.type == "cpu" for t in leaves) and any(
                isinstance(o, torch.Tensor) and o.device.type == "meta" for o in tree_leaves(out)):
            self.host_to_device += 1
        return out


def _meta_model(name: str):
    cfg = preset(name).model
    with torch.device("meta"):
        model, _, post = build_dino(cfg)
    return cfg, model, post


def _meta_batch(b: int, h: int, w: int, n_boxes: int = 3):
    images = torch.empty(b, 3, h, w, device="meta")
    masks = torch.zeros(b, h, w, dtype=torch.bool, device="meta")
    targets = [{"labels": torch.zeros(n_boxes, dtype=torch.long, device="meta"),
                "boxes": torch.empty(n_boxes, 4, device="meta")} for _ in range(b)]
    return images, masks, targets


@pytest.mark.parametrize("name,h,w", [("tiny", 192, 256), ("r50_4scale", 800, 1199), ("r50_5scale", 800, 1199),
                                      ("swinl_4scale", 800, 1199)])
def test_eval_forward_and_postprocess_are_capture_safe(name, h, w):
    _, model, post = _meta_model(name)
    model.eval()
    images, masks, _ = _meta_batch(1, h, w)
    sizes = torch.empty(1, 2, device="meta")
    with torch.no_grad():
        model(images, masks)  # first call at this size: fills the level-shape cache (a host copy)
        rec = HostTensorRecorder()
        with rec:
            out = model(images, masks)
            results = post(out, sizes)
    assert rec.host_ops == [], f"host tensors reached {rec.host_ops[:5]}"
    assert out["pred_boxes"].shape == (1, model.num_queries, 4)
    assert results[0]["boxes"].shape[-1] == 4


def test_training_forward_has_no_read_back_and_one_host_copy():
    """Training (denoising on) builds its slot indices on the host from target counts; they
    reach the device in ONE copy, and nothing is read back (meta would raise)."""
    _, model, _ = _meta_model("r50_4scale")
    model.train()
    images, masks, targets = _meta_batch(2, 800, 1199)
    model(images, masks, targets)
    rec = HostTensorRecorder()
    with rec:
        out = model(images, masks, targets)
    assert rec.host_to_device == 1, rec.host_ops
    assert out["dn_meta"]["pad_size"] > 0


# -- GraphedDetector: CPU contract ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, post = build_dino(preset("tiny").model)
    return model.eval(), post


def _batch(seed: int, b: int = 1, h: int = 160, w: int = 224, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, h, w, generator=g).to(device)
    masks = torch.zeros(b, h, w, dtype=torch.bool)
    masks[:, :, w - 32:] = True
    sizes = torch.tensor([[h, w - 32]] * b)
    return images, masks.to(device), sizes.to(device)


def test_cpu_runs_eagerly_with_the_same_contract(tiny):
    model, post = tiny
    graphed = GraphedDetector(model, post)
    images, masks, sizes = _batch(0)
    with torch.no_grad():
        ref = post(model(images, masks), sizes)
    got = graphed(images, masks, sizes)
    assert graphed.stats["eager_calls"] == 1 and graphed.stats["captures"] == 0
    for k in ("scores", "labels", "boxes"):
        torch.testing.assert_close(got[0][k], ref[0][k])
    raw = GraphedDetector(model)(images, masks)
    assert set(raw) == {"pred_logits", "pred_boxes"}


def test_rejects_training_mode_and_bad_masks(tiny):
    model, post = tiny
    images, masks, _ = _batch(0)
    with pytest.raises(ValueError, match="masks"):
        GraphedDetector(model)(images, masks[:, :10])
    with pytest.raises(ValueError, match="max_graphs"):
        GraphedDetector(model, max_graphs=0)
    model.train()
    try:
        with pytest.raises(RuntimeError, match="eval mode"):
            GraphedDetector(model)(images, masks)
    finally:
        model.eval()


# -- GraphedDetector on a GPU -------------------------------------------------------------------

@cuda
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_graph_replay_matches_eager_on_new_inputs(tiny, amp_dtype):
    model, post = tiny
    model = model.cuda()
    graphed = GraphedDetector(model, post, amp_dtype=amp_dtype, strict=True)
    tol = dict(rtol=1e-4, atol=1e-4) if amp_dtype is None else dict(rtol=2e-2, atol=2e-2)
    for seed in range(3):  # capture on the first, replay with fresh inputs after
        images, masks, sizes = _batch(seed, device="cuda")
        got = graphed(images, masks, sizes)
        with torch.no_grad(), torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(images, masks)
        ref = post({"pred_logits": out["pred_logits"].float(), "pred_boxes": out["pred_boxes"].float()}, sizes)
        torch.testing.assert_close(got[0]["scores"], ref[0]["scores"], **tol)
        torch.testing.assert_close(got[0]["boxes"], ref[0]["boxes"], **tol)
    assert graphed.stats == {"captures": 1, "replays": 3, "eager_calls": 0, "evicted": 0, "capture_failures": 0}
    model.cpu()


@cuda
def test_one_graph_per_size_with_lru_eviction(tiny):
    model, _ = tiny
    model = model.cuda()
    graphed = GraphedDetector(model, max_graphs=1, strict=True)
    a = _batch(0, device="cuda")
    b = _batch(1, h=192, w=256, device="cuda")
    first = graphed(a[0], a[1])["pred_boxes"]
    graphed(b[0], b[1])
    again = graphed(a[0], a[1])["pred_boxes"]  # evicted, captured again
    torch.testing.assert_close(first, again, rtol=1e-4, atol=1e-4)  # conv algorithms may differ per capture
    assert graphed.stats["captures"] == 3 and graphed.stats["evicted"] == 2
    model.cpu()

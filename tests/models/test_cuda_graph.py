"""CUDA-graph inference (dino_scale.models.cuda_graph) and the property it rests on: after one
call at a given size, DINO's forward makes no host read-back and feeds no host tensor to any op.

The property is checked on the meta device (CPU-only CI): a meta tensor has no data, so any
read-back (``.item()``, ``.tolist()``, ``nonzero``, a copy to the host) raises, and a
dispatch mode records every op that receives a host tensor. The real presets run there at
their real input size in milliseconds. Some host tensors appear only for CUDA tensors (e.g.
``t[idx] = number`` builds the number as a host tensor when ``t`` is on a GPU), so the same
check also runs on a fake CUDA device (FakeTensorMode: CUDA tensors without data or a GPU).
``GraphedDetector._capture`` runs on the CPU with stand-ins for the stream and graph calls (its
warm-up, its failure record). The capture itself needs a GPU (tests at the bottom).
"""
from __future__ import annotations

import contextlib
import logging
import traceback

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dino_scale.config import preset
from dino_scale.models import build_dino
from dino_scale.models import level_tables
from dino_scale.models.cuda_graph import GraphedDetector, describe_failure
from dino_scale.models.deformable_attention import MSDeformAttn
from dino_scale.ops import level_shapes

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model_frame() -> str:
    """The innermost dino_scale frame of the current stack, as 'file.py:line'."""
    for f in reversed(traceback.extract_stack()):
        if "/dino_scale/" in f.filename.replace("\\", "/"):
            return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
    return "?"


class HostTensorRecorder(TorchDispatchMode):
    """Records "op at file:line" (innermost dino_scale frame) for every op that receives a CPU tensor."""

    def __init__(self):
        super().__init__()
        self.host_ops: list[str] = []
        self.host_to_device: int = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in leaves):
            self.host_ops.append(f"{func} at {_model_frame()}")
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


@pytest.fixture
def fake_cuda(monkeypatch):
    """A FakeTensorMode for CUDA tensors (no GPU needed), with the per-size caches emptied before
    and after (entries made here hold fake tensors) and plain copies for the cache fills (fake
    tensors cannot be pinned)."""
    level_shapes.clear_level_cache()
    for module in (level_shapes, level_tables):
        monkeypatch.setattr(module, "host_to_device", lambda host, device: host.to(device))
    yield FakeTensorMode(allow_non_fake_inputs=True)
    level_shapes.clear_level_cache()


def _to_fake_cuda(model: torch.nn.Module) -> None:
    """Replace a meta model's parameters and buffers by fake CUDA tensors (no values)."""
    for m in model.modules():
        for n, p in m._parameters.items():
            if p is not None:
                m._parameters[n] = torch.nn.Parameter(torch.empty_like(p, device="cuda"), p.requires_grad)
        for n, b in m._buffers.items():
            if b is not None:
                m._buffers[n] = torch.zeros_like(b, device="cuda")
        if isinstance(m, MSDeformAttn):
            m.backend = "pytorch"  # the extension has no fake kernel (and would be built)


@contextlib.contextmanager
def _cuda_autocast(dtype):
    """torch.autocast("cuda") refuses without a GPU; the dispatch state it sets works on fake
    CUDA tensors. Weight cache off, as GraphedDetector runs."""
    state = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), torch.is_autocast_cache_enabled())
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", state[0])
        torch.set_autocast_dtype("cuda", state[1])
        torch.set_autocast_cache_enabled(state[2])


@pytest.mark.parametrize("name", ["swinl_4scale", "r50_4scale"])
def test_eval_forward_and_postprocess_are_capture_safe_on_a_fake_cuda_device(name, fake_cuda):
    """What GraphedDetector captures (bf16 forward + post-processing), second call at a size, on
    CUDA tensors: no host tensor reaches an op, nothing is read back (a fake tensor has no data:
    ``.item()``, ``nonzero`` raise). Was: the Swin shifted-window mask filled its regions with
    ``img[:, h, w, :] = cnt`` every forward, 36 host scalars per forward (swin.py)."""
    _, model, post = _meta_model(name)
    model.eval()
    with fake_cuda:
        _to_fake_cuda(model)
        images = torch.empty(1, 3, 256, 384, device="cuda")
        masks = torch.zeros(1, 256, 384, dtype=torch.bool, device="cuda")
        sizes = torch.empty(1, 2, device="cuda")
        with torch.no_grad(), _cuda_autocast(torch.bfloat16):
            model(images, masks)  # warm-up: fills the per-size caches (host copies allowed)
            rec = HostTensorRecorder()
            with rec:
                out = model(images, masks)
                results = post({k: out[k].float() for k in ("pred_logits", "pred_boxes")}, sizes)
    assert rec.host_ops == [], f"{len(rec.host_ops)} ops got host tensors: {sorted(set(rec.host_ops))[:5]}"
    assert out["pred_boxes"].device.type == "cuda" and out["pred_logits"].device.type == "cuda"
    assert out["pred_logits"].dtype == torch.float32  # the class heads leave autocast (models/precision.py)
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


class _CaptureStandIns:
    """Stand-ins for the torch.cuda stream and graph calls of ``GraphedDetector._capture``, so its
    warm-up and capture run (eagerly) on the CPU. ``capturing`` is True inside the capture block;
    ``on_capture()`` runs when it begins."""

    def __init__(self, monkeypatch, on_capture=lambda: None):
        self.capturing = False
        stand_ins = self

        class Stream:
            def __init__(self, *args, **kwargs):
                pass

            def wait_stream(self, other):
                pass

        @contextlib.contextmanager
        def graph(cuda_graph, pool=None, **kwargs):
            on_capture()
            stand_ins.capturing = True
            try:
                yield
            finally:
                stand_ins.capturing = False

        for name, value in {"Stream": Stream, "current_stream": lambda device=None: Stream(),
                            "stream": lambda s: contextlib.nullcontext(), "device": lambda d: contextlib.nullcontext(),
                            "graph_pool_handle": lambda: None,
                            "CUDAGraph": type("CUDAGraph", (), {}), "graph": graph}.items():
            monkeypatch.setattr(torch.cuda, name, value)


def _capture_key(images, sizes):
    return (tuple(images.shape), images.dtype, str(images.device), True, sizes.dtype)


def test_warm_up_compiles_what_the_capture_runs(monkeypatch):
    """A torch.compile'd region compiles during the warm-up, never inside the capture: dynamo
    guards on the autocast weight-cache flag, so a capture run with the cache off after a warm-up
    with it on recompiled every region inside the capture (was: 1 compile there)."""
    torch.manual_seed(0)
    model, _, post = build_dino(preset("tiny").model)
    model.eval()
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(stand_ins.capturing)
        return gm.forward

    stand_ins = _CaptureStandIns(monkeypatch)
    torch._dynamo.reset()
    model.backbone[0].compile(backend=counting_backend)
    try:
        graphed = GraphedDetector(model, post, amp_dtype=torch.bfloat16)
        images, masks, sizes = _batch(0, h=96, w=128)
        entry = graphed._capture(_capture_key(images, sizes), images, masks, sizes)
    finally:
        torch._dynamo.reset()
    assert entry is not None and graphed.stats["captures"] == 1, graphed.last_capture_failure
    assert compiles and not any(compiles), f"compiles (True = inside the capture): {compiles}"
    # the per-size tables the graph reads stay alive with it, whatever the cache evicts later
    from dino_scale.ops import level_shapes
    held = {id(t) for entry_tables in entry.tables for t in entry_tables}
    assert held and all(id(t) in held for v in level_shapes.cache_snapshot() for t in v)


def test_capture_failure_is_kept_with_its_place(tiny, monkeypatch, caplog):
    """A failed capture keeps "Type: message (at file:line...)" in ``last_capture_failure`` (and
    the warning says the same); the size then runs eagerly; ``strict`` raises after recording."""
    model, post = tiny
    message = "CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors might be async"

    def fail_in_capture(module, args):
        if stand_ins.capturing:
            raise RuntimeError(message)

    stand_ins = _CaptureStandIns(monkeypatch)
    handle = model.backbone[0].register_forward_pre_hook(fail_in_capture)
    try:
        graphed = GraphedDetector(model, post)
        images, masks, sizes = _batch(0)
        key = _capture_key(images, sizes)
        with caplog.at_level(logging.WARNING, logger="dino_scale.models.cuda_graph"):
            assert graphed._capture(key, images, masks, sizes) is None
        failure = graphed.last_capture_failure
        assert failure.startswith("RuntimeError: CUDA error: operation not permitted when stream is "
                                  "capturing | CUDA kernel errors might be async (at "), failure
        assert "test_cuda_graph.py:" in failure and "dino_scale models/" in failure and len(failure) <= 400
        assert failure in caplog.text
        assert key in graphed._eager_keys and graphed.stats["capture_failures"] == 1
        strict = GraphedDetector(model, post, strict=True)
        with pytest.raises(RuntimeError, match="stream is capturing"):
            strict._capture(key, images, masks, sizes)
        assert strict.last_capture_failure.split(" (at ")[0] == failure.split(" (at ")[0]
    finally:
        handle.remove()


def test_describe_failure_follows_the_cause_and_fits_its_limit():
    def inner():
        raise ValueError("x" * 500)

    try:
        try:
            inner()
        except ValueError as e:
            raise RuntimeError("backend='inductor' raised:\nValueError: xxx") from e
    except RuntimeError as exc:
        text = describe_failure(exc, limit=200)
    assert text.startswith("RuntimeError: backend='inductor' raised: | ValueError: xxx (at ")
    line = inner.__code__.co_firstlineno + 1
    assert text.endswith(f"test_cuda_graph.py:{line})"), text  # where the cause was raised
    assert len(describe_failure(ValueError("y" * 1000), limit=200)) <= 200


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


def test_host_masks_with_a_padded_top_left_are_refused_before_any_replay():
    """A replay copies the masks into the captured buffers without the model's own forward, so
    the model's check of host masks never ran there: an inverted mask (1 = valid) gave constant
    detections. GraphedDetector checks host masks itself (a model that checks nothing stands in
    for the replay here)."""
    class Unchecked(torch.nn.Module):
        def forward(self, images, masks):
            b = images.shape[0]
            return {"pred_logits": torch.zeros(b, 5, 3), "pred_boxes": torch.full((b, 5, 4), 0.5)}

    graphed = GraphedDetector(Unchecked().eval())
    images = torch.zeros(2, 3, 8, 8)
    assert graphed(images, torch.zeros(2, 8, 8, dtype=torch.bool))["pred_boxes"].shape == (2, 5, 4)
    pixel_mask = torch.ones(2, 8, 8, dtype=torch.long)  # Hugging Face style: 1 = valid
    with pytest.raises(ValueError, match=r"top-left pixel of image\(s\) \[0, 1\] as padding"):
        graphed(images, pixel_mask)

"""CUDA-graph inference: capture DINO's forward (+ post-processing) once per input size, replay it.

At batch 1 a DINO forward launches a few thousand small kernels and the GPU waits on the
host between them (profiled on an H100: host-bound). A CUDA graph replays the whole launch
sequence with one call. Graphs need fixed shapes and a forward with no host synchronization
and no host-to-device copy; the model's forward satisfies both after one call at a given
size (tests/models/test_cuda_graph.py proves it on the meta device and on a fake CUDA
device: no read-back, no host tensor reaches an op). Serving and benchmarks with fixed
(padded) input sizes benefit; evaluation over COCO's many image sizes does not (one graph
per size).

    graphed = GraphedDetector(model.eval(), postprocess, amp_dtype=torch.bfloat16)
    results = graphed(images, masks, target_sizes)   # list of {scores, labels, boxes}

On a non-CUDA device (or ``enabled=False``) the same call runs the model eagerly, so code
using it runs on CPU unchanged.
"""
from __future__ import annotations

import contextlib
import logging
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from dino_scale.ops.level_shapes import cache_snapshot

from .dino import check_padding_masks
from dino_scale.ops.transfer import host_to_device

__all__ = ["GraphedDetector", "describe_failure"]

_log = logging.getLogger(__name__)
Result = Union[Dict[str, Tensor], List[Dict[str, Tensor]]]


def _frame(f: traceback.FrameSummary) -> str:
    parts = f.filename.replace("\\", "/").split("/")
    return f"{'/'.join(parts[-2:])}:{f.lineno}"


def describe_failure(exc: BaseException, limit: int = 400) -> str:
    """One line, at most ``limit`` characters: ``"Type: message (at file:line; dino_scale
    file:line)"`` - the exception's lines joined by " | ", where it was raised (innermost frame
    of it or of its cause), and the innermost dino_scale frame on the way (the model code that
    made the call) when that differs."""
    msg = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    root, frames, seen = exc, [], set()
    while root is not None and id(root) not in seen:
        seen.add(id(root))
        frames += traceback.extract_tb(root.__traceback__)
        root = root.__cause__
    where = []
    if frames:
        where.append(_frame(frames[-1]))
        own = [f for f in frames if "/dino_scale/" in f.filename.replace("\\", "/")
               and not f.filename.endswith("cuda_graph.py")]
        if own and own[-1] is not frames[-1]:
            where.append("dino_scale " + _frame(own[-1]))
    at = f" (at {'; '.join(where)})" if where else ""
    head = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    room = max(limit - len(at), 40)
    return (head if len(head) <= room else head[:room - 3] + "...") + at


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    images: Tensor
    masks: Tensor
    sizes: Optional[Tensor]
    outputs: Tuple[Tensor, ...]
    tables: tuple = ()  # the per-size tables the graph reads (ops.level_shapes.cache_snapshot)


class GraphedDetector:
    """Callable ``(images (B,3,H,W), masks (B,H,W) bool, target_sizes (B,2) = None)``.

    Without ``postprocess`` (or without ``target_sizes``) returns ``{"pred_logits" (B,Q,C),
    "pred_boxes" (B,Q,4)}``; with both, ``postprocess``'s list of B dicts (``scores`` (k,),
    ``labels`` (k,), ``boxes`` (k,4)). Returned tensors are fresh copies (not the graph's
    static buffers), so they stay valid after the next call.

    One graph per (shape, dtype, device, with-sizes) key, at most ``max_graphs`` kept (least
    recently used dropped); graphs share one memory pool, which is safe because replays are
    serialized on the caller's stream and outputs are copied out before returning. Each new
    key costs ``warmup_iters`` eager calls on a side stream plus the capture. ``amp_dtype``
    runs the forward under autocast with its weight cache off in every call (capture requires it;
    torch.compile'd regions guard on that setting, so one setting for warm-up, capture and eager
    calls means they compile in the warm-up, never inside the capture). A capture failure logs a
    warning, is kept in ``last_capture_failure`` (one line: type, message, where it was raised;
    :func:`describe_failure`), and that key runs eagerly from then on (``strict=True`` raises).
    The model must be in eval mode (no dropout, no denoising) and must not be modified while
    graphs exist: a graph keeps reading the parameters' storage it saw at capture, so copy new
    weights in place (``load_state_dict``) rather than replacing parameters.
    """

    def __init__(self, model: nn.Module, postprocess: Optional[nn.Module] = None, *,
                 amp_dtype: Optional[torch.dtype] = None, max_graphs: int = 4, warmup_iters: int = 2,
                 enabled: bool = True, strict: bool = False):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        if warmup_iters < 1:
            raise ValueError(f"warmup_iters must be >= 1 (capture needs a warmed-up forward), got {warmup_iters}")
        self.model = model
        self.postprocess = postprocess
        self.amp_dtype = amp_dtype
        self.max_graphs = max_graphs
        self.warmup_iters = warmup_iters
        self.enabled = enabled
        self.strict = strict
        self._graphs: "OrderedDict[tuple, _Captured]" = OrderedDict()
        self._eager_keys: set = set()
        self._pool = None
        self.stats = {"captures": 0, "replays": 0, "eager_calls": 0, "evicted": 0, "capture_failures": 0}
        self.last_capture_failure: Optional[str] = None  # "Type: message (at file:line ...)", latest

    # -- the function that is captured ------------------------------------------------------
    def _autocast(self, device: torch.device):
        if self.amp_dtype is None or not torch.amp.is_autocast_available(device.type):
            return contextlib.nullcontext()
        # the autocast weight cache would hold casts made inside the capture: keep it off, in
        # every call alike (dynamo guards on it: a change would recompile inside the capture)
        return torch.autocast(device.type, dtype=self.amp_dtype, cache_enabled=False)

    @torch.no_grad()
    def _forward(self, images: Tensor, masks: Tensor, sizes: Optional[Tensor]) -> Tuple[Tensor, ...]:
        with self._autocast(images.device):
            out = self.model(images, masks)
        logits, boxes = out["pred_logits"].float(), out["pred_boxes"].float()
        if sizes is None or self.postprocess is None:
            return logits, boxes
        results = self.postprocess({"pred_logits": logits, "pred_boxes": boxes}, sizes)
        return tuple(torch.stack([r[k] for r in results]) for k in ("scores", "labels", "boxes"))

    @staticmethod
    def _pack(outputs: Tuple[Tensor, ...]) -> Result:
        if len(outputs) == 2:
            return {"pred_logits": outputs[0], "pred_boxes": outputs[1]}
        scores, labels, boxes = outputs
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]

    # -- public -----------------------------------------------------------------------------
    def __call__(self, images: Tensor, masks: Tensor, target_sizes: Optional[Tensor] = None) -> Result:
        if self.model.training:
            raise RuntimeError("GraphedDetector needs the model in eval mode (call model.eval())")
        if masks.shape != (images.shape[0],) + tuple(images.shape[-2:]):
            raise ValueError(f"expected masks (B,H,W) matching images {tuple(images.shape)}, got {tuple(masks.shape)}")
        check_padding_masks(masks)  # host masks: a replay copies them in without the model's own check
        sizes = target_sizes if self.postprocess is not None else None
        if sizes is not None:  # host sizes: a pinned asynchronous copy, not a blocking one per call
            sizes = host_to_device(sizes, images.device)
        key = (tuple(images.shape), images.dtype, str(images.device), sizes is not None,
               None if sizes is None else sizes.dtype)
        if not (self.enabled and images.is_cuda) or key in self._eager_keys:
            self.stats["eager_calls"] += 1
            return self._pack(self._forward(images, masks, sizes))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(key, images, masks, sizes)
            if entry is None:
                self.stats["eager_calls"] += 1
                return self._pack(self._forward(images, masks, sizes))
        else:
            self._graphs.move_to_end(key)
        entry.images.copy_(images)
        entry.masks.copy_(masks)
        if sizes is not None:
            entry.sizes.copy_(sizes)
        entry.graph.replay()
        self.stats["replays"] += 1
        return self._pack(tuple(t.clone() for t in entry.outputs))

    def _capture(self, key: tuple, images: Tensor, masks: Tensor, sizes: Optional[Tensor]) -> Optional[_Captured]:
        device = images.device
        static_images, static_masks = images.clone(), masks.to(torch.bool).clone()
        static_sizes = sizes.clone() if sizes is not None else None
        try:
            with torch.cuda.device(device):  # capture's own stream is made on the current device
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):  # warm-up: builds/loads kernels, fills shape caches
                    for _ in range(self.warmup_iters):  # compiled regions compile here, not in the capture
                        self._forward(static_images, static_masks, static_sizes)
                torch.cuda.current_stream(device).wait_stream(side)
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    outputs = self._forward(static_images, static_masks, static_sizes)
                tables = cache_snapshot()
        except Exception as exc:  # noqa: BLE001 - the key falls back to eager, loudly
            self.stats["capture_failures"] += 1
            self.last_capture_failure = describe_failure(exc)
            if self.strict:
                raise
            self._eager_keys.add(key)
            _log.warning("CUDA-graph capture failed for input %s (%s); running this size eagerly",
                         key[0], self.last_capture_failure)
            _log.debug("CUDA-graph capture failure for input %s", key[0], exc_info=exc)
            return None
        entry = _Captured(graph, static_images, static_masks, static_sizes, outputs, tables)
        self._graphs[key] = entry
        self.stats["captures"] += 1
        _log.info("captured a CUDA graph for input %s (%d kept)", key[0], len(self._graphs))
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
            self.stats["evicted"] += 1
        return entry

    def reset(self) -> None:
        """Drop every captured graph (e.g. after replacing the model's parameters)."""
        self._graphs.clear()
        self._eager_keys.clear()

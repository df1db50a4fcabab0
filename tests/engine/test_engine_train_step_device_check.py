"""train_step's finiteness check on the device (fused AdamW's ``found_inf``): the skipped step
changes nothing, the guard counts it a step late, and the check reads nothing back to the host.
The real tiny DINO on the CPU, whose fused AdamW honours ``found_inf`` as the CUDA one does."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dino_scale.config import preset
from dino_scale.engine.optim import build_optimizer
from dino_scale.engine.train_step import BadStepError, BadStepGuard, skips_on_device, train_step
from dino_scale.models import build_dino

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def _batch(device="cpu", nan=False):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 96, generator=g)
    if nan:
        images = images * float("nan")
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, :, 80:] = True
    targets = [{"labels": torch.tensor([1, 5]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])},
               {"labels": torch.tensor([7]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])}]
    return images.to(device), masks.to(device), [{k: v.to(device) for k, v in t.items()} for t in targets]


def _tiny(device="cpu"):
    torch.manual_seed(0)
    cfg = preset("tiny", {"train.lr": 1e-4, "train.lr_backbone": 1e-4})
    model, criterion, _ = build_dino(cfg.model)
    return cfg, model.to(device), criterion.to(device)


def _snapshot(model, opt):
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {(i, k): v.detach().clone() for i, s in enumerate(opt.state.values()) for k, v in s.items()}
    return weights, state


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _NanGradient:
    """A finite loss whose gradients are not: one trainable parameter's gradient made NaN."""

    def __init__(self, opt):
        self.param = opt.param_groups[0]["params"][0]

    def __enter__(self):
        self.handle = self.param.register_hook(lambda g: torch.full_like(g, float("nan")))

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("device", DEVICES)
def test_a_non_finite_step_changes_no_weight_moment_or_step_count(device):
    cfg, model, criterion = _tiny(device)
    opt = build_optimizer(model, cfg.train, fused=True)
    assert skips_on_device(opt)
    guard = BadStepGuard(max_consecutive=3)
    first = train_step(model, criterion, opt, _batch(device), guard=guard, step=0)
    assert first.verdict is not None and not first.skipped
    before = _snapshot(model, opt)
    out = train_step(model, criterion, opt, _batch(device, nan=True), guard=guard, step=1)
    assert out.skipped and not torch.isfinite(out.grad_norm)
    after = _snapshot(model, opt)
    assert _equal(before[0], after[0]) and _equal(before[1], after[1])  # weights, moments, step counts
    guard.settle()
    assert (guard.total, guard.consecutive) == (1, 1)
    with _NanGradient(opt):  # a finite loss, NaN gradients: skipped too, counted as a gradient skip
        out = train_step(model, criterion, opt, _batch(device), guard=guard, step=2)
    guard.settle()
    assert out.skipped and torch.isfinite(out.loss)
    assert (guard.total, guard.consecutive, guard.grad_consecutive) == (2, 0, 1)
    assert _equal(before[0], _snapshot(model, opt)[0])
    good = train_step(model, criterion, opt, _batch(device), guard=guard, step=3)
    guard.settle()
    assert not good.skipped and guard.grad_consecutive == 0 and guard.total == 2
    assert not _equal(before[0], _snapshot(model, opt)[0])
    with pytest.raises(BadStepError, match="3 consecutive micro-batches with a non-finite loss"):
        for step in range(4, 7):
            train_step(model, criterion, opt, _batch(device, nan=True), guard=guard, step=step)
        guard.settle()


def test_same_weights_as_the_host_check():
    """One good, one NaN, one good step: the device check and the host check end bit-equal."""
    cfg, model, criterion = _tiny()
    twin, twin_criterion = copy.deepcopy(model), copy.deepcopy(criterion)
    opt, twin_opt = build_optimizer(model, cfg.train, fused=True), build_optimizer(twin, cfg.train, fused=True)
    for k, nan in enumerate([False, True, False]):
        torch.manual_seed(100 + k)  # the same denoising draws in both
        dev = train_step(model, criterion, opt, _batch(nan=nan))
        torch.manual_seed(100 + k)
        host = train_step(twin, twin_criterion, twin_opt, _batch(nan=nan), device_check=False)
        assert dev.verdict is not None and host.verdict is None and dev.skipped == host.skipped == nan
    assert _equal(*(_snapshot(m, o)[0] for m, o in [(model, opt), (twin, twin_opt)]))
    assert _equal(*(_snapshot(m, o)[1] for m, o in [(model, opt), (twin, twin_opt)]))


class _HostReads(TorchDispatchMode):
    """Counts tensor values read back to the host (``.item()``, ``bool()``, ``float()``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_device_check_reads_nothing_back():
    """The step checked on the device makes as many host reads as an unchecked step (the host
    check makes two more: the loss's and the gradient norm's finiteness)."""
    cfg, model, criterion = _tiny()
    opt = build_optimizer(model, cfg.train, fused=True)
    train_step(model, criterion, opt, _batch())  # warm-up: optimizer state, cached tables
    counts = {}
    for name, kwargs in [("none", {"check_finite": False}), ("device", {}), ("host", {"device_check": False})]:
        torch.manual_seed(5)
        with _HostReads() as reads:
            train_step(model, criterion, opt, _batch(), **kwargs)
        counts[name] = reads.count
    assert counts["device"] == counts["none"] and counts["host"] == counts["none"] + 2, counts


def test_the_host_check_skips_non_finite_gradients_too():
    """Without a fused optimizer (the CPU default) a finite loss with NaN gradients is skipped and
    counted (was: applied, and every weight became NaN)."""
    cfg, model, criterion = _tiny()
    opt = build_optimizer(model, cfg.train)
    assert not skips_on_device(opt)
    guard = BadStepGuard(max_consecutive=2)
    train_step(model, criterion, opt, _batch(), guard=guard, step=0)
    before = _snapshot(model, opt)
    with _NanGradient(opt):
        out = train_step(model, criterion, opt, _batch(), guard=guard, step=1)
        assert out.skipped and out.verdict is None and guard.grad_consecutive == 1
        assert _equal(before[0], _snapshot(model, opt)[0]) and _equal(before[1], _snapshot(model, opt)[1])
        with pytest.raises(BadStepError, match="2 consecutive optimizer steps with non-finite gradients"):
            train_step(model, criterion, opt, _batch(), guard=guard, step=2)
    with pytest.raises(ValueError, match="device_check=True needs a fused Adam/AdamW"):
        train_step(model, criterion, opt, _batch(), device_check=True)


class _LateVerdict:
    """A device verdict whose copy has not reached the host yet (``ready`` False until read)."""

    def __init__(self, finite: bool):
        self.finite, self.waited = finite, False

    def ready(self) -> bool:
        return False

    def read(self):
        self.waited = True
        return self.finite, True

    def loss_value(self) -> float:
        return float("nan")


def test_the_guard_waits_for_no_verdict_but_the_one_before_the_last():
    guard = BadStepGuard(max_consecutive=2)
    first, second, third = _LateVerdict(False), _LateVerdict(False), _LateVerdict(True)
    guard.observe(first, step=0)
    assert not first.waited and guard.total == 0 and len(guard.pending) == 1
    with pytest.raises(BadStepError, match=r"2 consecutive micro-batches with a non-finite loss \(last at step 1"):
        guard.observe(second, step=1)
        assert first.waited and not second.waited and guard.total == 1
        guard.observe(third, step=2)  # counts the second: the abort comes one step late
    assert second.waited and not third.waited and guard.total == 2


def test_only_a_fused_adam_skips_on_the_device():
    # fused SGD honours found_inf too, but its first skipped step leaves an uninitialized momentum buffer
    params = [torch.nn.Parameter(torch.ones(2))]
    assert skips_on_device(torch.optim.AdamW(params, fused=True))
    assert skips_on_device(torch.optim.Adam(params, fused=True))
    assert not skips_on_device(torch.optim.AdamW(params))
    assert not skips_on_device(torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True))


def test_the_guard_state_counts_queued_verdicts_and_a_rollback_drops_them():
    guard = BadStepGuard(max_consecutive=5)
    queued = _LateVerdict(False)
    guard.observe(queued, step=0)
    saved = guard.state_dict()  # counts the queued verdict first
    assert queued.waited and saved["total"] == 1 and not guard.pending
    guard.observe(_LateVerdict(False), step=1)
    guard.load_state_dict(saved)  # back to step 0: the later step's verdict is not counted
    assert not guard.pending
    guard.settle()
    assert guard.total == 1

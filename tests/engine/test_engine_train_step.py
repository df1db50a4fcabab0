"""train_step without Ray or DeepSpeed: the real tiny DINO, a fixed batch."""
from __future__ import annotations

import pytest
import torch

from dino_scale.config import ConfigError, preset
from dino_scale.engine.optim import build_optimizer
from dino_scale.engine.train_step import BadStepError, BadStepGuard, compute_loss, train_step
from dino_scale.models import build_dino


def _batch(b=2, h=64, w=96):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(b, 3, h, w, generator=g)
    masks = torch.zeros(b, h, w, dtype=torch.bool)
    masks[1, :, 80:] = True  # second image is narrower (padded on the right)
    targets = [{"labels": torch.tensor([1, 5]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])},
               {"labels": torch.tensor([7]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])}]
    return images, masks, targets


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = preset("tiny", {"train.lr": 1e-4, "train.lr_backbone": 1e-4})
    model, criterion, _ = build_dino(cfg.model)
    return cfg, model, criterion


def _loss_at(model, criterion, batch, seed=123):
    torch.manual_seed(seed)  # same denoising noise for both evaluations
    with torch.no_grad():
        loss, _ = compute_loss(model, criterion, *batch)
    return float(loss)


def test_step_reduces_loss_and_clips(tiny):
    cfg, model, criterion = tiny
    opt = build_optimizer(model, cfg.train)
    batch = _batch()
    before = _loss_at(model, criterion, batch)
    torch.manual_seed(123)
    out = train_step(model, criterion, opt, batch, clip_max_norm=0.1)
    assert not out.skipped and out.num_images == 2
    assert float(out.grad_norm) > 0.1  # pre-clip norm is reported...
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert float(clipped) <= 0.1 * (1 + 1e-4)  # ...and the applied gradient is clipped to 0.1
    after = _loss_at(model, criterion, batch)
    assert after < before, (before, after)
    assert set(out.loss_terms) >= {"loss_ce", "loss_bbox", "loss_giou"}


def test_nan_step_skipped_and_counted_then_abort(tiny):
    cfg, model, criterion = tiny
    opt = build_optimizer(model, cfg.train)
    images, masks, targets = _batch()
    bad = (images * float("nan"), masks, targets)
    guard = BadStepGuard(max_consecutive=3)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    out = train_step(model, criterion, opt, bad, guard=guard, step=0)
    assert out.skipped and guard.total == 1 and guard.consecutive == 1
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())  # no update
    inf_batch = (images.clone().fill_(float("inf")), masks, targets)
    train_step(model, criterion, opt, inf_batch, guard=guard, step=1)
    assert guard.total == 2
    good = train_step(model, criterion, opt, (images, masks, targets), guard=guard, step=2)
    assert not good.skipped and guard.consecutive == 0 and guard.total == 2
    train_step(model, criterion, opt, bad, guard=guard, step=3)
    train_step(model, criterion, opt, bad, guard=guard, step=4)
    with pytest.raises(BadStepError, match="3 consecutive micro-batches with a non-finite loss"):
        train_step(model, criterion, opt, bad, guard=guard, step=5)
    assert guard.total == 5


def test_steps_skipped_for_non_finite_gradients_abort_too():
    """A finite loss with NaN gradients every step: each update is skipped (AccumulationWindow),
    and max_bad_steps such steps in a row abort (was: never, the run skipped to its end)."""
    guard = BadStepGuard(max_consecutive=3)
    for step in range(2):
        guard.update(True, step=step)  # the micro-batches' losses are finite
        guard.update_step(False, step=step)
    guard.update_step(True, step=2)  # an applied step resets the run of skips
    assert guard.grad_consecutive == 0 and guard.total == 2
    restored = BadStepGuard(max_consecutive=3)
    for step in range(3, 5):
        guard.update(True, step=step)
        guard.update_step(False, step=step)
    restored.load_state_dict(guard.state_dict())  # a resume keeps the run of skips
    assert restored.grad_consecutive == 2
    with pytest.raises(BadStepError, match="3 consecutive optimizer steps with non-finite gradients"):
        restored.update_step(False, step=5)
    assert restored.total == 5


def test_activation_checkpointing_and_ema():
    from dino_scale.engine.deepspeed_utils import ModelEMA, apply_activation_checkpointing

    cfg = apply_activation_checkpointing(preset("tiny", {"train.lr": 1e-4, "train.lr_backbone": 1e-4}))
    assert cfg.model.backbone_checkpointing and cfg.model.encoder_checkpointing
    torch.manual_seed(0)
    model, criterion, _ = build_dino(cfg.model)
    opt = build_optimizer(model, cfg.train)
    ema = ModelEMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    out = train_step(model, criterion, opt, _batch(), clip_max_norm=0.1)
    assert not out.skipped and float(out.grad_norm) > 0
    ema.update(model)
    current = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], current[k].float())]
    assert changed
    for k in changed[:20]:
        torch.testing.assert_close(ema.shadow[k], 0.9 * before[k] + 0.1 * current[k].float())
    # the multi-tensor update is the per-tensor one bit for bit (was mul_ then add_ per tensor)
    expected = {k: before[k].clone().mul_(0.9).add_(current[k].float(), alpha=1 - 0.9) for k in before}
    assert all(torch.equal(ema.shadow[k], expected[k]) for k in before)
    with pytest.raises(ConfigError, match=r"train\.ema_decay must be in \(0, 1\), got 1\.5"):
        ModelEMA(model, decay=1.5)


def test_target_labels_outside_the_class_range_name_the_image():
    from dino_scale.engine.train_step import check_target_labels

    def target(image_id, labels):
        return {"labels": torch.tensor(labels, dtype=torch.int64), "image_id": torch.tensor(image_id)}

    check_target_labels([target(1, [0, 90]), target(2, [])], num_classes=91)  # in range; no boxes
    with pytest.raises(ValueError, match=r"image 7 has labels \[91, 120\] outside \[0, 91\)"):
        check_target_labels([target(1, [3]), target(7, [5, 91, 120, 91])], num_classes=91)
    with pytest.raises(ValueError, match=r"image 3 has labels \[-1\]"):
        check_target_labels([target(3, [-1, 2])], num_classes=91)


def test_a_skipped_step_still_moves_the_schedule(tiny):
    """train_step's scheduler follows the data position: a skipped (non-finite) batch advances it
    like an applied one, so the next update takes its own position's lr (was: the schedule paused)."""
    from dino_scale.engine.optim import build_scheduler, lr_factor_fn

    cfg, model, criterion = tiny
    tc = preset("tiny", {"train.lr": 1e-4, "train.lr_backbone": 1e-4, "train.warmup_steps": 4}).train
    opt = build_optimizer(model, tc)
    sched = build_scheduler(opt, tc, steps_per_epoch=10)
    images, masks, targets = _batch()
    bad = (images * float("nan"), masks, targets)
    assert train_step(model, criterion, opt, bad, scheduler=sched).skipped
    assert sched.last_epoch == 1
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * lr_factor_fn(tc, 10)(1))
    assert not train_step(model, criterion, opt, (images, masks, targets), scheduler=sched).skipped
    assert sched.last_epoch == 2


def test_move_batch_sends_each_target_field_in_one_copy(monkeypatch):
    # a blocking copy per field and image was 2 + 5B host syncs per micro-batch on a GPU
    from dino_scale.engine import train_step as ts

    copies = []

    def host_to_device(host, device):
        copies.append(tuple(host.shape))
        return host.clone()  # stays on the host: the values can be compared

    monkeypatch.setattr(ts, "host_to_device", host_to_device)
    images, masks = torch.zeros(3, 3, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8, dtype=torch.bool)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.rand(2, 4), "image_id": torch.tensor(7),
                "orig_size": torch.tensor([8, 8])},
               {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4), "image_id": torch.tensor(8),
                "orig_size": torch.tensor([6, 8])},
               {"labels": torch.tensor([3]), "boxes": torch.rand(1, 4), "image_id": torch.tensor(9),
                "orig_size": torch.tensor([8, 5]), "note": "kept"}]
    _, _, moved = ts.move_batch((images, masks, targets), torch.device("meta"))
    assert len(copies) == 2 + 4  # images, masks, then one per tensor field for the whole batch
    assert copies[2:] == [(3,), (3, 4), (3,), (6,)]
    for t, m in zip(targets, moved):
        assert m.keys() == t.keys()
        for k, v in t.items():
            assert torch.equal(m[k], v) and m[k].shape == v.shape if torch.is_tensor(v) else m[k] == v
    # already on the device: nothing copied, the same objects back
    copies.clear()
    assert ts._targets_to(targets, torch.device("cpu")) is targets and not copies

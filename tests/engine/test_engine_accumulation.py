"""Gradient accumulation at fixed micro-batch positions (``AccumulationWindow``) on a real
DeepSpeed engine: 2 gloo ranks on CPU, ZeRO 0/1/2/3, compared with plain torch."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from dino_scale.engine.checkpoint import TrainState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_fixtures import run_ranks  # noqa: E402

# Each rank runs this. Per stage: 4 accumulation windows of 2 micro-batches over the ranks' own
# data ("ok" micro-batches are backpropagated, "skip" ones, forward only, stand for non-finite losses):
# [ok, ok] a full step; [skip, ok] a step over one micro-batch; [skip, skip] no step; [ok] a
# window the data cut short. The reference replays the same steps in plain torch: the gradient
# of a step is the sum over ranks and backpropagated micro-batches of loss / accum, averaged
# over ranks, clipped to 0.1, then AdamW.
_WINDOWS = textwrap.dedent("""
    import json, sys
    import torch
    from deepspeed.utils import safe_get_full_fp32_param
    from dino_scale.config import preset
    from dino_scale.engine.deepspeed_utils import AccumulationWindow, build_ds_config, init_deepspeed

    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    pattern = [["ok", "ok"], ["skip", "ok"], ["skip", "skip"], ["ok"]]

    def host_syncing_clip(*args, **kwargs):  # DeepSpeed's: blocking host-to-device copies each step
        raise AssertionError("deepspeed's clip_grad_norm_ was called")

    import deepspeed.runtime.engine, deepspeed.runtime.utils
    deepspeed.runtime.utils.clip_grad_norm_ = deepspeed.runtime.engine.clip_grad_norm_ = host_syncing_clip

    def net():
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    for stage in map(int, sys.argv[1].split(",")):
        tc = preset("tiny", {"train.zero_stage": stage, "train.global_batch_size": 8, "train.clip_max_norm": 0.1}).train
        ds = build_ds_config(tc, 2, world)
        accum = ds["gradient_accumulation_steps"]
        torch.manual_seed(0)
        model, ref = net(), net()
        ref.load_state_dict(model.state_dict())
        init = [q.detach().clone() for q in ref.parameters()]
        engine = init_deepspeed(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), None, ds)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
        window = AccumulationWindow(engine, accum)
        gen = torch.Generator().manual_seed(1)
        data = [[[(torch.randn(2, 8, generator=gen), torch.randn(2, 3, generator=gen)) for _ in w] for w in pattern]
                for _ in range(world)]
        flushed, micro, norms, ref_norms = [], 0, [], []

        def flush():
            flushed.append(window.flush())
            if flushed[-1]:
                norms.append(window.grad_norm)

        for w, kinds in enumerate(pattern):
            for m, kind in enumerate(kinds):
                micro += 1
                x, y = data[rank][w][m]
                loss = ((engine(x) - y) ** 2).mean()  # the loop runs the forward of a skipped one too
                if kind == "ok":
                    window.backward(loss)
                if window.ends_at(micro):
                    flush()
            if window.pending:  # the last window, cut short
                flush()
            ok = [m for m, kind in enumerate(kinds) if kind == "ok"]
            if ok:
                ref_opt.zero_grad()
                loss = sum(((ref(data[r][w][m][0]) - data[r][w][m][1]) ** 2).mean() for r in range(world) for m in ok)
                (loss / accum / world).backward()
                ref_norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)))
                ref_opt.step()
        diff = max(float(((safe_get_full_fp32_param(p) if stage else p.detach()) - q).abs().max())
                   for p, q in zip(engine.module.parameters(), ref.parameters()))
        moved = max(float((q - q0).abs().max()) for q, q0 in zip(ref.parameters(), init))
        if rank == 0:
            print("REPORT " + json.dumps({"stage": stage, "accum": accum, "flushed": flushed, "diff": diff,
                                          "moved": moved, "norms": norms, "ref_norms": ref_norms,
                                          "engine_steps": engine.global_steps,
                                          "managed": ds["managed_gradient_accumulation"]}), flush=True)
    torch.distributed.destroy_process_group()
""")


def test_windows_with_skipped_micro_batches_match_plain_torch():
    """Every ZeRO stage: a skipped micro-batch adds no gradient and never shifts the windows, an
    all-skipped window takes no step, and a window cut short is applied, not left pending; each
    step's ``grad_norm`` is the global norm before clipping (was: none without ZeRO in fp32),
    clipped without DeepSpeed's ``clip_grad_norm_`` (its host syncs)."""
    reports = run_ranks(_WINDOWS, 2, "0,1,2,3")
    assert [r["stage"] for r in reports] == [0, 1, 2, 3]
    for r in reports:
        assert r["accum"] == 2 and r["managed"] is False, r
        assert r["flushed"] == [2, 1, 0, 1], r
        assert r["engine_steps"] == 3, r
        assert r["diff"] < 1e-6 and r["moved"] > 1e-3, r
        assert len(r["norms"]) == len(r["ref_norms"]) == 3 and min(r["ref_norms"]) > 0.1, r  # each step clipped
        assert all(abs(a - b) <= 1e-5 * b for a, b in zip(r["norms"], r["ref_norms"])), r


def test_train_state_position_rescales_to_another_worker_count():
    """An elastic restart keeps the epoch's consumed samples: 6 micro-batches on 2 workers are 3
    on 4 workers and 12 on 1; an old checkpoint without a worker count keeps its position."""
    state = TrainState(micro_in_epoch=6, world=2)
    assert state.rescale_to(4) and (state.micro_in_epoch, state.world) == (3, 4)
    assert state.rescale_to(1) and state.micro_in_epoch == 12
    assert state.rescale_to(1) and state.micro_in_epoch == 12
    odd = TrainState(micro_in_epoch=3, world=2)
    assert not odd.rescale_to(4) and odd.micro_in_epoch == 1  # rounded down: a few samples again
    legacy = TrainState.from_dict({"epoch": 1, "micro_in_epoch": 5})
    assert legacy.rescale_to(3) and (legacy.micro_in_epoch, legacy.world) == (5, 3)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ds_config_hands_the_accumulation_boundary_to_the_loop(world):
    from dino_scale.config import preset
    from dino_scale.engine.deepspeed_utils import build_ds_config

    ds = build_ds_config(preset("tiny", {"train.global_batch_size": 8}).train, 2, world)
    assert ds["managed_gradient_accumulation"] is False
    assert ds["gradient_accumulation_steps"] * 2 * world == ds["train_batch_size"] == 8


# fp16 (DeepSpeed's loss scaling; this CPU lacks oneDNN fp16, so the capability check is lifted as
# in test_engine_optim): a window whose scaled gradients overflow is flushed without an update,
# and ``step_applied`` says so; the loop then counts no step.
_FP16 = textwrap.dedent("""
    import json, sys
    import torch
    from deepspeed.accelerator import get_accelerator
    from dino_scale.config import preset
    from dino_scale.engine.deepspeed_utils import AccumulationWindow, build_ds_config, init_deepspeed

    type(get_accelerator()).is_fp16_supported = lambda self: True
    torch.distributed.init_process_group("gloo")
    for stage in map(int, sys.argv[1].split(",")):
        tc = preset("tiny", {"train.zero_stage": stage, "train.precision": "fp16", "train.global_batch_size": 4}).train
        ds = build_ds_config(tc, 2, 1)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        engine = init_deepspeed(model, torch.optim.AdamW(model.parameters(), lr=1e-3), None, ds)
        window = AccumulationWindow(engine, ds["gradient_accumulation_steps"])
        x, y = torch.randn(2, 8).half(), torch.randn(2, 3).half()

        def run(scale):
            for _ in range(window.accum):
                window.backward(((engine(x) - y) ** 2).mean().float() * scale)
            before = [p.detach().clone() for p in engine.module.parameters()]
            window.flush()
            return any(not torch.equal(a, p.detach()) for a, p in zip(before, engine.module.parameters()))

        huge_changed = run(1e30)
        huge_applied, huge_reason = window.step_applied, window.skip_reason
        tries = 0
        while tries < 40:
            tries += 1
            changed = run(1.0)
            if window.step_applied:
                break
        print("REPORT " + json.dumps({"stage": stage, "huge_applied": huge_applied, "huge_changed": huge_changed,
                                      "huge_reason": huge_reason,
                                      "applied": window.step_applied, "changed": changed, "tries": tries}), flush=True)
    torch.distributed.destroy_process_group()
""")


def test_fp16_overflow_window_is_flushed_without_an_update():
    reports = run_ranks(_FP16, 1, "0,2")
    assert [r["stage"] for r in reports] == [0, 2]
    for r in reports:
        assert r["huge_applied"] is False and r["huge_changed"] is False and r["huge_reason"] == "fp16 overflow", r
        assert r["applied"] is True and r["changed"] is True, r


# fp32: a window whose loss is finite but whose gradients are not (here NaN on rank 0 only: d/dx
# sqrt(x) at 0 times 0). DeepSpeed's ZeRO optimizers skip that step; without ZeRO DeepSpeed applied
# it, every weight became NaN and the run went on from there. The next window trains normally.
_NAN_GRADS = textwrap.dedent("""
    import json, sys
    import torch
    from dino_scale.config import preset
    from dino_scale.engine.deepspeed_utils import AccumulationWindow, build_ds_config, init_deepspeed

    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    for stage in map(int, sys.argv[1].split(",")):
        tc = preset("tiny", {"train.zero_stage": stage, "train.global_batch_size": 2 * world}).train
        ds = build_ds_config(tc, 2, world)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        engine = init_deepspeed(model, torch.optim.AdamW(model.parameters(), lr=1e-2), None, ds)
        window = AccumulationWindow(engine, ds["gradient_accumulation_steps"])
        x, y = torch.randn(2, 8), torch.randn(2, 3)

        def run(nan_grad):
            out = engine(x)
            loss = ((out - y) ** 2).mean()
            if nan_grad and rank == 0:
                loss = loss + (out * 0).sqrt().sum()  # still finite: 0
            window.backward(loss)
            before = [p.detach().clone() for p in engine.module.parameters()]
            window.flush()
            params = list(engine.module.parameters())
            return {"finite_loss": bool(torch.isfinite(loss)), "applied": window.step_applied,
                    "reason": window.skip_reason, "finite": all(bool(torch.isfinite(p).all()) for p in params),
                    "changed": any(not torch.equal(a, p.detach()) for a, p in zip(before, params))}

        bad, good = run(True), run(False)
        if rank == 0:
            print("REPORT " + json.dumps({"stage": stage, "bad": bad, "good": good}), flush=True)
    torch.distributed.destroy_process_group()
""")


def test_non_finite_gradients_skip_the_update_without_zero_too():
    reports = run_ranks(_NAN_GRADS, 2, "0,2")
    assert [r["stage"] for r in reports] == [0, 2]
    for r in reports:
        bad, good = r["bad"], r["good"]
        assert bad["finite_loss"] and not bad["applied"] and bad["reason"] == "non-finite gradients", r
        assert bad["finite"] and not bad["changed"], r  # no NaN weights, no update
        assert good["applied"] and good["reason"] is None and good["changed"] and good["finite"], r


# The DINO loss divides by the step's box count (official: the batch's boxes averaged over the
# workers). Global batch: 4 images with 1, 0, 4 and 3 boxes, micro-batches of 2: on 1 worker two
# accumulated micro-batches (1 and 7 boxes), on 2 workers one each. The "model" holds each image's
# outputs as parameters (image id in pixel [0, 0, 0]); the real criterion and compute_loss run on a
# real DeepSpeed engine, SGD without clipping, so any change of a box's weight moves the weights.
# The reference: the whole global batch as one batch in plain torch.
_BOX_NORM = textwrap.dedent("""
    import json, sys
    import torch
    from deepspeed.utils import safe_get_full_fp32_param
    from dino_scale.config import preset
    from dino_scale.engine.deepspeed_utils import AccumulationWindow, build_ds_config, init_deepspeed
    from dino_scale.engine.train_step import compute_loss, window_num_boxes
    from dino_scale.models.criterion import SetCriterion, build_weight_dict
    from dino_scale.models.matcher import HungarianMatcher

    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.logits = torch.nn.Parameter(torch.randn(4, 5, 3, generator=g))
            self.boxes = torch.nn.Parameter(torch.randn(4, 5, 4, generator=g) * 0.5)

        def forward(self, images, masks, targets=None):
            idx = images[:, 0, 0, 0].long()
            return {"pred_logits": self.logits[idx], "pred_boxes": self.boxes[idx].sigmoid()}

    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    g = torch.Generator().manual_seed(1)
    targets = [{"labels": torch.randint(0, 3, (n,), generator=g),
                "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25,
                                    torch.rand(n, 2, generator=g) * 0.2 + 0.1], 1)} for n in (1, 0, 4, 3)]
    images = torch.zeros(4, 3, 4, 4)
    images[:, 0, 0, 0] = torch.arange(4.0)
    masks = torch.zeros(4, 4, 4, dtype=torch.bool)
    criterion = SetCriterion(3, HungarianMatcher(), build_weight_dict(dec_layers=1, dn=False, interm=False),
                             dn_losses=False)
    for stage in map(int, sys.argv[1].split(",")):
        tc = preset("tiny", {"train.zero_stage": stage, "train.global_batch_size": 4, "train.clip_max_norm": 0}).train
        ds = build_ds_config(tc, 2, world)
        accum = ds["gradient_accumulation_steps"]
        model, ref = Heads(), Heads()
        engine = init_deepspeed(model, torch.optim.SGD(model.parameters(), lr=0.5), None, ds)
        window = AccumulationWindow(engine, accum)
        micro = [[(m * world + rank) * 2, (m * world + rank) * 2 + 1] for m in range(accum)]
        num_boxes = window_num_boxes([sum(len(targets[i]["labels"]) for i in mb) for mb in micro], accum,
                                     torch.device("cpu"))
        for mb in micro:
            loss, _ = compute_loss(engine, criterion, images[mb], masks[mb], [targets[i] for i in mb],
                                   num_boxes=num_boxes)
            window.backward(loss)
        window.flush()
        loss, _ = compute_loss(ref, criterion, images, masks, targets)  # one batch: the official normalization
        loss.backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.5 * p.grad
        got = [(safe_get_full_fp32_param(p) if stage else p.detach()) for p in engine.module.parameters()]
        diff = max(float((a - b).abs().max()) for a, b in zip(got, ref.parameters()))
        moved = max(float((b - a).abs().max()) for a, b in zip(Heads().parameters(), ref.parameters()))
        if rank == 0:
            print("REPORT " + json.dumps({"stage": stage, "accum": accum, "num_boxes": float(num_boxes),
                                          "diff": diff, "moved": moved}), flush=True)
    torch.distributed.destroy_process_group()
""")


@pytest.mark.parametrize("world", [1, 2])
def test_step_gradient_does_not_depend_on_the_split_into_workers_and_micro_batches(world):
    """One optimizer step over the same global batch equals the one-batch step on 1 worker with 2
    accumulated micro-batches and on 2 workers with 1: every micro-batch's loss is divided by the
    step's boxes per micro-batch (8 / 2 = 4), not by its own count (was: 1 and 7 on 1 worker, so
    the 1-box image's gradient weighed 4x and the others' 4/7 of the 2-worker step's)."""
    reports = run_ranks(_BOX_NORM, world, "0,2")
    assert [r["stage"] for r in reports] == [0, 2]
    for r in reports:
        assert r["accum"] == 2 // world and r["num_boxes"] == 4.0, r
        assert r["moved"] > 0.05 and r["diff"] < 1e-6, r

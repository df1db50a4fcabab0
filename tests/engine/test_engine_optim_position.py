"""The lr schedule follows the data position (windows consumed, skipped ones included), not the
count of applied optimizer steps: a real DeepSpeed engine on 2 gloo ranks, ZeRO 0 and 2. The loop
end to end (Ray Train, a skipped first window, the lr logged to MLflow) is part of one run in
tests/engine/test_engine_ray.py (``test_nan_steps_skipped_lr_follows_the_data_position_then_abort``),
sharing that run's Ray Train start-up."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dino_scale.config import preset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_fixtures import run_ranks  # noqa: E402

# 2 epochs of 3 windows of 2 micro-batches per rank (global batch 8 = 2 ranks x 2 images x 2),
# schedule "step": warmup over 2 steps, x0.1 at epoch 1 (position 3). Windows: 0 applied; 1 a
# finite loss with NaN gradients on rank 0 (skipped: by AccumulationWindow's own check without
# ZeRO, by DeepSpeed's ZeRO-2 optimizer, which calls no lr_scheduler.step() then); 2 every loss
# non-finite (no backward, no engine step); 3, 4, 5 applied. A checkpoint after window 3; a second
# engine resumes from it and takes windows 4 and 5 again. Each step's lr is read by an optimizer
# step pre-hook: the lr the update used.
_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from dino_scale.config import preset
    from dino_scale.engine.deepspeed_utils import AccumulationWindow, build_ds_config, init_deepspeed
    from dino_scale.engine.optim import applied_lr, build_scheduler, window_position

    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    SPE, KINDS = 3, ["ok", "nan_grad", "skip", "ok", "ok", "ok"]

    def engine_for(tc):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr)
        used = []
        opt.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))
        sched = build_scheduler(opt, tc, SPE)
        ds = build_ds_config(tc, 2, world)
        engine = init_deepspeed(model, opt, sched, ds)
        return engine, sched, AccumulationWindow(engine, ds["gradient_accumulation_steps"]), used

    def run(engine, sched, window, used, windows, ckpt=None):
        steps = []  # (position, lr the update used, applied_lr after it)
        g = torch.Generator().manual_seed(1)
        data = [[(torch.randn(2, 8, generator=g), torch.randn(2, 3, generator=g)) for _ in range(2)]
                for _ in range(len(KINDS) * world)]
        for pos in windows:
            epoch, kind = pos // SPE, KINDS[pos]
            for m in range(window.accum):
                micro = (pos % SPE) * window.accum + m + 1
                x, y = data[pos * world + rank][m]
                out = engine(x)
                loss = ((out - y) ** 2).mean()
                if kind == "nan_grad" and rank == 0:
                    loss = loss + (out * 0).sqrt().sum()  # finite (0), its gradient NaN
                if kind != "skip":
                    window.backward(loss)
                if window.ends_at(micro):
                    n_used = len(used)
                    window.flush(window_position(epoch, micro, SPE, window.accum))
                    if window.step_applied:
                        steps.append((pos, used[n_used], applied_lr(sched)))
            if ckpt is not None and pos == 3:
                engine.save_checkpoint(ckpt, tag="t")
        return steps

    for stage in map(int, sys.argv[1].split(",")):
        tc = preset("tiny", {"train.zero_stage": stage, "train.global_batch_size": 8, "train.lr": 1.0,
                             "train.schedule": "step", "train.lr_drop_epochs": [1], "train.warmup_steps": 2,
                             "train.epochs": 2, "train.clip_max_norm": 0.1}).train
        engine, sched, window, used = engine_for(tc)
        steps = run(engine, sched, window, used, range(6), ckpt=f"{sys.argv[2]}/s{stage}")
        last_epoch = sched.last_epoch
        engine, sched, window, used = engine_for(tc)
        engine.load_checkpoint(f"{sys.argv[2]}/s{stage}", tag="t", load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        resumed = run(engine, sched, window, used, range(4, 6))
        if rank == 0:
            print("REPORT " + json.dumps({"stage": stage, "steps": steps, "resumed": resumed,
                                          "last_epoch": last_epoch, "resumed_last_epoch": sched.last_epoch}),
                  flush=True)
    torch.distributed.destroy_process_group()
""")


def _cfg():
    return preset("tiny", {"train.lr": 1.0, "train.schedule": "step", "train.lr_drop_epochs": [1],
                           "train.warmup_steps": 2, "train.epochs": 2}).train


def test_lr_after_skipped_windows_is_the_lr_of_the_data_position(tmp_path):
    """Each applied step's lr is ``lr_factor_fn(position)``, skipped windows counted: after 2
    skipped windows the drop of epoch 1 lands at its first step (was: the scheduler counted
    applied steps only, so the step at position 3 still had warmup's lr and the drop came 2
    steps late, in the epoch's last step). The logged ``applied_lr`` is the lr the update used,
    the scheduler is stepped once per applied step (6 positions: ``last_epoch`` 6), and a run
    resumed from a checkpoint takes the same lrs."""
    from dino_scale.engine.optim import lr_factor_fn

    f = lr_factor_fn(_cfg(), 3)
    reports = run_ranks(_SCRIPT, 2, "0,2", str(tmp_path))
    assert [r["stage"] for r in reports] == [0, 2]
    for r in reports:
        assert [s[0] for s in r["steps"]] == [0, 3, 4, 5], r  # windows 1 and 2 skipped
        for pos, used, logged in r["steps"]:
            assert used == pytest.approx(f(pos), rel=1e-12) and logged == pytest.approx(used, rel=1e-12), r
        assert r["steps"][1][1] == pytest.approx(0.1), r  # the drop at the epoch's first step
        assert r["last_epoch"] == 6, r  # no double stepping
        assert r["resumed"] == r["steps"][2:] and r["resumed_last_epoch"] == 6, r


def test_seek_schedule_moves_lr_and_position_and_is_a_no_op_in_place():
    from dino_scale.engine.optim import build_scheduler, seek_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, _cfg(), steps_per_epoch=3)
    seek_schedule(sched, 0)  # in place: nothing changes
    assert sched.last_epoch == 0 and opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    seek_schedule(sched, 4)
    assert sched.last_epoch == 4 and opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]
    opt.step()
    sched.step()
    assert sched.last_epoch == 5 and opt.param_groups[0]["lr"] == pytest.approx(0.1)
    seek_schedule(sched, 1)  # back (a skipped step's seek undone)
    assert sched.last_epoch == 1 and opt.param_groups[0]["lr"] == pytest.approx(0.5 * (1 - 1e-3) + 1e-3)


def test_window_position_counts_every_window_of_the_epochs_before():
    from dino_scale.engine.optim import window_position

    assert [window_position(0, m, 3, 2) for m in range(1, 7)] == [0, 0, 1, 1, 2, 2]
    assert window_position(2, 1, 3, 2) == 6 and window_position(1, 5, 3, 2) == 5
    assert window_position(1, 3, 3, 1) == 5

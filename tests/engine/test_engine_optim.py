"""Parameter groups, schedules and the DeepSpeed config (no Ray)."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dino_scale.config import ConfigError, preset
from dino_scale.engine.deepspeed_utils import build_ds_config, grad_accum_steps
from dino_scale.engine.optim import build_param_groups, build_scheduler, lr_factor_fn
from dino_scale.engine.trainer import steps_per_epoch, worker_count, resources_per_worker
from dino_scale.models import build_dino

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_fixtures import run_ranks  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = preset("tiny")
    return cfg, build_dino(cfg.model)[0]


def test_param_groups(tiny_model):
    cfg, model = tiny_model
    tc = preset("tiny", {"train.lr": 1e-4, "train.lr_backbone": 1e-5, "train.lr_linear_proj_mult": 0.1}).train
    groups = {g["name"]: g for g in build_param_groups(model, tc)}
    assert set(groups) == {"default", "backbone", "linear_proj"}
    assert groups["default"]["lr"] == 1e-4 and groups["backbone"]["lr"] == 1e-5
    assert groups["linear_proj"]["lr"] == pytest.approx(1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("backbone.") for p in groups["backbone"]["params"])
    assert all(("sampling_offsets" in names[id(p)] or "reference_points" in names[id(p)])
               for p in groups["linear_proj"]["params"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(trainable)  # shared heads appear once
    tc.no_decay_norm_embed = True
    split = {g["name"]: g for g in build_param_groups(model, tc)}
    assert split["default_no_decay"]["weight_decay"] == 0.0 and split["default"]["weight_decay"] == tc.weight_decay
    nd = {names[id(p)] for p in split["default_no_decay"]["params"]}
    assert any("norm" in n for n in nd) and any(n.endswith("bias") for n in nd)
    assert any("label_enc" in n or "tgt_embed" in n or "level_embed" in n for n in nd)
    assert all(p.ndim >= 2 for p in split["default"]["params"])


def test_schedules():
    tc = preset("r50_4scale").train  # 12 epochs, drop at 11
    f = lr_factor_fn(tc, steps_per_epoch=10)
    assert f(0) == 1.0 and f(109) == 1.0 and f(110) == pytest.approx(0.1) and f(119) == pytest.approx(0.1)
    tc.schedule, tc.lr_drop_epochs = "multistep", [4, 8]
    f = lr_factor_fn(tc, 10)
    assert [round(f(s), 6) for s in (39, 40, 80)] == [1.0, 0.1, 0.01]
    tc.schedule, tc.warmup_steps = "cosine", 10
    f = lr_factor_fn(tc, 10)
    assert f(0) == pytest.approx(1e-3) and f(5) == pytest.approx(0.5 * (1 + 1e-3), rel=1e-3)
    assert f(10) == pytest.approx(1.0) and f(65) == pytest.approx(0.5) and f(120) == pytest.approx(0.0, abs=1e-9)
    tc.schedule = "poly"
    with pytest.raises(ConfigError, match="unknown schedule"):
        lr_factor_fn(tc, 10)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    tc.schedule = "step"
    with pytest.raises(ConfigError, match=r"'step' drops the lr once.*\[4, 8\]"):  # it dropped at 4 only
        build_scheduler(opt, tc, steps_per_epoch=2)
    tc.lr_drop_epochs = [4]
    sched = build_scheduler(opt, tc, steps_per_epoch=2)
    for _ in range(22):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_logged_lr_is_the_lr_the_step_used():
    """``applied_lr`` after a step is the lr that step used (``get_last_lr`` is the next step's:
    the log showed the drop, and each warmup value, one step early)."""
    from dino_scale.engine.optim import applied_lr

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    tc = preset("tiny", ["train.lr_drop_epochs=[1]", "train.warmup_steps=2"]).train
    tc.schedule = "step"
    sched = build_scheduler(opt, tc, steps_per_epoch=4)
    used = []
    assert applied_lr(sched) == opt.param_groups[0]["lr"]  # no step yet: the first step's
    for _ in range(6):
        used.append(opt.param_groups[0]["lr"])  # what this step applies
        opt.step()
        sched.step()
        assert applied_lr(sched) == pytest.approx(used[-1])
    assert used[3] == pytest.approx(1.0) and used[4] == pytest.approx(0.1)  # the drop at step 5 (epoch 1)
    assert used[0] < used[1] < used[2]  # warmup


def test_lr_drop_follows_the_epoch_count():
    """Unset, the drop is the recipe's 11-of-12 point of the run: `--epochs 26` (the Objects365
    recipe) drops at 24, not at 11 (was: 15 of 26 epochs at 0.1x lr); an explicit list is kept."""
    from dino_scale.engine.optim import lr_drop_epochs

    tc = preset("r50_4scale", {"train.epochs": 26}).train
    assert lr_drop_epochs(tc) == [24]
    f = lr_factor_fn(tc, steps_per_epoch=10)
    assert f(239) == 1.0 and f(240) == pytest.approx(0.1)
    assert [lr_drop_epochs(preset("r50_4scale", {"train.epochs": n}).train) for n in (12, 18, 1)] == [[11], [17], [1]]
    # 2 to 6 epochs: rounding gave the epoch count itself (no drop at all); the last epoch drops
    assert [lr_drop_epochs(preset("r50_4scale", {"train.epochs": n}).train)[0] for n in range(2, 9)] == [
        1, 2, 3, 4, 5, 6, 7]
    tc = preset("r50_4scale", ["train.epochs=26", "train.lr_drop_epochs=[20]"]).train
    assert lr_drop_epochs(tc) == [20]
    assert preset("r50_4scale", ["train.lr_drop_epochs=none"]).train.lr_drop_epochs is None
    assert lr_drop_epochs(preset("tiny").train) == [11]  # pinned: the demo's schedule


def test_a_drop_before_the_first_epoch_is_refused():
    """``train.lr_drop_epochs=[0]`` (or a negative epoch) trained at 0.1x the lr from the first
    step and passed every check. A drop at or past the run's last epoch stays legal (a pinned
    schedule, a run extended later): the pipelines' start-up line says it never happens."""
    from dino_scale.engine.trainer import check_training_config

    for drops in ("[0]", "[-1]", "[0,8]"):
        cfg = preset("r50_4scale", [f"train.lr_drop_epochs={drops}", "train.schedule=multistep"])
        with pytest.raises(ConfigError, match=r"each must be >= 1"):
            check_training_config(cfg)
    check_training_config(preset("r50_4scale", ["train.lr_drop_epochs=[12]", "train.schedule=step"]))


def test_max_failures_below_minus_one_is_refused():
    from dino_scale.engine.trainer import check_training_config

    with pytest.raises(ConfigError, match=r"train.max_failures must be >= 0 \(or -1: retry without limit\), got -5"):
        check_training_config(preset("tiny", ["train.max_failures=-5"]))
    check_training_config(preset("tiny", ["train.max_failures=-1"]))

"""Parameter groups, schedules and the DeepSpeed config (no Ray)."""
from __future__ import annotations

import math
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
    # lr * mult (2e-5) differs from lr_backbone (1e-5) and from lr: a linear_proj group at either is caught
    tc = preset("tiny", {"train.lr": 1e-4, "train.lr_backbone": 1e-5, "train.lr_linear_proj_mult": 0.2}).train
    groups = {g["name"]: g for g in build_param_groups(model, tc)}
    assert set(groups) == {"default", "backbone", "linear_proj"}
    assert groups["default"]["lr"] == 1e-4 and groups["backbone"]["lr"] == 1e-5
    assert groups["linear_proj"]["lr"] == pytest.approx(1e-4 * 0.2)
    assert groups["linear_proj"]["lr"] != pytest.approx(groups["backbone"]["lr"])
    assert groups["linear_proj"]["lr"] != pytest.approx(groups["default"]["lr"])
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
    # off the midpoint cosine and linear decay differ: progress = (step - warmup) / (total - warmup)
    assert f(10 + 22) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))  # 22/110: 0.9045, linear 0.8
    assert f(10 + 88) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.8)))  # 88/110: 0.0955, linear 0.2
    q = lr_factor_fn(tc, 10, total_steps=130)  # decay span 120: a quarter of it is 30 steps after warmup
    assert q(40) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))  # 0.8536, linear 0.75
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


def test_ds_config_and_fixed_global_batch():
    tc = preset("r50_4scale", {"train.zero_stage": 3, "train.precision": "bf16"}).train
    ds = build_ds_config(tc, micro_batch_size=2, world_size=4)
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 16
    # bf16 is the loop's autocast over fp32 weights: no DeepSpeed precision mode
    assert ds["zero_optimization"]["stage"] == 3 and "bf16" not in ds and "fp16" not in ds
    assert ds["gradient_clipping"] == 0.1 and ds["zero_allow_untested_optimizer"]
    assert build_ds_config(tc, 2, 8)["gradient_accumulation_steps"] == 1  # fewer workers, more accumulation
    assert grad_accum_steps(16, 2, 2) == 4
    with pytest.raises(ConfigError, match="not a multiple"):
        grad_accum_steps(16, 2, 3)
    for bad_global in (0, -4):  # 0 passed the modulo and divided by zero later; -4 read as "too few images"
        with pytest.raises(ConfigError, match="global_batch_size must be >= 1"):
            grad_accum_steps(bad_global, 2, 2)
    tc.precision = "fp16"
    assert build_ds_config(tc, 2, 8)["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    tc.zero_stage = 4
    with pytest.raises(ConfigError, match="zero_stage"):
        build_ds_config(tc, 2, 8)


def test_workers_resources_steps():
    cfg = preset("tiny", {"train.num_workers": 2, "data.batch_size": 2})
    assert worker_count(cfg) == 2 and resources_per_worker(cfg) == {"CPU": 0.5}
    assert steps_per_epoch(17, cfg) == 4  # 8 images/worker -> 4 micro-batches -> 4 steps (global 4)
    cfg.train.min_workers, cfg.train.num_workers, cfg.train.global_batch_size = 1, 4, 8
    with pytest.raises(ConfigError, match=r"\[3\]"):
        worker_count(cfg)
    cfg.train.min_workers, cfg.train.global_batch_size = 2, 24
    assert worker_count(cfg) == (2, 4)
    cfg.train.min_workers = 5
    with pytest.raises(ConfigError, match="above train.num_workers"):
        worker_count(cfg)
    cfg.train.min_workers = 2
    cfg.data.batch_size = 0  # was a ZeroDivisionError in the elastic range's modulo
    with pytest.raises(ConfigError, match="data.batch_size and train.global_batch_size must be >= 1"):
        worker_count(cfg)
    cfg.data.batch_size = 2
    cfg.train.elastic_resize_interval_s = -1.0
    with pytest.raises(ConfigError, match="elastic_resize_interval_s"):
        worker_count(cfg)
    # evaluation accumulates nothing: any worker count >= 1, one fixed group
    ev = preset("tiny", {"train.num_workers": 3})
    with pytest.raises(ConfigError, match="not a multiple"):
        worker_count(ev)
    assert worker_count(ev, training=False) == 3
    ev.train.num_workers = 0
    with pytest.raises(ConfigError, match="num_workers must be >= 1"):
        worker_count(ev, training=False)
    cfg.train.use_gpu = True
    assert resources_per_worker(cfg) == {"CPU": 1.0, "GPU": 1.0}
    cfg.train.worker_resources = ["gpu_h100", " gpu_spot:0.5 "]
    assert resources_per_worker(cfg) == {"CPU": 1.0, "GPU": 1.0, "gpu_h100": 1.0, "gpu_spot": 0.5}


@pytest.mark.parametrize("entries, needle", [
    (["GPU:2"], r"'GPU' is Ray's own resource; set it with train.use_gpu"),
    (["cpu"], r"'cpu' is Ray's own resource; set it with train.cpus_per_worker"),
    (["memory:100"], r"'memory' is Ray's own resource"),
    ([":1"], r"':1' names no resource"),
    (["gpu_h100:0"], r"'gpu_h100:0' needs an amount > 0"),
    (["gpu_h100:nan"], r"'gpu_h100:nan' needs an amount > 0"),
    (["gpu_h100:x"], r"'gpu_h100:x' needs an amount > 0"),
    (["gpu_h100", "gpu_h100:2"], r"names 'gpu_h100' twice"),
])
def test_worker_resources_errors(entries, needle):
    """``train.worker_resources`` is checked with the training config, before Ray starts: Ray
    refused these in the worker group's placement (or waited forever for an amount of 0 ...)."""
    from dino_scale.engine.trainer import check_training_config

    cfg = preset("tiny", {"train.worker_resources": entries})
    with pytest.raises(ConfigError, match=needle):
        check_training_config(cfg)


# DeepSpeed engines in a fresh single-rank process (gloo): steps of the tiny model in one
# precision, for each ZeRO stage in argv[2], until DeepSpeed applies one (fp16 skips the
# steps its dynamic loss scale overflows). This CPU has no fp16 support in oneDNN, so
# DeepSpeed refuses fp16 here; for fp16 the script lifts that check (torch's fp16 CPU
# kernels run the tiny model) and the rest is the real engine.
_PRECISION_STEP = textwrap.dedent("""
    import json, os, sys
    import torch
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from dino_scale.config import preset
    from dino_scale.engine.deepspeed_utils import build_ds_config, full_state_dict, init_deepspeed
    from dino_scale.engine.optim import build_optimizer
    from dino_scale.engine.train_step import autocast_context, autocast_dtype
    from dino_scale.models import build_dino

    precision = sys.argv[1]
    if precision == "fp16":
        type(get_accelerator()).is_fp16_supported = lambda self: True
    torch.distributed.init_process_group("gloo")
    for stage in map(int, sys.argv[2].split(",")):
        cfg = preset("tiny", {"train.precision": precision, "train.zero_stage": stage,
                              "train.global_batch_size": 1, "train.lr": 1e-3})
        torch.manual_seed(0)
        model, criterion, _ = build_dino(cfg.model)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        params = dict(model.named_parameters(remove_duplicate=False))  # shared heads under every name
        frozen = {n for n, p in params.items() if not p.requires_grad}
        engine = init_deepspeed(model, build_optimizer(model, cfg.train), None, build_ds_config(cfg.train, 1, 1))
        images, masks = torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool)
        targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}]
        for steps in range(1, 41):
            with autocast_context(images.device, autocast_dtype(precision)):
                out = engine(images, masks, targets)
                terms = criterion(out, targets)
            engine.backward(sum(v * criterion.weight_dict[k] for k, v in terms.items() if k in criterion.weight_dict))
            engine.step()
            if engine.was_step_applied():
                break
        after = full_state_dict(engine, rank=0, all_ranks=True)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            module = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        float_keys = [k for k, v in before.items() if v.is_floating_point()]
        trained = [k for k in params if k not in frozen]
        print("REPORT " + json.dumps({
            "stage": stage, "steps": steps, "applied": engine.was_step_applied(),
            "module_param_dtypes": sorted({str(v.dtype) for k, v in module.items() if k in params}),
            "saved_dtypes": sorted({str(after[k].dtype) for k in float_keys}),
            "frozen": len(frozen),
            "frozen_or_buffer_changed": [k for k in float_keys if (k not in params or k in frozen)
                                         and not torch.equal(after[k], before[k])],
            "trained_changed": sum(not torch.equal(after[k], before[k]) for k in trained),
            "trained": len(trained),
            # the module's copy is the saved weight rounded to its dtype (the masters, for fp16)
            "module_not_saved_rounded": [k for k in trained
                                         if not torch.equal(after[k].to(module[k].dtype), module[k])],
            "saved_finer_than_module": sum(not torch.equal(after[k].to(module[k].dtype).float(), after[k])
                                           for k in trained),
        }), flush=True)
    torch.distributed.destroy_process_group()
""")


def _precision_steps(precision: str, stages: str) -> list[dict]:
    return run_ranks(_PRECISION_STEP, 1, precision, stages)


def test_bf16_trains_fp32_weights_and_keeps_frozen_ones_exact():
    """train.precision=bf16 under DeepSpeed: autocast over fp32 weights. DeepSpeed's bf16 mode
    (used before) cast the module to bf16: frozen backbone weights and BN buffers were rounded
    for good, and the saved weights were bf16 copies of the optimizer's fp32 masters."""
    (report,) = _precision_steps("bf16", "2")  # the presets' default stage
    assert report["applied"] and report["steps"] == 1
    assert report["module_param_dtypes"] == ["torch.float32"]
    assert report["frozen"] > 0 and report["frozen_or_buffer_changed"] == []
    assert report["trained_changed"] > 0


def test_fp16_saves_the_fp32_masters_and_exact_frozen_weights():
    """train.precision=fp16 is DeepSpeed's fp16 mode: the module trains fp16 copies. Saved weights
    are the optimizer's fp32 masters (finer than, and rounding to, the module's copies) and the
    frozen weights as they were before the cast, for ZeRO 0 (DeepSpeed's fp16 optimizer), 2 and 3."""
    reports = _precision_steps("fp16", "0,2,3")
    assert [r["stage"] for r in reports] == [0, 2, 3]
    for r in reports:
        assert r["applied"], r
        assert r["module_param_dtypes"] == ["torch.float16"] and r["saved_dtypes"] == ["torch.float32"], r
        assert r["frozen"] > 0 and r["frozen_or_buffer_changed"] == [], r
        assert r["trained_changed"] == r["trained"], r
        assert r["module_not_saved_rounded"] == [], r
        assert r["saved_finer_than_module"] > r["trained"] // 2, r


def test_a_universal_load_host_step_moves_to_the_parameters_device():
    # DeepSpeed's universal load assigns the step it read (a CPU tensor) into the optimizer state,
    # bypassing load_state_dict: the fused CUDA AdamW then failed at the first step after a resume
    # on another worker count (device mismatch in _fused_adamw_). Meta stands in for the GPU.
    from types import SimpleNamespace

    from dino_scale.engine.optim import steps_on_param_devices

    fused_p, plain_p, fresh_p = (torch.empty(3, device="meta") for _ in range(3))
    state = {fused_p: {"step": torch.tensor(7.0, dtype=torch.float64)}, plain_p: {"step": torch.tensor(7.0)}}
    inner = SimpleNamespace(param_groups=[{"params": [fused_p, fresh_p], "fused": True},
                                          {"params": [plain_p], "fused": None}], state=state)
    assert steps_on_param_devices(SimpleNamespace(optimizer=inner)) == 1  # through the ZeRO wrapper
    step = state[fused_p]["step"]
    assert step.device.type == "meta" and step.dtype == torch.float32
    assert state[plain_p]["step"].device.type == "cpu"  # the plain implementation keeps it on the host
    assert fresh_p not in state and steps_on_param_devices(inner) == 0

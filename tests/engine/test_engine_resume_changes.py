"""What a rerun under the same run name may change (dino_scale.engine.elastic.resume_changes), and
resumes that change the ZeRO stage or skip the backbone file: real engines on gloo CPU ranks."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_fixtures import max_diff, run_ranks  # noqa: E402

from dino_scale.config import preset


def test_a_tuple_set_from_python_is_the_list_its_checkpoint_saved():
    """``cfg.data.train_scales = (192, 224)`` (Python API) was compared with the ``[192, 224]``
    that the checkpoint's config.json reads back: a rerun of the same run was refused."""
    from dino_scale.config import to_dict
    from dino_scale.engine.elastic import resume_changes

    cfg = preset("tiny")
    cfg.data.train_scales = (192, 224)
    assert resume_changes(json.loads(json.dumps(to_dict(cfg))), cfg) == []


def test_a_rerun_under_the_same_run_name_must_keep_what_the_run_trains_with():
    """A resumed run restores the optimizer's parameter groups and the scheduler's base lrs from
    its checkpoint: a changed train.lr or weight decay was silently ignored (the new value only
    logged as the run's param), while the schedule's shape (drop epochs, warmup) came from the
    new config. resume_changes names what differs; the budget and where it runs may change."""
    from dino_scale.config import to_dict
    from dino_scale.engine.elastic import resume_changes

    base = preset("tiny", {"train.lr_drop_epochs": None, "train.epochs": 12})
    saved = to_dict(base)
    same = {"train.max_steps": 900, "train.num_workers": 4, "train.min_workers": 2,
            "train.checkpoint_every_steps": 7, "train.log_every_steps": 3, "train.max_failures": 2,
            "train.compile": True, "eval.tta": True, "model.msda_backend": "pytorch", "name": "other",
            "train.collective_timeout_s": 7200, "data.eval_size": 320, "data.eval_max_size": 544,
            "model.num_select": 100}  # (detections kept per image: evaluation only, was refused)
    assert resume_changes(saved, preset("tiny", {"train.lr_drop_epochs": None, "train.epochs": 12, **same})) == []
    # more epochs with the drop pinned: the schedule so far is unchanged
    pinned = to_dict(preset("tiny", {"train.lr_drop_epochs": [11], "train.epochs": 12}))
    assert resume_changes(pinned, preset("tiny", {"train.lr_drop_epochs": [11], "train.epochs": 24})) == []
    for overrides, needle in (
            ({"train.lr": 1e-3}, "train.lr 0.0002 -> 0.001"),
            ({"train.lr_backbone": 1e-5}, "train.lr_backbone 0.0002 -> 1e-05"),
            ({"train.weight_decay": 0.05}, "train.weight_decay 0.0001 -> 0.05"),
            ({"train.clip_max_norm": 1.0}, "train.clip_max_norm 0.1 -> 1.0"),
            ({"data.batch_size": 2}, "data.batch_size 4 -> 2"),
            ({"train.global_batch_size": 8}, "train.global_batch_size 4 -> 8"),
            ({"train.epochs": 24}, "lr drop epochs [11] -> [22]"),  # the default drop moves with the length
            ({"train.lr_drop_epochs": [8]}, "lr drop epochs [11] -> [8]"),
            ({"train.warmup_steps": 100}, "train.warmup_steps 0 -> 100"),
            ({"train.schedule": "cosine"}, "train.schedule 'step' -> 'cosine'"),
            ({"model.num_queries": 60}, "model.num_queries 50 -> 60")):
        cfg = preset("tiny", {"train.lr_drop_epochs": None, "train.epochs": 12, **overrides})
        changes = resume_changes(saved, cfg)
        assert needle in changes and (len(changes) == 1 or "schedule" in needle), changes
    # the epoch length in optimizer steps (another dataset, or another size of it)
    assert resume_changes(saved, base, 40, 40) == [] and resume_changes(saved, base, 0, 41) == []
    assert resume_changes(saved, base, 40, 41) == ["steps per epoch (training images // global batch) 40 -> 41"]


# One rank: 2 optimizer steps and a checkpoint under ZeRO ``save_stage`` (then the step after it:
# the uninterrupted run), or the checkpoint loaded under ZeRO ``load_stage`` and that step.
_STAGE_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from deepspeed.utils import safe_get_full_fp32_param
    from dino_scale.config import preset
    from dino_scale.engine.checkpoint import TrainState, load_training_checkpoint, save_training_checkpoint
    from dino_scale.engine.deepspeed_utils import AccumulationWindow, build_ds_config, init_deepspeed

    mode, folder, stage = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    torch.distributed.init_process_group("gloo")
    gen = torch.Generator().manual_seed(3)
    samples = [(torch.randn(4, 6, generator=gen), torch.randn(4, 2, generator=gen)) for _ in range(3)]
    tc = preset("tiny", {"train.zero_stage": stage, "train.global_batch_size": 4, "train.clip_max_norm": 1.0}).train
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 2))
    groups = [{"params": list(model[0].parameters()), "lr": 3e-3, "weight_decay": 0.05},
              {"params": list(model[2].parameters()), "lr": 6e-3, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    engine = init_deepspeed(model, optimizer, scheduler, build_ds_config(tc, 2, 1))
    window = AccumulationWindow(engine, 2)

    def step(t):
        x, y = samples[t]
        for i in (0, 2):
            window.backward(((engine(x[i:i + 2]) - y[i:i + 2]) ** 2).mean())
        window.flush()

    if mode == "save":
        step(0), step(1)
        save_training_checkpoint(folder, engine, TrainState(global_step=2, world=1), 0)
    else:
        load_training_checkpoint(folder, engine, 0)
    step(2)
    params = [(safe_get_full_fp32_param(p) if stage else p.detach()).tolist() for p in engine.module.parameters()]
    print("REPORT " + json.dumps({"params": params, "lrs": [g["lr"] for g in engine.optimizer.param_groups]}))
    torch.distributed.destroy_process_group()
""")


def test_a_rerun_may_change_the_zero_stage_only_between_checkpoint_layouts_deepspeed_loads():
    """``--zero-stage`` was free on a rerun under the same run name, but DeepSpeed loads a ZeRO-0
    checkpoint only under ZeRO-0, a ZeRO-3 one only under ZeRO-3: the driver let 0 -> 2, 2 -> 0 and
    2 -> 3 through and every worker then failed at the resume (FileNotFoundError of
    'zero_pp_rank_0_mp_rank_00_optim_states.pt', AttributeError: 'NoneType' object has no attribute
    'copy', an AssertionError in DeepSpeed's state dict loader), retried max_failures times. ZeRO-1
    and ZeRO-2 write the same partitions: 1 -> 2 resumes exactly (real engines below)."""
    from dino_scale.config import to_dict
    from dino_scale.engine.elastic import resume_changes

    def changes(old: int, new: int) -> list[str]:
        return resume_changes(to_dict(preset("tiny", {"train.zero_stage": old})),
                              preset("tiny", {"train.zero_stage": new}))

    for old, new, layouts in ((0, 2, "'ZeRO-0' -> 'ZeRO-1/2'"), (2, 0, "'ZeRO-1/2' -> 'ZeRO-0'"),
                              (0, 1, "'ZeRO-0' -> 'ZeRO-1/2'"), (2, 3, "'ZeRO-1/2' -> 'ZeRO-3'"),
                              (3, 1, "'ZeRO-3' -> 'ZeRO-1/2'"), (0, 3, "'ZeRO-0' -> 'ZeRO-3'")):
        assert changes(old, new) == [f"train.zero_stage (checkpoint layout) {layouts}"], (old, new)
    assert changes(1, 2) == changes(2, 1) == changes(3, 3) == []


def test_a_zero1_checkpoint_resumes_exactly_under_zero2(tmp_path):
    reference = run_ranks(_STAGE_SCRIPT, 1, "save", str(tmp_path / "ckpt"), "1")[0]
    resumed = run_ranks(_STAGE_SCRIPT, 1, "load", str(tmp_path / "ckpt"), "2")[0]
    assert resumed["lrs"] == reference["lrs"]
    assert max_diff(reference["params"], resumed["params"]) < 1e-7


def test_which_resumes_skip_the_backbone_file():
    """A worker skips model.backbone_weights only where the file would be overwritten entirely:
    strict init weights, or a resume that restores every tensor: any from a checkpoint holding its
    frozen tensors (resumed_frozen); from one written before, where DeepSpeed restores them (the
    same worker count, or any without ZeRO; not fp16). The driver (world None) also covers every
    size an elastic run may take."""
    from dino_scale.engine.elastic import reads_backbone_weights, resume_restores_every_tensor

    def reads(resumed_world, world=None, init=None, strict=True, resumed_frozen=False, **over):
        cfg = preset("tiny", {"model.backbone_weights": "/cluster/resnet18.pth", "train.num_workers": 2,
                              "train.zero_stage": 2, **over})
        return reads_backbone_weights(cfg, init_weights=init, init_strict=strict, resumed_world=resumed_world,
                                      world=world, resumed_frozen=resumed_frozen)

    assert reads(None) and reads(None, world=2)  # a new run: the file is the backbone's start
    assert not reads(None, init="w.safetensors") and reads(None, init="w.safetensors", strict=False)
    assert not reads(2) and not reads(2, world=2) and not reads(0)  # same worker count (0: unknown)
    assert reads(4) and reads(2, world=1)  # universal load: frozen tensors come from the build
    assert not reads(4, **{"train.zero_stage": 0}) and not reads(4, world=3, **{"train.zero_stage": 0})
    assert not reads(2, **{"train.zero_stage": 3}) and reads(4, **{"train.zero_stage": 3})
    assert reads(2, **{"train.precision": "fp16"})
    assert not reads(2, **{"train.precision": "bf16"})  # autocast over fp32 weights
    assert reads(2, **{"train.min_workers": 1})  # elastic ZeRO-2: a resize resumes universally
    assert not reads(2, world=2, **{"train.min_workers": 1})  # the worker knows its size
    assert not reads(2, **{"train.min_workers": 1, "train.zero_stage": 0})
    assert not reads(None, **{"model.backbone_weights": None})
    assert resume_restores_every_tensor(1, 1, 1, "fp32") and not resume_restores_every_tensor(2, 1, 1, "fp32")
    # a checkpoint holding its frozen tensors (frozen.safetensors): every resume restores them
    assert not reads(4, resumed_frozen=True) and not reads(2, world=1, resumed_frozen=True)
    assert not reads(2, resumed_frozen=True, **{"train.precision": "fp16"})
    assert not reads(2, resumed_frozen=True, **{"train.min_workers": 1})
    assert reads(None, resumed_frozen=True)  # a new run
    assert resume_restores_every_tensor(2, 1, 2, "fp16", frozen_saved=True)
    assert not resume_restores_every_tensor(4, 2, 3, "fp32", frozen_saved=True)  # refused: check_resumable


# ``save``: a net with a frozen layer and a buffer (as the backbone's stem and FrozenBN statistics),
# one step, a checkpoint. ``load``: the net built from other values (a skipped backbone file), the
# checkpoint resumed as the loop resumes it; prints the full state dict and the module's own frozen
# tensors for the test to compare. A case is ``<stage>[h][o]``: ``h`` fp16 (the capability check
# lifted, as in test_engine_accumulation), ``o`` a copy of the case's checkpoint without its
# frozen.safetensors (one written before they were saved; the test makes it), folder ``case<case>``.
_RESTORE_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from deepspeed.accelerator import get_accelerator
    from dino_scale.config import preset
    from dino_scale.engine.checkpoint import TrainState, load_training_checkpoint, save_training_checkpoint
    from dino_scale.engine.deepspeed_utils import AccumulationWindow, build_ds_config, full_state_dict, init_deepspeed
    from dino_scale.engine.elastic import resume_source
    from ray.train import Checkpoint

    type(get_accelerator()).is_fp16_supported = lambda self: True
    mode, root, cases = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen, self.head = torch.nn.Linear(6, 6).requires_grad_(False), torch.nn.Linear(6, 2)
            self.register_buffer("stat", torch.randn(6))

        def forward(self, x):
            h = torch.tanh(self.frozen(x.to(self.frozen.weight.dtype)) + self.stat)
            return self.head(h.to(self.head.weight.dtype)).float()

    for case in cases:
        folder, stage = root / f"case{case}", int(case[0])
        precision = "fp16" if "h" in case else "fp32"
        tc = preset("tiny", {"train.zero_stage": stage, "train.global_batch_size": 4, "train.precision": precision})
        ds = build_ds_config(tc.train, 2, world)
        torch.manual_seed(0 if mode == "save" else 1)
        model = Net()
        optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        checkpoint = Checkpoint.from_directory(str(folder)) if mode == "load" else None
        with resume_source(checkpoint, world, stage, rank, torch.distributed.barrier) as source:
            if source.universal is not None:
                ds["checkpoint"] = {"load_universal": True}
            engine = init_deepspeed(model, optimizer, scheduler, ds)
            if mode == "load":
                load_training_checkpoint(folder, engine, rank, universal_root=source.universal)
        if mode == "save":
            window = AccumulationWindow(engine, ds["gradient_accumulation_steps"])
            for m in range(window.accum):
                window.backward(engine(torch.randn(2, 6)).square().mean())
            window.flush()
            save_training_checkpoint(folder, engine, TrainState(global_step=1, world=world), rank)
        state = full_state_dict(engine, rank)
        module = {k: v.float().tolist() for k, v in engine.module.state_dict().items()
                  if k in ("frozen.weight", "stat")} if stage < 3 else {}  # ZeRO-3: partitions
        if rank == 0:
            print("REPORT " + json.dumps({"case": case, "universal": source.universal is not None, "module": module,
                                          "state": {k: v.tolist() for k, v in state.items()}}), flush=True)
    torch.distributed.destroy_process_group()
""")


def test_a_resume_that_skips_the_backbone_file_restores_every_tensor(tmp_path):
    """Real engines: a net built from other values (the backbone file skipped) holds every tensor
    of the checkpoint after the resume, frozen weights and buffers included, on every resume:
    also a universal load (ZeRO-2, 2 -> 1 workers), which skips the module state dict (the frozen
    tensors come from the checkpoint's frozen.safetensors), and under fp16 (the fp32 originals,
    not their fp16 copies; the module holds those copies rounded; ZeRO 0, 2 and 3). A checkpoint without
    frozen.safetensors (written before) keeps the build's frozen tensors under a universal load:
    resume_restores_every_tensor says so, which is why the backbone file is read there."""
    import shutil

    import torch

    from dino_scale.engine.elastic import holds_frozen_tensors, resume_restores_every_tensor

    saves = {1: "0,1,2,3,0h,2h,3h", 2: "2,3,2h"}  # one launch per saved worker count (case folders apart)
    saved = {w: {r["case"]: r for r in run_ranks(_RESTORE_SCRIPT, w, "save", str(tmp_path / f"w{w}"), cases)}
             for w, cases in saves.items()}
    for case in ("2", "2h"):  # as written before the frozen tensors were saved
        shutil.copytree(tmp_path / f"w2/case{case}", tmp_path / f"w2/case{case}o")
        (tmp_path / f"w2/case{case}o/frozen.safetensors").unlink()
    checked = 0
    for saved_world, world, cases in [(1, 1, "0,1,2,3,0h,2h,3h"), (2, 2, "3,2h"), (2, 1, "2,2h,2o,2ho")]:
        loaded = run_ranks(_RESTORE_SCRIPT, world, "load", str(tmp_path / f"w{saved_world}"), cases)
        assert [r["case"] for r in loaded] == cases.split(",")
        for res in loaded:
            case, stage = res["case"], int(res["case"][0])
            ref = saved[saved_world][case.rstrip("o")]
            restored = {k for k in ref["state"] if max_diff(ref["state"][k], res["state"][k]) < 1e-7}
            assert {"head.weight", "head.bias"} <= restored, case  # the optimizer's parameters, always
            frozen_saved = holds_frozen_tensors(tmp_path / f"w{saved_world}/case{case}")
            assert frozen_saved == ("o" not in case)
            precision = "fp16" if "h" in case else "fp32"
            if resume_restores_every_tensor(saved_world, world, stage, precision, frozen_saved):
                assert restored == set(ref["state"]), (saved_world, world, case, restored)
                checked += 1
            else:
                assert "o" in case, case
            if res["universal"] and not frozen_saved:  # the build's: the backbone file's
                assert {"frozen.weight", "stat"}.isdisjoint(restored), case
            if frozen_saved and res["module"]:  # the module's own tensors (fp16: the originals rounded)
                rounded = torch.tensor(ref["state"]["frozen.weight"]).to(torch.float16 if "h" in case else None)
                assert torch.equal(torch.tensor(res["module"]["frozen.weight"]), rounded.float()), case
                assert res["module"]["stat"] == ref["state"]["stat"], case
    assert res["universal"] and checked == 11


def test_a_rerun_on_other_training_data_of_the_same_size_is_a_change():
    """The epoch length caught a training set of another size only: another set of the same size
    was resumed silently. The data's fingerprint, kept in the checkpoint, is compared too; a
    checkpoint from before it (no fingerprint) is not refused."""
    from dino_scale.config import to_dict
    from dino_scale.engine.elastic import resume_changes

    cfg = preset("tiny")
    saved = to_dict(cfg)
    assert resume_changes(saved, cfg, 8, 8, "a1b2c3d4e5f60718", "a1b2c3d4e5f60718") == []
    assert resume_changes(saved, cfg, 8, 8, "", "a1b2c3d4e5f60718") == []
    assert resume_changes(saved, cfg, 8, 8, "a1b2c3d4e5f60718", "99b2c3d4e5f60718") == [
        "training data (fingerprint of their labelled images) a1b2c3d4e5f60718 -> 99b2c3d4e5f60718"]

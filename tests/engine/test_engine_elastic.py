"""Resuming a DeepSpeed training checkpoint on another worker count (dino_scale.engine.elastic):
real engines on gloo CPU ranks, the project's save/load functions, compared with a run that
kept its worker count."""
from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_fixtures import max_diff, run_ranks  # noqa: E402

from dino_scale.config import ConfigError, preset
from dino_scale.engine.deepspeed_utils import check_train_config
from dino_scale.engine.elastic import check_resumable, saved_world_size

# ``save``: 2 optimizer steps on the global batches 0 and 1, a checkpoint, then step 2 (the
# reference). ``load``: on this world size, the checkpoint (converted to the universal format
# when needed), then step 2. A global batch is 8 samples (micro-batches of 2, accumulation
# 8 / (2 x world)); which rank sees which sample does not change the averaged gradient. Two
# parameter groups with their own lr and weight decay, and a frozen layer, as in DINO.
_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from deepspeed.utils import safe_get_full_fp32_param
    from dino_scale.config import preset
    from dino_scale.engine.checkpoint import TrainState, load_training_checkpoint, save_training_checkpoint
    from dino_scale.engine.deepspeed_utils import AccumulationWindow, build_ds_config, init_deepspeed
    from dino_scale.engine.elastic import resume_source
    from ray.train import Checkpoint

    mode, root, stages = sys.argv[1], Path(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    gen = torch.Generator().manual_seed(3)
    samples = [(torch.randn(8, 6, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(3)]

    def step(engine, window, t):
        x, y = samples[t]
        for m in range(window.accum):
            i = (m * world + rank) * 2
            window.backward(((engine(x[i:i + 2]) - y[i:i + 2]) ** 2).mean())
        window.flush()

    for stage in stages:
        folder = root / f"stage{stage}"
        tc = preset("tiny", {"train.zero_stage": stage, "train.global_batch_size": 8, "train.clip_max_norm": 1.0}).train
        ds = build_ds_config(tc, 2, world)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 12),
                                    torch.nn.Tanh(), torch.nn.Linear(12, 2))
        model[0].requires_grad_(False)
        groups = [{"params": list(model[2].parameters()), "lr": 3e-3, "weight_decay": 0.05},
                  {"params": list(model[4].parameters()), "lr": 6e-3, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
        checkpoint = Checkpoint.from_directory(str(folder)) if mode == "load" else None
        with resume_source(checkpoint, world, stage, rank, torch.distributed.barrier) as source:  # as the loop
            if source.universal is not None:
                ds["checkpoint"] = {"load_universal": True}
            engine = init_deepspeed(model, optimizer, scheduler, ds)
            if mode == "load":
                state = load_training_checkpoint(folder, engine, rank, universal_root=source.universal)
                assert state.global_step == 2 and source.saved_world == state.world
        universal = source.universal
        window = AccumulationWindow(engine, ds["gradient_accumulation_steps"])
        if mode == "save":
            step(engine, window, 0)
            step(engine, window, 1)
            save_training_checkpoint(folder, engine, TrainState(global_step=2, world=world), rank)
        step(engine, window, 2)
        params = [(safe_get_full_fp32_param(p) if stage and p.requires_grad else p.detach()).tolist()
                  for p in engine.module.parameters()]
        if rank == 0:
            print("REPORT " + json.dumps({
                "stage": stage, "world": world, "universal": universal is not None, "params": params,
                "copy_left": universal is not None and universal.exists(),
                "groups": [(g["lr"], g["weight_decay"]) for g in engine.optimizer.param_groups]}), flush=True)
    torch.distributed.destroy_process_group()
""")


@pytest.mark.parametrize("saved_world, world, stages", [(2, 1, "0,1,2"), (1, 2, "2")])
def test_resume_on_another_worker_count_matches_the_uninterrupted_run(tmp_path, saved_world, world, stages):
    """ZeRO 0 (plain load), 1 and 2 (universal copy): the step after the resume on another worker
    count equals the uninterrupted run's, parameter groups keep their lr and weight decay."""
    reference = run_ranks(_SCRIPT, saved_world, "save", str(tmp_path), stages)
    assert saved_world_size(tmp_path / "stage2") == saved_world
    resumed = run_ranks(_SCRIPT, world, "load", str(tmp_path), stages)
    assert [r["stage"] for r in resumed] == [int(s) for s in stages.split(",")]
    for ref, res in zip(reference, resumed):
        assert res["universal"] == (res["stage"] > 0) and not res["copy_left"], res["stage"]
        assert max_diff(ref["groups"], res["groups"]) < 1e-12, res["stage"]
        assert max_diff(ref["params"], res["params"]) < 1e-6, res["stage"]
    assert not list(Path(tmp_path).glob("stage*/ds_universal"))  # converted beside, not into, the checkpoint


def test_zero3_on_another_worker_count_is_refused_up_front():
    assert check_resumable(2, 2, 3) is False and check_resumable(0, 4, 3) is False
    with pytest.raises(ConfigError, match="ZeRO-3 checkpoint was written by 2 workers and cannot resume on 1"):
        check_resumable(2, 1, 3)
    tc = preset("tiny", {"train.zero_stage": 3, "train.min_workers": 1, "train.num_workers": 2,
                         "train.global_batch_size": 4}).train
    with pytest.raises(ConfigError, match="elastic run"):
        check_train_config(tc, 2, 2)
    tc.min_workers = 2  # not elastic: min == max
    check_train_config(tc, 2, 2)
    tc.min_workers, tc.zero_stage = 1, 2
    check_train_config(tc, 2, 2)


def test_saved_world_size_of_a_checkpoint_from_before_it_was_recorded(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "trainer_state.json").write_text(json.dumps({"epoch": 0, "micro_in_epoch": 2}))
    for r in range(4):
        (tmp_path / "ds" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert saved_world_size(tmp_path) == 4
    assert saved_world_size(tmp_path / "missing") == 0


def test_holds_frozen_tensors_says_whether_the_checkpoint_saved_them(tmp_path):
    """Checkpoints written before frozen.safetensors was saved lack it: a resume from them still
    needs the backbone file where DeepSpeed skips the frozen tensors. Read through a pyarrow
    filesystem as Ray hands a checkpoint over (also an object store)."""
    import pyarrow.fs as pafs

    from dino_scale.engine.elastic import holds_frozen_tensors

    assert not holds_frozen_tensors(tmp_path) and not holds_frozen_tensors(tmp_path / "missing")
    (tmp_path / "frozen.safetensors").mkdir()  # not a file
    assert not holds_frozen_tensors(tmp_path)
    (tmp_path / "frozen.safetensors").rmdir()
    (tmp_path / "frozen.safetensors").write_bytes(b"{}")
    assert holds_frozen_tensors(tmp_path) and holds_frozen_tensors(f"{tmp_path}/", pafs.LocalFileSystem())
    assert holds_frozen_tensors("ckpt", pafs.SubTreeFileSystem(str(tmp_path.parent), pafs.LocalFileSystem())) is False
    assert holds_frozen_tensors(tmp_path.name, pafs.SubTreeFileSystem(str(tmp_path.parent), pafs.LocalFileSystem()))


def test_a_failed_conversion_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    """A checkpoint of 2 workers resumed on 1 whose DeepSpeed files are unreadable: the error names
    the conversion and its output; no temporary folder is left behind."""
    import tempfile

    from ray.train import Checkpoint

    from dino_scale.engine.elastic import resume_source

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    ckpt = tmp_path / "ckpt"
    (ckpt / "ds").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"world": 2}))
    for r in range(2):
        (ckpt / "ds" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match=r"converting .*ds to DeepSpeed's universal format failed"):
        with resume_source(Checkpoint.from_directory(str(ckpt)), 1, 2, 0, lambda: None):
            pytest.fail("the block must not run")
    assert list((tmp_path / "tmp").iterdir()) == []


def _two_worker_checkpoint(folder):
    (folder / "ds").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"world": 2}))
    return folder


def test_the_universal_copy_is_removed_when_the_last_barrier_fails(tmp_path, monkeypatch):
    """The copy (fp32 weights and both Adam moments: gigabytes) was removed after the block's
    closing barrier, in the same ``finally``: when that barrier raised (a peer rank died), local
    rank 0 left it in /tmp for good. The conversion itself is DeepSpeed's (a test above runs it);
    here it is replaced by a folder of the same layout."""
    import tempfile

    from ray.train import Checkpoint

    from dino_scale.engine import elastic
    from dino_scale.engine.checkpoint import UNIVERSAL_TAG
    from dino_scale.engine.scratch import OWNER_FILE, owner_tag

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(elastic, "_convert", lambda folder, out: (out / UNIVERSAL_TAG).mkdir(parents=True))
    calls = []

    def barrier():
        calls.append(1)
        if len(calls) == 2:  # the one after the block: a peer is gone
            raise RuntimeError("Connection closed by peer")

    ckpt = _two_worker_checkpoint(tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="closed by peer"):
        with elastic.resume_source(Checkpoint.from_directory(str(ckpt)), 1, 2, 0, barrier) as source:
            assert (source.universal / UNIVERSAL_TAG).is_dir()
            assert (source.universal / OWNER_FILE).read_text() == owner_tag()  # swept if this process dies
    assert list((tmp_path / "tmp").iterdir()) == []


def test_copies_of_killed_workers_are_swept_before_converting(tmp_path, monkeypatch):
    """A worker killed while converting (or loading) left its copy behind; the next local rank 0
    of the host removes it (the owner is dead) and leaves copies of live workers alone."""
    import subprocess
    import tempfile

    from ray.train import Checkpoint

    from dino_scale.engine import elastic
    from dino_scale.engine.checkpoint import UNIVERSAL_TAG
    from dino_scale.engine.scratch import OWNER_FILE, owner_tag

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(elastic, "_convert", lambda folder, out: (out / UNIVERSAL_TAG).mkdir(parents=True))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    left, half, busy = tmp / "dino_universal_0123", tmp / "dino_universal_4567.tmp-89ab", tmp / "dino_universal_cdef"
    for folder, pid in ((left, gone.pid), (half, gone.pid), (busy, os.getpid())):
        (folder / UNIVERSAL_TAG).mkdir(parents=True)
        (folder / OWNER_FILE).write_text(owner_tag(pid))
    ckpt = _two_worker_checkpoint(tmp_path / "ckpt")
    with elastic.resume_source(Checkpoint.from_directory(str(ckpt)), 1, 2, 0, lambda: None) as source:
        assert sorted(p.name for p in tmp.iterdir()) == sorted([busy.name, source.universal.name])
    assert [p.name for p in tmp.iterdir()] == [busy.name]


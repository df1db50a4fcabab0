"""Checkpoint files: the EMA and training state read back on another device, the state file's
position fields, weights files read without running a pickle (the RNG streams: test_engine_rng_state.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dino_scale.engine.checkpoint import atomic_write_text, load_weights


class _LoadedEngine:
    """Stands for the DeepSpeed engine, whose own state is not under test here."""

    def load_checkpoint(self, *args, **kwargs):
        return "loaded", {}


def test_ema_written_from_another_device_resumes_on_this_ranks_device(tmp_path, monkeypatch):
    """Rank 0 writes ``ema.pt`` from its GPU and every rank reads it back on resume: it must load
    where that GPU is not (a CPU-only host, or another rank's GPU) and average on this rank's
    device. (It was read with ``torch.load`` without ``map_location``: every rank put the
    averages on cuda:0, and the next update mixed devices; a CPU host could not read it.)"""
    import json
    import torch.serialization

    from dino_scale.engine.checkpoint import STATE_NAME, TrainState, load_training_checkpoint
    from dino_scale.engine.deepspeed_utils import ModelEMA

    saved = ModelEMA(torch.nn.Linear(3, 2), 0.9)
    with monkeypatch.context() as patch:  # tensors tagged as rank 0's GPU wrote them
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(saved.state_dict(), tmp_path / "ema.pt")
    atomic_write_text(tmp_path / STATE_NAME, json.dumps(TrainState(global_step=3).to_dict()))
    with torch.device("meta"):  # this rank's device: not the writer's
        model = torch.nn.Linear(3, 2)
    ema = ModelEMA(model, 0.5)
    state = load_training_checkpoint(tmp_path, _LoadedEngine(), rank=1, ema=ema)
    assert state.global_step == 3 and ema.decay == 0.9
    assert sorted(ema.shadow) == ["bias", "weight"]
    assert all(v.device.type == "meta" for v in ema.shadow.values())


def test_cuda_rng_state_restores_on_a_host_with_fewer_visible_gpus(tmp_path, monkeypatch):
    """A rank written where 2 GPUs were visible (2 workers on the node) resumes where 1 is (an
    elastic restart with fewer workers there). It restored every visible device's state by
    index, and torch's ``set_rng_state(state, 1)`` indexes ``default_generators[1]``:
    IndexError, the resume failed. Only the rank's own (current) device's state matters.
    CUDA is simulated: these hosts have no GPU."""
    import torch.cuda.random

    from dino_scale.engine.checkpoint import load_rng_state, save_rng_state

    states = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
    visible = {"count": 2, "current": 1}
    restored: dict[int, torch.Tensor] = {}

    def index_of(device) -> int:
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return visible["current"] if device.index is None else device.index

    def get_state(device="cuda"):
        return states[index_of(device)].clone()

    def set_state(state, device="cuda"):
        index = index_of(device)
        if index >= visible["count"]:
            raise IndexError("tuple index out of range")  # torch.cuda.default_generators[index]
        restored[index] = state

    for module in (torch.cuda, torch.cuda.random):
        monkeypatch.setattr(module, "get_rng_state", get_state)
        monkeypatch.setattr(module, "set_rng_state", set_state)
        monkeypatch.setattr(module, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: visible["current"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible["count"])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: visible["initialized"])

    # a CPU run on a GPU node (no CUDA context made): no CUDA state read or written, so no
    # context is opened on GPU 0 by every worker's first checkpoint
    visible["initialized"] = False
    save_rng_state(tmp_path, rank=0)
    assert "cuda_device" not in torch.load(tmp_path / "rng_rank0.pt", weights_only=True)
    visible["initialized"] = True
    save_rng_state(tmp_path, rank=0)  # the rank used cuda:1 of 2
    visible.update(count=1, current=0)  # now the only GPU its node shows it
    assert load_rng_state(tmp_path, rank=0)
    assert list(restored) == [0] and torch.equal(restored[0], states[1])


def test_checkpoint_folders_of_different_worker_counts_never_share_a_name():
    """Ray Train copies a checkpoint into its folder without emptying it: a folder a crashed
    attempt left half-written, written again by a restart on another worker count, mixed both
    attempts' ZeRO partitions. The epoch-end and final names did not depend on the count."""
    from dino_scale.engine.checkpoint import checkpoint_dir_name

    for args in ((8, 1, 0), (8, None, 0), (8, 1, 4)):
        step, epoch, micro = args
        names = {checkpoint_dir_name(step, world, epoch, micro) for world in (1, 2, 4, 8)}
        assert len(names) == 4, names
    assert checkpoint_dir_name(12, 2, 1, 0) == "ckpt_000000012_1_0_w2"
    assert checkpoint_dir_name(12, 2) == "final_000000012_w2"
    # sorted by name = sorted by step (Ray orders by report, users and scripts by name)
    assert sorted([checkpoint_dir_name(10, 2, 0, 5), checkpoint_dir_name(9, 4, 0, 9)])[0].startswith("ckpt_000000009")


def test_each_evaluation_gets_its_own_result_folder():
    """Evaluations under one run name each report a new folder name: with the fixed
    ``final_000000000`` the third evaluation of a run name lost its detections (Ray Train's
    retention deleted the folder the latest entry named while pruning the oldest; seen with three
    ``evaluate_weights`` calls of one run name, 2 checkpoints kept: ``final/`` had no
    ``detections.json`` and Ray's run folder no final)."""
    import re

    from dino_scale.engine.checkpoint import evaluation_dir_name

    names = {evaluation_dir_name() for _ in range(50)}
    assert len(names) == 50
    assert all(re.fullmatch(r"final_000000000_eval_\d{8}T\d{6}_[0-9a-f]{6}", n) for n in names), names


def test_a_resumed_runs_final_folder_never_takes_an_earlier_final_name():
    """A run resumed from its final checkpoint that takes no step (the same command again, or an
    abort replayed to the same step) reported ``final_<step>_w<n>`` a second time: Ray Train
    registered two entries for one folder and, pruning the older, deleted the folder of both (the
    third such run failed with "final checkpoint ... has no model.safetensors", the run's weights
    gone)."""
    from dino_scale.engine.checkpoint import checkpoint_dir_name

    names = [checkpoint_dir_name(4, 1, resumes=r) for r in range(3)]
    assert names == ["final_000000004_w1", "final_000000004_w1_r1", "final_000000004_w1_r2"]
    assert checkpoint_dir_name(4, 1, 0, 2, resumes=3) == "ckpt_000000004_0_2_w1"  # later steps: new names anyway


class _RunsCode:
    """A pickled object that runs code when unpickled (touches a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_load_weights_reads_a_pth_without_running_its_pickle(tmp_path):
    """load_weights read a .pth/.pt with weights_only=False (the Ray driver for fit/evaluate_weights
    init weights, registry.load_model_from_uri): an object pickled in the file ran while predict,
    reading the same file with weights_only, refused it. An official layout (with its
    argparse.Namespace 'args') still loads; a flat state dict too."""
    import argparse

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "extra": _RunsCode(marker)}, evil)
    with pytest.raises(ValueError, match=rf"{evil}: refused by weights_only"):
        load_weights(evil)
    assert not marker.exists()
    official = tmp_path / "checkpoint0011_4scale.pth"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 11, "args": argparse.Namespace(lr=1e-4)}, official)
    assert torch.equal(load_weights(official)["w"], torch.ones(2))
    flat = tmp_path / "flat.pt"
    torch.save({"w": torch.zeros(3)}, flat)
    assert torch.equal(load_weights(flat)["w"], torch.zeros(3))


class _SavingEngine(_LoadedEngine):
    """Stands for the DeepSpeed engine on both sides of a checkpoint (its own files untested here),
    around a module with a frozen weight and a buffer (written to frozen.safetensors, and back)."""

    def __init__(self):
        self.module = torch.nn.BatchNorm1d(2).requires_grad_(False)

    def save_checkpoint(self, *args, **kwargs):
        pass

    def zero_optimization_stage(self):
        return 0


@pytest.mark.parametrize("where", ["extra entry", "object array"])
def test_rng_state_holding_a_pickled_object_is_refused_naming_the_file(tmp_path, where):
    import random

    import numpy as np

    from dino_scale.engine.checkpoint import load_rng_state

    marker = tmp_path / "code-ran"
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if where == "extra entry":
        state["extra"] = _RunsCode(marker)
    else:  # an ndarray is allowed, its objects are not
        state["numpy"] = ("MT19937", np.array([_RunsCode(marker)], dtype=object), 0, 0, 0.0)
    path = tmp_path / "rng_rank0.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=rf"{path}: RNG state refused by weights_only loading.*remove it"):
        load_rng_state(tmp_path, rank=0)
    assert not marker.exists()
    torch.save({"python": random.getstate(), "torch": torch.get_rng_state()}, path)  # loads, but is not one
    with pytest.raises(ValueError, match=rf"{path}: not an RNG state file"):
        load_rng_state(tmp_path, rank=0)


def test_ema_round_trips_through_a_checkpoint_and_a_pickled_object_is_refused(tmp_path):
    """ema.pt was read with weights_only=False: an object pickled in a checkpoint folder on
    shared storage ran on every rank that resumed. The EMA state (decay, updates, shadow tensors)
    still resumes; a file holding anything else is refused naming it, the pickle never run."""
    from dino_scale.engine.checkpoint import TrainState, load_training_checkpoint, save_training_checkpoint
    from dino_scale.engine.deepspeed_utils import ModelEMA

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    saved = ModelEMA(model, 0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    saved.update(model)
    save_training_checkpoint(tmp_path, _SavingEngine(), TrainState(global_step=7), rank=0, ema=saved)
    ema = ModelEMA(torch.nn.Linear(3, 2), 0.5)
    assert load_training_checkpoint(tmp_path, _SavingEngine(), rank=0, ema=ema).global_step == 7
    assert (ema.decay, ema.updates) == (0.9, 1)
    assert all(torch.equal(ema.shadow[k], v) for k, v in saved.shadow.items())

    marker = tmp_path / "code-ran"
    torch.save({**saved.state_dict(), "extra": _RunsCode(marker)}, tmp_path / "ema.pt")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'ema.pt'}: EMA state refused by weights_only"):
        load_training_checkpoint(tmp_path, _SavingEngine(), rank=0, ema=ema)
    assert not marker.exists()
    torch.save({"shadow": [1, 2]}, tmp_path / "ema.pt")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'ema.pt'}: not an EMA state"):
        load_training_checkpoint(tmp_path, _SavingEngine(), rank=0, ema=ema)


def test_frozen_parameters_and_buffers_round_trip_through_a_checkpoint(tmp_path):
    """DeepSpeed's universal load skips the module state dict (test_engine_elastic runs it): a
    checkpoint holds the frozen parameters and buffers itself (frozen.safetensors, floating ones
    fp32, others in their dtype) and a resume puts them back into a module built from other values.
    A file that does not hold the model's frozen tensors is refused, naming it."""
    from safetensors.torch import save_file

    from dino_scale.engine.checkpoint import FROZEN_NAME, TrainState, load_training_checkpoint, save_training_checkpoint

    saving = _SavingEngine()
    saving.module.train()(torch.randn(8, 2) * 3 + 1)  # running statistics and num_batches_tracked move
    with torch.no_grad():
        saving.module.weight.copy_(torch.tensor([0.5, 2.0]))
    save_training_checkpoint(tmp_path, saving, TrainState(global_step=3), rank=0)
    loading = _SavingEngine()
    load_training_checkpoint(tmp_path, loading, rank=0)
    saved = saving.module.state_dict()
    assert saved["num_batches_tracked"].item() == 1
    assert all(torch.equal(v, saved[k]) for k, v in loading.module.state_dict().items())

    save_file({"weight": torch.ones(2), "other": torch.ones(2)}, str(tmp_path / FROZEN_NAME))
    with pytest.raises(RuntimeError, match=rf"{tmp_path / FROZEN_NAME} does not hold this model's frozen .* "
                                           rf"4 missing .* 1 unknown"):
        load_training_checkpoint(tmp_path, _SavingEngine(), rank=0)


def test_a_checkpoint_without_ema_restarts_the_ema_from_the_resumed_weights(tmp_path, caplog):
    """``train.ema_decay`` set on a run whose checkpoint holds no ``ema.pt`` (its run kept no EMA):
    the EMA averaged the weights as built (before the checkpoint loaded) and went on from there,
    without a word. It now starts over from the resumed weights, with a warning; a rank the
    checkpoint has no RNG file for is logged too."""
    import json
    import logging

    from dino_scale.engine.checkpoint import STATE_NAME, TrainState, load_training_checkpoint
    from dino_scale.engine.deepspeed_utils import ModelEMA

    model = torch.nn.Linear(3, 2)

    class _Resuming(_LoadedEngine):
        module = model

        def load_checkpoint(self, *args, **kwargs):
            with torch.no_grad():
                model.weight.fill_(7.0)
            return "loaded", {}

    atomic_write_text(tmp_path / STATE_NAME, json.dumps(TrainState(global_step=3).to_dict()))
    ema = ModelEMA(model, 0.9)
    ema.update(model)
    with caplog.at_level(logging.INFO, logger="dino_scale.engine.checkpoint"):
        load_training_checkpoint(tmp_path, _Resuming(), rank=1, ema=ema)
    assert torch.equal(ema.shadow["weight"], torch.full((2, 3), 7.0)) and ema.updates == 0
    assert "holds no ema.pt" in caplog.text and "no RNG state of rank 1" in caplog.text


def test_a_failed_atomic_write_names_the_file_asked_for(tmp_path):
    """A write into a missing folder said "No such file or directory: 'model.json.tmp-eeebc697'":
    the temporary file's name, which the user never chose and cannot find. It names the target."""
    import pytest

    from dino_scale.engine.checkpoint import atomic_write_text

    target = tmp_path / "nodir" / "model.json"
    with pytest.raises(FileNotFoundError) as err:
        atomic_write_text(target, "x")
    assert err.value.filename == str(target) and str(target) in str(err.value) and ".tmp-" not in str(err.value)
    assert not (tmp_path / "nodir").exists()


def test_an_atomic_write_takes_every_legal_file_name(tmp_path):
    """The temporary file was the target's name plus 13 bytes: a legal name of 243-255 bytes (predict's
    annotated copy of an image so named) failed with "File name too long", though its own write works."""
    from dino_scale.engine.checkpoint import atomic_write_bytes

    for name in ("x" * 251 + ".png", "é" * 120 + "x" * 11 + ".png"):  # 255 bytes, multi-byte characters
        assert len(name.encode()) == 255
        atomic_write_bytes(tmp_path / name, b"data")
        assert (tmp_path / name).read_bytes() == b"data"
    assert sorted(len(p.name.encode()) for p in tmp_path.iterdir()) == [255, 255]  # no temporary file left

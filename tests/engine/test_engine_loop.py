"""The Ray Train worker function (dino_scale.engine.loop), run in-process without Ray."""
from __future__ import annotations

import pytest
import torch

from dino_scale.config import preset, to_dict


def _official_layout(state: dict) -> dict:
    """``state`` as an official DINO .pth may hold it: a DDP ``module.`` prefix, the shared
    decoder heads stored under one name only (``bbox_embed.*``/``class_embed.*``), a FrozenBN
    ``num_batches_tracked``."""
    out = {f"module.{k}": v.clone() for k, v in state.items()
           if not k.startswith(("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed."))}
    out["module.backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(0)
    return out


def _run_worker(monkeypatch, state: dict, strict: bool = True, **overrides) -> torch.nn.Module:
    """``train_loop_per_worker`` of an evaluation-only run handed ``state``: the model it
    would evaluate."""
    import ray.train
    import ray.train.torch

    from dino_scale.engine import loop

    class Ctx:
        def get_world_rank(self):
            return 0

        def get_world_size(self):
            return 1

    monkeypatch.setattr(ray.train, "get_context", lambda: Ctx())
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    seen = {}
    monkeypatch.setattr(loop, "evaluate_only", lambda model, *a, **k: seen.setdefault("model", model))
    cfg = preset("tiny", overrides)
    loop.train_loop_per_worker({"config": to_dict(cfg), "train": False, "init_weights": "official.pth",
                                "init_state": state, "init_strict": strict})
    return seen["model"]


def test_worker_loads_an_official_layout_checkpoint_the_pipelines_accept(monkeypatch):
    """predict and the evaluate pre-check (load_official_state_dict) accept one copy of a shared
    head and ``module.`` prefixes; the worker loaded with a plain strict load_state_dict and
    failed on them in every worker, after the run had started."""
    from dino_scale.models import build_model
    from dino_scale.models.official import load_official_state_dict

    torch.manual_seed(123)
    source = build_model(preset("tiny").model)
    state = _official_layout(source.state_dict())
    load_official_state_dict(build_model(preset("tiny").model), state)  # what the pipelines check
    model = _run_worker(monkeypatch, state)
    got = model.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(got[key], value), key
    assert model.bbox_embed[0] is model.transformer.decoder.bbox_embed[0]


def test_worker_refuses_a_checkpoint_that_does_not_fit_naming_keys(monkeypatch):
    from dino_scale.models import build_model
    from dino_scale.models.official import CheckpointMismatch

    state = build_model(preset("tiny").model).state_dict()
    state.pop("input_proj.0.0.weight")
    with pytest.raises(CheckpointMismatch, match="input_proj.0.0.weight"):
        _run_worker(monkeypatch, state)
    _run_worker(monkeypatch, state, strict=False)  # init_strict=False still loads what is there


def test_worker_with_strict_init_weights_does_not_read_the_imagenet_backbone_file(monkeypatch, tmp_path):
    """Init weights loaded strictly replace every weight, yet each worker first loaded
    model.backbone_weights (a download per worker for a URL), and a path absent where the workers
    run (a config carried from another cluster) failed every worker with FileNotFoundError."""
    from dino_scale.models import build_model

    state = build_model(preset("tiny").model).state_dict()
    absent = {"model.backbone_weights": str(tmp_path / "other-cluster" / "resnet18.pth")}
    model = _run_worker(monkeypatch, state, **absent)
    assert torch.equal(model.state_dict()["input_proj.0.0.weight"], state["input_proj.0.0.weight"])
    with pytest.raises(FileNotFoundError, match="other-cluster"):  # not replaced: read as before
        _run_worker(monkeypatch, state, strict=False, **absent)


def test_worker_non_strict_init_normalizes_official_keys_and_refuses_a_near_miss(monkeypatch, caplog):
    """init_strict=False loaded the state with a plain load_state_dict: every key of an official
    .pth (``module.`` prefixed) was unexpected, nothing loaded, and the run trained from scratch
    after one warning line. The keys are now normalized as the strict path does; a state holding
    under half of the model's tensors is refused naming the counts; a few missing keys are
    tolerated, named in the warning."""
    import logging

    from dino_scale.models import build_model
    from dino_scale.models.official import CheckpointMismatch

    torch.manual_seed(321)
    source = build_model(preset("tiny").model).state_dict()
    model = _run_worker(monkeypatch, _official_layout(source), strict=False)
    got = model.state_dict()
    for key, value in source.items():
        assert torch.equal(got[key], value), key
    assert model.bbox_embed[0] is model.transformer.decoder.bbox_embed[0]

    partial = _official_layout(source)
    partial.pop("module.input_proj.0.0.weight")
    partial["module.extra_head.weight"] = torch.zeros(2)
    with caplog.at_level(logging.WARNING, logger="dino_scale"):
        got = _run_worker(monkeypatch, partial, strict=False).state_dict()
    assert torch.equal(got["input_proj.0.1.weight"], source["input_proj.0.1.weight"])
    assert not torch.equal(got["input_proj.0.0.weight"], source["input_proj.0.0.weight"])  # left as built
    assert "1 model tensors missing from them" in caplog.text and "extra_head.weight" in caplog.text

    renamed = {f"detector.{k}": v for k, v in source.items()}  # another key layout
    with pytest.raises(CheckpointMismatch, match=r"holds only 0 of the model's \d+ tensors.*detector\."):
        _run_worker(monkeypatch, renamed, strict=False)
    backbone_only = {k: v for k, v in source.items() if k.startswith("backbone.")}
    with pytest.raises(CheckpointMismatch, match=r"holds only \d+ of the model's \d+ tensors.*backbone_weights"):
        _run_worker(monkeypatch, backbone_only, strict=False)

"""engine.api on the driver: the weights a run starts from (init weights, the backbone's file) are
read and checked before Ray, MLflow or any worker starts."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_fixtures import RayStarted, small_cfg, unique  # noqa: E402

# Every test here is refused before Ray starts: where Ray would start, RayStarted is raised.
pytestmark = pytest.mark.usefixtures("ray_refused")


def test_init_weights_that_do_not_fit_are_refused_before_ray_or_mlflow(data, tmp_path, monkeypatch, ray_refused):
    """evaluate_weights (and fit with init_weights) read the file on the driver only to hand it
    to the workers: one that did not fit the config (here 3 decoder layers for a 2-layer model)
    failed in every worker, Ray and the MLflow run having started. It is now loaded as the
    workers load it (official layouts pass) before Ray starts."""
    import torch

    from dino_scale.engine import evaluate_weights
    from dino_scale.models import build_model
    from dino_scale.models.official import CheckpointMismatch


    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, val_dir = data
    state = build_model(small_cfg().model).state_dict()
    official = {f"module.{k}": v for k, v in state.items() if not k.startswith("transformer.decoder.bbox_embed.")}
    path = tmp_path / "checkpoint_tiny.pth"
    torch.save({"model": official, "epoch": 3}, path)
    with pytest.raises(CheckpointMismatch, match=rf"{path} does not fit the model of config 'tiny'.*missing keys"):
        evaluate_weights(small_cfg(**{"model.dec_layers": 3}), str(path), val_dir, tmp_path / "work", unique("e"))
    assert not (tmp_path / "work" / "mlflow.db").exists()
    with pytest.raises(RayStarted):  # the official layout fits the right config
        evaluate_weights(small_cfg(), str(path), val_dir, tmp_path / "work", unique("e"))


def test_a_backbone_weights_path_absent_here_is_refused_before_ray_or_mlflow(data, tmp_path, monkeypatch, ray_refused,
                                                                            caplog):
    """Every worker reads model.backbone_weights as it builds the model: a local path that is not
    a file failed each of them (FileNotFoundError, retried train.max_failures times) after Ray and
    the MLflow run had started. Refused on the driver where the workers run on its machine; on a
    cluster joined by address the file may exist on the workers only (a warning), and init weights
    loaded strictly replace it (not read: not checked)."""
    import logging

    import torch

    from dino_scale.config import ConfigError
    from dino_scale.engine import fit
    from dino_scale.engine.checkpoint import save_weights
    from dino_scale.models import build_model
    from dino_scale.models.weights_file import WeightsFileError


    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    train_dir, val_dir = data
    absent = tmp_path / "other-cluster" / "resnet18.pth"

    def run(path, **kwargs):
        cfg = small_cfg(**{"model.backbone_weights": str(path)})
        return fit(cfg, train_dir, val_dir, tmp_path / "work", unique("bb"), progress=False, **kwargs)

    absent_msg = rf"model.backbone_weights {absent} does not exist.*model.backbone_weights=none"
    with pytest.raises(ConfigError, match=absent_msg):
        run(absent)
    with pytest.raises(ConfigError, match=rf"model.backbone_weights {tmp_path} is a directory"):
        run(tmp_path)
    # a file cut short by a copy: named on the driver (exit 2 in the pipelines), not in every worker
    cut = tmp_path / "cut" / "resnet18.pth"
    cut.parent.mkdir()
    torch.save({"conv1.weight": torch.ones(64, 3, 7, 7)}, cut)
    cut.write_bytes(cut.read_bytes()[:20000])
    with pytest.raises(WeightsFileError, match=rf"{cut}: not a readable torch file"):
        run(cut)
    assert not (tmp_path / "work" / "mlflow.db").exists()
    init = save_weights(tmp_path / "init", build_model(small_cfg().model).state_dict())
    with pytest.raises(RayStarted):  # strict init weights replace every weight: the file is not read
        run(absent, init_weights=str(init))
    with pytest.raises(ConfigError, match="does not exist"):  # init_strict=False: still read
        run(absent, init_weights=str(init), init_strict=False)
    monkeypatch.setenv("RAY_ADDRESS", "ray-head:6379")
    with caplog.at_level(logging.WARNING, logger="dino_scale.engine"), pytest.raises(RayStarted):
        run(absent)
    assert f"model.backbone_weights {absent} does not exist on this machine" in caplog.text


def test_non_strict_init_weights_of_another_layout_are_refused_before_ray(data, tmp_path, monkeypatch, ray_refused):
    """init_strict=False had no pre-check: weights of another key layout loaded nothing in every
    worker, silently. They are checked on the driver as the workers load them (keys normalized,
    at least half of the model's tensors present), before Ray or the MLflow run start."""
    from dino_scale.engine import fit
    from dino_scale.engine.checkpoint import save_weights
    from dino_scale.models import build_model
    from dino_scale.models.official import CheckpointMismatch


    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train_dir, val_dir = data
    state = build_model(small_cfg().model).state_dict()
    renamed = save_weights(tmp_path / "renamed", {f"detector.{k}": v for k, v in state.items()})
    with pytest.raises(CheckpointMismatch, match=rf"{renamed} does not fit .*holds only 0 of the model's"):
        fit(small_cfg(), train_dir, val_dir, tmp_path / "work", unique("ns"), progress=False,
            init_weights=str(renamed), init_strict=False)
    assert not (tmp_path / "work" / "mlflow.db").exists()
    prefixed = save_weights(tmp_path / "prefixed", {f"module.{k}": v for k, v in state.items()})
    with pytest.raises(RayStarted):  # a DDP-saved file: normalized, every tensor found
        fit(small_cfg(), train_dir, val_dir, tmp_path / "work", unique("ns"), progress=False,
            init_weights=str(prefixed), init_strict=False)


def test_a_resumed_run_is_not_refused_for_a_backbone_file_it_does_not_read(data, tmp_path, monkeypatch, ray_refused):
    """A run resuming a checkpoint that restores every tensor (same worker count, ZeRO-2) builds
    its workers' model without model.backbone_weights: a path absent here no longer refuses it (was:
    ConfigError before Ray). A resume onto another worker count (universal load) from a checkpoint
    written before the frozen tensors were saved in it (they come from the build) still reads it,
    and is still refused; from one holding them ("frozen") it does not. check_restart stands in
    for a run name whose checkpoint N workers wrote (real reruns: test_engine_rerun)."""
    from dino_scale.config import ConfigError
    from dino_scale.engine import elastic, fit


    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    train_dir, val_dir = data
    absent = tmp_path / "moved" / "resnet18.pth"
    cfg = small_cfg(**{"model.backbone_weights": str(absent), "train.zero_stage": 2})
    for saved_world, frozen, outcome in ((2, False, RayStarted), (1, False, ConfigError), (1, True, RayStarted),
                                         (None, False, ConfigError)):
        resumes = None if saved_world is None else {"world": saved_world, "frozen": frozen}
        monkeypatch.setattr(elastic, "check_restart", lambda *a, _r=resumes, **k: _r)
        refused = re.escape(f"model.backbone_weights {absent} does not exist: every worker of this run reads it")
        with pytest.raises(outcome, match=refused if outcome is ConfigError else None):
            fit(cfg, train_dir, val_dir, tmp_path / "work", unique("resumed"), progress=False)

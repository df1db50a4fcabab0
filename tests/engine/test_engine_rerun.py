"""Reusing a run name (``fit`` / ``--run-name`` again): Ray Train restores the run's latest
checkpoint. A real local Ray, one CPU worker, the tiny DINO on synthetic shards."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_fixtures import RaySession, make_data, small_cfg, unique  # noqa: E402
from mlflow_store import seeded_store  # noqa: E402

from dino_scale.config import ConfigError  # noqa: E402

pytestmark = [pytest.mark.slow]


def _cfg(**overrides):
    return small_cfg(**{"train.num_workers": 1, "train.global_batch_size": 2, "train.zero_stage": 0,
                        "train.checkpoint_every_steps": 50, "train.max_steps": 2, **overrides})


def _other_train_set(base: Path) -> str:
    """16 other synthetic images (make_data's training set holds 16 too)."""
    from dino_scale.data import convert_coco
    from dino_scale.data.synthetic import generate

    root, ann = generate(base / "raw", "coco-like", 16, 7, image_size=((96, 128), (120, 160)), max_objects=3,
                         empty_fraction=0.0)
    convert_coco(ann, root, base / "train", embed_images=True, progress=False)
    return str(base / "train")


@pytest.mark.timeout(900)
def test_a_run_name_reused_resumes_continues_with_more_steps_and_refuses_changed_settings(tmp_path, monkeypatch,
                                                                                          caplog):
    """The same run three times: (1) 2 steps; (2) the same command: nothing to train, its final
    checkpoint reported again; (3) a changed lr, or (3b) other initial weights (``source.*`` tags), or
    (3c) another training set of the same size, is refused on the driver, before Ray Train starts;
    (4) --max-steps 4: it trains steps 3 and 4.

    Before: (2) reported the folder ``final_..2_w1`` a second time and Ray Train's retention,
    pruning the older of the two entries at the next report, deleted the folder of both: (4)
    failed with "final checkpoint ... has no model.safetensors" and the run's weights were gone.
    (4) also trained nothing (the finished run's flag stopped the loop) while printing step 2/4.
    (3) trained on with the first run's lr and logged the new one as the run's param. The MLflow
    runs of (2) and (4) were not linked to the run they continue (tag resumed_from_run_id).

    The run starts from an ImageNet backbone file, removed after (1): the resumed runs (ZeRO-0,
    same worker count: DeepSpeed restores every tensor) do not read it (was: ConfigError "does
    not exist" before Ray, and FileNotFoundError in every worker), and (4)'s frozen backbone
    tensors are still the file's."""
    import torch

    from dino_scale.engine import fit
    from dino_scale.engine.checkpoint import load_weights
    from dino_scale.models import build_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train_dir, _ = make_data(tmp_path / "data")
    seeded_store(tmp_path / "work")  # an empty store: no migrations inside the first run
    storage, name = tmp_path / "ray", unique("rerun")
    backbone = tmp_path / "imagenet" / "resnet18.pth"
    backbone.parent.mkdir()
    body = {k: v * 1.05 + 0.01 for k, v in build_model(_cfg().model).state_dict().items()
            if k.startswith("backbone.0.body.") and v.is_floating_point()}
    torch.save(body, backbone)
    frozen = [f"backbone.0.body.{k}" for k in ("conv1.weight", "layer1.0.conv1.weight", "bn1.running_mean",
                                                "layer4.1.bn2.running_var")]

    def _cfg_bb(**overrides):
        return _cfg(**{"model.backbone_weights": str(backbone), **overrides})

    def run(cfg, tags=None):
        return fit(cfg, train_dir, None, tmp_path / "work", name, storage_path=str(storage), evaluate=False,
                   progress=False, experiment="engine-test", tags=tags)

    def state(result) -> dict:
        return json.loads((Path(result.checkpoint_path) / "trainer_state.json").read_text())

    with RaySession(num_cpus=4):
        first = run(_cfg_bb())
        assert (first.metrics["step"], first.metrics["resumes"]) == (2, 0)
        assert all(torch.equal(load_weights(first.checkpoint_path)[k], body[k]) for k in frozen)  # it was read
        saved_frozen = load_weights(Path(first.checkpoint_path) / "frozen.safetensors")  # what a resume restores
        assert all(torch.equal(saved_frozen[k], body[k]) for k in frozen)
        assert not any(k.startswith("transformer.") for k in saved_frozen)  # trained: the optimizer's
        backbone.unlink()
        caplog.clear()
        again = run(_cfg_bb())
        # said on the driver (Ray's own line only advises deleting the run's folder)
        assert f"run {name!r} finished at step 2 of 2: nothing left to train" in caplog.text
        assert (again.metrics["step"], again.metrics["resumes"]) == (2, 1)
        assert Path(again.checkpoint_path).name != Path(first.checkpoint_path).name
        assert state(again)["steps_per_epoch"] == 8 and (Path(again.checkpoint_path) / "config.json").is_file()

        before = sorted(p.name for p in (storage / name).iterdir())
        with pytest.raises(ConfigError, match=r"trained with other settings: train\.lr 0\.0002 -> 0\.001\b"):
            run(_cfg_bb(**{"train.lr": 1e-3}))
        assert sorted(p.name for p in (storage / name).iterdir()) == before  # Ray Train never started
        # other initial weights (e.g. a moved @pretrained alias): refused before an MLflow run exists
        with pytest.raises(ConfigError, match=r"which started from no initial weights; this call starts from "
                                              r"models:/dino-o365/4"):
            run(_cfg_bb(), tags={"source.model_name": "dino-o365", "source.model_version": "4"})
        assert sorted(p.name for p in (storage / name).iterdir()) == before
        # (3c) another training set of the same size (same steps per epoch): refused as well
        other_train = _other_train_set(tmp_path / "other")
        with pytest.raises(ConfigError, match=r"trained with other settings: training data \(fingerprint"):
            fit(_cfg_bb(), other_train, None, tmp_path / "work", name, storage_path=str(storage), evaluate=False,
                progress=False, experiment="engine-test")
        assert sorted(p.name for p in (storage / name).iterdir()) == before

        caplog.clear()
        longer = run(_cfg_bb(**{"train.max_steps": 4}))
        assert f"run {name!r} resumes from its checkpoint at step 2 of 4 (epoch 0)" in caplog.text
        assert (longer.metrics["step"], longer.metrics["resumes"], longer.metrics["images_seen"]) == (4, 2, 8)
        assert (Path(longer.checkpoint_path) / "model.safetensors").is_file()
        assert state(longer)["global_step"] == 4 and state(longer)["finished"]
        assert all(torch.equal(load_weights(longer.checkpoint_path)[k], body[k]) for k in frozen)

    # each resumed run's MLflow run names the one it continues (the run that wrote its checkpoint)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(first.tracking_uri)
    assert state(longer)["mlflow_run_id"] == longer.run_id
    assert "resumed_from_run_id" not in client.get_run(first.run_id).data.tags
    assert client.get_run(again.run_id).data.tags["resumed_from_run_id"] == first.run_id
    assert client.get_run(longer.run_id).data.tags["resumed_from_run_id"] == again.run_id
    assert len(client.search_runs([client.get_run(first.run_id).info.experiment_id])) == 3  # none for (3), (3b)

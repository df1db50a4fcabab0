"""engine.api on the driver: what it checks before Ray, MLflow or any worker starts (the weights a
run starts from: test_engine_api_weights.py; Ctrl-C on a real Ray: test_engine_interrupt.py)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_fixtures import RayStarted, small_cfg, unique  # noqa: E402


# Every test here is refused before Ray starts: where Ray would start, RayStarted is raised.
pytestmark = pytest.mark.usefixtures("ray_refused")


@pytest.mark.parametrize("override,needle", [
    ({"train.schedule": "linear"}, "unknown schedule 'linear'"),
    ({"train.checkpoint_every_steps": 0}, "checkpoint_every_steps must be >= 1"),
    ({"train.checkpoints_to_keep": 0}, "checkpoints_to_keep must be >= 1, got 0"),  # was kept as 1
    # 0 never aborted: a run whose every loss was NaN took no step, finished and registered its start
    ({"train.max_bad_steps": 0}, r"train.max_bad_steps must be >= 1, got 0"),
    # 'step' dropped the lr at the first epoch listed only
    ({"train.lr_drop_epochs": [8, 10]}, r"schedule 'step' drops the lr once.*\[8, 10\].*'multistep'"),
    ({"train.ema_decay": 1.5}, "ema_decay must be in"),
    ({"train.precision": "fp8"}, "precision must be"),
    ({"train.global_batch_size": 64}, "fewer than one global batch"),
    ({"model.num_classes": 40}, r"category ids up to \d+: model.num_classes must be >= \d+ \(got 40\)"),
    # AdamW checks its default lr only: a negative backbone lr trained the backbone uphill
    ({"train.lr_backbone": -1e-5}, r"train.lr_backbone must be a finite number >= 0, got -1e-05"),
    # not frozen at 0: gradients, AdamW state and a share of the clip norm (official DINO refuses it)
    ({"train.lr_backbone": 0.0}, r"train.lr_backbone must be > 0, got 0.0: a backbone at lr 0 is not frozen"),
    ({"train.weight_decay": float("nan")}, "train.weight_decay must be a finite number >= 0"),
    ({"train.max_steps": 0}, r"train.max_steps must be >= 1 \(or none"),  # 0 trained every epoch
    # these finished 'successfully' having trained nothing (epochs 0, -1: no step, the initial weights
    # evaluated and copied as the result; lr 0: only the backbone trained) or without the warmup asked for
    ({"train.epochs": 0}, r"train.epochs must be >= 1, got 0"),
    ({"train.epochs": -1}, r"train.epochs must be >= 1, got -1"),
    ({"train.lr": 0.0}, r"train.lr must be > 0"),
    ({"train.warmup_steps": -100}, r"train.warmup_steps must be >= 0, got -100"),
    # these failed in every worker as it started ('set_num_threads expects a positive integer', the
    # compile regions' ValueError), Ray and the MLflow run having started
    ({"train.torch_threads": -1}, r"train.torch_threads must be >= 1 \(0 or none: torch's default\), got -1"),
    ({"train.cpus_per_worker": -1.0}, r"train.cpus_per_worker must be a finite number >= 0, got -1.0"),
    ({"train.compile": True, "train.compile_granularity": "block"},
     r"train.compile_granularity must be one of \['layer', 'stack'\], got 'block'"),
    ({"train.compile": True, "train.compile_mode": "fast"}, r"train.compile_mode must be one of .*got 'fast'"),
    # CUDA graphs record parameters at fixed addresses; ZeRO-3 gathers them anew every forward
    ({"train.compile": True, "train.compile_mode": "reduce-overhead", "train.zero_stage": 3},
     r"compile_mode=reduce-overhead \(CUDA graphs\) does not work with train.zero_stage=3"),
    ({"train.collective_timeout_s": 0}, r"train.collective_timeout_s must be >= 1, got 0"),
    ({"model.backbone_weights": "imagenet"}, r"no ImageNet weights for backbone 'tiny_resnet'"),
])
def test_config_errors_before_ray_or_mlflow(data, tmp_path, monkeypatch, override, needle):
    """Checked on the driver before Ray or an MLflow run starts: in the workers these came back
    as worker-group failures (retried max_failures times) and left the MLflow run RUNNING."""
    import ray

    from dino_scale.config import ConfigError
    from dino_scale.engine import fit

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train_dir, val_dir = data
    ray_before = ray.is_initialized()  # False when this module runs alone or first
    with pytest.raises(ConfigError, match=needle):
        fit(small_cfg(**override), train_dir, val_dir, tmp_path / "work", unique("bad"), progress=False)
    assert ray.is_initialized() == ray_before and not (tmp_path / "work" / "mlflow.db").exists()


def test_an_empty_validation_set_is_refused_before_ray_or_mlflow(data, tmp_path, monkeypatch):
    """A val set of no image (``prepare-data --o365-val-split 0``, or every image skipped) was
    accepted: the run trained to its end, then measured nothing."""
    import ray

    from dino_scale.config import ConfigError
    from dino_scale.engine import fit

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    empty = tmp_path / "empty_val"  # the val/ part of a split past the file's images: no shard, no image
    shutil.copytree(data[1], empty)
    manifest = json.loads((empty / "manifest.json").read_text())
    for shard in manifest["shards"]:
        (empty / shard["file"]).unlink()
    manifest.update(shards=[], num_images=0, num_boxes=0, num_crowd_boxes=0)
    (empty / "manifest.json").write_text(json.dumps(manifest))
    ray_before = ray.is_initialized()
    with pytest.raises(ConfigError, match=r"validation set .*empty_val holds no image"):
        fit(small_cfg(), data[0], str(empty), tmp_path / "work", unique("empty"), progress=False)
    assert ray.is_initialized() == ray_before and not (tmp_path / "work" / "mlflow.db").exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_missing_shard_is_refused_before_ray_or_mlflow(data, tmp_path, monkeypatch, split):
    """A dataset whose manifest lists a shard that is not there (a copy that did not finish) is
    named before Ray or an MLflow run starts. Before, Ray Data's planning on the driver failed
    after both had started: the one-line error was the bare path (a missing shard) or pyarrow's
    "Parquet magic bytes not found" without the file's name (a truncated one)."""
    import ray

    from dino_scale.data import ShardError
    from dino_scale.engine import evaluate_weights, fit

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dirs = dict(zip(("train", "val"), data))
    broken = tmp_path / split
    shutil.copytree(dirs[split], broken)
    shard = sorted(broken.glob("shard-*.parquet"))[0]
    shard.unlink()
    dirs[split] = str(broken)
    ray_before = ray.is_initialized()
    with pytest.raises(ShardError, match=rf"{shard.name} is missing"):
        fit(small_cfg(), dirs["train"], dirs["val"], tmp_path / "work", unique("shard"), progress=False)
    if split == "val":
        with pytest.raises(ShardError, match=rf"{shard.name} is missing"):
            evaluate_weights(small_cfg(), str(tmp_path / "weights.safetensors"), dirs["val"], tmp_path / "work",
                             unique("shard"))
    assert ray.is_initialized() == ray_before and not (tmp_path / "work" / "mlflow.db").exists()


@pytest.mark.parametrize("damage", ["footer overwritten", "column renamed"])
def test_a_train_shard_damaged_at_its_size_is_refused_before_ray_or_mlflow(data, tmp_path, monkeypatch, ray_refused,
                                                                         damage):
    """A training shard damaged in place (same size, so its manifest agrees) is named before Ray or
    an MLflow run starts (its footer read by data.preflight). Before, the check passed it: an
    overwritten footer failed Ray Data's planning after both had started, with pyarrow's
    "Couldn't deserialize thrift" and no file name; a column renamed in the footer trained on,
    every record of that shard dropped as ``damaged`` in each epoch. Ray's start is a recorder."""
    from dino_scale.data import ShardError
    from dino_scale.engine import fit


    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train_dir, val_dir = data
    broken = tmp_path / "train"
    shutil.copytree(train_dir, broken)
    shard = sorted(broken.glob("shard-*.parquet"))[0]
    whole = shard.read_bytes()
    if damage == "footer overwritten":
        shard.write_bytes(whole[:-204] + bytes(200) + whole[-4:])
        needle = rf"{shard.name} has a footer Parquet cannot read \(OSError: Couldn't deserialize thrift"
    else:
        shard.write_bytes(whole.replace(b"category_ids", b"category_idz"))
        needle = rf"{shard.name} does not hold the record columns \(category_ids is missing"
    with pytest.raises(ShardError, match=needle):
        fit(small_cfg(), str(broken), val_dir, tmp_path / "work", unique("footer"), progress=False)
    assert not (tmp_path / "work" / "mlflow.db").exists()


def test_val_labels_changed_after_conversion_are_refused_before_ray_or_mlflow(data, tmp_path, monkeypatch):
    """A val record whose labels no longer match the checksum written at conversion (a shard
    changed in place, same size) is refused where the ground truth is read, now before Ray and
    the MLflow run: scoring against changed boxes, or without that image, is not the set's AP."""
    import ray

    from dino_scale.data import ShardError, iter_records, shard_paths
    from dino_scale.engine import evaluate_weights, fit

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train_dir, val_dir = data
    broken = tmp_path / "val"
    shutil.copytree(val_dir, broken)
    for rec in (r for r in iter_records(broken) if len(r["boxes"])):  # a box whose 16 bytes occur once
        old = rec["boxes"][0].astype("<f4").tobytes()
        hits = [p for p in shard_paths(broken) if p.read_bytes().count(old) == 1]
        if hits:
            break
    hits[0].write_bytes(hits[0].read_bytes().replace(old, (rec["boxes"][0] + 1).astype("<f4").tobytes()))
    needle = rf"{hits[0].name} row \d+ \(image id {rec['image_id']}\): its labels do not match the checksum"
    ray_before = ray.is_initialized()
    with pytest.raises(ShardError, match=needle):
        fit(small_cfg(), train_dir, str(broken), tmp_path / "work", unique("crc"), progress=False)
    with pytest.raises(ShardError, match=needle):
        evaluate_weights(small_cfg(), str(tmp_path / "weights.safetensors"), str(broken), tmp_path / "work",
                         unique("crc"))
    assert ray.is_initialized() == ray_before and not (tmp_path / "work" / "mlflow.db").exists()


def test_a_reused_run_name_is_checked_before_ray_for_training_only(data, tmp_path, monkeypatch):
    """A training run checks, on the driver and before Ray starts, whether its run name resumes a
    checkpoint it cannot load or trained with other settings (engine.elastic.check_restart;
    exercised for real on a ZeRO-3 run in test_engine_ray_zero3, on changed settings in
    test_engine_rerun); an eval-only run resumes nothing and skips it. The check and Ray's
    start are replaced by recorders here: this is about the order, which a refactor once broke."""
    from dino_scale.engine import api, elastic, evaluate_weights, fit

    calls: list = []

    def no_ray(*args, **kwargs):
        calls.append("ray")
        raise RayStarted

    monkeypatch.setattr(elastic, "check_restart",
                        lambda *args, **kwargs: calls.append(("check_restart",) + args + tuple(sorted(kwargs))))
    monkeypatch.setattr(api, "ensure_ray", no_ray)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train_dir, val_dir = data
    cfg = small_cfg(**{"train.zero_stage": 3})
    name = unique("reuse")
    with pytest.raises(RayStarted):
        fit(cfg, train_dir, val_dir, tmp_path / "work", name, storage_path=str(tmp_path / "ray"), progress=False)
    assert calls == [("check_restart", str(tmp_path / "ray"), name, cfg.train.num_workers, 3, "config",
                      "steps_per_epoch", "train_data"), "ray"]
    calls.clear()
    from dino_scale.engine.checkpoint import save_weights
    from dino_scale.models import build_model

    weights = save_weights(tmp_path / "weights", build_model(cfg.model).state_dict())  # read before Ray
    with pytest.raises(RayStarted):
        evaluate_weights(cfg, str(weights), val_dir, tmp_path / "work", name)
    assert calls == ["ray"]


def test_a_run_that_cannot_be_created_fails_before_training(data, tmp_path, monkeypatch):
    """A tracking server that does not answer when the run is created: fit() raises (after
    retrying for tracking_close_timeout_s) before any dataset or worker. It used to train with
    run_id None: rank 0 got no logger and every training and eval metric of the run was lost,
    the run being created only at the driver's last flush. Ray's start is a recorder here (the
    order matters, not Ray); the MLflow side is real: nothing listens on the port."""
    import socket

    import dino_scale.data
    from dino_scale.engine import api, fit
    from dino_scale.tracking import TrackingUnavailable

    class Training(Exception):
        pass

    def no_dataset(*args):
        calls.append("dataset")
        raise Training

    calls: list = []
    monkeypatch.setattr(api, "ensure_ray", lambda *args: calls.append("ray"))
    monkeypatch.setattr(dino_scale.data, "build_train_dataset", no_dataset)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    train_dir, val_dir = data
    with pytest.raises(TrackingUnavailable, match=rf"could not be created at http://127.0.0.1:{port} within 2 s"):
        fit(small_cfg(), train_dir, val_dir, tmp_path / "work", unique("down"), progress=False,
            storage_path=str(tmp_path / "ray"), tracking_close_timeout_s=2)
    assert calls == ["ray"]


def test_a_new_run_with_no_weights_at_all_notes_the_random_backbone(caplog):
    """The presets leave model.backbone_weights unset: a Swin-L or R50 run started through the
    API trained its backbone from random weights without a word (only the pipelines said so),
    where the official recipe starts from ImageNet weights. ``fit`` says it itself."""
    import logging

    from dino_scale.config import preset
    from dino_scale.engine.run_checks import backbone_start_note, check_backbone_weights

    note = backbone_start_note(preset("swinl_4scale"))
    assert note and "model.backbone_weights=imagenet" in note and "swin_large_patch4_window12_384_22k.pth" in note
    assert "resnet50-0676ba61.pth" in backbone_start_note(preset("r50_4scale"))
    assert backbone_start_note(preset("r50_4scale", ["model.backbone_weights=https://x/r50.pth"])) is None
    assert backbone_start_note(preset("tiny")) is None  # no published weights for it
    caplog.set_level(logging.WARNING, logger="dino_scale.engine")
    for init, resumed, said in ((None, None, True), ("/w/dino.safetensors", None, False), (None, 2, False)):
        caplog.clear()
        check_backbone_weights(preset("r50_4scale"), init, True, None, resumed_world=resumed)
        assert ("starts from random weights" in caplog.text) is said, (init, resumed)


@pytest.mark.parametrize("storage,expected", [(None, "WORK/ray-evaluations"),
                                              ("s3://bucket/dino/", "s3://bucket/dino/evaluations"),
                                              ("/mnt/runs", "/mnt/runs/evaluations")])
def test_an_evaluation_never_runs_in_the_training_runs_storage(tmp_path, monkeypatch, storage, expected):
    """A trained model's config carries its run's train.storage_path: an evaluation given the training
    run's name ran in that run's Ray folder, where Ray Train took its result for the run's newest
    checkpoint and deleted the run's older ones (checkpoints_to_keep). Without a storage path too:
    both defaulted to ``<work_dir>/ray``."""
    expected = expected.replace("WORK", str(tmp_path / "work"))
    from dino_scale.config import preset
    from dino_scale.engine import api

    seen = {}
    monkeypatch.setattr(api, "_run", lambda cfg, **kw: seen.update(kw) or "result")
    cfg = preset("tiny", {"train.storage_path": storage})
    (tmp_path / "val").mkdir()
    assert api.evaluate_weights(cfg, str(tmp_path / "w"), str(tmp_path / "val"), tmp_path / "work", "run1") == "result"
    assert seen["storage_path"] == expected and seen["train"] is False


def test_the_resume_note_says_what_a_rerun_will_train():
    from dino_scale.config import preset
    from dino_scale.engine.run_checks import resume_note

    cfg = preset("tiny", {"train.epochs": 3, "train.max_steps": 20})
    assert resume_note("r", {"global_step": 5, "epoch": 0}, cfg, 8) == \
        "run 'r' resumes from its checkpoint at step 5 of 20 (epoch 0)"
    assert "finished at step 20 of 20: nothing left to train" in resume_note("r", {"global_step": 20, "epoch": 2},
                                                                             cfg, 8)
    # the epochs ran out first (decode-time skips shortened them): the loop trains nothing either
    cfg = preset("tiny", {"train.epochs": 3})
    assert "finished at step 22 of 24: nothing left" in resume_note("r", {"global_step": 22, "epoch": 3}, cfg, 8)
    assert resume_note("r", {}, cfg, 8) == "run 'r' resumes from its latest checkpoint"  # no trainer state


def test_the_cuda_kernel_on_cpu_workers_is_refused_before_ray(data, tmp_path, monkeypatch, ray_refused):
    """``model.msda_backend=cuda`` with CPU workers passed every check, then each worker's first
    forward failed ("needs CUDA tensors"), retried ``train.max_failures`` times."""
    from dino_scale.config import ConfigError
    from dino_scale.engine import evaluate_weights, fit
    from dino_scale.engine.checkpoint import save_weights
    from dino_scale.models import build_model


    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train_dir, val_dir = data
    cfg = small_cfg(**{"model.msda_backend": "cuda", "train.use_gpu": False})
    with pytest.raises(ConfigError, match="model.msda_backend=cuda needs GPU workers"):
        fit(cfg, train_dir, val_dir, tmp_path / "work", unique("cuda-on-cpu"), progress=False)
    weights = save_weights(tmp_path / "w", build_model(small_cfg().model).state_dict())
    with pytest.raises(ConfigError, match="model.msda_backend=cuda needs GPU workers"):
        evaluate_weights(cfg, str(weights), val_dir, tmp_path / "work", unique("cuda-on-cpu-eval"))
    with pytest.raises(RayStarted):  # the default backend on CPU workers goes on
        fit(small_cfg(), train_dir, val_dir, tmp_path / "work", unique("cpu"), progress=False)


def test_fp16_on_cpu_workers_without_cpu_fp16_is_refused_before_ray(data, tmp_path, monkeypatch, ray_refused,
                                                                     caplog):
    """``train.precision=fp16`` with CPU workers on a CPU without oneDNN fp16 (this box's) passed every
    check, then each worker's ``deepspeed.initialize`` raised "Type fp16 is not supported on your
    device", retried ``train.max_failures`` times. A CPU with fp16 goes on; on a joined cluster,
    whose nodes' CPUs may differ, it is a warning."""
    from dino_scale.config import ConfigError
    from dino_scale.engine import fit, run_checks

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    train_dir, _ = data
    cfg = small_cfg(**{"train.precision": "fp16", "train.use_gpu": False})
    monkeypatch.setattr(run_checks, "_cpu_runs_fp16", lambda: False)
    with pytest.raises(ConfigError, match=r"train\.precision=fp16 with CPU workers: .* train in bf16 or fp32"):
        fit(cfg, train_dir, None, tmp_path / "work", unique("fp16-cpu"), progress=False)
    with pytest.raises(RayStarted):  # bf16 on CPU workers goes on
        fit(small_cfg(**{"train.precision": "bf16"}), train_dir, None, tmp_path / "work", unique("bf16-cpu"),
            progress=False)
    with pytest.raises(RayStarted), caplog.at_level("WARNING"):  # a cluster's nodes may have fp16 CPUs
        fit(cfg, train_dir, None, tmp_path / "work", unique("fp16-cluster"), progress=False,
            ray_address="ray://10.0.0.1:10001")
    assert "train.precision=fp16 with CPU workers: this machine's CPU has no fp16 support" in caplog.text
    monkeypatch.setattr(run_checks, "_cpu_runs_fp16", lambda: True)  # e.g. a Sapphire Rapids CPU
    with pytest.raises(RayStarted):
        fit(cfg, train_dir, None, tmp_path / "work", unique("fp16-cpu-ok"), progress=False)

"""Bad use of the pipelines: one `error: ...` line, non-zero exit, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow_store import seeded_store

ROOT = Path(__file__).resolve().parents[2]
_NEEDS_NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="refuses GPU workers on a machine without")


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", *args, "--work-dir", str(tmp_path / "w")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err_lines) == 1, proc.stderr[-2000:]
    assert err_lines[0].startswith("error: "), err_lines
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in err_lines[0], err_lines[0]


@pytest.mark.parametrize("args,needles", [
    (["pipelines.pretrain_o365", "--preset", "tinny"], ["unknown preset 'tinny'", "tiny"]),
    (["pipelines.finetune_coco", "--preset", "r50_4scal"], ["unknown preset"]),
    (["pipelines.pretrain_o365", "--set", "model.hidden_dims=64"], ["unknown config key 'model.hidden_dims'"]),
    (["pipelines.finetune_coco", "--set", "train.lr"], ["section.key=value"]),
    (["pipelines.pretrain_o365", "--set", "train.max_steps=two"], ["bad value"]),
    (["pipelines.pretrain_o365", "--data", "/nonexistent/o365"], ["dataset path not found: /nonexistent/o365"]),
    (["pipelines.evaluate", "--model", "/nonexistent/model.pth"], ["model not found: /nonexistent/model.pth"]),
])
def test_pipelines_bad_use_fails_fast(args, needles, tmp_path):
    _assert_one_line_error(_run(args, tmp_path), *needles)


def test_pipelines_bad_use_unknown_registry_name(tmp_path):
    from mlflow import MlflowClient

    MlflowClient(seeded_store(tmp_path / "w")).search_experiments()  # an existing, empty store
    proc = _run(["pipelines.finetune_coco", "--preset", "tiny", "--init", "models:/no-such-model@pretrained"],
                tmp_path)
    _assert_one_line_error(proc, "models:/no-such-model@pretrained", "not found")


def test_pipelines_bad_use_data_not_a_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = _run(["pipelines.finetune_coco", "--init", "none", "--data", str(tmp_path / "empty")], tmp_path)
    _assert_one_line_error(proc, "not a dataset folder")
    ann = tmp_path / "ann.json"
    ann.write_text("{}")
    proc = _run(["pipelines.pretrain_o365", "--data", str(ann)], tmp_path)
    _assert_one_line_error(proc, "--images")


@pytest.mark.parametrize("args,needles", [
    # refused by the MLflow registry at registration, i.e. after the whole training: now up front
    (["pipelines.pretrain_o365", "--alias", "latest"], ["--alias 'latest'", "reserved"]),
    (["pipelines.pretrain_o365", "--alias", "v2"], ["--alias 'v2'"]),
    (["pipelines.finetune_coco", "--init", "none", "--model-name", "team/dino"], ["--model-name", "'/'"]),
    (["pipelines.pretrain_o365", "--max-steps", "0"], ["--max-steps must be >= 1"]),
    # was: refused at the run's creation, after the data checks and Ray's start, with a hint to
    # restore a deleted experiment
    (["pipelines.pretrain_o365", "--experiment", ""], ["--experiment ''", "give an MLflow experiment name"]),
    # was: a negative count generated an empty synthetic set and started Ray before the engine
    # refused it; 0 silently trained on the default-sized set
    (["pipelines.pretrain_o365", "--synthetic-images", "-3"], ["--synthetic-images must be >= 1"]),
    (["pipelines.finetune_coco", "--init", "none", "--synthetic-images", "0", "--max-steps", "1"],
     ["--synthetic-images must be >= 1"]),
    # was: the set was generated and Ray started before the engine refused it
    (["pipelines.pretrain_o365", "--preset", "tiny", "--synthetic-images", "3"],
     ["--synthetic-images 3", "global batch (4)"]),
    (["pipelines.pretrain_o365", "--workers", "2", "--min-workers", "1", "--zero-stage", "3",
      "--set", "train.global_batch_size=8"], ["elastic", "zero_stage <= 2"]),
    (["pipelines.finetune_coco", "--init", "none", "--workers", "3"], ["not a multiple"]),
    # was: Ray started, then "error: ValueError: cannot convert float NaN to integer", exit 1
    (["pipelines.finetune_coco", "--init", "none", "--scale", "nan"], ["--scale must be"]),
    (["pipelines.demo", "--finetune-steps", "0"], ["--finetune-steps must be >= 1"]),
    # was: Ray started and the data was made before pretraining refused the set
    (["pipelines.demo", "--pretrain-images", "3"], ["--pretrain-images 3", "global batch (4)"]),
    (["pipelines.demo", "--set", "model.nope=1"], ["unknown config key 'model.nope'"]),
    # was: refused by the pretraining stage, after the demo had started Ray
    (["pipelines.demo", "--set", "model.activation=silu"], ["model.activation 'silu'"]),
    # was: the second value silently won; '=1' read "unknown config key ''"
    (["pipelines.pretrain_o365", "--set", "train.lr=1e-4", "--set", "train.lr=2e-4"],
     ["--set train.lr given twice ('1e-4' and '2e-4')"]),
    (["pipelines.finetune_coco", "--set", "=1"], ["override '=1' names no key"]),
    # was "cannot resolve models:/dino-tiny-o365@pretrained: no MLflow store": the flag mistake unsaid
    (["pipelines.finetune_coco", "--val-data", "/data/coco/val"], ["--val-data needs --data"]),
    # the run name names folders a run writes and (evaluate's download) deletes: '..' was the work dir
    (["pipelines.evaluate", "--model", "models:/dino-tiny-coco@champion", "--run-name", ".."], ["--run-name '..'"]),
    (["pipelines.pretrain_o365", "--run-name", "team/run1"], ["--run-name 'team/run1'", "single folder name"]),
    # was: a ~110-line traceback from inside Ray Train (its metrics tags are ASCII), exit 1, a FAILED run
    (["pipelines.pretrain_o365", "--run-name", "rün 1"], ["--run-name 'rün 1'", "printable ASCII"]),
    # was: the synthetic set was made and Ray started before the GPU workers were refused
    pytest.param(["pipelines.pretrain_o365", "--gpus", "1"], ["--gpus 1", "0 GPU(s)"], marks=_NEEDS_NO_GPU),
    pytest.param(["pipelines.evaluate", "--model", "models:/dino-tiny-coco@champion", "--gpus", "1"],
                 ["--gpus 1", "0 GPU(s)"], marks=_NEEDS_NO_GPU),
])
def test_pipelines_bad_use_caught_before_any_work(args, needles, tmp_path):
    proc = _run(args, tmp_path)
    _assert_one_line_error(proc, *needles)
    assert not (tmp_path / "w" / "data").exists()  # no data generated, no training started
    assert "Ray:" not in proc.stdout


def test_pipelines_bad_use_mistyped_work_dir_is_no_store(tmp_path):
    """A lookup in a store that does not exist names it (MLflow would create an empty one)."""
    # _run appends --work-dir after the action (was refused there: "unrecognized arguments")
    proc = _run(["pipelines.registry", "list"], tmp_path)
    _assert_one_line_error(proc, "no MLflow store at", str(tmp_path / "w" / "mlflow.db"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "pipelines.registry", "--work-dir", str(tmp_path / "typo"), "list"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    _assert_one_line_error(proc, "no MLflow store at", str(tmp_path / "typo" / "mlflow.db"))
    proc = _run(["pipelines.predict", "--model", "models:/dino-tiny-coco@champion", str(tmp_path)],
                tmp_path)  # the model is looked up before the image folders are walked
    _assert_one_line_error(proc, "cannot resolve models:/dino-tiny-coco@champion: no MLflow store at")
    assert not (tmp_path / "typo").exists() and not (tmp_path / "w").exists()  # lookups create no folder
    proc = _run(["pipelines.evaluate", "--model", "models:/dino-tiny-coco@champion"], tmp_path)
    _assert_one_line_error(proc, "cannot resolve models:/dino-tiny-coco@champion: no MLflow store at")
    proc = _run(["pipelines.evaluate", "--model", str(tmp_path / "nope.pth")], tmp_path)
    _assert_one_line_error(proc, f"model not found: {tmp_path / 'nope.pth'}")
    assert not (tmp_path / "w").exists()  # evaluate made the work folder (an empty ./runs) before its checks


def test_pipelines_bad_use_evaluate_checks_data_before_reading_the_model(tmp_path):
    # was: the model was resolved (a registry model downloaded) and its weights read first, and
    # an empty model folder was reported instead of the mistyped --data
    (tmp_path / "model").mkdir()
    proc = _run(["pipelines.evaluate", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "nope")],
                tmp_path)
    _assert_one_line_error(proc, f"dataset path not found: {tmp_path / 'nope'}")


def test_pipelines_bad_use_unreachable_tracking_server_fails_fast(tmp_path):
    """A tracking server that does not answer: exit 1 within seconds, naming it (MLflow's own
    retries took 4 minutes, then the error claimed the model was not registered)."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.evaluate", "--model", "models:/dino-tiny-coco@champion",
                           "--work-dir", str(tmp_path / "w")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"MLflow tracking server http://127.0.0.1:{port} unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr
    # a training stage too: before its data is generated or read, and before Ray (was: after both)
    proc = subprocess.run([sys.executable, "-m", "pipelines.pretrain_o365", "--preset", "tiny", "--synthetic-images",
                           "4", "--work-dir", str(tmp_path / "w")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"MLflow tracking server http://127.0.0.1:{port} unreachable" in proc.stderr
    assert "Ray:" not in proc.stdout and not list((tmp_path / "w").rglob("*.parquet"))


def test_pipelines_bad_use_class_head_smaller_than_the_data(tmp_path):
    """A class head that cannot hold the data's category ids is refused before Ray starts
    (was: an index error in the loss at the first training step, on the workers)."""
    proc = _run(["pipelines.pretrain_o365", "--preset", "tiny", "--synthetic-images", "4",
                 "--set", "model.num_classes=5"], tmp_path)
    _assert_one_line_error(proc, "has category ids up to", "model.num_classes must be >= ")
    assert "Ray:" not in proc.stdout



def test_pipelines_bad_use_incomplete_dataset_copy(tmp_path):
    """A dataset folder whose shards a copy left out or cut short is named before Ray starts
    (was: Ray's bare path, or pyarrow's "Parquet magic bytes not found" naming no file, after
    Ray and an MLflow run had started)."""
    CHECKED = "checked against manifest.json and their Parquet footers before the run"
    from dino_scale.data import convert_coco
    from dino_scale.data.synthetic import generate

    root, ann = generate(tmp_path / "raw", "coco-like", 4, 0, image_size=((64, 96), (64, 96)))
    data = {}
    for split in ("train", "val"):
        manifest = convert_coco(ann, root, tmp_path / split, embed_images=True, max_images_per_shard=2,
                                progress=False)
        data[split] = (tmp_path / split, manifest["shards"][1]["file"])
    train_dir, cut = data["train"]
    (train_dir / cut).write_bytes((train_dir / cut).read_bytes()[:100])
    proc = _run(["pipelines.pretrain_o365", "--preset", "tiny", "--data", str(train_dir)], tmp_path)
    _assert_one_line_error(proc, f"{train_dir}: 1 of 2 shards are damaged ({CHECKED}): {cut} has 100 bytes")
    val_dir, gone = data["val"]
    (val_dir / gone).unlink()
    proc = _run(["pipelines.finetune_coco", "--init", "none", "--preset", "tiny", "--data", str(train_dir),
                 "--val-data", str(val_dir)], tmp_path)
    _assert_one_line_error(proc, f"{train_dir}: 1 of 2")  # the training set's first
    (train_dir / cut).unlink()
    convert_coco(ann, root, train_dir, embed_images=True, max_images_per_shard=2, progress=False)  # whole again
    proc = _run(["pipelines.finetune_coco", "--init", "none", "--preset", "tiny", "--data", str(train_dir),
                 "--val-data", str(val_dir)], tmp_path)
    _assert_one_line_error(proc, f"{val_dir}: 1 of 2 shards are damaged ({CHECKED}): {gone} is missing")
    assert "Ray:" not in proc.stdout and not (tmp_path / "w" / "mlflow.db").exists()
    manifest = val_dir / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    proc = _run(["pipelines.pretrain_o365", "--preset", "tiny", "--data", str(train_dir), "--val-data",
                 str(val_dir)], tmp_path)
    _assert_one_line_error(proc, f"{manifest}: not valid JSON")


def test_pipelines_bad_use_evaluate_on_another_label_space(tmp_path):
    """The model's class index i is scored as category id i: data with ids the class head has no
    index for is refused before Ray starts, and data whose ids name other categories than the
    model's is warned about (both were scored silently, an AP of another label space)."""
    from dino_scale.config import preset, to_dict
    from dino_scale.data.synthetic import categories, generate
    from dino_scale.engine.checkpoint import save_weights
    from dino_scale.models import build_dino
    from pipelines._common import UsageError
    from pipelines.evaluate import label_space_check

    cfg = preset("tiny", ["model.num_classes=20", "model.dn_labelbook_size=20"])
    save_weights(tmp_path / "model", build_dino(cfg.model)[0].state_dict(), to_dict(cfg))
    images, ann = generate(tmp_path / "o365", flavour="o365-like", num_images=2, seed=0)  # ids up to 36
    proc = _run(["pipelines.evaluate", "--model", str(tmp_path / "model"), "--data", str(ann),
                 "--images", str(images), "--gpus", "0"], tmp_path)
    _assert_one_line_error(proc, "has category ids up to 36, but the model's class head has 20 classes")
    assert "Ray:" not in proc.stdout
    o365, coco = categories("o365-like"), categories("coco-like")
    assert label_space_check(o365, 366, o365, "val") is None
    assert label_space_check(None, 91, coco, "val") is None  # no categories known (an official .pth)
    assert label_space_check([{**c, "name": c["name"].upper()} for c in coco], 91, coco, "val") is None
    warning = label_space_check(o365, 366, coco, "coco/val")
    assert warning.startswith("warning: 9 of 10 categories of coco/val are not the model's classes of the same id "
                              "(id 2 is 'bicycle' here, 'car' in the model)"), warning
    assert "absent in the model" in label_space_check(o365[:1], 366, coco, "val")
    with pytest.raises(UsageError, match="up to 90, but the model's class head has 37 classes"):
        label_space_check(o365, 37, coco, "val")


def test_pipelines_bad_use_paths_that_are_files_or_empty(tmp_path):
    """A ``--work-dir`` that is a file (or under one) or that holds ',' (where the data is
    converted), an empty ``prepare-data`` path (``--out ""`` converted into the current folder,
    exit 0), ``check-data`` on an empty or missing path or
    with ``--json`` a folder (found only after reading every shard), ``synth`` into a file or
    into a dataset it did not make (it wrote its images there first): one line, exit 2, nothing
    made."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    afile = tmp_path / "afile"
    afile.write_text("not a folder")

    def run(*args):
        return subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=240)

    for work in (afile, afile / "sub"):
        _assert_one_line_error(run("pipelines.pretrain_o365", "--preset", "tiny", "--gpus", "0", "--work-dir",
                                   str(work)), f"--work-dir {work}: {afile} is a file, not a folder")
    ann = tmp_path / "ann.json"
    ann.write_text("{}")
    comma = tmp_path / "w,d"  # the converted or generated data under it was read as two folders, after the work
    for data in (["--data", str(ann), "--images", str(tmp_path)], []):
        _assert_one_line_error(run("pipelines.pretrain_o365", "--preset", "tiny", "--gpus", "0", *data,
                                   "--work-dir", str(comma)), f"--work-dir {comma}: a folder whose path holds ','")
    for flag in ("--out", "--images"):
        args = {"--annotations": str(ann), "--images": str(tmp_path), "--out": str(tmp_path / "ds"), flag: ""}
        _assert_one_line_error(run("pipelines.prepare_data", *[x for kv in args.items() for x in kv]),
                               f"{flag} is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ann.json"]  # nothing converted into "."
    _assert_one_line_error(run("pipelines.check_data", ""), "dataset folder argument is empty")
    _assert_one_line_error(run("pipelines.check_data", str(tmp_path / "nope")),
                           f"dataset folder not found: {tmp_path / 'nope'}")
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "manifest.json").write_text("{}")
    _assert_one_line_error(run("pipelines.check_data", str(ds), "--json", str(tmp_path)), "is a folder")
    _assert_one_line_error(run("dino_scale.cli", "synth", str(afile)), f"{afile} is a file, not a folder")
    _assert_one_line_error(run("dino_scale.cli", "synth", str(ds), "-n", "2"),
                           "holds a dataset that synth did not make")
    assert sorted(p.name for p in ds.iterdir()) == ["manifest.json"]


def test_pipelines_bad_use_annotation_file_that_cannot_be_converted(tmp_path):
    """A training pipeline given an annotation JSON it cannot convert (cut short, no categories)
    says so as prepare-data does: one line, exit 2 (was exit 1 with the exception's class name)."""
    images = tmp_path / "imgs"
    images.mkdir()
    cut = tmp_path / "cut.json"
    cut.write_text('{"categories": [{"id": 1, "name": "a"}], "images": [{"id": 1, "file_na')
    nocats = tmp_path / "nocats.json"
    nocats.write_text('{"images": [], "annotations": []}')
    for ann, needle in ((cut, "cut.json"), (nocats, "no 'categories'")):
        proc = _run(["pipelines.pretrain_o365", "--preset", "tiny", "--gpus", "0", "--data", str(ann),
                     "--images", str(images)], tmp_path)
        _assert_one_line_error(proc, needle)
        assert "Error:" not in proc.stderr  # no exception class name: the input's fault, said as such

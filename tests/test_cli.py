"""`dino-scale` CLI: help of every subcommand, synth, predict (images + JSON out)."""
from __future__ import annotations

import json
import os
import sys

import pytest

from mlflow_store import seeded_store
from dino_scale import cli

@pytest.fixture(autouse=True)
def _isolated_mlflow(monkeypatch):
    """The CLI points MLflow (globals + MLFLOW_TRACKING_URI) at a store; undo it after
    each test so other tests in this process see the environment they expect."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    import sys as _sys

    if "mlflow" in _sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)


SUBCOMMANDS = ["prepare-data", "check-data", "synth", "pretrain", "finetune", "evaluate", "predict", "registry"]


def test_cli_top_level_help_lists_subcommands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_cli_subcommand_help(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: dino-scale " + command in out, out[:300]
    assert "--debug" in out


def test_cli_debug_before_prepare_data_shows_the_traceback(tmp_path, capsys):
    # `dino-scale --debug CMD` is `dino-scale CMD --debug` (the epilog's promise for every
    # command): prepare-data used to refuse --debug as an unrecognized argument
    argv = ["prepare-data", "--annotations", str(tmp_path / "missing.json"), "--images", str(tmp_path),
            "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.json" in err
    with pytest.raises((OSError, ValueError)):
        cli.main(["--debug"] + argv)


def test_cli_registry_actions_help(capsys):
    # the actions' usage named the module (`usage: python -m pipelines.registry promote`), not the command typed
    for action in ("list", "show", "promote"):
        assert cli.main(["registry", action, "--help"]) == 0
        assert f"usage: dino-scale registry {action}" in capsys.readouterr().out


def test_cli_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "usage: dino-scale" in capsys.readouterr().out
    assert cli.main(["--debug"]) == 2  # was "unrecognized arguments: --debug", which the help suggests adding
    assert "usage: dino-scale" in capsys.readouterr().out


def test_cli_bad_subcommand_is_one_line(capsys):
    assert cli.main(["pretrian"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "Traceback" not in err


@pytest.mark.timeout(300)
def test_cli_synth_and_predict_write_images_and_json(tmp_path, capsys):
    """A real (untrained) tiny model on two synthetic images: annotated JPEGs + JSON."""
    from PIL import Image

    from dino_scale.config import preset, to_dict
    from dino_scale.engine.checkpoint import save_weights
    from dino_scale.models import build_dino

    data = tmp_path / "synth"
    assert cli.main(["synth", str(data), "--flavour", "coco-like", "-n", "2", "--seed", "3"]) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["num_images"] == 2
    cats = [{"id": c["id"], "name": c["name"]} for c in manifest["categories"]]

    cfg = preset("tiny", ["model.num_classes=91"])
    model, _, _ = build_dino(cfg.model)
    ckpt = tmp_path / "ckpt"
    save_weights(ckpt, model.state_dict(), config=to_dict(cfg))
    (ckpt / "categories.json").write_text(json.dumps(cats))
    images = sorted((data / "raw" / "images").rglob("*.jpg"))
    assert len(images) == 2
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    out = tmp_path / "pred"
    rc = cli.main(["predict", str(images[0]), str(images[1]), str(bad), "--model", str(ckpt),
                   "--out", str(out), "--threshold", "0", "--work-dir", str(tmp_path)])
    assert rc == 0
    pred = json.loads((out / "predictions.json").read_text())
    assert len(pred["images"]) == 2 and len(pred["failed"]) == 1  # the broken file is counted
    for item in pred["images"]:
        annotated = Image.open(item["annotated"])
        assert annotated.size == (item["width"], item["height"])
        assert len(item["detections"]) == cfg.model.num_select  # threshold 0 keeps the top-k
        det = item["detections"][0]
        assert set(det) == {"label", "category_id", "score", "box"} and len(det["box"]) == 4
        names = {c["id"]: c["name"] for c in cats}
        for d in item["detections"]:
            assert d["label"] == names.get(d["category_id"], str(d["category_id"]))


def test_cli_registry_list_show_promote(tmp_path, monkeypatch, capsys):
    import mlflow

    uri = seeded_store(tmp_path)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("dino-tiny-coco")
    for _ in range(2):
        client.create_model_version("dino-tiny-coco", source=str(tmp_path),
                                    tags={"source.model_name": "dino-tiny-o365", "source.model_version": "1",
                                          "source.run_id": "abc123"})
    for i in range(100):  # names sorted first: one page of MLflow's default search (100) missed the model
        client.create_registered_model(f"a-filler-{i:03d}")
    base = ["registry", "--work-dir", str(tmp_path)]
    assert cli.main(["--debug"] + base + ["show", "dino-tiny-coco"]) == 0  # --debug before the command
    assert "v2" in capsys.readouterr().out
    assert cli.main(base + ["promote", "dino-tiny-coco", "2"]) == 0
    assert "dino-tiny-coco@champion -> version 2" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("dino-tiny-coco", "champion").version) == "2"
    assert cli.main(base + ["list"]) == 0
    out = capsys.readouterr().out
    assert "dino-tiny-coco" in out and "@champion" in out and "dino-tiny-o365 v1" in out
    assert out.count("a-filler-") == 100
    assert cli.main(base + ["show", "dino-tiny-cocoa"]) == 2  # names the closest models (as evaluate does)
    assert "error: registered model 'dino-tiny-cocoa' not found (registered models: dino-tiny-coco, a-filler-000" in \
        capsys.readouterr().err
    assert cli.main(base + ["promote", "no-such-model", "1"]) == 2
    assert "not found (registered models: " in capsys.readouterr().err
    assert cli.main(base + ["promote", "dino-tiny-coco", "7"]) == 2  # no such version
    # was MLflow's raw "Model Version (name=..., version=7) not found"
    assert "error: dino-tiny-coco has no version 7 (versions: 1, 2; 'registry show dino-tiny-coco'" in \
        capsys.readouterr().err
    # a version written with blanks or zeros is the version; anything else is refused before a tag
    assert cli.main(base + ["promote", "dino-tiny-coco", " 01", "--alias", "spaced"]) == 0
    assert "dino-tiny-coco@spaced -> version 1\n" in capsys.readouterr().out  # was 'version  01'
    assert str(client.get_model_version_by_alias("dino-tiny-coco", "spaced").version) == "1"
    for bad in ("v2", "0", "-1", "1.5", "", "²"):  # "²": a digit to str.isdigit, which int() refuses (exit 1)
        assert cli.main(base + ["promote", "dino-tiny-coco", bad, "--alias", "bad"]) == 2
        assert "give a version number" in capsys.readouterr().err, bad
    for alias in ("latest", "v3", "bad alias"):  # refused by MLflow: the version is left untouched
        assert cli.main(base + ["promote", "dino-tiny-coco", "1", "--alias", alias]) == 2
        assert not [k for k in client.get_model_version("dino-tiny-coco", "1").tags
                    if k.startswith(f"{alias}.")]  # were: <alias>.promotion, .basis stamped before the refusal
        assert f"error: --alias {alias!r}" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_cli_predict_registry_model_and_exif_photo(tmp_path, capsys):
    """``predict`` of a registry model keeps no copy of it in --out, and a phone photo (EXIF
    orientation 6) is predicted upright, in the size it is displayed at."""
    import io

    import numpy as np
    from PIL import Image

    from dino_scale.config import preset, to_dict
    from dino_scale.engine.checkpoint import save_weights
    from dino_scale.models import build_dino
    from dino_scale.tracking import ResilientLogger, register_model

    cfg = preset("tiny", ["model.num_classes=91"])
    model, _, _ = build_dino(cfg.model)
    ckpt = tmp_path / "ckpt"
    save_weights(ckpt, model.state_dict(), config=to_dict(cfg))
    uri = seeded_store(tmp_path)
    logger = ResilientLogger(uri)
    run_id = logger.start_run("cli-test", "train")
    logger.log_artifacts(ckpt, "model")
    logger.end_run()
    assert logger.close(timeout_s=5)
    assert register_model(run_id, "dino-tiny-coco", tracking_uri=uri) == "1"

    raw = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 120, 3), dtype=np.uint8))
    exif = raw.getexif()
    exif[0x0112] = 6  # stored landscape 120x40, displayed portrait 40x120
    photo = tmp_path / "photo.jpg"
    buf = io.BytesIO()
    raw.save(buf, format="JPEG", exif=exif.tobytes())
    photo.write_bytes(buf.getvalue())
    out = tmp_path / "pred"
    assert cli.main(["predict", str(photo), "--model", "models:/dino-tiny-coco/1", "--out", str(out),
                     "--threshold", "0.5", "--work-dir", str(tmp_path)]) == 0
    pred = json.loads((out / "predictions.json").read_text())
    (item,) = pred["images"]
    assert (item["width"], item["height"]) == (40, 120)
    assert Image.open(item["annotated"]).size == (40, 120)
    assert sorted(p.name for p in out.iterdir()) == ["photo.jpg", "predictions.json"]  # no model copy


def _readme_commands() -> list[tuple[str, list[str]]]:
    """Every `dino-scale CMD ...` and `python -m pipelines.X ...` line of README.md's bash
    blocks (continuations joined, comments cut) as (module, argv)."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    out = []
    for block in re.findall(r"(?ms)^```bash\n(.*?)^```", text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0]
            if "python -m pipelines." in line:
                argv = shlex.split(line[line.index("python -m pipelines."):])
                out.append((argv[2], argv[3:]))
            elif line.startswith("dino-scale ") and " | " not in line:  # `registry list | show` is a menu
                argv = shlex.split(line)[1:]
                if argv[0] in cli.FORWARDED:
                    out.append((cli.FORWARDED[argv[0]][0], argv[1:]))
    return out


def test_readme_training_commands_pass_the_up_front_checks(monkeypatch):
    # The README's commands parse with their pipeline's parser, and the training ones pass the
    # checks the pipeline runs before anything starts (preset, --set keys, batch sizes per worker
    # count). `--preset swinl_4scale --workers 64 --gpus 1` alone was refused: the preset's
    # global batch 16 is not a multiple of 2 images x 64 workers. The multi-GPU ones are jobs
    # submitted to a cluster (`ray job submit` sets RAY_ADDRESS), not runs on this machine.
    import importlib

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")

    from pipelines import _common as common

    commands = _readme_commands()
    checked = 0
    assert {m for m, _ in commands} >= {"pipelines.pretrain_o365", "pipelines.finetune_coco",
                                        "pipelines.evaluate", "pipelines.prepare_data"}
    for module, argv in commands:
        mod = importlib.import_module(module)
        if "--help" in argv:
            continue  # the help test runs those
        args = mod.build_parser().parse_args(argv)
        if hasattr(args, "zero_stage"):  # a training command, with or without --preset
            common.validate_config_args(args)
            checked += 1
    assert checked >= 6


def test_cli_predict_weights_cut_short_is_one_line_naming_the_file(tmp_path, capsys):
    """A checkpoint folder whose model.safetensors a copy cut short (was: "SafetensorError: Error
    while deserializing header: incomplete metadata, file not fully covered", naming no file)."""
    from PIL import Image

    from dino_scale.config import preset, to_dict
    from dino_scale.engine.checkpoint import save_weights
    from dino_scale.models import build_dino

    cfg = preset("tiny")
    model, _, _ = build_dino(cfg.model)
    ckpt = tmp_path / "ckpt"
    save_weights(ckpt, model.state_dict(), config=to_dict(cfg))
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "a.jpg")
    capsys.readouterr()
    rc = cli.main(["predict", str(tmp_path / "a.jpg"), "--model", str(ckpt), "--out", str(tmp_path / "pred"),
                   "--work-dir", str(tmp_path)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {weights}: not a readable safetensors file (SafetensorError: "), err


def test_cli_check_data_exit_status_names_damaged_records(tmp_path, capsys):
    """``dino-scale check-data``: 0 when every record matches its checksums, 1 listing the damaged
    records (and --json), 2 with one line when a folder's shards are not all there."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
    from test_data_integrity import BOX, _convert, _replace_in_shard

    import struct

    good, _ = _convert(tmp_path / "good")
    bad, _ = _convert(tmp_path / "bad")
    _replace_in_shard(bad, struct.pack("<f", BOX), struct.pack("<f", BOX + 8))
    assert cli.main(["check-data", str(good)]) == 0
    out = capsys.readouterr().out
    assert "1/1 shards read" in out and f"{good}: 4 records in 1 shards match their checksums" in out
    report = tmp_path / "report.json"
    assert cli.main(["check-data", str(good), str(bad), "--quiet", "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "shards read" not in out and f"{bad}: 1 damaged record(s)" in out
    assert "(image id 2): its labels do not match" in out
    assert [len(r["damaged"]) for r in json.loads(report.read_text())] == [0, 1]
    (bad / "shard-00000.parquet").unlink()
    assert cli.main(["check-data", str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert "shards read" not in captured.out  # the folders are checked whole before any is read
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: 1 of 1 shards do not match manifest.json")


@pytest.mark.parametrize("flag,value", [("--shard-size-mb", "0"), ("--shard-size-mb", "-1"),
                                        ("--shard-size-mb", "nan"), ("--shard-size-mb", "inf"),
                                        ("--max-images-per-shard", "0")])
def test_cli_prepare_data_shard_limits_must_be_positive(flag, value, tmp_path, capsys):
    """A shard limit <= 0 wrote one image per shard (Objects365: 1.7M shards) and exited 0; NaN
    and inf failed inside the converter without naming the flag."""
    from dino_scale.data import synthetic

    root, ann = synthetic.generate(tmp_path / "raw", flavour="coco-like", num_images=2)
    out = tmp_path / "out"
    code = cli.main(["prepare-data", "--annotations", str(ann), "--images", str(root), "--out", str(out),
                     flag, value])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("error: " + flag), err
    assert not out.exists()


@pytest.mark.parametrize("case", ["out_is_a_file", "images_is_a_file", "negative_val_split", "zero_val_split",
                                  "comma_in_out"])
def test_cli_prepare_data_names_the_flag_at_fault(case, tmp_path, capsys):
    """Was: "[Errno 17] File exists" (--out a file), "image folder not found" for an --images
    that exists as a file, "o365_val_split must be >= 0" (no flag name); an --out with a comma
    converted, then no pipeline could read it ("dataset path not found" for its first half)."""
    from dino_scale.data import synthetic

    root, ann = synthetic.generate(tmp_path / "raw", flavour="coco-like", num_images=2)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = {"out_is_a_file": ["--images", str(root), "--out", str(blocker)],
            "images_is_a_file": ["--images", str(blocker), "--out", str(tmp_path / "out")],
            "negative_val_split": ["--images", str(root), "--out", str(tmp_path / "out"), "--o365-val-split", "-5"],
            "zero_val_split": ["--images", str(root), "--out", str(tmp_path / "out"), "--o365-val-split", "0"],
            "comma_in_out": ["--images", str(root), "--out", str(tmp_path / "out" / "coco,v2")]}
    flag = {"out_is_a_file": "--out", "images_is_a_file": "--images", "negative_val_split": "--o365-val-split",
            "zero_val_split": "--o365-val-split", "comma_in_out": "--out"}
    code = cli.main(["prepare-data", "--annotations", str(ann), *argv[case]])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {flag[case]} "), err
    assert not (tmp_path / "out").exists()


def test_prepare_data_module_help_names_the_module():
    """`python -m pipelines.prepare_data --help` said `usage: prepare_data.py`, a file that is not
    the command (like every other pipeline, the usage line is what the user types)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pipelines.prepare_data", "--help"], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m pipelines.prepare_data "), proc.stdout[:200]


def test_prepare_data_module_fails_with_one_line(tmp_path):
    """`python -m pipelines.prepare_data` ended an unexpected failure (or Ctrl-C) with a traceback;
    `dino-scale prepare-data` printed one line: both now go through the same handler."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ann = tmp_path / "a.json"
    ann.write_text("{}")
    code = ("import runpy, sys, dino_scale.data as d\n"
            "def boom(*a, **k):\n    raise RuntimeError('disk on fire')\n"
            "d.convert_coco = boom\n"
            "sys.argv = ['prepare_data', '--annotations', sys.argv[1], '--images', sys.argv[2], '--out', sys.argv[2]]\n"
            "runpy.run_module('pipelines.prepare_data', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ann), str(tmp_path / "out")], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "error: RuntimeError: disk on fire" in proc.stderr, proc.stderr


def test_cli_paths_starting_with_a_tilde_are_in_home(tmp_path, monkeypatch, capsys):
    """`--out=~/preds` (the shell leaves a '~' after '=' alone) wrote into a folder named '~' in
    the current folder, and so did synth, prepare-data and check-data; predict and registry made
    an empty '~/<work-dir>' there while reading the store in the real home. Each path now means
    the home folder, as --work-dir always did for the training pipelines."""
    from dino_scale.config import preset, to_dict
    from dino_scale.engine.checkpoint import save_weights
    from dino_scale.models import build_dino

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert cli.main(["synth", "~/synth", "-n", "2"]) == 0
    assert cli.main(["prepare-data", "--annotations", "~/synth/raw/annotations.json",
                     "--images", "~/synth/raw/images", "--out", "~/conv", "--quiet"]) == 0
    assert cli.main(["check-data", "~/conv", "--json", "~/check.json", "--quiet"]) == 0
    cfg = preset("tiny", ["model.num_classes=91"])
    save_weights(home / "ckpt", build_dino(cfg.model)[0].state_dict(), config=to_dict(cfg))
    assert cli.main(["predict", "~/synth/raw/images", "--model", "~/ckpt", "--out", "~/preds",
                     "--work-dir", "~/w"]) == 0
    capsys.readouterr()
    assert list(cwd.iterdir()) == []
    assert (home / "conv" / "manifest.json").is_file() and (home / "check.json").is_file()
    assert len(json.loads((home / "preds" / "predictions.json").read_text())["images"]) == 2


def test_cli_check_data_of_a_folder_holding_train_and_val_checks_both(tmp_path, capsys):
    """A folder holding train/ and val/ (what --data takes) was refused: "no manifest.json in ...:
    not a converted dataset"."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
    from test_data_integrity import _convert

    _convert(tmp_path / "coco", name="train")
    _convert(tmp_path / "coco", name="val")
    (tmp_path / "coco" / "img").rename(tmp_path / "img")  # not a dataset: not checked
    assert cli.main(["check-data", str(tmp_path / "coco"), "--no-image-files"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'coco'} holds datasets: checking train, val" in out
    assert all(f"{tmp_path / 'coco' / n}: 4 records in 1 shards match" in out for n in ("train", "val")), out
    # a folder named twice (itself and through its parent) is checked once; --quiet: the summaries only
    assert cli.main(["check-data", str(tmp_path / "coco"), str(tmp_path / "coco" / "val"), "--quiet",
                     "--no-image-files"]) == 0
    out = capsys.readouterr().out
    assert out.count("records in 1 shards match") == 2 and "holds datasets" not in out, out
    # a split whose manifest is gone (an incomplete copy, a conversion cut short) was passed over, exit 0
    (tmp_path / "coco" / "val" / "manifest.json").unlink()
    assert cli.main(["check-data", str(tmp_path / "coco"), "--no-image-files"]) == 2
    err = capsys.readouterr().err
    assert f"no manifest.json in {tmp_path / 'coco' / 'val'}, which holds shards: an incomplete copy" in err, err
    (tmp_path / "empty").mkdir()  # neither a dataset nor a folder of datasets: the manifest error, as before
    assert cli.main(["check-data", str(tmp_path / "empty")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_cli_check_data_looks_for_the_image_files_a_dataset_names(tmp_path, capsys):
    """A dataset converted without --embed-images passed check-data with its images gone (it read
    the shards only): training then skipped every image, or refused the folder after Ray started.
    Each record's file is now looked up (exit 1 naming the missing ones; --image-root for images
    that moved; --no-image-files to skip the lookups); an embedded dataset is not looked at."""
    import shutil

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
    from test_data_integrity import _convert

    ref, _ = _convert(tmp_path, embed=False, name="ref")
    report = tmp_path / "r.json"
    assert cli.main(["check-data", str(ref), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert f"{ref}: all 4 image files are there" in out and "4/4 image files looked up" in out
    assert json.loads(report.read_text())[0]["image_files"]["missing"] == 0
    (tmp_path / "img" / "3.jpg").unlink()
    assert cli.main(["check-data", str(ref), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"{ref}: 1 of 4 image files are missing" in out and str(tmp_path / "img" / "3.jpg") in out
    assert "looked up" not in out  # --quiet
    assert cli.main(["check-data", str(ref), "--no-image-files"]) == 0
    assert "image files" not in capsys.readouterr().out
    shutil.move(str(tmp_path / "img"), str(tmp_path / "moved"))  # every image elsewhere now
    assert cli.main(["check-data", str(ref), "--quiet"]) == 1
    assert f"{ref}: 4 of 4 image files are missing" in capsys.readouterr().out
    (tmp_path / "moved" / "3.jpg").write_bytes(b"x")
    assert cli.main(["check-data", str(ref), "--image-root", str(tmp_path / "moved")]) == 0
    assert "all 4 image files are there" in capsys.readouterr().out
    embedded, _ = _convert(tmp_path / "e", embed=True)
    shutil.rmtree(tmp_path / "e" / "img")
    assert cli.main(["check-data", str(embedded)]) == 0
    assert "image files" not in capsys.readouterr().out
    # one root per folder, in order (was: refused, after the first folder's full read); one root for
    # folders converted against different roots is ambiguous: refused before any read
    other, _ = _convert(tmp_path / "o", embed=False, name="other")
    assert cli.main(["check-data", str(ref), str(other), "--quiet", "--image-root",
                     f"{tmp_path / 'moved'},{tmp_path / 'o' / 'img'}"]) == 0
    out = capsys.readouterr().out
    assert f"{ref}: all 4 image files are there" in out and f"{other}: all 4 image files are there" in out
    assert cli.main(["check-data", str(ref), str(other), "--image-root", str(tmp_path / "moved")]) == 2
    captured = capsys.readouterr()
    assert "ambiguous" in captured.err and "match their checksums" not in captured.out
    # a folder converted (by the library) without an image root: not looked up, and said so
    from dino_scale.data import convert_coco

    bare = tmp_path / "bare"
    convert_coco(tmp_path / "ann.json", None, bare, check_files=False, progress=False)
    assert cli.main(["check-data", str(bare)]) == 0
    assert "no image root recorded" in capsys.readouterr().out


def test_cli_check_data_json_destination_is_checked_before_reading(tmp_path, capsys):
    """A --json in a folder that does not exist failed only after every shard was read (minutes
    to hours on a cluster copy), with exit 2 instead of the check's own 0/1 and the report lost."""
    assert cli.main(["synth", str(tmp_path / "d"), "-n", "2"]) == 0
    capsys.readouterr()
    assert cli.main(["check-data", str(tmp_path / "d"), "--json", str(tmp_path / "no" / "r.json")]) == 2
    captured = capsys.readouterr()
    assert "shards read" not in captured.out and "match their checksums" not in captured.out
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: --json") and str(tmp_path / "no") in err[0], err


def test_readme_ray_job_excludes_keep_every_source_file():
    """The `excludes` of each `--runtime-env-json` in the docs, matched as Ray matches them
    (.gitignore patterns): `"data"` left dino_scale/data/ out of the job's upload."""
    import json
    import re
    from pathlib import Path

    from ray._private.runtime_env.packaging import _get_excludes  # the matcher `ray job submit` uses

    root = Path(__file__).resolve().parents[1]
    sources = [p for d in ("dino_scale", "pipelines", "csrc") for p in (root / d).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]
    found = 0
    for doc in [root / "README.md", *sorted((root / "cluster").glob("*.md"))]:
        for spec in re.findall(r"--runtime-env-json '(\{.*?\})'", doc.read_text(), flags=re.S):
            excludes = json.loads(spec).get("excludes")
            if not excludes:
                continue
            found += 1
            excluded = _get_excludes(root, excludes)
            dropped = [str(p.relative_to(root)) for p in sources if excluded(p)]
            assert not dropped, f"{doc.name}: excludes {excludes} leave out {dropped[:5]}"
            assert excluded(root / "data" / "o365") and excluded(root / "runs" / "x")
    assert found >= 1

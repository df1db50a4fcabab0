"""`dino-scale` CLI: help of every subcommand, synth, predict (images + JSON out), registry (the data
commands: test_cli_data.py)."""
from __future__ import annotations

import json
import os

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


@pytest.mark.parametrize("module, argv, flag", [
    ("pipelines.finetune_coco", ["--model", "models:/dino-tiny-o365@pretrained"], "--model"),  # was --model-name
    ("pipelines.finetune_coco", ["--no"], "--no"),  # was --no-register
    ("pipelines.pretrain_o365", ["--max", "3"], "--max"),  # was --max-steps
    ("pipelines.evaluate", ["--model", "m", "--val", "x"], "--val"),
    ("pipelines.predict", ["--model", "m", "--thr", "0.5", "a.jpg"], "--thr"),
    ("pipelines.prepare_data", ["--annotations", "a.json", "--images", "i", "--out", "o", "--emb"], "--emb"),
    ("pipelines.check_data", ["d", "--js", "x"], "--js"),
    ("pipelines.demo", ["--fr"], "--fr"),
    ("pipelines.registry", ["promote", "m", "1", "--al", "x"], "--al"),
    ("dino_scale.cli", ["synth", "out", "--fl", "coco-like"], "--fl"),
])
def test_cli_abbreviated_flags_are_refused(module, argv, flag, capsys):
    """argparse took a prefix of a flag as the flag: ``finetune --model <uri>`` (evaluate's and
    predict's name for the source) became ``--model-name <uri>`` (refused as a registry name,
    naming a flag not typed) or, for a plain name, the name to register under, silently."""
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and flag in err, err


def test_cli_debug_before_prepare_data_shows_the_traceback(tmp_path, capsys):
    # `dino-scale --debug CMD` is `dino-scale CMD --debug` (the epilog's promise for every
    # command): prepare-data used to refuse --debug as an unrecognized argument
    argv = ["prepare-data", "--annotations", str(tmp_path / "missing.json"), "--images", str(tmp_path),
            "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.json" in err
    assert cli.main(["--debug"] + argv) == 2  # the traceback, and still the usage error's exit code
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and err.splitlines()[-1].startswith("error: ")


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

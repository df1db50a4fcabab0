"""`pipelines.predict`: what it reads and writes beside the images (earlier runs' copies and
predictions files, reruns on other images, names that differ in case only), the model files it reads (a damaged
categories.json, a diverged model's shared heads) and the padding evaluation applies."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pipelines_predict import _tiny_checkpoint  # noqa: E402

from pipelines import _common as common  # noqa: E402
from pipelines.predict import MARK, keep_earlier_predictions, list_images, main, name_key, output_path  # noqa: E402


def test_a_name_differing_in_case_only_is_taken(tmp_path):
    """``IMG_1.JPG`` in the input folder, ``--out`` that folder: the copy was named ``IMG_1.jpg``,
    which on macOS, Windows or a camera card (FAT/exFAT) is the photo itself, replaced."""
    photo = tmp_path / "IMG_1.JPG"
    taken = {name_key(photo)}
    assert output_path(tmp_path, photo, 1, taken) == tmp_path / "IMG_1-1.jpg"
    assert name_key(tmp_path / "img_1.jpg") in taken  # the second image of that stem gets its own name too
    assert output_path(tmp_path, tmp_path / "sub" / "img_1.png", 2, taken) == tmp_path / "img_1-2.jpg"


def test_copies_of_earlier_runs_are_no_photos_wherever_they_lie(tmp_path):
    """Two runs into output folders inside the input folder (``--out photos/run1``, then
    ``--out photos/run2``): run2 read run1's copies as photos, and so did a quoted pattern over the
    input folder after a run into it. A copy named as a file is still read."""
    photos = tmp_path / "photos"
    (photos / "run1").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(photos / "a.jpg")
    Image.new("RGB", (8, 8)).save(photos / "run1" / "a.jpg", comment=MARK)
    Image.new("RGB", (8, 8)).save(photos / "a-1.jpg", comment=MARK)  # a run with --out photos
    Image.new("RGB", (8, 8)).save(photos / "run1" / "own.jpg")  # the user's photo there: read
    assert list_images([str(photos)], skip_dir=photos / "run2") == [photos / "a.jpg", photos / "run1" / "own.jpg"]
    assert list_images([str(photos / "*.jpg")], skip_dir=photos / "run2") == [photos / "a.jpg"]
    assert list_images([str(photos / "a-1.jpg")]) == [photos / "a-1.jpg"]  # named: read
    with pytest.raises(common.UsageError, match="every file matching the image pattern .* is an annotated copy"):
        list_images([str(photos / "a-*.jpg")])


def test_a_predictions_json_predict_did_not_write_is_kept(tmp_path):
    """A ``predictions.json`` of another tool in ``--out`` (a JSON object without predict's keys) was
    replaced unsaid: any object without ``"images"`` read as "nothing to keep"."""
    out = tmp_path / "out"
    out.mkdir()
    theirs = json.dumps({"note": "results of another tool", "boxes": [[1, 2, 3, 4]]}).encode()
    (out / "predictions.json").write_bytes(theirs)
    notes: list[str] = []
    kept = keep_earlier_predictions(out / "predictions.json", [{"file": str(tmp_path / "a.jpg")}], notes.append)
    assert kept == out / "predictions.1.json" and kept.read_bytes() == theirs
    assert "kept as predictions.1.json" in notes[0]
    # one of predict's own, on the same images: replaced (nothing kept)
    ours = {"model": "m", "images": [{"file": str(tmp_path / "a.jpg"), "annotated": None}]}
    (out / "predictions.json").write_text(json.dumps(ours))
    assert keep_earlier_predictions(out / "predictions.json", [{"file": str(tmp_path / "a.jpg")}], notes.append) is None


def test_a_damaged_categories_json_is_named(tmp_path, monkeypatch, mlflow_store_restored):
    """A cut-short or wrong-shaped ``categories.json`` beside the model's weights ended predict with
    ``JSONDecodeError`` / ``TypeError`` (exit 1) naming no file; a ConfigError is one ``error:``
    line naming it, exit 2 (run_main)."""
    from dino_scale.config import ConfigError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Image.new("RGB", (64, 48)).save(tmp_path / "a.jpg")
    model = _tiny_checkpoint(tmp_path / "ckpt")
    for damaged in ('[{"id": 1, "na', '{"1": "cat"}', '[{"id": 1}]'):
        (model / "categories.json").write_text(damaged)
        with pytest.raises(ConfigError, match=f"{model / 'categories.json'} is not a readable categories file"):
            main([str(tmp_path / "a.jpg"), "--model", str(model), "--out", str(tmp_path / "out"),
                  "--work-dir", str(tmp_path / "runs")])
    (model / "categories.json").write_text('[{"id": 1, "name": "cat"}]')
    assert main([str(tmp_path / "a.jpg"), "--model", str(model), "--out", str(tmp_path / "out"),
                 "--work-dir", str(tmp_path / "runs")]) == 0


def test_a_diverged_model_is_scored_as_diverged_not_refused_as_a_misfit(tmp_path, monkeypatch, capsys,
                                                                         mlflow_store_restored):
    """Every weight NaN (a diverged run): the shared box heads' copies are NaN alike, which
    ``torch.equal`` called different, so predict (and evaluate, ``--init``) refused the model with
    "does not fit the model; aliased (shared-head) keys hold different tensors"."""
    import torch

    from dino_scale.engine.checkpoint import load_weights, save_weights
    from dino_scale.models import build_dino
    from dino_scale.models.official import load_official_state_dict

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model = _tiny_checkpoint(tmp_path / "ckpt")
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in load_weights(model).items()}
    config = json.loads((model / "config.json").read_text())
    save_weights(model, state, config=config)
    from dino_scale.config import from_dict

    fresh, _, _ = build_dino(dataclasses.replace(from_dict(config).model, backbone_weights=None))
    load_official_state_dict(fresh, state)  # raised CheckpointMismatch
    Image.new("RGB", (64, 48)).save(tmp_path / "a.jpg")
    assert main([str(tmp_path / "a.jpg"), "--model", str(model), "--out", str(tmp_path / "out"),
                 "--work-dir", str(tmp_path / "runs"), "--threshold", "0"]) == 1
    assert "every detection has a NaN/inf score or box" in capsys.readouterr().err


def test_predict_pads_like_evaluation_for_a_model_with_pad_multiple():
    """A model whose config sets ``data.pad_multiple`` is evaluated on images padded to that
    multiple; predict fed it the unpadded image, so its detections differed from evaluate's with
    ``eval.batch_size=1`` (the README says they match)."""
    import numpy as np
    import torch

    from dino_scale.data.collate import collate
    from pipelines.predict import preprocess

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))
    x, mask = preprocess(image, 64, 100, 32)
    assert tuple(x.shape) == (1, 3, 64, 96) and tuple(mask.shape) == (1, 64, 96)
    assert not mask[:, :, :82].any() and mask[:, :, 82:].all()  # 70x90 -> 64x82, padded to 64x96
    resized, _ = preprocess(image, 64, 100)
    assert tuple(resized.shape) == (1, 3, 64, 82)
    # the evaluation's batching of an image of that resized size: the same padding mask
    sample = {"image": torch.zeros(3, 64, 82, dtype=torch.uint8), "labels": [], "boxes": np.zeros((0, 4), np.float32),
              "image_id": 1, "orig_size": [70, 90]}
    _, masks, _ = collate([sample], pad_multiple=32, normalize=True)
    assert torch.equal(masks, mask)
    torch.testing.assert_close(x[..., 82:], torch.zeros_like(x[..., 82:]))  # padding zeroed after normalizing


def test_a_rerun_on_other_images_keeps_the_earlier_predictions(tmp_path, monkeypatch, capsys, mlflow_store_restored):
    """A second run into the same --out on other images (or one whose every image failed)
    replaced predictions.json: the first run's detections were gone, their annotated copies left
    with nothing listing them. That file is now kept as predictions.1.json; a rerun on the same
    images replaces it as before. ``--device`` names where the model runs."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (64, 48), (90, 90, 90)).save(tmp_path / name)
    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"

    def run(*images, device="cpu"):
        return main([*map(str, images), "--model", str(ckpt), "--out", str(out), "--work-dir", str(tmp_path / "runs"),
                     "--threshold", "0", "--device", device])

    import torch

    from pipelines._common import UsageError

    assert run(tmp_path / "a.jpg") == 0
    first = (out / "predictions.json").read_bytes()
    assert run(tmp_path / "a.jpg") == 0 and not (out / "predictions.1.json").exists()  # same image: replaced
    assert run(tmp_path / "b.jpg") == 0
    assert (out / "predictions.1.json").read_bytes() == first
    said = capsys.readouterr()
    assert "kept as predictions.1.json" in said.out + said.err and ") on cpu; 1 image(s)" in said.out + said.err
    assert [Path(i["file"]).name for i in json.loads((out / "predictions.json").read_text())["images"]] == ["b.jpg"]
    with pytest.raises(UsageError, match="--device"):
        run(tmp_path / "a.jpg", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="--device cuda: torch sees 0 GPU"):
            run(tmp_path / "a.jpg", device="cuda")


def test_a_rerun_on_another_image_of_the_same_name_keeps_the_copy_the_kept_list_names(
        tmp_path, monkeypatch, mlflow_store_restored):
    """``predict p1/cat.jpg --out preds`` then ``predict p2/cat.jpg --out preds``: the second run
    kept the first's list as predictions.1.json and wrote p2's copy over ``preds/cat.jpg``, the
    copy that list names for p1's cat (another image under its entry). Paths in the lists were as
    typed, relative to where the command ran: a rerun elsewhere with the same relative names was
    taken for the same images. Both are absolute now, and listed copies are not written over, but
    by a new copy of the image they are listed for."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    colours = {"p1": (200, 10, 10), "p2": (10, 10, 200)}
    for folder, colour in colours.items():
        (tmp_path / folder).mkdir()
        Image.new("RGB", (64, 48), colour).save(tmp_path / folder / "cat.jpg")
    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    for folder in colours:
        assert main([f"{folder}/cat.jpg", "--model", str(ckpt), "--out", "preds", "--threshold", "1",
                     "--work-dir", str(tmp_path / "runs")]) == 0
    lists = [json.loads((tmp_path / "preds" / name).read_text()) for name in ("predictions.1.json", "predictions.json")]
    for listed, folder in zip(lists, colours):
        (item,) = listed["images"]
        assert item["file"] == str(tmp_path / folder / "cat.jpg") and Path(item["annotated"]).is_absolute()
        got = Image.open(item["annotated"]).convert("RGB").getpixel((32, 24))
        assert max(abs(a - b) for a, b in zip(got, colours[folder])) < 12, (folder, item, got)
    assert lists[0]["images"][0]["annotated"] != lists[1]["images"][0]["annotated"]
    # both again, p2 first: a listed copy was freed for any image of the run, so p2 took cat.jpg, the
    # copy the kept predictions.1.json names for p1 (p2's picture under p1's entry); each reuses its own now
    assert main(["p2/cat.jpg", "p1/cat.jpg", "--model", str(ckpt), "--out", "preds", "--threshold", "1",
                 "--work-dir", str(tmp_path / "runs")]) == 0
    for listing in sorted((tmp_path / "preds").glob("predictions*.json")):
        for item in json.loads(listing.read_text())["images"]:
            got = Image.open(item["annotated"]).convert("RGB").getpixel((32, 24))
            want = colours[Path(item["file"]).parent.name]
            assert max(abs(a - b) for a, b in zip(got, want)) < 12, (listing.name, item, got)
    assert sorted(p.name for p in (tmp_path / "preds").glob("*.jpg")) == ["cat-1.jpg", "cat.jpg"]  # no third copy

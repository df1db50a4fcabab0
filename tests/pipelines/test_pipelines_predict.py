"""`pipelines.predict`: annotated copies never overwrite an input image or each other."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipelines.predict import list_images, main


def _tiny_checkpoint(folder):
    from dino_scale.config import preset, to_dict
    from dino_scale.engine.checkpoint import save_weights
    from dino_scale.models import build_dino

    cfg = preset("tiny", ["model.num_classes=91"])
    model, _, _ = build_dino(cfg.model)
    # trained from ImageNet weights at a path of its training cluster, absent here: predict must
    # not read them (the model's weights replace the backbone's; was "backbone weights not found")
    cfg.model.backbone_weights = str(folder.parent / "cluster-only" / "resnet18.pth")
    save_weights(folder, model.state_dict(), config=to_dict(cfg))
    return folder


def test_predict_into_the_input_folder_keeps_every_input(tmp_path, monkeypatch, mlflow_store_restored):
    # predict points MLflow at its store (globals and environment): undone after the test
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    colours = {"a.jpg": (200, 10, 10), "sub/a.jpg": (10, 200, 10), "a-2.jpg": (10, 10, 200)}
    for name, colour in colours.items():
        Image.new("RGB", (64, 48), colour).save(photos / name)
    before = {name: (photos / name).read_bytes() for name in colours}
    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    rc = main([str(photos), "--model", str(ckpt), "--out", str(photos), "--threshold", "1",
               "--work-dir", str(tmp_path / "runs")])
    assert rc == 0
    assert {name: (photos / name).read_bytes() for name in colours} == before
    pred = json.loads((photos / "predictions.json").read_text())
    annotated = [item["annotated"] for item in pred["images"]]
    assert len(pred["images"]) == 3 and len(set(annotated)) == 3
    assert not set(annotated) & {str(photos / n) for n in colours}
    for item in pred["images"]:  # threshold 1 draws no box: each copy shows its own input's colour
        own = colours[str(Path(item["file"]).relative_to(photos))]
        got = Image.open(item["annotated"]).convert("RGB").getpixel((32, 24))
        assert max(abs(a - b) for a, b in zip(got, own)) < 12, (item, got, own)
    # the same command again: the copies are not read as new photos (was: 3, then 6, 12 ... images,
    # detections on copies reported as the user's; no copy ever replaced)
    files_before = sorted(p.name for p in photos.rglob("*"))
    assert main([str(photos), "--model", str(ckpt), "--out", str(photos), "--threshold", "1",
                 "--work-dir", str(tmp_path / "runs")]) == 0
    again = json.loads((photos / "predictions.json").read_text())
    assert sorted(item["file"] for item in again["images"]) == sorted(item["file"] for item in pred["images"])
    assert sorted(p.name for p in photos.rglob("*")) == files_before and again["complete"] is True


@pytest.mark.parametrize("out", ["a-file", "a-file/sub"])
def test_predict_out_blocked_by_a_file_is_a_usage_error(tmp_path, monkeypatch, mlflow_store_restored, out):
    """Was ``FileExistsError: [Errno 17] File exists`` / ``NotADirectoryError`` (exit 1)."""
    from pipelines._common import UsageError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "a-file").write_text("keep me")
    with pytest.raises(UsageError, match=r"--out .*a-file.*: a file is in the way"):
        main([str(tmp_path / "a.jpg"), "--model", str(_tiny_checkpoint(tmp_path / "ckpt")),
              "--out", str(tmp_path / out), "--work-dir", str(tmp_path / "runs")])
    assert (tmp_path / "a-file").read_text() == "keep me"


def _predict(tmp_path, images, *extra, out=None):
    return main([*map(str, images), "--model", str(_tiny_checkpoint(tmp_path / "ckpt")),
                 "--out", str(out or tmp_path / "out"), "--work-dir", str(tmp_path / "runs"), *extra])


def _strict_json(path: Path):
    """``path``'s JSON, refusing the ``NaN``/``Infinity`` that Python writes and JSON lacks."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_predict_drops_and_counts_nonfinite_detections(tmp_path, monkeypatch, mlflow_store_restored):
    """A detection with a NaN/inf box (a diverged model, a half-precision overflow) crashed the
    whole run while drawing (``ValueError: cannot convert float NaN to integer``), an inf box was
    written as ``Infinity`` (not JSON), and NaN scores were dropped unseen: a NaN model read as
    "0 boxes". They are now dropped, counted per image (``nonfinite``) and logged; when no
    detection at all is finite, predict exits 1."""
    import math

    import torch

    from dino_scale.models.postprocess import PostProcess

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    forward = PostProcess.forward
    broken = {"count": 3}

    def with_nonfinite(self, outputs, target_sizes):
        res = forward(self, outputs, target_sizes)
        for r in res:
            n = broken["count"]
            r["scores"][:n] = torch.linspace(0.9, 0.8, n)[: len(r["scores"][:n])]
            r["boxes"][0:1, 0] = math.nan
            r["boxes"][1:2, 2] = math.inf
            r["scores"][2:n] = math.nan
        return res

    monkeypatch.setattr(PostProcess, "forward", with_nonfinite)
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "a.jpg")
    assert _predict(tmp_path, [tmp_path / "a.jpg"], "--threshold", "0") == 0
    pred = _strict_json(tmp_path / "out" / "predictions.json")
    (item,) = pred["images"]
    assert item["nonfinite"] == 3 and pred["detections_nonfinite"] == 3
    assert len(item["detections"]) == 50 - 3  # tiny: num_select 50
    assert all(math.isfinite(v) for d in item["detections"] for v in [d["score"], *d["box"]])

    broken["count"] = 50  # every detection of every image: no usable output
    assert _predict(tmp_path, [tmp_path / "a.jpg"], "--threshold", "0", out=tmp_path / "out2") == 1
    pred = _strict_json(tmp_path / "out2" / "predictions.json")
    assert pred["detections_nonfinite"] == 50 and pred["images"][0]["detections"] == []


def test_predictions_json_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch, mlflow_store_restored):
    """predictions.json was rewritten in place: a write cut short (disk full, a file size limit,
    a kill) left the earlier run's file truncated, half a JSON document. It is now written to a
    temporary file and renamed: a failed write leaves the earlier file as it was."""
    import resource
    import signal

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "a.jpg")
    assert _predict(tmp_path, [tmp_path / "a.jpg"], "--threshold", "0") == 0
    target = tmp_path / "out" / "predictions.json"
    before = target.read_bytes()
    assert len(before) > 4096

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail (EFBIG)
    dumps = json.dumps

    def dumps_then_limit(obj, *args, **kwargs):
        text = dumps(obj, *args, **kwargs)
        if isinstance(obj, dict) and "images" in obj:  # the write that follows is cut short
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
        return text

    monkeypatch.setattr(json, "dumps", dumps_then_limit)
    try:
        with pytest.raises(OSError):
            _predict(tmp_path, [tmp_path / "a.jpg"], "--threshold", "0")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.jpg", "predictions.json"]


@pytest.mark.parametrize("preset_args, gpus_here", [([], False), (["--preset", "tiny"], False),
                                                    (["--device", "cpu"], True)])
def test_predict_official_file_of_another_preset_asks_for_preset(tmp_path, monkeypatch, capsys,
                                                                 mlflow_store_restored, preset_args, gpus_here):
    """An official ``.pth`` (no config) that is not the default preset's model (or not the
    ``--preset`` given) failed as ``error: CheckpointMismatch: checkpoint does not fit the model;
    unexpected keys: ...`` (exit 1), without a word of ``--preset``, which README says such a
    file needs. It is now a usage error (exit 2) that names the preset tried and asks for the one
    the file was trained with."""
    import torch

    from dino_scale.config import preset
    from dino_scale.models import build_model
    from pipelines import _common
    from pipelines._common import run_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # the default preset: tiny, where the model runs on the CPU (--device cpu on a GPU node too: it
    # was r50_4scale there)
    monkeypatch.setattr(_common, "_gpus_available", lambda: gpus_here)
    deeper = build_model(preset("tiny", ["model.dec_layers=3"]).model)  # not the tiny preset's layout
    torch.save({"model": deeper.state_dict()}, tmp_path / "checkpoint.pth")
    Image.new("RGB", (64, 48)).save(tmp_path / "a.jpg")
    rc = run_main(main, [str(tmp_path / "a.jpg"), "--model", str(tmp_path / "checkpoint.pth"), *preset_args,
                         "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "preset tiny" in err and "give --preset" in err and "r50_4scale" in err, err
    assert not (tmp_path / "out" / "predictions.json").exists()


def test_predict_never_overwrites_a_file_it_did_not_write(tmp_path, monkeypatch, mlflow_store_restored):
    """``--out`` a folder that holds the user's own ``a.jpg`` (not an input): the annotated copy of
    an input ``a.jpg`` replaced it, silently. A file in ``--out`` is now replaced only when it is an
    annotated copy (JPEG comment ``dino-scale predict``, or listed in the folder's predictions.json):
    a rerun refreshes its own copies under the same names, even after a run cut short; any other
    file keeps its bytes and the copy is ``a-<i>.jpg``."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    new, out = tmp_path / "new", tmp_path / "album"
    new.mkdir()
    out.mkdir()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(new / "a.jpg")
    Image.new("RGB", (64, 48), (10, 200, 10)).save(new / "b.jpg")
    Image.new("RGB", (30, 20), (10, 10, 200)).save(out / "a.jpg")  # the user's own photo
    mine = (out / "a.jpg").read_bytes()
    assert _predict(tmp_path, [new], "--threshold", "1", out=out) == 0
    assert (out / "a.jpg").read_bytes() == mine
    first = [item["annotated"] for item in json.loads((out / "predictions.json").read_text())["images"]]
    assert first == [str(out / "a-1.jpg"), str(out / "b.jpg")]
    assert _predict(tmp_path, [new], "--threshold", "1", out=out) == 0  # a rerun: its own copies, refreshed
    again = [item["annotated"] for item in json.loads((out / "predictions.json").read_text())["images"]]
    assert again == first and (out / "a.jpg").read_bytes() == mine
    assert sorted(p.name for p in out.iterdir()) == ["a-1.jpg", "a.jpg", "b.jpg", "predictions.json"]
    (out / "predictions.json").unlink()  # a run cut short before writing it: its copies are still its own
    assert _predict(tmp_path, [new], "--threshold", "1", out=out) == 0
    assert [item["annotated"] for item in json.loads((out / "predictions.json").read_text())["images"]] == first
    assert (out / "a.jpg").read_bytes() == mine


def test_predict_names_labels_from_the_training_data_of_a_checkpoint(tmp_path, monkeypatch, mlflow_store_restored):
    """A checkpoint folder without categories.json (the ``final/`` folder of ``engine.fit``: weights,
    config.json, lineage.json) was labelled with bare class indices ("17") although its lineage
    names the training data, whose manifest the other pipelines read the class names from
    (README: fine-tuning, evaluate). predict now reads the same sources."""
    from dino_scale.data.manifest import FORMAT

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "train"
    data.mkdir()
    names = {i: f"thing-{i}" for i in range(91)}
    (data / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "num_images": 0, "shards": [],
        "categories": [{"id": i, "name": n} for i, n in names.items()]}))
    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    (ckpt / "lineage.json").write_text(json.dumps({"train_dir": str(data)}))
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "a.jpg")
    assert main([str(tmp_path / "a.jpg"), "--model", str(ckpt), "--out", str(tmp_path / "out"), "--threshold", "0",
                 "--work-dir", str(tmp_path / "runs")]) == 0
    (item,) = json.loads((tmp_path / "out" / "predictions.json").read_text())["images"]
    assert item["detections"] and all(d["label"] == names[d["category_id"]] for d in item["detections"])


def test_predict_boxes_lie_inside_the_image(tmp_path, monkeypatch, mlflow_store_restored):
    """A box the model places across the image border (cx - w/2 < 0: an object cut by the frame)
    was written as it came, e.g. [-3.0, 17.0, 13.0, 33.0] on a 40x40 image: a consumer cropping
    ``img[y1:y2, x1:x2]`` with it gets an empty or wrapped slice. predictions.json boxes are now
    clipped to the image, 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height."""
    import torch

    from dino_scale.models.postprocess import PostProcess

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    forward = PostProcess.forward

    def across_the_border(self, outputs, target_sizes):
        res = forward(self, outputs, target_sizes)
        for r in res:
            r["boxes"][0] = torch.tensor([-3.0, 17.0, 13.0, 33.0])
            r["boxes"][1] = torch.tensor([30.0, -5.0, 70.0, 60.0])
        return res

    monkeypatch.setattr(PostProcess, "forward", across_the_border)
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "a.jpg")
    assert _predict(tmp_path, [tmp_path / "a.jpg"], "--threshold", "0") == 0
    (item,) = json.loads((tmp_path / "out" / "predictions.json").read_text())["images"]
    boxes = {tuple(d["box"]) for d in item["detections"]}
    assert (0.0, 17.0, 13.0, 33.0) in boxes and (30.0, 0.0, 64.0, 48.0) in boxes
    assert all(0 <= x1 <= x2 <= 64 and 0 <= y1 <= y2 <= 48 for x1, y1, x2, y2 in boxes)


def test_predict_reads_every_decodable_format_and_reports_other_files(tmp_path, monkeypatch, capsys,
                                                                      mlflow_store_restored):
    """A folder's GIFs (animated: the first frame), PGM (16-bit), TGA or upper-case suffixes are
    predicted like JPEGs (the decoder reads them; was: a .gif, .pgm or .tga was silently left
    out); its other files are listed in predictions.json ("skipped") and counted in the summary,
    and a folder of only such files names them in its error."""
    import numpy as np

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(photos / "A.JPG")
    frames = [Image.new("P", (36, 24), i) for i in (3, 9)]
    frames[0].save(photos / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(np.full((20, 28), 40000, dtype=np.uint16)).save(photos / "depth.pgm")
    Image.new("RGB", (16, 12), (10, 200, 10)).save(photos / "sub" / "b.TGA")
    (photos / "notes.txt").write_text("not an image")
    (photos / "sub" / "phone.heic").write_bytes(b"\0" * 64)
    assert _predict(tmp_path, [photos], "--threshold", "1") == 0
    pred = json.loads((tmp_path / "out" / "predictions.json").read_text())
    sizes = {Path(item["file"]).name: (item["width"], item["height"]) for item in pred["images"]}
    assert sizes == {"A.JPG": (40, 30), "anim.gif": (36, 24), "depth.pgm": (28, 20), "b.TGA": (16, 12)}
    assert pred["failed"] == [] and pred["skipped"] == [str(photos / "notes.txt"), str(photos / "sub" / "phone.heic")]
    assert "2 file(s) without an image suffix skipped (.heic, .txt)" in capsys.readouterr().out
    from pipelines._common import UsageError

    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.HEIC").write_bytes(b"x")
    with pytest.raises(UsageError, match=r"no images found in .*only \(1 file\(s\) without an image suffix "
                                         r"skipped \(\.heic\); name such a file to read it anyway\)"):
        list_images([str(tmp_path / "only")])


def test_an_image_failing_past_decoding_is_reported_and_the_others_go_on(tmp_path, monkeypatch,
                                                                         mlflow_store_restored):
    """A 70000x4 PNG decodes, but its annotated copy cannot be a JPEG (65500 px at most): the run
    stopped there (exit 1), the images after it never predicted and no predictions.json written.
    Then it was listed under "failed", its detections thrown away. Now its entry has them, with
    the copy's error, and the run goes on."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "c.jpg"):
        Image.new("RGB", (64, 48), (90, 90, 90)).save(photos / name)
    Image.new("RGB", (70000, 4), (90, 90, 90)).save(photos / "b.png")
    ckpt = _tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    assert main([str(photos), "--model", str(ckpt), "--out", str(out), "--work-dir", str(tmp_path / "runs")]) == 0
    pred = json.loads((out / "predictions.json").read_text())
    assert [Path(item["file"]).name for item in pred["images"]] == ["a.jpg", "b.png", "c.jpg"] and pred["complete"]
    wide = pred["images"][1]
    assert wide["annotated"] is None and "OSError" in wide["annotated_error"] and pred["failed"] == []
    assert (wide["width"], wide["height"]) == (70000, 4) and isinstance(wide["detections"], list)
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg", "c.jpg", "predictions.json"]


def test_predict_loads_an_official_file_with_its_own_labelbook_and_a_cuda_trained_config(
        tmp_path, monkeypatch, mlflow_store_restored):
    """An official ``.pth`` of 5 classes keeps the default denoising labelbook of 91 (two settings
    in the official code): it was refused ('label_enc.weight: checkpoint (92, 64) vs model (6, 64)',
    asking for a --preset that could not help). A model whose config says msda_backend=cuda (it
    trained on GPUs) failed on this CPU ('backend cuda needs CUDA tensors')."""
    import torch

    from dino_scale.config import preset, to_dict
    from dino_scale.engine.checkpoint import save_weights
    from dino_scale.models import build_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Image.new("RGB", (64, 48)).save(tmp_path / "a.jpg")
    five = build_model(preset("tiny", ["model.num_classes=5", "model.dn_labelbook_size=91"]).model)
    torch.save({"model": five.state_dict()}, tmp_path / "custom.pth")
    assert main([str(tmp_path / "a.jpg"), "--model", str(tmp_path / "custom.pth"), "--preset", "tiny",
                 "--out", str(tmp_path / "out1"), "--work-dir", str(tmp_path / "runs")]) == 0
    cfg = preset("tiny", ["model.num_classes=91", "model.msda_backend=cuda"])
    save_weights(tmp_path / "gpu_trained", build_model(preset("tiny").model).state_dict(), config=to_dict(cfg))
    assert main([str(tmp_path / "a.jpg"), "--model", str(tmp_path / "gpu_trained"),
                 "--out", str(tmp_path / "out2"), "--work-dir", str(tmp_path / "runs")]) == 0

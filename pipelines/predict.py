"""Detect objects in image files: annotated copies + ``predictions.json``.

    python -m pipelines.predict img1.jpg photos/ --model models:/dino-tiny-coco@champion \\
        --out predictions/ [--threshold 0.3]

For each image, ``<out>/<name>.jpg`` has the kept boxes drawn with label and score
(``<name>-<i>.jpg`` where that name is an input image, another image's copy or a file this
command did not write: inputs are never overwritten, even with ``--out`` the input folder, and
a file in ``--out`` only when it is an annotated copy: JPEG comment :data:`MARK`), and
``<out>/predictions.json`` lists ``{"file", "annotated" (absolute paths), "width", "height", "detections": [{"label",
"category_id", "score", "box": [x1, y1, x2, y2]}], "nonfinite"}`` (original pixels, clipped to the
image). A folder's files without an image suffix (:data:`IMAGE_SUFFIXES`, any case) are listed
(``skipped``) and counted in the summary. Unreadable images, and images that fail past
decoding (an annotated copy too large for a JPEG ...), are listed under ``failed``, not fatal;
so are detections with a NaN/inf score or box (a diverged model; ``nonfinite`` per
image, ``detections_nonfinite`` in all), and when no detection of any image is finite the exit
status is 1. An image whose annotated copy cannot be written keeps its detections (``"annotated":
null`` and ``"annotated_error"``). Files are written whole or not at all (a temporary file
renamed): a run cut short never leaves half a JSON document or image, and predictions.json is
written however the run ends (``"complete": false`` when cut short). A predictions.json of an
earlier run that lists images this run did not predict is kept as ``predictions.<n>.json``, and
the annotated copies it lists for them are not written over.
``--device auto`` (default) runs on the first GPU when there is one.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from pipelines import _common as common
# what a folder is searched for, and what predict wrote (its inputs: pipelines/predict_inputs.py)
from pipelines.predict_inputs import IMAGE_SUFFIXES, MARK, _is_copy, _is_predictions_file, _skipped_text, list_images

__all__ = ["IMAGE_SUFFIXES", "MARK", "build_parser", "list_images", "main", "output_path"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False, prog="python -m pipelines.predict",
        description="Run a model on image files (or folders of images), save each image with "
                    "its boxes drawn, and write predictions.json.")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--model", required=True,
                   help="models:/name@alias, models:/name/N, models:/name/latest, runs:/<id>/model, a checkpoint "
                        "folder/file, or an official .pth (then give --preset)")
    p.add_argument("--out", default="predictions", help="output folder (default ./predictions)")
    p.add_argument("--threshold", type=float, default=0.3, help="minimum score to keep (default 0.3)")
    p.add_argument("--preset", default=None,
                   help="preset of a model without config (official .pth); default: r50_4scale where the model "
                        "runs on a GPU, else tiny")
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (default: the first GPU when there is one, else the CPU), cpu, "
                        "cuda, cuda:N")
    p.add_argument("--work-dir", default="./runs",
                   help="work folder of the default MLflow store, <work-dir>/mlflow.db (default ./runs); "
                        "MLFLOW_TRACKING_URI overrides it")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def name_key(path: Path) -> str:
    """How :func:`output_path` compares names: the resolved path, case folded (``IMG_1.JPG`` and
    ``IMG_1.jpg`` are one file on macOS, Windows and FAT/exFAT camera cards)."""
    return str(path.resolve()).casefold()


def output_path(out: Path, image: Path, index: int, taken: set[str], reusable: frozenset = frozenset()) -> Path:
    """``out/<stem>.jpg``, or ``out/<stem>-<index>[-k].jpg`` when that name is ``taken`` (the
    :func:`name_key` of an input image, a file predict must not overwrite, or an annotated copy of
    this run or listed by an earlier run's predictions): never overwrites either, but a name in
    ``reusable`` (a copy listed for this same image only). Adds the chosen name to ``taken``."""
    candidates = [out / f"{image.stem}.jpg", out / f"{image.stem}-{index}.jpg"]
    k = 1
    while True:
        for target in candidates:
            if name_key(target) not in taken or name_key(target) in reusable:
                taken.add(name_key(target))
                return target
        candidates = [out / f"{image.stem}-{index}-{k}.jpg"]
        k += 1


def foreign_files(out: Path) -> set[Path]:
    """The resolved ``.jpg`` files in ``out`` that no earlier run wrote: every one but the
    annotated copies (marked with :data:`MARK`, or listed in ``out/predictions.json``: copies of
    a run cut short before it wrote the list are marked). Like the inputs, never overwritten."""
    ours: set[Path] = set()
    try:
        listed = json.loads((out / "predictions.json").read_text())["images"]
        ours = {Path(item["annotated"]).resolve() for item in listed if item.get("annotated")}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {p.resolve() for p in out.iterdir() if p.suffix.lower() == ".jpg" and p.resolve() not in ours
            and not _is_copy(p)}


def preprocess(image, eval_size: int, max_size: int, pad_multiple: Optional[int] = None):
    """PIL RGB image -> ImageNet-normalized float (1,3,H,W), resized as the evaluation
    transform does (short side ``eval_size``, long side <= ``max_size``), and its padding mask
    (1,H,W): all False, unless ``pad_multiple`` (the model's ``data.pad_multiple``, as evaluation
    collates) pads H and W up to a multiple of it (zeros, mask True there)."""
    import numpy as np
    import torch
    from torchvision.transforms.v2 import functional as F

    from dino_scale.data.transforms import dino_resize_size, normalize_batch

    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    oh, ow = dino_resize_size(tuple(x.shape[-2:]), eval_size, max_size)
    if (oh, ow) != tuple(x.shape[-2:]):
        x = F.resize(x, [oh, ow], antialias=True)
    if pad_multiple:
        ph, pw = -(-oh // pad_multiple) * pad_multiple, -(-ow // pad_multiple) * pad_multiple
        x = torch.nn.functional.pad(x, (0, pw - ow, 0, ph - oh))
    mask = torch.ones(1, *x.shape[-2:], dtype=torch.bool)
    mask[:, :oh, :ow] = False
    return normalize_batch(x.unsqueeze(0), mask), mask


def draw(image, detections: list[dict], path: Path) -> None:
    from PIL import ImageDraw

    from dino_scale.engine.checkpoint import atomic_write_bytes

    im = image.copy()
    d = ImageDraw.Draw(im)
    for det in detections:
        x1, y1, x2, y2 = det["box"]
        x1, x2 = sorted((min(max(x1, 0), im.width - 1), min(max(x2, 0), im.width - 1)))
        y1, y2 = sorted((min(max(y1, 0), im.height - 1), min(max(y2, 0), im.height - 1)))
        d.rectangle([x1, y1, x2, y2], outline=(255, 40, 40), width=2)
        text = f"{det['label']} {det['score']:.2f}"
        d.rectangle([x1, max(0, y1 - 12), x1 + 6 * len(text) + 4, y1], fill=(255, 40, 40))
        d.text((x1 + 2, max(0, y1 - 12)), text, fill=(255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92, comment=MARK)
    atomic_write_bytes(path, buf.getvalue())  # a kill mid-save leaves no half image


def pick_device(name: str):
    """``--device``: ``auto`` is the first GPU when torch sees one, else the CPU; a GPU named on a
    machine without one is a usage error (the model ran on the CPU whatever the machine had)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise common.UsageError(f"--device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise common.UsageError(f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s) here")
    if device.type not in ("cpu", "cuda"):
        raise common.UsageError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def listed_copies(out: Path) -> dict[Path, set[Path]]:
    """The resolved annotated copies that ``out``'s predictions files (``predictions.json`` and
    the kept ``predictions.<n>.json``) list, each with the resolved images it is listed for: a
    rerun on other images wrote its copies over them (``p2/cat.jpg`` over ``p1/cat.jpg``'s
    ``cat.jpg``), and the kept list then showed another image under an entry. Only a copy listed
    for one image may be replaced, by that image's new copy (it shows the same image); another
    image of the same run took its name, whose copy it was not."""
    copies: dict[Path, set[Path]] = {}
    for path in sorted(out.glob("predictions*.json")):
        if not _is_predictions_file(path):
            continue
        try:
            for item in json.loads(path.read_text()).get("images", []):
                if item.get("annotated"):
                    copies.setdefault(Path(item["annotated"]).resolve(), set()).add(Path(item["file"]).resolve())
        except (OSError, ValueError, AttributeError, TypeError, KeyError):
            continue  # not one of ours, or damaged: its copies are the user's files to foreign_files
    return copies


def keep_earlier_predictions(path: Path, results: list[dict], log) -> Optional[Path]:
    """Before ``path`` (predictions.json) is replaced: when it lists images this run did not
    predict (a rerun on other images, or one whose every image failed), it is kept as
    ``predictions.<n>.json`` (the first free n), with a note: the rerun replaced it, and the
    earlier images' annotated copies stayed in the folder with nothing listing them."""
    from dino_scale.engine.checkpoint import atomic_write_bytes

    try:
        earlier = path.read_bytes()
    except OSError:
        return None
    try:
        doc = json.loads(earlier)
        if not (isinstance(doc, dict) and "model" in doc and isinstance(doc.get("images"), list)):
            raise ValueError("not written by predict")  # was replaced unsaid when it had no "images"
        listed = {str(Path(item["file"]).resolve()) for item in doc["images"]}
    except (ValueError, AttributeError, TypeError, KeyError):
        listed = {None}  # not one of ours, or damaged: kept whole
    listed -= {str(Path(item["file"]).resolve()) for item in results}
    if not listed:
        return None
    n = 1
    while path.with_name(f"predictions.{n}.json").exists():
        n += 1
    kept = path.with_name(f"predictions.{n}.json")
    atomic_write_bytes(kept, earlier)
    log(f"note: the earlier {path.name} listed {len(listed)} image(s) this run did not predict; kept as {kept.name}")
    return kept


def _categories(resolved) -> dict[int, str]:
    """Class index -> name: the model's categories.json, else the manifest of the data its lineage
    names (:func:`pipelines._init._source_categories`, as fine-tuning and evaluate read them)."""
    from pipelines._init import _source_categories

    return {int(c["id"]): str(c["name"]) for c in _source_categories(resolved) or []}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    log = common.Progress("predict")
    if not 0.0 <= args.threshold <= 1.0:
        raise common.UsageError("--threshold must be in [0, 1]")
    if args.preset is not None:
        common.resolve_preset_name(args.preset)  # a typo fails here, whether or not it is used
    device = pick_device(args.device)  # before the model is read: a GPU asked for that is not here
    out = Path(args.out).expanduser()  # '~' the shell left (quoted, or after '=')
    common.setup_tracking(args.work_dir, create=False)  # a lookup: a mistyped --work-dir is not created
    from pipelines._init import check_exists

    check_exists(args.model)  # before the image folders are walked (large trees take a while)
    skipped: list[Path] = []
    files = list_images(args.images, skip_dir=out, skipped=skipped)
    if skipped:
        log(f"note: {_skipped_text(skipped)}; listed in predictions.json")
    import torch
    from PIL import Image

    from dino_scale.data.decode import decode_image
    from dino_scale.engine.checkpoint import atomic_write_text
    from dino_scale.engine.evaluate import finite_detections
    from dino_scale.models import build_dino
    from dino_scale.models.official import CheckpointMismatch, load_official_state_dict
    from pipelines._init import _source_state, head_sizes, preset_misfit, resolve

    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise common.UsageError(f"--out {out}: a file is in the way; --out names a folder") from None
    taken = {name_key(f) for f in files} | {name_key(f) for f in foreign_files(out)}  # nor the user's files in --out
    # nor the copies an earlier run's predictions list, but each image's own (listed for it alone)
    listed = listed_copies(out)
    taken |= {name_key(c) for c in listed}
    own: dict[Path, set[str]] = {}
    for copy, images in listed.items():
        if len(images) == 1:
            own.setdefault(next(iter(images)), set()).add(name_key(copy))
    with tempfile.TemporaryDirectory(prefix="dino_scale_predict_") as download:  # gone once loaded
        resolved = resolve(args.model, Path(download))
        cfg = resolved.config
        state = _source_state(resolved.weights_path)
        names = _categories(resolved)
    if cfg is not None and args.preset is not None and args.preset != cfg.name:
        log(f"note: --preset {args.preset} ignored; the model carries its config ({cfg.name})")
    if cfg is None:
        # the default preset: that of the device the model runs on (--device cpu on a GPU node: tiny)
        cfg = common.preset(common.resolve_preset_name(args.preset, device.type != "cpu"), head_sizes(state))
        log(f"note: the model carries no config; using {'--preset' if args.preset else 'the default preset'} "
            f"{cfg.name} (its eval size and num_select too)")
    # the weights replace the whole model: the ImageNet file its training started from (config
    # model.backbone_weights, often a path on the training cluster) is not read; the attention
    # backend is this machine's choice (a model trained with msda_backend=cuda runs here on the CPU)
    model, _, post = build_dino(dataclasses.replace(cfg.model, backbone_weights=None, msda_backend=None))
    try:
        load_official_state_dict(model, state)
    except CheckpointMismatch as exc:
        if resolved.config is not None:  # the model's own config: a damaged or foreign checkpoint
            raise
        raise preset_misfit(args.model, cfg.name, args.preset is not None, exc) from None
    model.to(device).eval()
    log(f"model {args.model} ({cfg.name}, {cfg.model.num_classes} classes) on {device}; {len(files)} image(s)")
    from dino_scale.config_checks import scaled_size

    size = scaled_size(cfg.data.eval_size, cfg.data.scale_factor)  # as evaluation sizes it (1333 x 1.5: 1999)
    max_size = scaled_size(cfg.data.eval_max_size, cfg.data.scale_factor)
    results, failed, nonfinite, finite_total, no_copy = [], [], 0, 0, 0
    done = False
    try:  # predictions.json is written however the loop ends (Ctrl-C included: "complete": false)
        for i, f in enumerate(files, 1):
            try:  # the training decoder: any mode -> RGB, EXIF orientation applied (phone photos)
                image = Image.fromarray(decode_image(f.read_bytes()))
            except (OSError, ValueError) as exc:  # ImageDecodeError is a ValueError
                failed.append({"file": os.path.abspath(f), "error": str(exc).splitlines()[0]})
                log(f"skipped unreadable image {f}: {failed[-1]['error']}")
                continue
            try:  # one image that fails past decoding (its annotated copy too large for JPEG ...) is reported
                x, mask = preprocess(image, size, max_size, cfg.data.pad_multiple)
                with torch.no_grad():
                    outputs = model(x.to(device), mask.to(device))
                    res = post(outputs, torch.tensor([[image.size[1], image.size[0]]], device=device))[0]
                dets = []
                # those with a NaN/inf score or box are dropped and counted (drawing one raised; JSON has no NaN)
                rows = zip(res["scores"].tolist(), res["labels"].tolist(), res["boxes"].tolist())
                finite, dropped = finite_detections([{"score": s, "category_id": l, "bbox": b} for s, l, b in rows])
                w, h = image.size
                for score, label, (x1, y1, x2, y2) in ((d["score"], d["category_id"], d["bbox"]) for d in finite):
                    if score >= args.threshold:  # boxes across the border are clipped to the image
                        box = [min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w),
                               min(max(y2, 0.0), h)]
                        dets.append({"label": names.get(int(label), str(int(label))), "category_id": int(label),
                                     "score": round(float(score), 4), "box": [round(float(v), 2) for v in box]})
            except Exception as exc:  # noqa: BLE001 - counted and reported; the other images go on
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                failed.append({"file": os.path.abspath(f), "error": f"{type(exc).__name__}: {first_line}"})
                log(f"failed on image {f}: {failed[-1]['error']}")
                continue
            nonfinite, finite_total = nonfinite + dropped, finite_total + len(finite)
            entry = {"file": os.path.abspath(f), "annotated": None, "width": image.size[0], "height": image.size[1],
                     "detections": dets, "nonfinite": dropped}
            try:  # a copy that cannot be written (too large for a JPEG ...) loses the copy, not the detections
                target = output_path(out, f, i, taken, frozenset(own.get(f.resolve(), ())))
                draw(image, dets, target)
                entry["annotated"] = os.path.abspath(target)
            except Exception as exc:  # noqa: BLE001 - reported with the image's entry
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                entry["annotated_error"] = f"{type(exc).__name__}: {first_line}"
                no_copy += 1
                log(f"no annotated copy of {f}: {entry['annotated_error']} (its detections are in predictions.json)")
            results.append(entry)
            log(f"[{i}/{len(files)}] {f.name}: {len(dets)} box(es) >= {args.threshold}"
                + (f"; {dropped} detection(s) with a NaN/inf score or box dropped" if dropped else ""))
        done = True
    finally:
        try:
            keep_earlier_predictions(out / "predictions.json", results, log)
        except OSError as exc:  # this run's predictions.json is written all the same
            log(f"warning: could not keep the earlier predictions.json ({exc})")
        atomic_write_text(out / "predictions.json", json.dumps(
            {"model": args.model, "threshold": args.threshold, "complete": done, "images": results,
             "failed": failed, "skipped": [os.path.abspath(f) for f in skipped],
             "detections_nonfinite": nonfinite}, indent=2))
    print(f"wrote {len(results) - no_copy} annotated image(s) and {out / 'predictions.json'}"
          + (f" ({no_copy} image(s) without an annotated copy: \"annotated_error\")" if no_copy else "")
          + (f"; {len(failed)} image(s) failed (listed as \"failed\")" if failed else "")
          + (f"; {_skipped_text(skipped)}" if skipped else ""))
    if nonfinite and not finite_total:  # a diverged model: no output to read as "nothing found"
        print(f"error: every detection has a NaN/inf score or box ({nonfinite} in {len(results)} image(s)): the "
              f"model's outputs hold NaN/inf; exit status 1", file=sys.stderr, flush=True)
        return 1
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(common.run_main(main))

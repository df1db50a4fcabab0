"""Synthetic detection data: JPEG files + a COCO-format JSON, for demos and tests.

Each class is a (shape, colour) pair drawn on a textured, low-saturation background,
so the tiny model can learn it. Objects vary in size (6%..45% of the short side),
aspect and count (0..6 per image; about 8% of the images are empty negatives).

Flavours:
- ``o365-like``: 36 categories with ids 1..36 (``num_classes=366`` works), file names
  nested as Objects365 does (``images/v1/patchN/objects365_v1_XXXXXXXX.jpg``, files
  stored under ``<images>/patchN/``), annotations carry ``isfake``/``isreflected``.
- ``coco-like``: 10 categories with sparse COCO ids (1..90, ``num_classes=91``);
  eight names (person, bicycle, car, bird, cat, dog, bottle, chair) are shared with
  ``o365-like`` and drawn the same way, so a head mapped by name transfers; a few
  crowd regions (``iscrowd=1``) mark groups of small objects.

CLI: ``python -m dino_scale.data.synthetic --flavour coco-like --out DIR --num-images N --seed S``
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["generate", "categories", "FLAVOURS"]

FLAVOURS = ("o365-like", "coco-like")
SHAPES = ("rect", "ellipse", "triangle", "diamond", "cross", "ring", "star")
COLOURS = {"red": (225, 35, 35), "green": (30, 190, 60), "blue": (35, 75, 230), "yellow": (240, 215, 30),
           "magenta": (210, 40, 210), "cyan": (30, 205, 215)}
_O365_NAMES = [
    "person", "car", "chair", "bottle", "cup", "dog", "cat", "bird", "bicycle", "boat", "bus", "truck",
    "umbrella", "bench", "lamp", "hat", "book", "plate", "helmet", "pillow", "glove", "flower", "vase", "bowl",
    "flag", "speaker", "clock", "sneakers", "handbag", "desk", "traffic light", "backpack", "tent", "guitar",
    "drum", "horse",
]
# shared names take the o365-like appearance; COCO ids from the 2017 label map
_COCO = [(1, "person"), (2, "bicycle"), (3, "car"), (16, "bird"), (17, "cat"), (18, "dog"), (44, "bottle"),
         (62, "chair"), (38, "kite"), (90, "toothbrush")]


def _appearance() -> dict[str, tuple[str, str]]:
    colours = list(COLOURS)
    look = {name: (SHAPES[i // len(colours)], colours[i % len(colours)]) for i, name in enumerate(_O365_NAMES)}
    look["kite"] = ("star", "red")
    look["toothbrush"] = ("star", "cyan")
    return look


def categories(flavour: str) -> list[dict]:
    """[{id, name, shape, colour}] of a flavour."""
    look = _appearance()
    if flavour == "o365-like":
        pairs = list(enumerate(_O365_NAMES, 1))
    elif flavour == "coco-like":
        pairs = _COCO
    else:
        raise ValueError(f"unknown flavour {flavour!r}; choose one of {FLAVOURS}")
    return [{"id": i, "name": n, "shape": look[n][0], "colour": look[n][1]} for i, n in pairs]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(70, 170, size=3)
    base = base.mean() + (base - base.mean()) * 0.25  # low saturation: the objects carry the colour
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.02, 0.15)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq) * rng.uniform(5, 20)
    grad = (xx / w - 0.5) * rng.uniform(-40, 40) + (yy / h - 0.5) * rng.uniform(-40, 40)
    noise = rng.normal(0, rng.uniform(4, 14), size=(h, w, 1))
    img = base[None, None, :] + (stripes + grad)[..., None] + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour: tuple, x: float, y: float, w: float, h: float) -> None:
    x2, y2 = x + w - 1, y + h - 1
    cx, cy = x + (w - 1) / 2, y + (h - 1) / 2
    if shape == "rect":
        draw.rectangle([x, y, x2, y2], fill=colour)
    elif shape == "ellipse":
        draw.ellipse([x, y, x2, y2], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y), (x2, y2), (x, y2)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y), (x2, cy), (cx, y2), (x, cy)], fill=colour)
    elif shape == "cross":
        tw, th = max(1.0, w / 3), max(1.0, h / 3)
        draw.rectangle([x, cy - th / 2, x2, cy + th / 2], fill=colour)
        draw.rectangle([cx - tw / 2, y, cx + tw / 2, y2], fill=colour)
    elif shape == "ring":
        draw.ellipse([x, y, x2, y2], outline=colour, width=max(2, int(min(w, h) / 4)))
    elif shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + r * (w - 1) / 2 * np.cos(a), cy + r * (h - 1) / 2 * np.sin(a)))
        ys = [p[1] for p in pts]  # stretch vertically so the star touches its box
        lo, hi = min(ys), max(ys)
        pts = [(px, y + (py - lo) / max(hi - lo, 1e-6) * (h - 1)) for px, py in pts]
        draw.polygon(pts, fill=colour)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter + 1e-9)


def _size_range(image_size) -> tuple[tuple[int, int], tuple[int, int]]:
    h, w = image_size
    h = (h, h) if isinstance(h, int) else tuple(h)
    w = (w, w) if isinstance(w, int) else tuple(w)
    return h, w  # type: ignore[return-value]


def generate(out_dir: Union[str, Path], flavour: str = "o365-like", num_images: int = 64, seed: int = 0,
             image_size=((224, 320), (256, 400)), max_objects: int = 6, empty_fraction: float = 0.08,
             quality: int = 90) -> tuple[Path, Path]:
    """Write ``num_images`` JPEGs and ``annotations.json`` under ``out_dir``.

    ``image_size``: (h, w), each an int or an inclusive (min, max) range.
    Returns (image root, annotation JSON path); feed both to :func:`convert_coco`.
    Deterministic in ``seed``.
    """
    cats = categories(flavour)
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    root = out / "images"
    root.mkdir(parents=True, exist_ok=True)
    (hlo, hhi), (wlo, whi) = _size_range(image_size)
    o365 = flavour == "o365-like"
    images, annotations = [], []
    next_id = int(rng.integers(1, 1000)) if not o365 else 1
    for n in range(num_images):
        h, w = int(rng.integers(hlo, hhi + 1)), int(rng.integers(wlo, whi + 1))
        image_id = next_id
        next_id += 1 if o365 else int(rng.integers(1, 50))
        if o365:
            rel = f"patch{n // 50}/objects365_v1_{image_id:08d}.jpg"
            file_name = f"images/v1/{rel}"
        else:
            rel = file_name = f"{image_id:012d}.jpg"
        img = Image.fromarray(_background(rng, h, w))
        draw = ImageDraw.Draw(img)
        count = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_objects + 1))
        placed: list[tuple[float, float, float, float]] = []
        for _ in range(count):
            cat = cats[int(rng.integers(len(cats)))]
            for _try in range(20):
                side = min(h, w) * float(np.exp(rng.uniform(np.log(0.06), np.log(0.45))))
                aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
                bw, bh = max(6, round(side * np.sqrt(aspect))), max(6, round(side / np.sqrt(aspect)))
                if bw >= w or bh >= h:
                    continue
                box = (float(rng.integers(0, w - bw + 1)), float(rng.integers(0, h - bh + 1)), float(bw), float(bh))
                if all(_iou(box, p) < 0.2 for p in placed):
                    break
            else:
                continue
            placed.append(box)
            _draw(draw, cat["shape"], COLOURS[cat["colour"]], *box)
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": cat["id"],
                   "bbox": [round(v, 2) for v in box], "area": round(box[2] * box[3], 2), "iscrowd": 0}
            if o365:
                ann["isfake"] = int(rng.random() < 0.02)
                ann["isreflected"] = 0
            annotations.append(ann)
        if not o365 and count and rng.random() < 0.05:  # a crowd region of small same-class objects
            cat = cats[int(rng.integers(len(cats)))]
            s = max(6, int(min(h, w) * 0.06))
            gx, gy = int(rng.integers(0, max(1, w - 4 * s))), int(rng.integers(0, max(1, h - 2 * s)))
            for k in range(4):
                _draw(draw, cat["shape"], COLOURS[cat["colour"]], gx + k * s, gy + (k % 2) * s, s - 1, s - 1)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat["id"],
                                "bbox": [float(gx), float(gy), float(4 * s - 1), float(2 * s - 1)],
                                "area": float(4 * (s - 1) ** 2), "iscrowd": 1})
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="JPEG", quality=quality)
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
    doc = {"info": {"description": f"dino_scale synthetic {flavour}", "seed": seed}, "licenses": [],
           "images": images, "annotations": annotations,
           "categories": [{"id": c["id"], "name": c["name"], "supercategory": c["shape"]} for c in cats]}
    ann_path = out / "annotations.json"
    ann_path.write_text(json.dumps(doc))
    return root, ann_path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--flavour", choices=FLAVOURS, default="o365-like")
    p.add_argument("--out", required=True)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=224, help="smallest image side range start")
    p.add_argument("--max-size", type=int, default=400, help="largest image side")
    a = p.parse_args(argv)
    if a.num_images < 1 or not 1 <= a.min_size <= a.max_size:  # numpy's "low >= high" traceback, before
        p.error(f"--num-images must be >= 1 and 1 <= --min-size <= --max-size, got {a.num_images}, "
                f"{a.min_size} and {a.max_size}")
    root, ann = generate(a.out, a.flavour, a.num_images, a.seed,
                         image_size=((a.min_size, max(a.min_size, a.max_size * 4 // 5)), (a.min_size, a.max_size)))
    print(f"images: {root}\nannotations: {ann}")


if __name__ == "__main__":
    main()

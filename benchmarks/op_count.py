"""Operator calls per DINO forward, inside the compiled regions vs the eager glue between them.

On a GPU a DINO step at batch 2 is bound by the host (benchmarks/README.md): every operator
call outside a compiled region costs host time whatever its size. This counts the ATen
operator calls of one forward (after one warm-up forward at the same size) on the meta device,
at the real input size, in seconds on any machine, and attributes the eager ones to the
``dino_scale`` function that issued them. The regions are those of
``dino_scale.models.compile.compile_regions`` at the chosen granularity (backbone body, the
levels' masks and position embeddings, plus encoder/decoder layers or whole stacks). The
``loss`` row counts one criterion call (matching + every loss, on the CPU at the real output
shapes) against the regions of ``compile_criterion``.

    python benchmarks/op_count.py                                  # r50_4scale, train + eval
    python benchmarks/op_count.py --preset swinl_4scale --granularity stack
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dino_scale.config import PRESETS, preset  # noqa: E402
from dino_scale.models import build_dino  # noqa: E402
from dino_scale.models.compile import _GRANULARITY, method_owner, region_methods  # noqa: E402


class _Counter(TorchDispatchMode):
    def __init__(self, in_region):
        super().__init__()
        self.in_region = in_region
        self.region_ops = 0
        self.glue: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.in_region():
            self.region_ops += 1
        else:
            frames = [f for f in traceback.extract_stack() if "/dino_scale/" in f.filename]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "(outside dino_scale)"
            self.glue[where] += 1
        return func(*args, **(kwargs or {}))


def _wrap_methods(root: torch.nn.Module, paths, depth: list) -> None:
    """Make each method at ``paths`` (from ``root``) count as a region while it runs."""
    def region_method(method):
        def wrapped(*args, **kwargs):
            depth[0] += 1
            try:
                return method(*args, **kwargs)
            finally:
                depth[0] -= 1
        return wrapped

    for path in paths:
        owner, attr = method_owner(root, path)
        setattr(owner, attr, region_method(getattr(owner, attr)))


def count_criterion(name: str, batch: int, boxes: int) -> dict:
    """Operator calls of one criterion forward (matching + all losses) on decoder outputs of the
    real shapes: on the CPU (the matcher solves on the host, which the meta device cannot feed),
    with outputs built as the model lays them out (denoising slots from ``prepare_for_cdn``)."""
    from dino_scale.models.compile import CRITERION_REGIONS
    from dino_scale.models.denoising import dn_post_process, prepare_for_cdn

    cfg = preset(name).model
    torch.manual_seed(0)
    _, criterion, _ = build_dino(cfg)
    targets = [{"labels": torch.randint(0, cfg.num_classes, (boxes,)), "boxes": torch.rand(boxes, 4) * 0.4 + 0.2}
               for _ in range(batch)]
    _, _, _, dn_meta = prepare_for_cdn(targets, cfg.dn_number, 0.5, 1.0, cfg.num_queries, cfg.num_classes, 8,
                                       torch.nn.Embedding(cfg.dn_labelbook_size + 1, 8))
    queries = dn_meta["pad_size"] + cfg.num_queries
    logits, coords = dn_post_process(torch.randn(cfg.dec_layers, batch, queries, cfg.num_classes),
                                     torch.rand(cfg.dec_layers, batch, queries, 4) * 0.5 + 0.25, dn_meta)
    outputs = {"pred_logits": logits[-1], "pred_boxes": coords[-1],
               "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], coords[:-1])],
               "interm_outputs": {"pred_logits": torch.randn(batch, cfg.num_queries, cfg.num_classes),
                                  "pred_boxes": torch.rand(batch, cfg.num_queries, 4) * 0.5 + 0.25},
               "dn_meta": dn_meta}
    depth = [0]
    _wrap_methods(criterion, CRITERION_REGIONS, depth)
    criterion(outputs, targets)  # warm-up
    counter = _Counter(lambda: depth[0] > 0)
    with counter:
        criterion(outputs, targets)
    return {"preset": name, "mode": "loss", "granularity": "criterion", "batch": batch,
            "region_ops": counter.region_ops, "glue_ops": sum(counter.glue.values()),
            "glue_by_function": dict(counter.glue.most_common())}


def count(name: str, mode: str, granularity: str, batch: int, height: int, width: int, boxes: int) -> dict:
    cfg = preset(name).model
    with torch.device("meta"):
        model, _, _ = build_dino(cfg)
    body = model.backbone[0]
    region_types = _GRANULARITY[granularity]["modules"]
    depth = [0]

    def is_region(m):
        return m is body or type(m).__name__ in region_types

    def pre(m, _args):
        depth[0] += is_region(m)

    def post(m, _args, _out):
        depth[0] -= is_region(m)

    _wrap_methods(model, region_methods(granularity), depth)  # compiled methods (compile_regions, backbone=True)
    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
             torch.nn.modules.module.register_module_forward_hook(post)]
    try:
        images = torch.empty(batch, 3, height, width, device="meta")
        masks = torch.zeros(batch, height, width, dtype=torch.bool, device="meta")
        targets = [{"labels": torch.zeros(boxes, dtype=torch.long, device="meta"),
                    "boxes": torch.empty(boxes, 4, device="meta")} for _ in range(batch)]
        model.train(mode == "train")
        with torch.set_grad_enabled(mode == "train"):
            model(images, masks, targets if mode == "train" else None)  # warm-up: per-size caches
            counter = _Counter(lambda: depth[0] > 0)
            with counter:
                model(images, masks, targets if mode == "train" else None)
    finally:
        for h in hooks:
            h.remove()
    return {"preset": name, "mode": mode, "granularity": granularity, "batch": batch,
            "region_ops": counter.region_ops, "glue_ops": sum(counter.glue.values()),
            "glue_by_function": dict(counter.glue.most_common())}


def main(argv: Optional[list[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", help="repeatable; default r50_4scale")
    p.add_argument("--granularity", choices=sorted(_GRANULARITY), default="layer")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1199)
    p.add_argument("--boxes", type=int, default=8)
    p.add_argument("--top", type=int, default=12, help="glue functions listed per row")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/op_count_<time>.json)")
    args = p.parse_args(argv)
    for name in args.preset or ():  # before the first preset is counted
        if name not in PRESETS:
            p.error(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    rows = []
    for name in args.preset or ["r50_4scale"]:
        for mode in ("train", "eval"):
            batch = args.batch_size if mode == "train" else 1
            rows.append(count(name, mode, args.granularity, batch, args.height, args.width, args.boxes))
        rows.append(count_criterion(name, args.batch_size, args.boxes))
    print(f"## operator calls per forward ({args.height}x{args.width}, {args.boxes} boxes, "
          f"regions: {args.granularity} granularity + backbone; loss: the criterion, compile_criterion's regions)")
    print("| preset | mode | bs | in compiled regions | eager glue |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['mode']} | {r['batch']} | {r['region_ops']} | {r['glue_ops']} |")
    for r in rows:
        print(f"\n{r['preset']} {r['mode']}: eager glue by function")
        for where, n in list(r["glue_by_function"].items())[:args.top]:
            print(f"  {n:6d}  {where}")
    stamp = time.strftime('%Y%m%d-%H%M%S')
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"op_count_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "args": vars(args), "rows": rows}, indent=2))
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()

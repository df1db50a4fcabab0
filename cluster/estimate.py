"""Paper estimate of time and cost for the 63+ AP recipe (Objects365 pretrain + COCO fine-tune).

    python cluster/estimate.py                      # the README table (official-code anchors)
    python cluster/estimate.py --img-per-s 9.5      # plug in a measured per-GPU throughput
    python cluster/estimate.py --json               # machine-readable

The model of a stage:

    wall_hours = epochs * images / (gpus * img_per_s_per_gpu * scale_cost * efficiency) / 3600
    gpu_hours  = wall_hours * gpus
    cost       = gpu_hours * price_per_gpu_hour

``img_per_s_per_gpu`` is a training throughput at the standard DINO input size (short side
480..800, long side <= 1333). ``scale_cost`` is 1 for pretraining and 1/1.5**2 for the 1.5x
fine-tuning scale (assumption: step cost grows with pixel count). ``efficiency`` is the
multi-node scaling efficiency (assumption). Prices are assumptions, not quotes.

The default anchors: the OFFICIAL DINO code's numbers, measured by someone else on one H100
80GB (issue 8: Swin-L 4-scale, batch 2 per GPU): 4.4 img/s with AMP + TF32 (its best) and
3.1 img/s in fp32; and this project's own `benchmarks/train_step.py` numbers for the same
shapes (benchmarks/README.md): 7.37 img/s on an H100 80GB (bf16 + TF32, eager, an earlier
tree, median of 8 steps) and 11.16 img/s on an H200 (bf16 + TF32, compiled, median of 15).
The prices are per H100-hour, so the H200 row's cost is low by the H200's price premium.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

# Recipe (DINO paper, see tests/reference/DINO-FACTS.md).
O365_IMAGES = 1_740_000  # ~1.74M Objects365 training images
O365_EPOCHS = 26
O365_GPUS = 64
COCO_IMAGES = 118_287  # COCO train2017
COCO_EPOCHS = 18
COCO_GPUS = 16
FINETUNE_SCALE = 1.5  # fine-tuning image side multiplier

# Anchors: the official DINO code, measured by someone else on one H100 80GB (issue 8), and this
# project's benchmarks/train_step.py on one GPU (benchmarks/results/train_step_h100_swinl_4scale_bf16.json,
# train_step_h200_swinl_4scale_bf16_compile.json).
ANCHORS = {
    "official Swin-L 4-scale AMP+TF32 (H100, issue 8)": 4.4,
    "official Swin-L 4-scale fp32 (H100, issue 8)": 3.1,
    "dino_scale Swin-L 4-scale bf16, eager (H100, measured)": 7.37,
    "dino_scale Swin-L 4-scale bf16, compiled (H200, measured)": 11.16,
}

# Assumptions (stated in the README; replace with your own).
EFFICIENCY = {64: 0.85, 16: 0.90}  # scaling efficiency by GPU count
PRICE_ON_DEMAND = 7.00  # USD per H100-hour (assumed, on-demand 8-GPU instance / 8)
PRICE_SPOT = 3.00  # USD per H100-hour (assumed spot/preemptible)


@dataclass
class StageEstimate:
    stage: str
    throughput_label: str
    img_per_s_per_gpu: float
    gpus: int
    efficiency: float
    images_seen: int
    wall_hours: float
    gpu_hours: float
    cost_on_demand: float
    cost_spot: float


def stage_estimate(stage: str, label: str, img_per_s: float, epochs: int, images: int, gpus: int,
                   efficiency: float, scale_cost: float = 1.0, price_on_demand: float = PRICE_ON_DEMAND,
                   price_spot: float = PRICE_SPOT) -> StageEstimate:
    """One stage of the recipe under the model in the module docstring."""
    if not (math.isfinite(img_per_s) and img_per_s > 0 and gpus > 0 and 0 < efficiency <= 1
            and math.isfinite(scale_cost) and scale_cost > 0):
        raise ValueError("throughput and scale_cost must be finite and > 0, gpus > 0, efficiency in (0, 1]")
    seen = epochs * images
    rate = gpus * img_per_s * scale_cost * efficiency  # images per second, whole cluster
    wall_h = seen / rate / 3600.0
    gpu_h = wall_h * gpus
    return StageEstimate(stage, label, img_per_s, gpus, efficiency, seen, wall_h, gpu_h,
                         gpu_h * price_on_demand, gpu_h * price_spot)


def recipe(img_per_s: float, label: str) -> list[StageEstimate]:
    """Both stages of the 63+ AP recipe for one per-GPU throughput (at standard scale)."""
    return [
        stage_estimate("Objects365 pretrain", label, img_per_s, O365_EPOCHS, O365_IMAGES, O365_GPUS,
                       EFFICIENCY[O365_GPUS]),
        stage_estimate("COCO fine-tune (1.5x)", label, img_per_s, COCO_EPOCHS, COCO_IMAGES, COCO_GPUS,
                       EFFICIENCY[COCO_GPUS], scale_cost=1.0 / FINETUNE_SCALE ** 2),
    ]


def markdown(rows: Sequence[StageEstimate]) -> str:
    head = ("| throughput source | stage | img/s/GPU | GPUs | eff. | images seen | wall h | GPU h "
            "| on-demand $ | spot $ |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r.throughput_label} | {r.stage} | {r.img_per_s_per_gpu:g} | {r.gpus} | "
                     f"{r.efficiency:.2f} | {r.images_seen / 1e6:.2f}M | {r.wall_hours:.1f} | "
                     f"{r.gpu_hours:,.0f} | {r.cost_on_demand:,.0f} | {r.cost_spot:,.0f} |")
    return "\n".join(lines)


def _throughput(text: str) -> float:
    """``--img-per-s`` value: a finite number > 0 (else a one-line usage error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--img-per-s", type=_throughput, action="append", default=None,
                   help="per-GPU training img/s at standard scale (repeatable); default: the anchors")
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = p.parse_args(argv)
    sources = ({f"given {v:g} img/s": v for v in args.img_per_s} if args.img_per_s else ANCHORS)
    rows = [row for label, v in sources.items() for row in recipe(v, label)]
    print(json.dumps([asdict(r) for r in rows], indent=2) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

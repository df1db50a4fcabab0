"""Matcher benchmark: batched (one padded (B, Q, N) cost tensor, one host copy) vs per-image
(one cost matrix and one host copy per image) vs the official layout (the full
(B*Q, sum n_i) cross-image matrix, then per-image blocks).

    python benchmarks/matcher.py [--repeats 15] [--devices cpu,cuda] [--threads N] [--clock wall|process]

Prints a table and writes benchmarks/results/matcher.json. Times are medians in ms of
(a) the cost matrices up to host numpy ("cost") and (b) the whole match including
scipy's linear_sum_assignment ("match"); plus 7 output sets (a 6-layer decoder + encoder)
matched one by one vs with ``match_many`` (one host copy for all). Torch threads: whatever torch picks (printed).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # as the other benchmarks: the device machine installs no package

from dino_scale.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou  # noqa: E402
from dino_scale.models.matcher import HungarianMatcher, _assign, pad_targets  # noqa: E402


def official_layout_cost(m: HungarianMatcher, outputs, targets):
    """The official implementation's layout: every query against every target of the batch."""
    bs, nq = outputs["pred_logits"].shape[:2]
    prob = outputs["pred_logits"].flatten(0, 1).sigmoid()
    out_bbox = outputs["pred_boxes"].flatten(0, 1)
    ids = torch.cat([t["labels"] for t in targets])
    tgt = torch.cat([t["boxes"] for t in targets])
    a, g = m.focal_alpha, m.focal_gamma
    neg = (1 - a) * prob ** g * (-(1 - prob + 1e-8).log())
    pos = a * (1 - prob) ** g * (-(prob + 1e-8).log())
    c = (m.cost_bbox * torch.cdist(out_bbox, tgt, p=1) + m.cost_class * (pos[:, ids] - neg[:, ids])
         - m.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt)))
    c = c.view(bs, nq, -1).cpu()
    sizes = [len(t["boxes"]) for t in targets]
    return [blk[i].numpy() for i, blk in enumerate(c.split(sizes, -1))]


def batched_cost(m, outputs, targets):
    labels, boxes, sizes = pad_targets(targets, outputs["pred_logits"].device)
    cost = m.cost_matrix(outputs["pred_logits"], outputs["pred_boxes"], labels, boxes).cpu().numpy()
    return [cost[b, :, :n] for b, n in enumerate(sizes)]


def per_image_cost(m, outputs, targets):
    out = []
    for b, t in enumerate(targets):
        c = m.cost_matrix(outputs["pred_logits"][b:b + 1], outputs["pred_boxes"][b:b + 1],
                          t["labels"][None], t["boxes"][None])
        out.append(c[0].cpu().numpy())
    return out


VARIANTS = {"batched": batched_cost, "per_image": per_image_cost, "official_layout": official_layout_cost}


def problem(batch, queries, classes, lo, hi, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(batch, queries, classes, generator=g).to(device),
               "pred_boxes": (torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.2).to(device)}
    sizes = torch.randint(lo, hi + 1, (batch,), generator=g).tolist()
    targets = [{"labels": torch.randint(0, classes, (n,), generator=g).to(device),
                "boxes": (torch.rand(n, 4, generator=g) * 0.5 + 0.2).to(device)} for n in sizes]
    return outputs, targets


CLOCK = time.perf_counter  # --clock process: CPU time of this process (robust on a shared host)


def timed(fn, repeats, device):
    times = []
    for _ in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = CLOCK()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((CLOCK() - t0) * 1e3)
    return statistics.median(times[2:])  # first two are warm-up


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--queries", type=int, default=900)
    ap.add_argument("--classes", type=int, default=91)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="process = CPU time (use on a shared, oversubscribed host with --threads 1)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "matcher.json"))
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    asked = [d for d in args.devices.split(",") if d]
    if not asked or any(d not in ("cpu", "cuda") for d in asked):
        ap.error(f"--devices {args.devices!r}: a comma list of cpu, cuda")
    if asked == ["cuda"] and not torch.cuda.is_available():  # nothing would run
        ap.error("--devices cuda but no GPU is visible (use --devices cpu)")
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "process":
        if "cuda" in args.devices.split(","):
            raise SystemExit("--clock process measures CPU time only: use --devices cpu")
        CLOCK = time.process_time
    m = HungarianMatcher()
    devices = [d for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]
    rows = []
    with torch.no_grad():
        for device in devices:
            for batch in (2, 8):
                for lo, hi in ((8, 8), (8, 50), (50, 50)):
                    outputs, targets = problem(batch, args.queries, args.classes, lo, hi, device)
                    ref = [_assign(c) for c in per_image_cost(m, outputs, targets)]
                    for name, fn in VARIANTS.items():
                        got = [_assign(c) for c in fn(m, outputs, targets)]
                        assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
                                   for a, b in zip(ref, got)), f"{name} disagrees"
                        cost_ms = timed(lambda: fn(m, outputs, targets), args.repeats, device)
                        match_ms = timed(lambda: [_assign(c) for c in fn(m, outputs, targets)],
                                         args.repeats, device)
                        rows.append({"device": device, "batch": batch, "queries": args.queries,
                                     "targets": f"{lo}-{hi}", "variant": name,
                                     "cost_ms": round(cost_ms, 3), "match_ms": round(match_ms, 3)})
                        r = rows[-1]
                        print(f"{device:5} B={batch:<2} n={r['targets']:6} {name:16} "
                              f"cost {cost_ms:8.2f} ms   match {match_ms:8.2f} ms", flush=True)
            # 7 output sets (6 decoder layers + encoder) per step: 7 copies vs one
            for batch in (2, 8):
                sets = [problem(batch, args.queries, args.classes, 8, 50, device, seed=s)[0] for s in range(7)]
                _, targets = problem(batch, args.queries, args.classes, 8, 50, device)
                for name, fn in (("7_sets_separate", lambda: [m(o, targets) for o in sets]),
                                 ("7_sets_match_many", lambda: m.match_many(sets, targets))):
                    ms = timed(fn, args.repeats, device)
                    rows.append({"device": device, "batch": batch, "queries": args.queries,
                                 "targets": "8-50", "variant": name, "cost_ms": None,
                                 "match_ms": round(ms, 3)})
                    print(f"{device:5} B={batch:<2} n=8-50   {name:18} match {ms:8.2f} ms", flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
            "clock": args.clock,
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out} ({meta})")


if __name__ == "__main__":
    main()

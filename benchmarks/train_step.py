"""Train-step and inference throughput of DINO on one device, torch only (no Ray).

For each preset: a training step (forward with targets, criterion, backward, clipping,
AdamW step; ``dino_scale.engine.train_step.train_step``) at each batch size, and
inference (forward + post-processing) at batch 1, on synthetic images (default 800x1199,
8 boxes each) with random weights. Reports the median over ``--iters`` timed iterations
after ``--warmup``: img/s (train), FPS (inference) and peak memory (CUDA: max allocated
since the row's start, model weights included; CPU: the process's peak RSS so far, which
no reset lowers). Before the inference row the training rows' optimizer state and gradients
are freed, so its CUDA peak is the model's weights plus the inference itself. A training step
that ``train_step`` skipped (a non-finite loss or gradients: no weight update) is counted
(``skipped_steps``: of the timed steps; ``warmup_skipped``); a row with a skipped timed step
is an error row (no timing, exit status 1), since its median would not be of full steps.
``--finite-check`` says where that check is made: ``auto`` on the device with a fused AdamW (the
default on a GPU; each step's verdict read once it has reached the host, never waited for in the
timed loop), else on the host (two syncs per step: the loss, the gradient norm); ``device`` also
uses a fused AdamW on the CPU; ``host``; ``none`` (no step is checked, so none can be seen as
skipped). Prints a
table and writes JSON under benchmarks/results/.

    python benchmarks/train_step.py                                   # GPU, three presets
    python benchmarks/train_step.py --precision bf16 --tf32 --channels-last
    python benchmarks/train_step.py --precision bf16 --tf32 --compile --cuda-graphs
    python benchmarks/train_step.py --device cpu --preset tiny --iters 5 --height 256 --width 384
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dino_scale.config import PRESETS, preset  # noqa: E402
from dino_scale.engine.optim import build_optimizer  # noqa: E402
from dino_scale.engine.train_step import autocast_dtype, train_step  # noqa: E402
from dino_scale.models import build_dino  # noqa: E402

DEFAULT_PRESETS = ("r50_4scale", "r50_5scale", "swinl_4scale")


@dataclass
class Row:
    preset: str
    mode: str  # train | infer
    batch_size: int
    precision: str
    median_s: float
    throughput: float  # img/s (train) or FPS (infer)
    peak_gib: float
    iters: int
    note: str = ""
    skipped_steps: int = 0  # train: timed steps train_step skipped (non-finite); an error when > 0
    warmup_skipped: int = 0  # train: warm-up steps it skipped


def synthetic_batch(b: int, h: int, w: int, n_boxes: int, num_classes: int, device, seed: int = 0):
    """Normalized-looking images (B,3,H,W), no padding, ``n_boxes`` random boxes per image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, h, w, generator=g)
    masks = torch.zeros(b, h, w, dtype=torch.bool)
    targets = []
    for _ in range(b):
        cxcy = torch.rand(n_boxes, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n_boxes, 2, generator=g) * 0.25 + 0.05
        labels = torch.randint(1, num_classes, (n_boxes,), generator=g)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([cxcy, wh], 1).to(device)})
    return images.to(device), masks.to(device), targets


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _time(fn, warmup: int, iters: int, device) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


class StepRecorder:
    """Calls ``train_step`` and keeps each call's skip flag. A step checked on the device keeps
    its verdict until the verdict has reached the host without a wait (asked at each later call,
    then dropped: its pinned buffer is reused), or until ``skipped`` is read after the timing."""

    def __init__(self, step_fn):
        self.step_fn = step_fn
        self.flags: list = []  # bool, or the StepOutput whose verdict is not read yet

    def __call__(self):
        for i in range(len(self.flags) - 1, -1, -1):  # the newest unread first: older ones are ready too
            flag = self.flags[i]
            if isinstance(flag, bool):
                break
            if flag.verdict.ready():  # (only outputs with a device verdict are kept unread)
                self.flags[i] = bool(flag.skipped)
        out = self.step_fn()
        self.flags.append(out if out.verdict is not None else bool(out.skipped))
        return out

    @property
    def skipped(self) -> list[bool]:
        return [flag if isinstance(flag, bool) else bool(flag.skipped) for flag in self.flags]


def train_row(name: str, bs: int, precision: str, times: list[float], skipped: list[bool], peak: float) -> Row:
    """The row of a timed training run: ``skipped`` holds every call's flag, warm-up first, the
    timed ones (``len(times)``) last. Any skipped timed step makes it an error row."""
    timed = skipped[len(skipped) - len(times):]
    n_skip, n_warm = sum(timed), sum(skipped[:len(skipped) - len(times)])
    if n_skip:
        note = (f"error: {n_skip} of {len(times)} timed steps skipped by train_step (non-finite loss or "
                "gradients: no update); not a timing of full steps")
        return Row(name, "train", bs, precision, float("nan"), float("nan"), peak, len(times), note, n_skip, n_warm)
    note = f"{n_warm} warm-up steps skipped (non-finite loss or gradients)" if n_warm else ""
    med = statistics.median(times)
    return Row(name, "train", bs, precision, med, bs / med, peak, len(times), note, 0, n_warm)


def free_training_state(opt, model, device) -> None:
    """Drop the optimizer's state and the gradients, so that the inference row's peak memory is
    the weights plus inference, not the leftover AdamW state of the training rows."""
    opt.zero_grad(set_to_none=True)
    opt.state.clear()
    for p in model.parameters():
        p.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def build(name: str, device, args):
    cfg = preset(name)
    torch.manual_seed(0)
    model, criterion, post = build_dino(cfg.model)
    model.to(device)
    criterion.to(device)
    if args.channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    if args.compile:
        from dino_scale.models.compile import compile_criterion, compile_regions
        compile_regions(model, granularity=args.compile_granularity, mode=args.compile_mode)
        compile_criterion(criterion)  # default mode: the match count varies every step
    return cfg, model, criterion, post


def bench_preset(name: str, args, device, on_row=None) -> list[Row]:
    """The rows of one preset; ``on_row(row)`` is called as each is measured (a run killed by its
    time limit keeps the rows it finished: they were written only once the preset was done)."""
    rows = []
    on_row = on_row or (lambda row: None)
    cfg, model, criterion, post = build(name, device, args)
    amp = autocast_dtype(args.precision)
    opt = build_optimizer(model, cfg.train, fused=True if args.finite_check == "device" else None)
    device_check = {"auto": None, "device": True, "host": False}.get(args.finite_check)
    for k, bs in enumerate(args.batch_sizes):
        if k and args.compile:  # else bs 8 ran the regions recompiled for a dynamic batch size (bs 2 first)
            torch._dynamo.reset()
        _reset_peak(device)
        images, masks, targets = synthetic_batch(bs, args.height, args.width, args.boxes, cfg.model.num_classes, device)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        step = StepRecorder(lambda: train_step(model, criterion, opt, (images, masks, targets),
                                               clip_max_norm=cfg.train.clip_max_norm, amp_dtype=amp,
                                               check_finite=args.finite_check != "none",
                                               device_check=device_check))
        try:
            times = _time(step, args.warmup, args.iters, device)
            rows.append(train_row(name, bs, args.precision, times, step.skipped, _peak_gib(device)))
        except torch.OutOfMemoryError:
            rows.append(Row(name, "train", bs, args.precision, float("nan"), float("nan"), _peak_gib(device), 0, "OOM"))
        on_row(rows[-1])
        opt.zero_grad(set_to_none=True)
        del images, masks, targets, step
    free_training_state(opt, model, device)
    del opt
    _reset_peak(device)
    model.eval()
    images, masks, _ = synthetic_batch(1, args.height, args.width, args.boxes, cfg.model.num_classes, device)
    sizes = torch.tensor([[args.height, args.width]], device=device)

    @torch.no_grad()
    def infer():
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            out = model(images, masks)
        post({"pred_logits": out["pred_logits"].float(), "pred_boxes": out["pred_boxes"].float()}, sizes)

    note = ""
    if args.cuda_graphs:
        from dino_scale.models.cuda_graph import GraphedDetector
        graphed = GraphedDetector(model, post, amp_dtype=amp)
        infer = lambda: graphed(images, masks, sizes)  # noqa: E731 - captured on the first warm-up call
    times = _time(infer, args.warmup, args.iters, device)
    if args.cuda_graphs:
        note = graph_note(graphed, device)
    med = statistics.median(times)
    rows.append(Row(name, "infer", 1, args.precision, med, 1 / med, _peak_gib(device), len(times), note))
    on_row(rows[-1])
    return rows


def msda_state() -> dict:
    """Which deformable-attention kernel the rows ran: the CUDA extension (loaded) or the PyTorch
    fallback after a failed build or load (its error), so that such rows are not read as ours."""
    from dino_scale.ops import ms_deform_attn_cuda

    return {"cuda_extension_loaded": ms_deform_attn_cuda.is_loaded(), "load_error": ms_deform_attn_cuda.load_error()}


def graph_note(graphed, device, limit: int = 220) -> str:
    """A row's note on its ``GraphedDetector``: "cuda graph" when replayed, else why not (the
    capture failure's type, message and place, kept in the JSON), at most ``limit`` chars."""
    if graphed.stats["replays"]:
        return "cuda graph"
    reason = graphed.last_capture_failure or (
        f"{device.type} device, ran eagerly" if device.type != "cuda" else "no capture attempted")
    note = f"cuda graph not used: {reason}"
    if len(note) <= limit:
        return note
    head, sep, at = note.rpartition(" (at ")  # shorten the message, keep where it was raised
    if not sep or len(sep + at) > limit // 2:
        return note[:limit - 3] + "..."
    return head[:limit - 3 - len(sep + at)] + "..." + sep + at


def table(rows: list[Row], device_name: str) -> str:
    mem = "peak GiB" if not device_name.startswith("cpu") else "process peak RSS GiB"
    lines = [f"| preset | mode | bs | precision | median ms | img/s or FPS | {mem} |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.preset} | {r.mode} | {r.batch_size} | {r.precision} | {r.median_s * 1000:.1f} | "
                     f"{r.throughput:.2f} | {r.peak_gib:.2f} |" + (f" {r.note}" if r.note else ""))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", help=f"repeatable; default {', '.join(DEFAULT_PRESETS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", default="2,8", help="train batch sizes, comma-separated")
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1199)
    p.add_argument("--boxes", type=int, default=8)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions where fp32 remains")
    p.add_argument("--compile", action="store_true",
                   help="regional torch.compile of the model and the criterion (dino_scale.models.compile)")
    p.add_argument("--compile-mode", default=None,
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="with --compile: torch.compile mode (reduce-overhead = CUDA graphs per region)")
    p.add_argument("--compile-granularity", choices=("layer", "stack"), default="layer",
                   help="with --compile: each layer (default) or whole encoder/decoder stacks")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="inference through dino_scale.models.cuda_graph.GraphedDetector (one captured graph)")
    p.add_argument("--channels-last", action="store_true", help="channels_last backbone and input")
    p.add_argument("--finite-check", choices=("auto", "device", "host", "none"), default="auto",
                   help="the NaN/Inf check of each step: auto = on the device where the AdamW is fused "
                        "(GPU), else on the host (two syncs); device = fused AdamW also on the CPU; none = off")
    p.add_argument("--no-finite-check", action="store_const", dest="finite_check", const="none",
                   help="= --finite-check none")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_step_<device>_<time>.json)")
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes {args.batch_sizes!r}: comma-separated integers, e.g. 2,8")
    if any(b < 1 for b in args.batch_sizes):
        p.error("--batch-sizes must be >= 1 each (empty: inference only)")
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    # before the first preset is timed: a typo in the last one cost the others' results
    for name in args.preset or ():
        if name not in PRESETS:
            p.error(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device} but no GPU is visible (use --device cpu)")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cpu_name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name
    rows: list[Row] = []
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / \
        f"train_step_{device.type}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(row: Optional[Row] = None) -> None:  # after every row: a killed run keeps what it measured
        if row is not None:
            rows.append(row)
            print(f"row: {row.preset} {row.mode} bs {row.batch_size}: {row.throughput:.2f} img/s, "
                  f"peak {row.peak_gib:.2f} GiB {row.note}".rstrip(), flush=True)
        out.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "msda": msda_state(),
                                   "args": {k: v for k, v in vars(args).items()},
                                   "rows": [asdict(r) for r in rows]}, indent=2))

    for name in args.preset or DEFAULT_PRESETS:
        bench_preset(name, args, device, on_row=write)
        print(table(rows[-len(args.batch_sizes) - 1:], device_name), flush=True)
    print(f"\n## train_step on {device_name}; {args.height}x{args.width}, {args.boxes} boxes, "
          f"median of {args.iters} after {args.warmup} warm-up")
    print(table(rows, device_name))
    write()
    print(f"wrote {out}")
    bad = [r for r in rows if r.skipped_steps]
    if bad:
        print(f"ERROR: {len(bad)} training row(s) timed steps that train_step skipped (non-finite): "
              + ", ".join(f"{r.preset} bs {r.batch_size}" for r in bad), file=sys.stderr)
    return rows


if __name__ == "__main__":
    sys.exit(1 if any(r.skipped_steps for r in main()) else 0)

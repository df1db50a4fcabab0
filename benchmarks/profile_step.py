"""Where does a DINO train step (and an inference call) spend its time? torch only, one GPU.

    python benchmarks/profile_step.py --preset r50_4scale --precision bf16 --batch-size 2

Prints (1) a phase breakdown with a device sync between phases (forward, criterion, backward,
clip + optimizer; median of --iters), (2) the torch.profiler tables of a few profiled steps:
top ops by self CPU time and by self device time, the device busy time per step (the summed
time of the device's own activity: kernels, memcpy and memset, each counted once, as the
profiler table's "Self CUDA time total"; kernels that overlap on several streams are summed),
and the host syncs per step (calls where the host waits for the device: ``cudaStreamSynchronize``,
``cudaEventSynchronize``, ``cudaDeviceSynchronize``; each ``.item()``, ``.tolist()``, blocking
device-to-host copy or ``nonzero`` makes one) beside the device-to-host copies (``Memcpy DtoH``),
and (3) the same for inference at batch 1. On CPU there is no device activity to count.
With --out, writes the phases and tables to a text file there.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dino_scale.config import PRESETS, preset  # noqa: E402
from dino_scale.engine.optim import build_optimizer  # noqa: E402
from dino_scale.engine.train_step import _to_float, autocast_context, autocast_dtype, train_step  # noqa: E402
from dino_scale.models import build_dino  # noqa: E402
from dino_scale.models.criterion import weighted_loss  # noqa: E402
from train_step import synthetic_batch  # noqa: E402

# CUDA runtime calls in which the host waits for the device. `.item()` (aten::item ->
# aten::_local_scalar_dense), a blocking device-to-host copy and aten::nonzero each end in one
# cudaStreamSynchronize, so counting these calls counts each sync once; counting the ATen ops
# too counted one `.item()` two or three times, and every cudaMemcpyAsync (host-to-device
# copies included) as a sync.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize")
D2H_COPY = "Memcpy DtoH"  # the device's own record of a device-to-host copy (Memcpy DtoH (Device -> ...))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def phases(model, criterion, opt, batch, amp, clip, iters, device):
    images, masks, targets = batch
    rec = {k: [] for k in ("forward", "criterion", "backward", "optimizer", "total")}
    for it in range(iters + 2):
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, amp):
            out = model(images, masks, targets)
        _sync(device); t1 = time.perf_counter()
        losses = criterion(_to_float(out), targets)
        loss = weighted_loss(losses, criterion.weight_dict)
        _sync(device); t2 = time.perf_counter()
        loss.backward()
        _sync(device); t3 = time.perf_counter()
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        _sync(device); t4 = time.perf_counter()
        if it >= 2:
            for k, v in zip(rec, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                rec[k].append(v * 1e3)
    return {k: statistics.median(v) for k, v in rec.items()}


def _is_device_event(e) -> bool:
    """An event of the device's own activity (kernel, memcpy, memset), not a host-side op or range."""
    return e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)


def sync_counts(events, steps: int, own_syncs: int = 0) -> dict:
    """Per-step host syncs of profiled ``events`` (``prof.key_averages()``): each SYNC_CALLS call
    once, less ``own_syncs`` cudaDeviceSynchronize calls the script made itself inside the
    profile; ``total``; and ``d2h_copies`` (device-to-host copies, blocking or not; those that
    block are already in the sync calls)."""
    counts = {k: 0 for k in SYNC_CALLS}
    d2h = 0
    for e in events:
        if e.key in SYNC_CALLS:
            counts[e.key] += e.count
        elif e.key.startswith(D2H_COPY) and _is_device_event(e):
            d2h += e.count
    counts["cudaDeviceSynchronize"] = max(0, counts["cudaDeviceSynchronize"] - own_syncs)
    out = {k: v / steps for k, v in counts.items() if v}
    out["total"] = sum(counts.values()) / steps
    out["d2h_copies"] = d2h / steps
    return out


def device_busy_ms(events, steps: int) -> float:
    """Per-step device time (ms) of profiled ``events``: the self time of the device's own events
    only (kernels, memcpy, memset; each once). The host-side ops' self device time is the same
    kernels again, and ranges such as Optimizer.step cover them a third time."""
    return sum(e.self_device_time_total for e in events if _is_device_event(e)) / steps / 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="r50_4scale")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1199)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--tf32", action="store_true")
    p.add_argument("--compile", action="store_true", help="regional torch.compile (dino_scale.models.compile)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.preset not in PRESETS:
        p.error(f"unknown preset {a.preset!r}; choose from {', '.join(PRESETS)}")
    if a.iters < 1 or a.batch_size < 1:
        p.error("--iters and --batch-size must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = preset(a.preset)
    torch.manual_seed(0)
    model, criterion, post = build_dino(cfg.model)
    model.to(device); criterion.to(device)
    if a.compile:
        from dino_scale.models.compile import compile_criterion, compile_regions
        compile_regions(model)
        compile_criterion(criterion)
    opt = build_optimizer(model, cfg.train)
    amp = autocast_dtype(a.precision)
    batch = synthetic_batch(a.batch_size, a.height, a.width, 8, cfg.model.num_classes, device)
    ph = phases(model, criterion, opt, batch, amp, cfg.train.clip_max_norm, a.iters, device)
    print(f"## phases ({a.preset}, {a.precision}, bs {a.batch_size}; median ms with syncs between)")
    print(" | ".join(f"{k} {v:.1f}" for k, v in ph.items()))

    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = 3
    with profile(activities=acts) as prof:
        for _ in range(steps):
            train_step(model, criterion, opt, batch, clip_max_norm=cfg.train.clip_max_norm, amp_dtype=amp)
        _sync(device)
    on_gpu = device.type == "cuda"
    own = 1 if on_gpu else 0  # the _sync above: one cudaDeviceSynchronize of this script's own
    text = []
    ka = prof.key_averages()
    if on_gpu:
        text.append(f"## train: host syncs per step {sync_counts(ka, steps, own)}")
        text.append(f"## train: device busy ~{device_busy_ms(ka, steps):.1f} ms per step (kernels, memcpy and "
                    "memset on the device, each once; summed over streams)")
    else:
        text.append("## train: on CPU: no device time or host-device syncs to count")
    text.append(ka.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=60))
    text.append(ka.table(sort_by="self_device_time_total", row_limit=a.rows, max_name_column_width=60))

    model.eval()
    images, masks, _ = synthetic_batch(1, a.height, a.width, 8, cfg.model.num_classes, device)
    sizes = torch.tensor([[a.height, a.width]], device=device)

    @torch.no_grad()
    def infer():
        with autocast_context(device, amp):
            out = model(images, masks)
        return post({"pred_logits": out["pred_logits"].float(), "pred_boxes": out["pred_boxes"].float()}, sizes)

    for _ in range(3):
        infer()
    _sync(device)
    t = []
    for _ in range(a.iters):
        t0 = time.perf_counter(); infer(); _sync(device); t.append((time.perf_counter() - t0) * 1e3)
    with profile(activities=acts) as prof2:
        for _ in range(steps):
            infer()
        _sync(device)
    ka2 = prof2.key_averages()
    if on_gpu:
        text.append(f"## infer bs1: {statistics.median(t):.1f} ms wall, device busy ~{device_busy_ms(ka2, steps):.1f} "
                    f"ms (kernels, memcpy, memset); host syncs per call {sync_counts(ka2, steps, own)}")
    else:
        text.append(f"## infer bs1: {statistics.median(t):.1f} ms wall")
    text.append(ka2.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=60))
    text.append(ka2.table(sort_by="self_device_time_total", row_limit=a.rows, max_name_column_width=60))
    report = "\n".join(text)
    print(report)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"profile_{a.preset}_{a.precision}_bs{a.batch_size}.txt").write_text(
            f"phases {ph}\n" + report)


if __name__ == "__main__":
    main()

"""Shared pieces of the engine's Ray tests: a module-long Ray session, synthetic shards,
a small CPU config."""
from __future__ import annotations

import contextlib
import fcntl
import threading
import uuid
from pathlib import Path
from typing import Callable

from dino_scale.config import preset

# CPU-sized images so a 2-worker DeepSpeed step takes well under a second.
SMALL = {
    "data.train_scales": [96, 128], "data.train_max_size": 160, "data.crop_resize_scales": [96],
    "data.crop_size_range": [64, 96], "data.eval_size": 128, "data.eval_max_size": 160,
    "data.batch_size": 2, "train.global_batch_size": 4, "train.num_workers": 2, "train.epochs": 1,
    "train.checkpoint_every_steps": 2, "train.log_every_steps": 1, "train.torch_threads": 1,
    "eval.batch_size": 1,
}


class RayStarted(Exception):
    """Raised where Ray would start (the ``ray_refused`` fixture): a test that expects a refusal
    before Ray sees this when the refusal did not come."""


def small_cfg(**overrides):
    return preset("tiny", {**SMALL, **overrides})


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def make_data(base: Path) -> tuple[str, str]:
    """16 training and 6 validation synthetic images (coco-like), embedded in shards."""
    from dino_scale.data import convert_coco
    from dino_scale.data.synthetic import generate

    out = {}
    for split, n, seed in (("train", 16, 0), ("val", 6, 1)):
        root, ann = generate(base / f"raw_{split}", "coco-like", n, seed, image_size=((96, 128), (120, 160)),
                             max_objects=3, empty_fraction=0.0)
        convert_coco(ann, root, base / split, embed_images=True, progress=False)
        out[split] = str(base / split)
    return out["train"], out["val"]


def registered_step(run_dir: Path) -> int:
    """The step of the latest checkpoint the Ray Train controller of the run in ``run_dir``
    (``<storage>/<run name>``) has registered: it rewrites its snapshot file each time; -1
    before the first (or while the file is caught mid-write)."""
    import json

    try:
        latest = json.loads((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
        latest = latest.get("latest_checkpoint_result") or {}
        return int((latest.get("metrics") or {}).get("step", -1))
    except (OSError, ValueError):
        return -1


def paused_at(pid_file: Path, run_dir: Path, step: int, done: threading.Event) -> bool:
    """Wait until a test hook wrote ``pid_file`` (its worker paused) and the run's controller
    registered the checkpoint of ``step``; ``False`` if ``done`` is set first."""
    while not (Path(pid_file).exists() and registered_step(run_dir) >= step):
        if done.wait(0.05):
            return False
    return True


@contextlib.contextmanager
def watching(watch: Callable[[threading.Event], None], join_s: float = 5):
    """Run ``watch(done)`` in a daemon thread while the with-block runs (a ``fit()``): ``done``
    is set when the block ends, returned or raised, so a watcher that kills a worker, stops a
    server or changes the cluster cannot act later, on another test's processes."""
    done = threading.Event()
    thread = threading.Thread(target=watch, args=(done,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=join_s)


class RaySession:
    """Holds the host-wide Ray test lock (same file as the ``ray_lock`` fixture) for the
    life of a test module and runs a private local Ray instance."""

    def __init__(self, num_cpus: int = 4):
        self.num_cpus = num_cpus
        self._fh = None

    def __enter__(self):
        import ray

        self._fh = open("/tmp/dino_scale_ray.lock", "w")
        fcntl.flock(self._fh, fcntl.LOCK_EX)
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=True,
                 configure_logging=False)
        return self

    def __exit__(self, *exc):
        import ray

        try:
            ray.shutdown()
        finally:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()


def max_diff(a: list, b: list) -> float:
    """The largest absolute difference between two equally nested lists of numbers."""
    if isinstance(a, list):
        return max((max_diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    return abs(a - b)


def run_ranks(script: str, world: int, *args: str, timeout: float = 600) -> list[dict]:
    """Run ``python -c script *args`` as ``world`` torch.distributed ranks (gloo on 127.0.0.1,
    DeepSpeed on CPU); return the JSON of rank 0's ``REPORT {...}`` lines. Any rank failing
    fails the test with its output.

    A rank that reaches the end of ``script`` leaves with ``os._exit(0)`` after flushing its
    output: the interpreter's own teardown of gloo/DeepSpeed background threads aborted once in
    CI ("terminate called without an active exception") after every report was printed and the
    process group destroyed. An exception raised by the script still fails the rank.

    The ranks share a temporary directory of their own (``TMPDIR``), removed afterwards: what
    they write there (universal checkpoint copies, ``/tmp/dino_universal_*`` otherwise) is not
    seen by tests running beside them under pytest-xdist."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from free_ports import listen_port

    port = listen_port()  # rank 0 binds it once started: outside the range outgoing connections use
    script += "\nimport os as _os, sys as _sys\n_sys.stdout.flush(); _sys.stderr.flush(); _os._exit(0)\n"
    procs = []
    tmp = tempfile.mkdtemp(prefix="dino_ranks_")
    try:
        for rank in range(world):
            env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", TMPDIR=tmp)
            procs.append(subprocess.Popen([sys.executable, "-c", script, *args], env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    return [json.loads(line[len("REPORT "):]) for line in outs[0][0].splitlines() if line.startswith("REPORT ")]

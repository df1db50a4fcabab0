"""benchmarks/gpu_check.sh: the one-call GPU session plan fits its budget and returns its files.

A lent GPU gives a session 15 minutes of device time and 600 s per call, and a call returns at
most 8 files from $OUT; a plan that overruns or scatters its logs loses the rarest measurements
this project gets, so the script's plan and packing are checked here on the CPU."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
SESSION = ["build", "tests-msda", "msda", "train", "graphs", "tests-models", "graphs-swinl", "finite-host",
           "finite-auto",
           "preset-r50_5scale", "preset-swinl_4scale", "regions-stack", "regions-reduce-overhead", "profile"]


def _run(tmp_path, *args, **env):
    out = tmp_path / "out"
    full_env = dict(os.environ, OUT=str(out), **{k: str(v) for k, v in env.items()})
    # the script calls `python3`: make it this interpreter (the venv's)
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env['PATH']}"
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def _summary_steps(out: Path) -> dict[str, str]:
    lines = (out / "summary.txt").read_text().splitlines()
    return {m.group(1): m.group(2) for m in (re.match(r"([\w.-]+): (.*)", ln) for ln in lines) if m}


def test_session_plan_runs_in_priority_order_within_the_budget(tmp_path):
    out, _ = _run(tmp_path, DRY_RUN=1, BUDGET_S=540)
    steps = _summary_steps(out)
    assert [s for s in steps if s in SESSION] == SESSION, steps
    ran = [s for s in SESSION if steps[s].startswith("would run")]
    # the kernel's correctness and the headline timings come first, and they fit one call
    assert ran[:5] == ["build", "tests-msda", "msda", "train", "graphs"]
    estimates = [int(re.search(r"~(\d+) s", steps[s]).group(1)) for s in ran]
    limits = [int(re.search(r"limit (\d+) s", steps[s]).group(1)) for s in ran]
    assert sum(estimates) <= 540
    # no step may be given more time than is left of the budget when it starts
    elapsed = 0
    for est, limit in zip(estimates, limits):
        assert limit <= 540 - elapsed
        elapsed += est
    skipped = [s for s in SESSION if s not in ran]
    assert skipped and all(steps[s].startswith("skipped") for s in skipped)
    # the finite pair is one comparison: both rows or neither (a lone host row compares with nothing)
    assert ("finite-host" in ran) == ("finite-auto" in ran), steps


def test_the_finite_pair_starts_only_when_both_fit(tmp_path):
    out, _ = _run(tmp_path / "fits", "finite", DRY_RUN=1, BUILD=0, BUDGET_S=95)
    steps = _summary_steps(out)
    assert steps["finite-host"].startswith("would run") and steps["finite-auto"].startswith("would run"), steps
    out, _ = _run(tmp_path / "tight", "finite", DRY_RUN=1, BUILD=0, BUDGET_S=100)
    steps = _summary_steps(out)  # the host row may not take the time the device row needs
    assert "limit 55 s" in steps["finite-host"] and steps["finite-auto"].startswith("would run"), steps
    out, _ = _run(tmp_path / "short", "finite", DRY_RUN=1, BUILD=0, BUDGET_S=60)
    steps = _summary_steps(out)
    assert all(steps[f"finite-{c}"].startswith("skipped (60 s left") for c in ("host", "auto")), steps
    assert not any(v.startswith("would run") for v in steps.values()), steps


def test_a_dry_run_plan_does_not_depend_on_how_fast_the_machine_runs_it(tmp_path):
    # a `date` that jumps 20 s at every call stands for a slow, loaded CI machine: the dry run's
    # plan (its limits and what it skips) must be the one a fast machine prints
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    clock = tmp_path / "clock"
    clock.write_text("1000000")
    (fake_bin / "date").write_text(f"#!/bin/bash\nt=$(( $(cat {clock}) + 20 )); echo $t > {clock}; echo $t\n")
    (fake_bin / "date").chmod(0o755)
    fast, _ = _run(tmp_path / "fast", "finite", DRY_RUN=1, BUILD=0, BUDGET_S=100)
    env_path = f"{fake_bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    full_env = dict(os.environ, OUT=str(tmp_path / "slow" / "out"), DRY_RUN="1", BUILD="0", BUDGET_S="100",
                    PATH=env_path)
    proc = subprocess.run(["bash", str(SCRIPT), "finite"], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(clock.read_text()) > 1000000  # the fake clock was read
    fast_steps, slow_steps = _summary_steps(fast), _summary_steps(tmp_path / "slow" / "out")
    strip = (lambda steps: {k: re.sub(r"/tmp/gpu_check\.\w+", "WORK", v) for k, v in steps.items()})
    assert strip(slow_steps) == strip(fast_steps)


def test_a_larger_budget_runs_every_step(tmp_path):
    out, _ = _run(tmp_path, DRY_RUN=1, BUDGET_S=100000)
    steps = _summary_steps(out)
    assert all(steps[s].startswith("would run") for s in SESSION)


def test_explicit_plan_and_train_arguments(tmp_path):
    out, _ = _run(tmp_path, "tests,train", "--preset", "tiny", "--iters", "2", DRY_RUN=1, BUILD=0)
    steps = _summary_steps(out)
    assert "build" not in steps
    assert [s for s in steps if s not in ("plan", "total")] == ["tests-msda", "tests-models", "train"]
    assert steps["train"].endswith("--preset tiny --iters 2") and "r50_4scale" not in steps["train"]


def test_results_are_packed_into_one_archive(tmp_path):
    # a real (not dry) run of a plan with nothing to time: the summary and the archive with the
    # machine description come back
    out, _ = _run(tmp_path, "none", BUILD=0)
    assert sorted(p.name for p in out.iterdir()) == ["results.tgz", "summary.txt"]
    assert "plan:  (budget" in (out / "summary.txt").read_text()
    with tarfile.open(out / "results.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert "gpu.txt" in names


def test_an_archive_over_the_size_limit_leaves_out_its_large_files(tmp_path):
    # limits shrunk so that the machine description alone is "too large": it is named in the
    # summary and left out, and the (now small) archive still comes back
    out, _ = _run(tmp_path, "none", BUILD=0, PACK_MAX_BYTES=1, PACK_BIG=0)
    summary = (out / "summary.txt").read_text()
    assert "left out of results.tgz (too large): ./gpu.txt" in summary
    with tarfile.open(out / "results.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert "gpu.txt" not in names and ".too_large" not in names


def test_a_mistyped_step_is_refused_before_anything_runs(tmp_path):
    # was: the build and every other step ran first, and the summary said "unknown step trian" at
    # the end of the device call: the step the call was for never ran
    for plan, env, needle in (("msda,trian", {}, "trian"),
                              ("regions", {"REGION_RUNS": "stack reduce_overhead"}, "reduce_overhead")):
        full_env = dict(os.environ, OUT=str(tmp_path / "out"), DRY_RUN="1", **env)
        full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env['PATH']}"
        proc = subprocess.run(["bash", str(SCRIPT), plan], cwd=ROOT, env=full_env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
        assert needle in proc.stderr and "would run" not in proc.stdout, proc.stdout + proc.stderr
        assert not (tmp_path / "out").exists()


def test_a_dry_run_leaves_no_results_folder_in_the_checkout(tmp_path):
    # was: DRY_RUN=1 without OUT made benchmarks/results/gpu_<time>/summary.txt in the checkout
    # each time (an untracked folder that `git add -A` commits); the plan is on stdout
    copy = tmp_path / "benchmarks" / "gpu_check.sh"
    copy.parent.mkdir()
    copy.write_text(SCRIPT.read_text())  # the script works in the folder above its own
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", str(copy)], cwd=tmp_path, env=dict(env, DRY_RUN="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "msda: would run" in proc.stdout
    assert not (tmp_path / "benchmarks" / "results").exists()


def test_presets_train_at_batch_2_and_8_each_within_one_call(tmp_path):
    # the presets step trained r50_5scale and swinl_4scale at bs 2 only; both at bs 2 and 8 do not
    # fit one call's budget together, so each preset is a step of its own that does
    for preset in ("r50_5scale", "swinl_4scale"):
        out, _ = _run(tmp_path / preset, f"preset-{preset}", DRY_RUN=1, BUDGET_S=540)
        steps = _summary_steps(out)
        line = steps[f"preset-{preset}"]
        assert line.startswith("would run") and f"--preset {preset}" in line and "--batch-sizes 2,8" in line, line
        est, limit = (int(re.search(p, line).group(1)) for p in (r"~(\d+) s", r"limit (\d+) s"))
        assert 60 + est <= 540 and limit <= 540 - 60  # after the build
    out, _ = _run(tmp_path / "both", "presets", DRY_RUN=1, BUDGET_S=100000)
    steps = _summary_steps(out)
    assert [s for s in steps if s.startswith("preset-")] == ["preset-r50_5scale", "preset-swinl_4scale"]
    assert all("--batch-sizes 2,8" in steps[s] for s in ("preset-r50_5scale", "preset-swinl_4scale"))


def test_a_failed_build_makes_later_steps_skip_the_jit_build(tmp_path):
    """A failed `ops build` (no toolkit on the node, a compiler error) left every later step to
    try the JIT build again (minutes each of the device's 15) and then time the PyTorch fallback.
    Later steps run with DINO_SCALE_MSDA_NO_JIT=1. Stand-ins for `python3` and `nvidia-smi` play
    the device: the build fails, the msda step prints the variable it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(
        '#!/bin/bash\n'
        'if [[ "$*" == *"dino_scale.ops build"* ]]; then echo "build failed: no CUDA toolkit"; exit 1; fi\n'
        'if [[ "$*" == *"benchmarks/msda.py"* ]]; then\n'
        '  echo "msda ran with NO_JIT=${DINO_SCALE_MSDA_NO_JIT:-unset}"; fi\n'
        'exit 0\n')
    (bin_dir / "nvidia-smi").write_text("#!/bin/bash\necho 'NVIDIA H100, 81559 MiB'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), BUDGET_S="300", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(SCRIPT), "msda"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "build failed: later steps run with DINO_SCALE_MSDA_NO_JIT=1" in proc.stdout, proc.stdout
    assert "msda ran with NO_JIT=1" in proc.stdout, proc.stdout

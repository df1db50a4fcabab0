"""The benchmark commands a user types: `make bench-cpu` and benchmarks/README.md.

Each command is parsed by the script's own argparse parser (the script is loaded and its
``main`` called with the command's arguments; the parse result is caught before any timing
starts), so a flag renamed in a script but not in the docs, or a Makefile target that runs
nothing, fails here instead of in a user's shell."""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_module import load_benchmark  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        super().__init__("parsed")
        self.namespace = namespace


def parse_benchmark_command(script: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    """``benchmarks/<script>.py argv`` parsed by that script's parser; SystemExit on a bad flag."""
    path = ROOT / script
    assert path.is_file(), f"{script} does not exist"
    module = load_benchmark(script)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            module.main(argv)
        except _Parsed as parsed:
            return parsed.namespace
    raise AssertionError(f"{script} {argv}: main() returned without parsing its arguments")


def _script_commands(lines: list[str]) -> list[tuple[str, list[str]]]:
    """``(benchmarks/X.py, argv)`` of every ``python benchmarks/X.py ...`` in ``lines``."""
    out = []
    for line in lines:
        for m in re.finditer(r"python3?\s+(benchmarks/\w+\.py)((?:\s+[^\s#`|;&<>\[\]]+)*)", line):
            out.append((m.group(1), shlex.split(m.group(2))))
    return out


def _make_dry_run(target: str) -> list[str]:
    """The commands ``make TARGET`` would run (the venv taken as built)."""
    proc = subprocess.run(["make", "-n", "-o", ".venv/.installed", target, "PY=python"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.replace("\\\n", " ").splitlines()  # recipe lines continued with '\\'


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_bench_cpu_runs_the_cpu_benchmarks_with_flags_they_accept(monkeypatch):
    # `make bench-cpu` was declared .PHONY with no recipe: "Nothing to be done for 'bench-cpu'"
    lines = _make_dry_run("bench-cpu")
    commands = _script_commands(lines)
    assert {s for s, _ in commands} >= {"benchmarks/msda.py", "benchmarks/train_step.py",
                                        "benchmarks/matcher.py", "benchmarks/data_pipeline.py",
                                        "benchmarks/op_count.py"}, lines
    for script, argv in commands:
        args = parse_benchmark_command(script, argv, monkeypatch)
        # CPU only, and the results go to the bench folder, never over the measured JSON files
        # kept in benchmarks/results/
        for attr in ("device", "devices"):
            if hasattr(args, attr):
                assert getattr(args, attr) == "cpu", (script, argv)
        written = [getattr(args, a) for a in ("out", "results_dir") if getattr(args, a, None)]
        assert written, f"{script}: no --out / --results-dir, so it writes into benchmarks/results"
        assert all("benchmarks/results" not in str(w) for w in written), (script, written)


def test_benchmarks_readme_commands_parse(monkeypatch):
    """Every ``python benchmarks/X.py ...`` of benchmarks/README.md and of the scripts' own
    docstrings parses with the script's parser (placeholders such as ``FILE`` are values)."""
    docs = [ROOT / "benchmarks" / "README.md", ROOT / "README.md",
            *sorted((ROOT / "benchmarks").glob("*.py"))]
    commands = [c for doc in docs for c in _script_commands(doc.read_text().splitlines())]
    assert len({s for s, _ in commands}) >= 6, commands
    for script, argv in commands:
        parse_benchmark_command(script, argv, monkeypatch)


_TINY_RUN = ["--iters", "1", "--warmup", "0", "--height", "64", "--width", "64", "--batch-sizes", "1"]


@pytest.mark.parametrize("script,argv,needle", [
    # was: TypeError: expected str, bytes or os.PathLike object, not NoneType
    ("benchmarks/data_pipeline.py", ["--part", "pycocotools"], "--json"),
    ("benchmarks/data_pipeline.py", ["--part", "throughput", "--rounds", "0"], "--rounds"),
    # was: statistics.StatisticsError: no median for empty data, after the first timings
    ("benchmarks/matcher.py", ["--devices", "cpu", "--repeats", "0"], "--repeats"),
    # was: every row "failed: StatisticsError", and a results file of no rows
    # was: no device to run, exit 0 and a results file of no rows (by default over the measured
    # benchmarks/results/matcher.json)
    ("benchmarks/matcher.py", ["--devices", "gpu", "--repeats", "1"], "gpu"),
    pytest.param("benchmarks/matcher.py", ["--devices", "cuda", "--repeats", "1"], "GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
    ("benchmarks/msda.py", ["--device", "cpu", "--small", "--reps", "0"], "--reps"),
    # was: on a GPU, KeyError: 'bf61' after the dtypes before it were timed, and no JSON
    ("benchmarks/msda.py", ["--device", "cpu", "--small", "--dtypes", "fp32,bf61"], "bf61"),
    # was: the presets before the mistyped one were timed (minutes each on a GPU), then
    # ConfigError's traceback, and no JSON of the rows already measured
    ("benchmarks/train_step.py", ["--device", "cpu", "--preset", "tiny", "--preset", "swinl_4scal",
                                  *_TINY_RUN], "swinl_4scal"),
    ("benchmarks/op_count.py", ["--preset", "tiny", "--preset", "r50_4scal", "--height", "64",
                                "--width", "64"], "r50_4scal"),
    # was: RuntimeError: Non-empty 4D data tensor expected ... deep in the backbone
    ("benchmarks/train_step.py", ["--device", "cpu", "--preset", "tiny", *_TINY_RUN[:-2],
                                  "--batch-sizes", "0"], "--batch-sizes"),
    # was: statistics.StatisticsError: no median for empty data, after the model was built and run
    ("benchmarks/profile_step.py", ["--preset", "tiny", "--iters", "0", "--height", "64", "--width", "64"],
     "--iters"),
    ("benchmarks/profile_step.py", ["--preset", "tiyn"], "tiyn"),
    # was: RuntimeError: Found no NVIDIA driver on your system, from the first .to(device)
    pytest.param("benchmarks/train_step.py", ["--device", "cuda", "--preset", "tiny", *_TINY_RUN], "GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_benchmark_bad_counts_are_usage_errors(script, argv, needle, tmp_path, capsys):
    module = load_benchmark(script)
    out = ["--out", str(tmp_path / "out.json")] if "data_pipeline" not in script else \
        ["--results-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        module.main(argv + out)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err.splitlines()[-1], err
    assert not any(tmp_path.iterdir())  # nothing written

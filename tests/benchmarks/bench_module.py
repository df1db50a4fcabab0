"""The benchmark scripts as modules for the tests: ``benchmarks/<stem>.py`` loaded once per
process under the name ``bench_<stem>`` (their dataclasses look their module up there)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_benchmark(script: str) -> ModuleType:
    """``script``: a path under the repository (``benchmarks/msda.py``) or a stem (``msda``)."""
    path = ROOT / script if script.endswith(".py") else ROOT / "benchmarks" / f"{script}.py"
    name = f"bench_{path.stem}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module

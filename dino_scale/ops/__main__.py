"""``python -m dino_scale.ops build|info``: ahead-of-time build of the CUDA extension.

    python -m dino_scale.ops build [--arch "8.0;9.0"] [--build-dir DIR] [--force] [--verbose]
    python -m dino_scale.ops info

``build`` honors TORCH_CUDA_ARCH_LIST (``--arch`` wins), builds into the cache directory the
runtime loader looks in (``$DINO_SCALE_EXT_DIR`` or ``~/.cache/dino_scale/ext``) unless
``--build-dir`` is given, and prints where the library is. Exit status 1 when the build fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import _build


def _info() -> int:
    import torch

    arch = _build.default_arch_list()
    cuda_home = _build.find_cuda_home()
    try:
        lib = _build.find_library(arch)  # named by a hash of the sources
    except _build.BuildError:
        lib = None
    print(f"torch            {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"GPU available    {torch.cuda.is_available()}")
    try:
        sources = str(_build.source_dir())
    except _build.BuildError as exc:
        sources = str(exc)
    print(f"sources          {sources}")
    print(f"CUDA_HOME        {cuda_home}")
    if cuda_home:
        print(f"extra includes   {_build.extra_system_includes(cuda_home)}")
    print(f"arch list        {arch}")
    built = lib is not None and _build.library_complete(lib)
    if lib is None:
        print("library          unknown: the CUDA sources are missing (an installation without csrc/)")
    else:
        state = "built" if built else "incomplete: rebuild" if lib.exists() else "not built"
        print(f"library          {lib} ({state})")
    gpu, arch_problem = torch.cuda.is_available(), None
    if gpu and lib is not None:
        try:  # the loader refuses a library without code for a visible GPU (as it would fail at the first call)
            _build.check_runs_on_visible_gpus(lib, arch)
        except _build.BuildError as exc:
            arch_problem = str(exc)
    jit = os.environ.get("DINO_SCALE_MSDA_NO_JIT", "0") != "1"
    print(f"default backend  {_default_backend(gpu, built, cuda_home, arch_problem, jit)}")
    return 0


def _default_backend(gpu: bool, built: bool, cuda_home: str | None, arch_problem: str | None = None,
                     jit: bool = True) -> str:
    """What ``ms_deform_attn(backend=None)`` will run for CUDA inputs in a process started here,
    said without building anything (CPU inputs always take the PyTorch backend). ``arch_problem``:
    why the library cannot run on a visible GPU; ``jit``: DINO_SCALE_MSDA_NO_JIT is not 1."""
    if not gpu:
        return "pytorch (no GPU visible)"
    if arch_problem:
        return f"pytorch, with one warning ({arch_problem})"
    if built:
        return "cuda (the library above, loaded on the first CUDA call)"
    if not jit:
        return ("pytorch, with one warning (not built and DINO_SCALE_MSDA_NO_JIT=1: run "
                "`python -m dino_scale.ops build`)")
    if cuda_home:
        return "cuda after a JIT build on the first CUDA call (or run `python -m dino_scale.ops build` now)"
    return "pytorch, with one warning (no CUDA toolkit found to build the extension)"


def _build_cmd(args: argparse.Namespace) -> int:
    arch = args.arch or _build.default_arch_list()
    t0 = time.perf_counter()
    try:
        lib = _build.build_extension(build_dir=Path(args.build_dir) if args.build_dir else None,
                                     arch_list=arch, force=args.force, verbose=args.verbose)
    except _build.BuildError as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a build folder that cannot be created or written (read-only, a file)
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    print(f"built ms_deform_attn extension for arch {arch} in {time.perf_counter() - t0:.1f} s:")
    print(lib)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m dino_scale.ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", allow_abbrev=False, help="compile the CUDA extension ahead of time")
    b.add_argument("--arch", help='CUDA arch list, e.g. "8.0;9.0" (default: TORCH_CUDA_ARCH_LIST, '
                                  "else the visible GPUs, else 9.0)")
    b.add_argument("--build-dir", help="build here instead of the cache directory")
    b.add_argument("--force", action="store_true", help="rebuild even if already built")
    b.add_argument("--verbose", action="store_true")
    sub.add_parser("info", help="show toolkit, cache and build status")
    args = parser.parse_args(argv)
    return _info() if args.cmd == "info" else _build_cmd(args)


if __name__ == "__main__":
    sys.exit(main())

"""Which finished build the loader takes (``_build.find_library``), on stand-in GPUs: no toolkit
and no GPU needed (the libraries are ELF headers; nothing is loaded)."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from dino_scale.ops import _build


def _finished_build(root: Path, arch: str) -> Path:
    """A cache folder as ``build_extension(arch_list=arch)`` leaves it: a complete library (an
    ELF header with no segments) and the arch list beside it."""
    build_dir = _build.build_dir_for(arch, root)
    build_dir.mkdir(parents=True)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 64, 0, 64, 56, 0, 64, 0, 0)
    lib = _build.library_path(build_dir)
    lib.write_bytes(header + b"library for " + arch.encode())
    (build_dir / _build.ARCH_FILE).write_text(arch + "\n")
    assert _build.library_complete(lib)
    return lib


@pytest.fixture
def gpu(monkeypatch):
    """Set the one visible GPU's compute capability; returns the arch list the loader asks for."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def set_capability(cap: tuple[int, int]) -> str:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: cap)
        return _build.default_arch_list()
    return set_capability


def test_loader_takes_a_finished_build_whose_code_runs_on_the_gpu(tmp_path, gpu):
    # `python -m dino_scale.ops build --arch "8.0;9.0"` (the image's list) into a shared cache; a
    # process without TORCH_CUDA_ARCH_LIST on an A10G (8.6) or L4 (8.9) asks for "8.6"/"8.9".
    # sm_80 code runs there (arch_list_runs_on), but the loader looked only for a build naming
    # that exact arch: a cache miss, so a second compile, or with no toolkit on the node
    # (runtime image) or DINO_SCALE_MSDA_NO_JIT=1 the slow PyTorch backend for good
    multi = _finished_build(tmp_path, "8.0;9.0")
    for cap in ((9, 0), (8, 6), (8, 9), (8, 0)):
        want = gpu(cap)
        assert _build.arch_list_runs_on("8.0;9.0", cap)
        assert _build.find_library(want, tmp_path) == multi, (cap, want)
    # no code for sm_100: a miss, until a build with PTX it can JIT from is there
    assert _build.find_library(gpu((10, 0)), tmp_path) == _build.library_path(_build.build_dir_for("10.0", tmp_path))
    ptx = _finished_build(tmp_path, "9.0+PTX")
    assert _build.find_library(gpu((10, 0)), tmp_path) == ptx


def test_loader_prefers_machine_code_for_the_gpu_and_skips_unparsed_lists(tmp_path, gpu):
    ptx = _finished_build(tmp_path, "8.0+PTX")  # runs on sm_90 through the PTX JIT
    exact = _finished_build(tmp_path, "9.0;10.0")  # sm_90 machine code: taken, though listed later
    assert sorted(p.parent for p in (ptx, exact)) == [ptx.parent, exact.parent]
    assert _build.find_library(gpu((9, 0)), tmp_path) == exact
    assert _build.find_library(gpu((8, 6)), tmp_path) == ptx  # only the PTX build runs there
    # a named arch ("Hopper") is trusted when asked for, never guessed for another GPU
    named = _finished_build(tmp_path, "Hopper")
    assert _build.find_library("Hopper", tmp_path) == named
    assert _build.find_library(gpu((7, 5)), tmp_path) == _build.library_path(_build.build_dir_for("7.5", tmp_path))

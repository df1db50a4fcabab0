"""The csrc/ build after a failure: a build or rebuild killed mid-way, a truncated library, a
forced build that fails, a build in a process that has the ops loaded, incomplete ELF headers;
never a half-written library loaded, always a rebuild or a clear error. No nvcc runs here."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dino_scale.ops import _build
from fake_build import elf, fake_toolchain, library_builder, truncated_shared_object


def test_killed_build_leaves_no_library_and_is_rebuilt(tmp_path, monkeypatch):
    # A build killed while the linker writes the library (SIGKILL of a Ray worker, OOM) must not
    # leave a file at library_path: the loader would load it (fail, and fall back to the slow
    # PyTorch backend for good) and build_extension would never rebuild it.
    build_dir = tmp_path / "ext"
    calls = []

    def killed_mid_link(name, sources, build_directory, **kw):
        calls.append(build_directory)
        Path(build_directory, f"{name}.so").write_bytes(b"\x7fELF half-written")
        raise KeyboardInterrupt  # stands for the kill: no cleanup runs

    fake_toolchain(monkeypatch, tmp_path, killed_mid_link)
    with pytest.raises(KeyboardInterrupt):
        _build.build_extension(build_dir=build_dir, arch_list="9.0")
    assert not _build.library_path(build_dir).exists()

    good_build = library_builder(calls, b"complete library")

    monkeypatch.setattr("torch.utils.cpp_extension.load", good_build)
    lib = _build.build_extension(build_dir=build_dir, arch_list="9.0")
    assert len(calls) == 2, "the half-written library was taken for a finished build"
    assert lib == _build.library_path(build_dir) and lib.read_bytes() == elf(b"complete library")
    # built once: a second call finds it without compiling
    assert _build.build_extension(build_dir=build_dir, arch_list="9.0") == lib and len(calls) == 2


def test_build_after_a_killed_builder_does_not_wait_on_its_baton(tmp_path, monkeypatch):
    # torch < the FileLock change (pyproject allows torch>=2.4) guards JIT builds with a
    # FileBaton: build_directory/lock is created with O_EXCL and a later build waits while the
    # file exists, forever when its builder was killed. Under the fcntl lock it is stale.
    build_dir = tmp_path / "ext"
    seen = []

    def baton_load(name, sources, build_directory, **kw):
        if Path(build_directory, "lock").exists():
            raise TimeoutError("FileBaton.wait() would spin forever on a stale lock file")
        seen.append(build_directory)
        out = Path(build_directory, f"{name}.so")
        out.write_bytes(elf(b"library"))
        return str(out)

    fake_toolchain(monkeypatch, tmp_path, baton_load)
    _build.build_extension(build_dir=build_dir, arch_list="9.0")
    # a builder killed mid-compile left its baton where the compile runs
    Path(seen[0], "lock").touch()
    lib = _build.build_extension(build_dir=build_dir, arch_list="9.0", force=True)
    assert lib.is_file() and len(seen) == 2


def test_a_rebuild_killed_before_its_library_is_in_place_is_not_up_to_date(tmp_path, monkeypatch, capsys):
    """A `--build-dir` rebuild after csrc/ changed, killed after the new stamp was written and
    before the new library replaced the old one, left the old library under the new stamp: the
    next build called it up to date. The stamp now goes after the library."""
    src = tmp_path / "src"
    src.mkdir()
    for p in _build.source_files():
        (src / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(_build, "SOURCE_DIR", src)
    built = []

    def good_build(name, sources, build_directory, **kw):
        out = Path(build_directory, f"{name}.so")
        out.write_bytes(elf(b"library %d" % len(built)))
        built.append(name)
        return str(out)

    fake_toolchain(monkeypatch, tmp_path, good_build)
    build_dir = tmp_path / "mine"
    old = _build.build_extension(build_dir=build_dir, arch_list="9.0")
    (src / "msda_cpu.cpp").write_text((src / "msda_cpu.cpp").read_text() + "\n// edited\n")

    def killed_at_the_rename(src_path, dst_path):
        raise KeyboardInterrupt  # stands for the kill between the compile and the rename

    monkeypatch.setattr(_build.os, "replace", killed_at_the_rename)
    with pytest.raises(KeyboardInterrupt):
        _build.build_extension(build_dir=build_dir, arch_list="9.0")
    monkeypatch.undo()
    monkeypatch.setattr(_build, "SOURCE_DIR", src)
    fake_toolchain(monkeypatch, tmp_path, good_build)
    assert old.read_bytes() == elf(b"library 0")  # the old library is still there
    lib = _build.build_extension(build_dir=build_dir, arch_list="9.0")
    assert len(built) == 3 and lib.read_bytes() == elf(b"library 2"), "the old library was taken as up to date"

    # `info` without sources (an installation without csrc/): says so instead of a traceback
    from dino_scale.ops import __main__ as cli

    monkeypatch.setattr(_build, "SOURCE_DIR", tmp_path / "no-sources")
    assert cli.main(["info"]) == 0
    assert "the CUDA sources are missing" in capsys.readouterr().out


def test_truncated_library_is_never_loaded(tmp_path):
    # a truncated library at the cache path killed every process that loaded the op with a Bus
    # error (exit -7: no Python exception, so no fallback), and `python -m dino_scale.ops build`
    # reported it as built; now the loader refuses it (JIT disabled: BuildError naming it) and a
    # build replaces it
    env = dict(os.environ, DINO_SCALE_EXT_DIR=str(tmp_path), DINO_SCALE_MSDA_NO_JIT="1",
               TORCH_CUDA_ARCH_LIST="9.0")
    lib = _build.library_path(_build.build_dir_for("9.0", root=tmp_path))
    lib.parent.mkdir(parents=True)
    truncated_shared_object(lib)
    code = ("from dino_scale.ops import ms_deform_attn_cuda as m\n"
            "try:\n    m.load()\nexcept m._build.BuildError as e:\n    print('ERR', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert "ERR" in proc.stdout and "incomplete" in proc.stdout and str(lib) in proc.stdout, proc.stdout
    assert not _build.library_complete(lib)
    import _ctypes
    assert _build.library_complete(Path(_ctypes.__file__))


def test_build_replaces_a_truncated_library(tmp_path, monkeypatch):
    built = []

    good_build = library_builder(built)

    fake_toolchain(monkeypatch, tmp_path, good_build)
    build_dir = tmp_path / "ext"
    lib = _build.build_extension(build_dir=build_dir, arch_list="9.0")
    assert len(built) == 1 and _build.build_extension(build_dir=build_dir, arch_list="9.0") == lib
    truncated_shared_object(lib)
    assert _build.build_extension(build_dir=build_dir, arch_list="9.0") == lib and len(built) == 2
    assert lib.read_bytes() == elf(b"library")


def test_a_build_in_a_process_that_has_the_ops_refuses_instead_of_aborting(tmp_path, monkeypatch):
    # cpp_extension.load loads the library it links: with the ops already registered (a forced
    # rebuild after a load, a second build dir or arch list) TORCH_LIBRARY(dino_scale) ran twice
    # and the process died in the library's static initializer (SIGABRT, rc 134), no exception
    from dino_scale.ops import _build

    monkeypatch.setattr(_build, "ops_registered", lambda: True)
    monkeypatch.setattr(_build, "find_cuda_home", lambda: pytest.fail("got as far as compiling"))
    with pytest.raises(_build.BuildError, match="already loaded in this process.*python -m dino_scale.ops build"):
        _build.build_extension(build_dir=tmp_path / "ext", arch_list="9.0", force=True)
    assert not _build.library_path(tmp_path / "ext").exists()


@pytest.mark.parametrize("failure", ["no toolkit", "compiler error"])
def test_a_forced_build_that_fails_keeps_the_library_it_would_replace(tmp_path, monkeypatch, failure):
    """``build --force`` deleted the library before compiling: a build that then failed (no nvcc
    on this node, a compiler error) left the cache without one, and jobs that may not JIT-build
    (DINO_SCALE_MSDA_NO_JIT=1) ran on the PyTorch backend. The library and its stamp stay."""
    import torch.utils.cpp_extension as cpp_ext

    from dino_scale.ops import _build

    ext = tmp_path / "ext"
    ext.mkdir()
    monkeypatch.setattr(_build, "ops_registered", lambda: False)
    monkeypatch.setattr(_build, "find_cuda_home", lambda: str(tmp_path))
    monkeypatch.setattr(cpp_ext, "load", library_builder(payload=b"the library jobs load"))
    monkeypatch.setattr(_build.torch.version, "cuda", "13.0")
    lib = _build.build_extension(build_dir=ext, arch_list="9.0")
    before = lib.read_bytes()
    assert _build._up_to_date(ext, "9.0")
    if failure == "no toolkit":
        monkeypatch.setattr(_build, "find_cuda_home", lambda: None)
    else:
        def compiler_error(**kwargs):
            raise RuntimeError("Error building extension 'dino_scale_msda': nvcc exited with 1")
        monkeypatch.setattr(cpp_ext, "load", compiler_error)
    expected = {"no toolkit": r"no CUDA toolkit found \(nvcc\): set CUDA_HOME",
                "compiler error": r"building the ms_deform_attn extension failed: Error building extension "
                                  r"'dino_scale_msda': nvcc exited with 1"}[failure]
    with pytest.raises(_build.BuildError, match=expected):
        _build.build_extension(build_dir=ext, arch_list="9.0", force=True)
    assert lib.read_bytes() == before and _build._up_to_date(ext, "9.0")


def test_a_program_header_size_no_elf64_has_is_incomplete_not_an_error(tmp_path):
    # e_phentsize 8 with one entry: struct.error (a traceback from `ops info` and `build`)
    import struct

    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 0, 0, 64, 8, 1, 64, 0, 0)
    lib = tmp_path / "damaged.so"
    lib.write_bytes(header + bytes(64))
    assert _build.library_complete(lib) is False


def test_a_short_elf_header_is_incomplete_not_an_error(tmp_path):
    # 52-63 bytes with a 64-bit ELF ident raised struct.error (a traceback from `ops info` and
    # the builder) instead of counting as a library to rebuild
    lib = tmp_path / "short.so"
    lib.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(49))  # 56 bytes
    assert _build.library_complete(lib) is False


"""CI compile test: builds csrc/ms_deform_attn for sm_90 with the local nvcc through the same
function production uses (dino_scale.ops._build.build_extension), into a temporary cache
directory (started in the background when the session has collected this test, or when the test
starts under pytest-xdist: tests/ops/conftest.py), then loads the library in a fresh process through the production
loader and checks the operator schemas, the fake kernels and the C++ autograd on meta tensors,
and the library's CPU kernels against the float64 reference (tests/ops/compiled_op_cpu_check.py):
the compiled operator's registration, autograd and argument checks are exercised without a GPU.
Also the build's cache, lock, loader and command; builds killed or failed: test_ops_msda_build_recovery.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dino_scale.ops import _build
from fake_build import elf, fake_toolchain, library_builder

# only the real build and the toolkit's paths need nvcc; the other tests use stand-ins for it
needs_toolkit = pytest.mark.skipif(_build.find_cuda_home() is None, reason="no CUDA toolkit (nvcc) on this machine")

# A fresh process loads the prebuilt library through the production loader (JIT disabled, so a
# cache miss would fail) and runs tests/ops/compiled_op_cpu_check.py: schemas, fake kernels and
# the C++ autograd on meta tensors, and the CPU kernels against the float64 reference.
_CPU_CHECK = Path(__file__).with_name("compiled_op_cpu_check.py")


def _report(proc) -> dict:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


@needs_toolkit
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_extension_compiles_for_sm90_and_registers_ops(msda_build):
    # the build started in the background at collection, or here under xdist (tests/ops/conftest.py)
    built = msda_build.wait(timeout=880)
    env, build_dir = msda_build.env, msda_build.build_dir
    lib = Path(built["lib"])
    assert lib == _build.library_path(build_dir)
    assert lib.is_file() and lib.stat().st_size > 100_000
    print(f"compile time {built['seconds']:.1f} s ({built['wall_since_start']:.1f} s since it started)")

    report = _report(subprocess.run([sys.executable, str(_CPU_CHECK)], env=env, capture_output=True,
                                    text=True, timeout=600))
    print(json.dumps(report, indent=1))
    assert report["lib"] == str(lib) and report["compiled"] is False
    assert "ms_deform_attn_forward(Tensor value" in report["schemas"][0]
    assert "-> (Tensor, Tensor, Tensor)" in report["schemas"][1]
    assert report["meta_out"] == [[2, 7, 128], "torch.bfloat16", "meta"]
    assert report["meta_grads"] == [[[2, 40, 4, 32], "torch.bfloat16"], [[2, 7, 4, 2, 3, 2], "torch.float32"],
                                    [[2, 7, 4, 2, 3], "torch.float32"]]
    # the CPU kernels: float64 exact to rounding, float32 within 1e-5, forward and backward
    assert max(report["cpu_rel_err"]["float64"]) <= 1e-12, report["cpu_rel_err"]
    assert max(report["cpu_rel_err"]["float32"]) <= 1e-5, report["cpu_rel_err"]
    # any number of levels: 20 (the op refused more than 16, on the CPU too), same tolerances
    many = report["many_levels"]
    assert many["L"] == 20 and "rel_err" in many, many
    assert max(many["rel_err"]["float64"]) <= 1e-12 and max(many["rel_err"]["float32"]) <= 1e-5, many
    assert report["gradcheck"] is True
    assert report["deterministic_mode_cpu"] == "ran"  # the CUDA backward alerts; the CPU one need not
    assert "MSDAFunction" in report["grad_fn"]  # autograd is the C++ node, not a Python one
    assert report["compile_err"] <= 1e-12
    raised = report["errors_raised"]
    assert "half types: CUDA only" in raised["bf16_on_cpu"]
    assert "attention_weights" in raised["bad_weights_shape"]
    assert "spatial_shapes must be (L, 2)" in raised["levels_mismatch"]
    assert "does not fit in value's" in raised["level_past_value"], raised
    assert "does not fit in value's" in raised["level_start_negative"], raised
    assert report["create_graph_err"] <= 1e-12
    assert "double backward is not supported" in report["double_backward"], report["double_backward"]
    # with the compiled op, every compiled region of a training step and an eval forward traces
    # whole: no graph break (the PyTorch backend reads the level sizes back and breaks there)
    regions = report["regions"]
    assert "transformer.decoder.step" in regions["names"] and "matched_set_terms" in regions["names"]
    assert regions["graph_breaks"] == {}, regions
    assert regions["unique_graphs"] >= len(regions["names"]) and regions["finite"]
    assert "already loaded in this process" in report["rebuild_while_loaded"], report["rebuild_while_loaded"]


def test_loader_without_jit_fails_fast_on_cache_miss(tmp_path):
    code = ("import sys\nfrom dino_scale.ops import ms_deform_attn_cuda as m\n"
            "try:\n    m.load()\nexcept m._build.BuildError as e:\n    print('ERR', e)\n"
            "    assert 'JIT disabled' in str(e) and m.load_error()\n"
            "    assert 'torch.utils.cpp_extension' not in sys.modules\n    sys.exit(0)\nsys.exit(3)\n")
    env = dict(os.environ, DINO_SCALE_EXT_DIR=str(tmp_path), DINO_SCALE_MSDA_NO_JIT="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_toolkit
def test_build_paths_are_found_programmatically():
    cuda_home = _build.find_cuda_home()
    assert os.path.isfile(os.path.join(cuda_home, "bin", "nvcc"))
    incs = _build.extra_system_includes(cuda_home)
    # every header torch's CUDA headers need must be reachable: toolkit or pip wheel include dirs
    dirs = [os.path.join(cuda_home, "include"), *incs]
    assert any(os.path.isfile(os.path.join(d, "cusparse.h")) for d in dirs)


def test_cache_dir_is_keyed_by_sources_and_arch(tmp_path, monkeypatch):
    monkeypatch.setenv("DINO_SCALE_EXT_DIR", str(tmp_path))
    a, b = _build.build_dir_for("9.0"), _build.build_dir_for("8.0;9.0")
    assert a.parent == tmp_path and a != b and a == _build.build_dir_for("9.0")
    assert _build.library_path(a).name == "dino_scale_msda.so"


@pytest.mark.timeout(60)
def test_build_lock_serializes_processes(tmp_path):
    # Child 1 takes the build lock of a directory and holds it 4 s; child 2 asks for it only once
    # child 1 has said (from inside the lock) that it holds it: child 2 must wait for the release.
    # Both import first and wait for a "go" line, so neither's start-up time blurs the timings
    # (time.monotonic is one clock for all processes on Linux).
    code = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from dino_scale.ops import _build
        print("READY", flush=True)
        sys.stdin.readline()  # the parent's go
        requested = time.monotonic()
        with _build._locked(Path(sys.argv[1])):
            acquired = time.monotonic()
            print("ACQUIRED", requested, acquired, flush=True)
            time.sleep(float(sys.argv[2]))
            released = time.monotonic()  # taken before the unlock: a later holder acquires after it
        print("RELEASED", released, flush=True)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), hold], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for hold in ("4.0", "0")]

    def line(p, tag):
        got = p.stdout.readline().split()
        assert got and got[0] == tag, (tag, got, p.poll())
        return [float(v) for v in got[1:]]

    try:
        for p in procs:
            line(p, "READY")
        first, second = procs
        first.stdin.write("go\n"); first.stdin.flush()
        _, acquired1 = line(first, "ACQUIRED")  # child 1 holds the lock now
        second.stdin.write("go\n"); second.stdin.flush()
        requested2, acquired2 = line(second, "ACQUIRED")
        (released1,) = line(first, "RELEASED")
        line(second, "RELEASED")
        for p in procs:
            p.stdin.close()
            assert p.wait(timeout=30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # child 2 asked while child 1 held the lock, and got it only after child 1 let go (ordered
    # times, not a waited duration: a loaded machine's slow hand-over cannot fail it)
    assert acquired1 <= requested2 < released1 <= acquired2


def test_build_cli_reports_failure_without_toolkit(tmp_path):
    env = dict(os.environ, CUDA_HOME=str(tmp_path / "nowhere"), PATH="/usr/bin:/bin",
               DINO_SCALE_EXT_DIR=str(tmp_path / "cache"))
    env.pop("CUDA_PATH", None)
    code = ("import glob, sys; from dino_scale.ops import _build, __main__ as m; "
            "_build.find_cuda_home = lambda: None; sys.exit(m.main(['build', '--arch', '9.0']))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "no CUDA toolkit found" in proc.stderr


def test_loader_finds_a_multi_arch_build_for_its_gpu(tmp_path, monkeypatch):
    # `python -m dino_scale.ops build --arch "8.0;9.0"` builds into the cache; a process on an
    # H100 without TORCH_CUDA_ARCH_LIST asks for "9.0". The loader must use that build (it has
    # sm_90 code), not report a cache miss (JIT disabled: error and the slow PyTorch backend;
    # JIT enabled: a second compile on every node).
    import torch

    from dino_scale.ops import ms_deform_attn_cuda as m

    monkeypatch.setenv("DINO_SCALE_EXT_DIR", str(tmp_path))
    calls = []

    good_build = library_builder()

    fake_toolchain(monkeypatch, tmp_path, good_build)
    built = _build.build_extension(arch_list="8.0;9.0")
    assert built.parent.parent == tmp_path

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setenv("DINO_SCALE_MSDA_NO_JIT", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    assert _build.default_arch_list() == "9.0"
    monkeypatch.setattr(m, "_loaded", None)
    monkeypatch.setattr(m, "_load_error", None)
    monkeypatch.setattr(m, "_ops_registered", lambda: False)
    monkeypatch.setattr(m, "_register_python_side", lambda: None)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: calls.append(path))
    assert m.load() == built and calls == [str(built)]

    # a GPU the build has no code for (sm_100): a miss
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (10, 0))
    assert _build.find_library(_build.default_arch_list()) != built


def test_loader_refuses_a_build_without_code_for_the_gpu(tmp_path, monkeypatch):
    # TORCH_CUDA_ARCH_LIST="8.0" (an image made for A100s) on an H100: the loader used to build
    # (or load) an sm_80-only library, load it, and the first forward died with "no kernel image
    # is available for execution on the device" (no fallback: the extension had loaded). Now the
    # load fails up front with the reason, so backend=None falls back with its one warning.
    import torch

    from dino_scale.ops import ms_deform_attn_cuda as m

    monkeypatch.setenv("DINO_SCALE_EXT_DIR", str(tmp_path))
    builds, loads = [], []

    good_build = library_builder(builds)

    fake_toolchain(monkeypatch, tmp_path, good_build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    monkeypatch.setattr(m, "_ops_registered", lambda: False)
    monkeypatch.setattr(m, "_register_python_side", lambda: None)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: loads.append(path))

    def fresh_load():
        monkeypatch.setattr(m, "_loaded", None)
        monkeypatch.setattr(m, "_load_error", None)
        return m.load()

    for arch in ("8.0", "8.6;8.9", "10.0"):  # no sm_90 code, no PTX to JIT from
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch)
        _build.build_extension(arch_list=arch)  # also when it is already built
        with pytest.raises(_build.BuildError, match="no code for this GPU"):
            fresh_load()
    assert loads == []
    # not built yet: refused before spending minutes on a useless compile
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    with pytest.raises(_build.BuildError, match="TORCH_CUDA_ARCH_LIST"):
        fresh_load()
    assert len(builds) == 3
    # lists that do run on sm_90: exact, PTX of an older arch, several entries
    # (the loader may take another finished build that covers the GPU: find_library)
    for arch in ("8.0+PTX", "8.0;9.0", "9.0a", "9.0"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch)
        lib = fresh_load()
        assert lib.is_file() and loads[-1] == str(lib)
        assert _build.arch_list_runs_on((lib.parent / _build.ARCH_FILE).read_text().strip(), (9, 0))
        assert _build.arch_list_runs_on(arch, (9, 0))
    # an sm_80-only build is passed over for a finished build that has sm_90 code
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert fresh_load() == lib
    # same major, older minor: sm_80 code runs on an sm_86 GPU; sm_90a code only on sm_90
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 6))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert fresh_load() == _build.library_path(_build.build_dir_for("8.0"))
    assert not _build.arch_list_runs_on("9.0a", (9, 1)) and _build.arch_list_runs_on("Hopper", (9, 0))
    # digits str.isdigit takes and int() refuses (ValueError) are no version: the entry is not parsed
    assert _build.arch_list_runs_on("9.²", (9, 0)) and _build.arch_list_runs_on("².0", (9, 0))


def test_explicit_build_dir_rebuilds_for_other_arch_or_sources(tmp_path, monkeypatch, capsys):
    # `python -m dino_scale.ops build --build-dir DIR` (a folder not named by the sources hash)
    # printed "built ... for arch 8.0 in 0.0 s" over a library made for 9.0, or from older
    # sources after csrc/ was edited: the stale library was kept and reported as the new build
    from dino_scale.ops import __main__ as cli

    src = tmp_path / "src"
    src.mkdir()
    for p in _build.source_files():
        (src / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(_build, "SOURCE_DIR", src)
    monkeypatch.setenv("DINO_SCALE_EXT_DIR", str(tmp_path / "cache"))
    built = []

    def good_build(name, sources, build_directory, **kw):
        out = Path(build_directory, f"{name}.so")
        out.write_bytes(elf(b"library %d" % len(built)))
        built.append(os.environ["TORCH_CUDA_ARCH_LIST"])
        return str(out)

    fake_toolchain(monkeypatch, tmp_path, good_build)
    build_dir = tmp_path / "mine"
    assert cli.main(["build", "--arch", "9.0", "--build-dir", str(build_dir)]) == 0
    assert cli.main(["build", "--arch", "9.0", "--build-dir", str(build_dir)]) == 0
    assert built == ["9.0"]  # up to date: not rebuilt
    assert cli.main(["build", "--arch", "8.0", "--build-dir", str(build_dir)]) == 0
    assert built == ["9.0", "8.0"], "a library for another arch list was reported as built"
    (src / "msda_cpu.cpp").write_text((src / "msda_cpu.cpp").read_text() + "\n// edited\n")
    lib = _build.build_extension(build_dir=build_dir, arch_list="8.0")
    assert built == ["9.0", "8.0", "8.0"], "a library of older sources was reported as built"
    assert lib.read_bytes() == elf(b"library 2")
    assert _build.build_extension(build_dir=build_dir, arch_list="8.0") == lib and len(built) == 3
    # the cache folders (named by the hash) made before the stamp existed are still up to date
    cached = _build.build_dir_for("9.0")
    cached.mkdir(parents=True)
    _build.library_path(cached).write_bytes(elf(b"old cache"))
    assert _build.build_extension(arch_list="9.0").read_bytes() == elf(b"old cache") and len(built) == 3


def test_the_build_stamp_changes_with_the_torch_it_links_against(monkeypatch):
    import torch

    # an explicit --build-dir is recognised by its stamp alone: a library built against another
    # torch was taken as up to date after an upgrade
    before = _build.sources_hash("9.0")
    monkeypatch.setattr(torch, "__version__", "0.0.1-other")
    assert _build.sources_hash("9.0") != before


def test_a_read_only_build_folder_serves_its_library_and_refuses_a_build_in_one_line(tmp_path, monkeypatch):
    """A shared cache this user cannot write (another user's folder, a read-only image): ``build``
    took the lock before seeing the library was up to date, and failed with "No such file or
    directory: .../.lock" (the read-only fallback could not create it; EROFS was not caught at
    all). An up-to-date library is now returned without the lock; a needed build names the
    folder and DINO_SCALE_EXT_DIR."""
    import errno

    import torch.utils.cpp_extension as cpp_ext

    from dino_scale.ops import _build

    ext = tmp_path / "ext"
    ext.mkdir()
    monkeypatch.setattr(_build, "ops_registered", lambda: False)
    monkeypatch.setattr(_build, "find_cuda_home", lambda: str(tmp_path))
    monkeypatch.setattr(cpp_ext, "load", library_builder())
    monkeypatch.setattr(_build.torch.version, "cuda", "13.0")
    lib = _build.build_extension(build_dir=ext, arch_list="9.0")
    (ext / ".lock").unlink()
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(_build.os, "open", read_only)
    assert _build.build_extension(build_dir=ext, arch_list="9.0") == lib
    with pytest.raises(_build.BuildError, match=rf"build folder {ext} cannot be written \(Read-only file system\)"
                                                r".*DINO_SCALE_EXT_DIR"):
        _build.build_extension(build_dir=ext, arch_list="8.0")  # another arch: a build is needed

"""The CUDA sources travel with the package: a wheel (or ``pip install .``, as a cluster image
would use) carries ``csrc/ms_deform_attn`` as ``dino_scale/ops/csrc/ms_deform_attn``, and
``dino_scale.ops._build`` finds them there, as it finds ``csrc/`` in a checkout.

Was: ``_build.SOURCE_DIR`` was ``<package>/../csrc/ms_deform_attn``, which only a checkout (or
an editable install) has; from an installed wheel the JIT build and ``python -m
dino_scale.ops build`` failed with "CUDA sources not found at site-packages/csrc/...".
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from dino_scale.ops import _build

ROOT = Path(__file__).resolve().parents[2]
# what a build of the project reads (the rest of the checkout is not needed for a wheel); pip
# runs with --no-index and absolute paths: offline, and never a registry package of that name
_PROJECT = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "dino_scale", "pipelines", "csrc")
_PACKAGED = "dino_scale/ops/csrc/ms_deform_attn"
_LOCATE = textwrap.dedent("""
    import json
    from dino_scale.ops import _build
    print("REPORT " + json.dumps({"module": _build.__file__, "dir": str(_build.source_dir()),
                                  "files": [p.name for p in _build.source_files()],
                                  "hash": _build.sources_hash("9.0")}))
""")


def _run(args, cwd, env=None, timeout=120) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _copy_project(dest: Path) -> Path:
    """The project files a build reads, without caches or built libraries (a build in place would
    leave build/ and *.egg-info in the checkout)."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info", "build")
    dest.mkdir()
    for name in _PROJECT:
        src = ROOT / name
        if not src.exists():
            continue
        (shutil.copytree(src, dest / name, ignore=skip) if src.is_dir() else shutil.copy2(src, dest / name))
    return dest


def _env(pythonpath: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINO_SCALE_")}
    env["PYTHONPATH"] = str(pythonpath)  # ahead of the venv's (editable) dino_scale
    return env


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_ships_the_cuda_sources_and_the_installed_package_finds_them(tmp_path):
    checkout = _build.source_files()
    assert checkout[0].parent == ROOT / "csrc" / "ms_deform_attn"
    project = _copy_project(tmp_path / "project")
    # sdist -> wheel, as `python -m build` does (no network: this venv's setuptools)
    sdist_dir, wheel_dir = tmp_path / "sdist", tmp_path / "wheel"
    code = f"from setuptools import build_meta as b; print(b.build_sdist({str(sdist_dir)!r}))"
    sdist = sdist_dir / _run([sys.executable, "-c", code], cwd=project).stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "unpacked", filter="data")
    top = sdist.name[: -len(".tar.gz")]
    assert {f"{top}/csrc/ms_deform_attn/{p.name}" for p in checkout} <= set(names), names
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
          str(wheel_dir), str(tmp_path / "unpacked" / top)], cwd=tmp_path, timeout=240)
    (wheel,) = wheel_dir.glob("dino_scale-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        for p in checkout:  # every source and header, byte for byte
            assert zf.read(f"{_PACKAGED}/{p.name}") == p.read_bytes(), p.name

    # installed from the wheel (no checkout around it): the sources are found in the package,
    # and the cache key is the checkout's (same files), so a prebuilt library is still found
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
          str(wheel)], cwd=tmp_path, timeout=240)
    out = _run([sys.executable, "-c", _LOCATE], cwd=tmp_path, env=_env(target)).stdout
    report = json.loads(next(l for l in out.splitlines() if l.startswith("REPORT "))[len("REPORT "):])
    assert Path(report["module"]).is_relative_to(target), report
    assert report["dir"] == str(target / _PACKAGED), report
    assert report["files"] == [p.name for p in checkout]
    assert report["hash"] == _build.sources_hash("9.0")

    # an install without them: `build` fails in one line naming both places it looked
    shutil.rmtree(target / "dino_scale" / "ops" / "csrc")
    proc = subprocess.run([sys.executable, "-m", "dino_scale.ops", "build", "--arch", "9.0"], cwd=tmp_path,
                          env=dict(_env(target), DINO_SCALE_EXT_DIR=str(tmp_path / "ext")),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("build failed: "), err
    assert str(target / _PACKAGED) in err[0] and str(target / "csrc" / "ms_deform_attn") in err[0], err


def test_source_dir_prefers_the_packaged_copy_then_the_checkout(tmp_path, monkeypatch):
    packaged, checkout = tmp_path / "pkg" / "ms_deform_attn", tmp_path / "co" / "ms_deform_attn"
    monkeypatch.setattr(_build, "PACKAGED_SOURCE_DIR", packaged)
    monkeypatch.setattr(_build, "CHECKOUT_SOURCE_DIR", checkout)
    with pytest.raises(_build.BuildError, match="looked in") as info:
        _build.source_dir()
    assert str(packaged) in str(info.value) and str(checkout) in str(info.value)
    checkout.mkdir(parents=True)
    (checkout / "k.cu").write_text("// checkout\n")
    assert _build.source_dir() == checkout
    packaged.mkdir(parents=True)  # a folder without .cu files does not count
    assert _build.source_dir() == checkout
    (packaged / "k.cu").write_text("// packaged\n")
    assert _build.source_dir() == packaged and _build.source_files() == [packaged / "k.cu"]
    monkeypatch.setattr(_build, "SOURCE_DIR", checkout)  # an explicit folder wins
    assert _build.source_files() == [checkout / "k.cu"]

"""The cluster image's recipe (cluster/Dockerfile, cluster/constraints.txt) and the cost
estimate (cluster/estimate.py and the table cluster/README.md shows)."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"


def test_cluster_constraints_are_what_the_suite_runs_and_the_image_installs():
    """cluster/constraints.txt pins the libraries the engine leans on: this venv (the Makefile
    installs with it) holds exactly those versions, each within pyproject.toml's range, and the
    image installs with the same file and the same Ray as the KubeRay manifests. Was: the image
    took the newest DeepSpeed / MLflow / timm / pyarrow at build time, versions no test had run."""
    import importlib.metadata

    from packaging.requirements import Requirement

    pins = {}
    for line in (CLUSTER / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    assert {"ray", "deepspeed", "mlflow", "timm", "pyarrow", "pycocotools"} <= set(pins)
    for name, version in pins.items():
        assert importlib.metadata.version(name) == version, (name, importlib.metadata.version(name), version)
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        if dep.name.lower() in pins:
            assert dep.specifier.contains(pins[dep.name.lower()]), (dep, pins[dep.name.lower()])
    text = (CLUSTER / "Dockerfile").read_text()
    assert "COPY cluster/constraints.txt" in text and "pip install -c cluster/constraints.txt -e ." in text
    assert f'"ray[train,data,default]=={pins["ray"]}"' in text
    assert "-c cluster/constraints.txt" in (ROOT / "Makefile").read_text()


def test_cluster_dockerfile_builds_extension_for_sm80_and_sm90():
    text = (CLUSTER / "Dockerfile").read_text()
    stages = re.split(r"(?m)^FROM ", text)[1:]
    assert len(stages) == 2
    assert stages[0].startswith("nvidia/cuda:${CUDA_VERSION}-devel-")
    assert stages[1].startswith("nvidia/cuda:${CUDA_VERSION}-base-")
    for stage in stages:  # build and runtime agree, so the loader finds the prebuilt library
        assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in stage
        assert "DINO_SCALE_EXT_DIR=/opt/dino-scale/ext" in stage
    assert "python -m dino_scale.ops build" in stages[0]
    assert "grep -q sm_80" in stages[0] and "grep -q sm_90" in stages[0]
    # Same torch pair as the Makefile, from the index of the CUDA major the base image has.
    make = (ROOT / "Makefile").read_text()
    for pin in re.findall(r'"((?:torch|torchvision)==[0-9.]+)"', make):
        assert f'"{pin}"' in text
    cuda = re.search(r"ARG CUDA_VERSION=(\d+)\.(\d+)", text)
    assert f"/whl/cu{cuda.group(1)}{cuda.group(2)}" in text
    import torch

    if torch.version.cuda:  # the venv's torch is the same CUDA line as the image
        assert torch.version.cuda.split(".")[0] == cuda.group(1)
    for src in re.findall(r"(?m)^COPY (?!--from)(.+?) \S+$", stages[0]):
        for item in src.split():
            if not item.endswith("*"):
                assert (ROOT / item).exists(), f"COPY source {item} missing"
    users = re.findall(r"(?m)^USER (\S+)", text)
    assert users and users[-1] not in ("root", "0")
    for name in re.findall(r"(?m)^(?:ARG|ENV) (\w+)", text):
        assert not re.search("TOKEN|SECRET|PASSWORD|KEY", name), name
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore

    # Ray pinned to what the KubeRay manifests declare (and this venv runs); the cloud SDKs the
    # autoscaler's AWS/GCP node providers import; a C compiler and Python headers for Triton.
    import ray

    pin = re.search(r'"ray\[[a-z,]+\]==([0-9.]+)"', stages[0])
    assert pin, "ray is not pinned in the image"
    for manifest in ("raycluster.yaml", "rayjob.yaml"):
        assert f'rayVersion: "{pin.group(1)}"' in (CLUSTER / "kuberay" / manifest).read_text(), manifest
    assert ray.__version__ == pin.group(1)
    assert "boto3" in stages[0] and "google-api-python-client" in stages[0]
    assert "import torch, ray, deepspeed, mlflow, boto3, googleapiclient" in stages[1]
    runtime_apt = re.search(r"apt-get install[^\n]+", stages[1]).group(0)
    assert all(pkg in runtime_apt.split() for pkg in ("gcc", "python3-dev"))


def test_cluster_dockerfile_build_command_exists():
    out = subprocess.run([sys.executable, "-m", "dino_scale.ops", "build", "--help"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


def _estimate_module():
    spec = importlib.util.spec_from_file_location("dino_scale_cluster_estimate", CLUSTER / "estimate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "fast"])
def test_cluster_estimate_bad_throughput_is_a_usage_error(value, capsys):
    # was a ValueError traceback (0, -1) or a table of nan / 0 hours (nan, inf)
    est = _estimate_module()
    with pytest.raises(SystemExit) as exc:
        est.main([f"--img-per-s={value}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--img-per-s" in err and "Traceback" not in err


def test_cluster_estimate_formula_and_readme_table():
    est = _estimate_module()
    # Hand arithmetic: 26 * 1.74M images / (64 GPUs * 4.4 img/s * 0.85) / 3600 = 52.50 h.
    o365, coco = est.recipe(4.4, "x")
    assert o365.images_seen == 26 * 1_740_000
    assert o365.wall_hours == pytest.approx(26 * 1.74e6 / (64 * 4.4 * 0.85) / 3600, rel=1e-12)
    assert o365.wall_hours == pytest.approx(52.50, abs=0.01)
    assert o365.gpu_hours == pytest.approx(64 * o365.wall_hours)
    # Fine-tuning at 1.5x: 18 * 118287 / (16 * 4.4 / 2.25 * 0.9) / 3600 = 21.00 h.
    assert coco.wall_hours == pytest.approx(18 * 118_287 / (16 * 4.4 / 2.25 * 0.9) / 3600, rel=1e-12)
    assert coco.cost_spot == pytest.approx(coco.gpu_hours * est.PRICE_SPOT)
    with pytest.raises(ValueError):
        est.stage_estimate("s", "x", 0.0, 1, 1, 1, 0.9)
    with pytest.raises(ValueError):  # a NaN throughput used to print a table of nan hours
        est.stage_estimate("s", "x", float("nan"), 1, 1, 1, 0.9)
    # The README shows exactly what the script prints for the anchors.
    rows = [r for label, v in est.ANCHORS.items() for r in est.recipe(v, label)]
    assert est.markdown(rows) in (CLUSTER / "README.md").read_text()

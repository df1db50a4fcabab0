"""The torch-free pre-run checks (dino_scale.config_checks): what they import, that their name
tables are the ones the torch modules use, and that a pipeline refuses a bad config without torch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dino_scale import config_checks as checks
from dino_scale.config import ConfigError, preset
from pipelines._common import _GPU_DRIVER_FILES

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "deepspeed", "ray", "mlflow", "pycocotools")
_NO_GPU_DRIVER = not any(os.path.exists(p) for p in _GPU_DRIVER_FILES)


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_config_checks_import_no_torch_ray_deepspeed_or_mlflow():
    proc = _run_python("import sys, dino_scale.config_checks; "
                       f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_config_checks_name_tables_are_the_torch_modules_own():
    """One source: the modules that build or run a setting take its allowed names from here."""
    from dino_scale import ops
    from dino_scale.models import backbone, compile as model_compile, transformer

    assert tuple(model_compile._GRANULARITY) == checks.COMPILE_GRANULARITIES
    assert model_compile._MODES is checks.COMPILE_MODES
    assert tuple(transformer._ACTIVATIONS) == checks.ACTIVATION_NAMES == transformer.ACTIVATIONS
    assert ops._BACKENDS is checks.MSDA_BACKENDS
    assert backbone.BACKBONE_NAMES is checks.BACKBONE_NAMES


@pytest.mark.parametrize("overrides,match", [
    (["train.compile=true", "train.compile_granularity=block"], "train.compile_granularity must be one of"),
    (["train.compile=true", "train.compile_mode=fast"], "train.compile_mode must be one of"),
    (["model.activation=silu"], r"model.activation 'silu' is not one of relu, gelu"),
    (["model.msda_backend=triton"], "model.msda_backend 'triton' is not one of none, pytorch, cuda"),
    (["model.num_select=0"], "model.num_select must be an int >= 1"),
    (["model.num_classes=200", "model.dn_labelbook_size=91"], "model.num_classes 200 needs dn_labelbook_size"),
    (["train.precision=fp8"], "train.precision must be fp32, bf16 or fp16"),
    (["train.schedule=linear"], "unknown schedule 'linear'"),
    (["data.exif_orientation=rotated"], "data.exif_orientation must be one of auto, stored, upright"),
    (["eval.tta=true", "eval.tta_scales=[]"], "eval.tta_scales must name at least one size"),
    (["data.batch_size=0"], r"data.batch_size \(images per worker\) must be >= 1, got 0"),  # the key, named
    # accepted before, then every worker failed or trained wrong: Python refuses a PYTHONHASHSEED
    # outside [0, 2**32); a NaN loss weight aborted the run, a negative one trained uphill, NaN
    # matcher costs matched at random; [8, 8] dropped the lr twice at epoch 8; "none" was a resource
    (["train.seed=-1"], r"train.seed must be an integer in \[0, 4294967295\]"),
    (["train.seed=20261207090000"], "the workers' PYTHONHASHSEED"),
    (["model.focal_alpha=nan"], r"model.focal_alpha must be in \[0, 1\], got nan"),
    (["model.bbox_loss_coef=-1"], "model.bbox_loss_coef must be a finite number >= 0, got -1"),
    (["model.set_cost_giou=inf"], "model.set_cost_giou must be a finite number >= 0"),
    (["model.position_temperature=0"], "model.position_temperature must be a finite number > 0"),
    (["train.schedule=multistep", "train.lr_drop_epochs=[8,8]"], r"lr_drop_epochs \[8, 8\] names an epoch twice"),
    (["train.worker_resources=none"], "'none' is no resource name; for none give"),
])
def test_check_training_config_refuses_each_section_with_a_config_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        checks.check_training_config(preset("tiny", overrides))


def test_check_training_config_passes_every_preset():
    for name in ("tiny", "r50_4scale", "r50_5scale", "swinl_4scale", "swinl_5scale"):
        checks.check_training_config(preset(name))


def test_a_pipeline_refuses_a_bad_training_config_without_importing_torch(tmp_path):
    """The pre-run checks of the training pipelines (worker counts, model names, schedules) ran in
    torch modules: a typo in --set took 4-6 s (torch, torchvision, DeepSpeed imports) to refuse."""
    cases = [["--preset", "tiny", "--workers", "3"],
             ["--preset", "tiny", "--set", "model.activation=silu"],
             ["--preset", "r50_4scale", "--set", "train.compile=true", "--set", "train.compile_mode=fast"]]
    if _NO_GPU_DRIVER:  # the default preset and --gpus look for GPUs: without a driver, torch is not asked
        cases += [["--workers", "3"], ["--preset", "tiny", "--gpus", "1"]]
    code = ("import sys; from pipelines import pretrain_o365 as p; from pipelines._common import run_main\n"
            f"for argv in {cases!r}:\n"
            f"    print(run_main(p.main, argv + ['--work-dir', {str(tmp_path)!r}]), flush=True)\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = _run_python(code)
    lines = proc.stdout.split("\n")
    assert lines[:len(cases)] == ["2"] * len(cases), proc.stdout + proc.stderr[-2000:]
    assert lines[len(cases)] == "[]", proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == len(cases), proc.stderr[-2000:]
    assert "not a multiple" in errors[0] and "model.activation 'silu'" in errors[1]
    assert "train.compile_mode must be one of" in errors[2]
    assert not (tmp_path / "data").exists()  # nothing generated

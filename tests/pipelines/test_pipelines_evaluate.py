"""pipelines.evaluate's printed AP table and exit status."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dino_scale.config import preset, to_dict
from dino_scale.engine.checkpoint import save_weights
from dino_scale.models import build_dino
from pipelines.evaluate import exit_status, format_table


def test_ap_table_shows_sizes_without_objects_and_no_measurement_as_dashes():
    """pycocotools reports -1 for an object size the ground truth has none of (a val set of large
    objects only: APs, APm), which the table printed as '-100.00' AP %; a NaN AP (no image
    evaluated, every detection non-finite) printed 'nan'. Both are now '-', and a line says why."""
    metrics = {"AP": 0.5123, "AP50": 0.75, "AP75": 0.5, "APs": -1.0, "APm": -1.0, "APl": 0.5123}
    table = format_table(metrics, "title")
    assert "-100" not in table
    rows = table.splitlines()
    assert rows[0] == "title"
    values = [v.strip() for v in rows[2].split("|")]
    assert values == ["51.23", "75.00", "50.00", "-", "-", "51.23"]
    assert "APs, APm: the ground truth has no objects of that size" in table
    nan_table = format_table({k: math.nan for k in metrics}, "title")
    assert [v.strip() for v in nan_table.splitlines()[2].split("|")] == ["-"] * 6
    assert "no AP was measured" in nan_table and "a ground truth without an object that is not a crowd" in nan_table
    assert "no AP was measured" not in table and "no objects" not in format_table({**metrics, "APs": 0.1,
                                                                                     "APm": 0.2}, "t")


def test_evaluate_exits_nonzero_when_no_ap_was_measured():
    """An evaluation that measured no AP (NaN: no image evaluated, no object in the ground truth,
    every detection non-finite) exited 0, like a scored model: ``evaluate && promote`` went on.
    It now exits 1 with an ``error:`` line; an AP of 0 is a measurement and exits 0."""
    assert exit_status({"AP": 0.41, "AP50": 0.6}) == (0, None)
    assert exit_status({"AP": 0.0}) == (0, None)
    for metrics in ({"AP": math.nan, "AP50": math.nan}, {}, {"AP": None}, {"AP": "nan"}):
        status, reason = exit_status(metrics)
        assert status == 1 and "no AP was measured" in reason, metrics


@pytest.mark.parametrize("overrides, setting", [(["model.num_select=0"], "model.num_select"),
                                                (["eval.batch_size=0"], "eval.batch_size"),
                                                (["eval.tta=true", "eval.tta_scales=[]"], "eval.tta_scales")])
def test_evaluate_bad_eval_settings_are_refused_before_data_or_ray(tmp_path, monkeypatch, capsys,
                                                                   mlflow_store_restored, overrides, setting):
    """``--set model.num_select=0`` (the detections kept per image) passed the up-front checks:
    the synthetic val set was generated, Ray started and an MLflow run was opened before every
    worker failed building its PostProcess (``error: WorkerGroupError: Training failed due to worker
    errors:``, exit 1, 80 s on a 2-core box); a bad ``eval.*`` was
    refused only after Ray started. Both are now a one-line usage error (exit 2) first."""
    from pipelines import _common, evaluate
    from pipelines._common import run_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = preset("tiny", ["model.num_classes=91"])
    save_weights(tmp_path / "ckpt", build_dino(cfg.model)[0].state_dict(), config=to_dict(cfg))

    def started(*args, **kwargs):
        raise AssertionError("data was generated or Ray started")

    monkeypatch.setattr(_common, "connect_ray", started)
    monkeypatch.setattr(evaluate, "synthetic_dirs", started)
    argv = ["--model", str(tmp_path / "ckpt"), "--work-dir", str(tmp_path / "work")]
    for o in overrides:
        argv += ["--set", o]
    assert run_main(evaluate.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and setting in err and len(err.strip().splitlines()) == 1, err


def test_evaluate_official_file_of_another_preset_is_refused_before_data_or_ray(tmp_path, monkeypatch, capsys,
                                                                               mlflow_store_restored):
    """An official ``.pth`` (no config) that is not the model of the preset it is evaluated with
    (no ``--preset`` on a CPU machine: tiny) generated the val set and started Ray, and every
    worker failed loading it (``error: WorkerGroupError: Training failed due to worker errors:``,
    the workers' log ``RuntimeError: Error(s) in loading state_dict for DINO``, exit 1). It is now checked
    against that preset's model (built on the meta device: no memory) first: a usage error (exit 2)
    asking for ``--preset``."""
    from dino_scale.models import build_model
    from pipelines import _common, evaluate
    from pipelines._common import run_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(_common, "_gpus_available", lambda: False)  # the default preset: tiny

    def started(*args, **kwargs):
        raise AssertionError("data was generated or Ray started")

    monkeypatch.setattr(_common, "connect_ray", started)
    monkeypatch.setattr(evaluate, "synthetic_dirs", started)
    deeper = build_model(preset("tiny", ["model.dec_layers=3"]).model)  # not the tiny preset's layout
    torch.save({"model": deeper.state_dict()}, tmp_path / "checkpoint.pth")
    assert run_main(evaluate.main, ["--model", str(tmp_path / "checkpoint.pth"), "--work-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not fit preset tiny (the default): give --preset" in err and len(err.strip().splitlines()) == 1
    from pipelines._init import check_fits_preset

    fitting = build_model(preset("tiny").model)
    check_fits_preset("fits.pth", {"model": fitting.state_dict()}, preset("tiny"), False)  # no error


@pytest.mark.parametrize("flags, joined, want", [
    (["--gpus", "0"], False, "tiny"),  # GPUs here, but --gpus 0: the CPU preset, as training picks it
    ([], True, "r50_4scale"),  # a joined cluster: its GPUs decide (this node has none)
])
def test_evaluate_default_preset_follows_gpus_asked_and_the_cluster(flags, joined, want, tmp_path, monkeypatch, capsys,
                                                                     mlflow_store_restored):
    """The default preset of a model without a config followed this node's GPUs only: ``--gpus 0``
    on a GPU node picked ResNet-50, and a job joining a GPU cluster from a GPU-less head picked
    ``tiny`` (the training pipelines follow ``--gpus``, then the cluster's GPUs)."""
    from dino_scale.models import build_model
    from pipelines import _common, evaluate
    from pipelines._common import run_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    connected = []
    if joined:
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # never dialled: connect_ray is replaced
        monkeypatch.setattr(_common, "_gpus_available", lambda: bool(connected))  # GPUs in the cluster only
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.setattr(_common, "_gpus_available", lambda: True)
    monkeypatch.setattr(_common, "connect_ray", lambda *a, **k: connected.append(1) or "joined")
    deeper = build_model(preset("tiny", ["model.dec_layers=3"]).model)  # fits no preset: refused after the pick
    torch.save({"model": deeper.state_dict()}, tmp_path / "checkpoint.pth")
    assert run_main(evaluate.main, ["--model", str(tmp_path / "checkpoint.pth"), "--work-dir", str(tmp_path),
                                    *flags]) == 2
    said = capsys.readouterr()
    assert f"does not fit preset {want} (the default): give --preset" in said.err
    assert f"using the default preset {want}" in said.out
    assert bool(connected) == joined


def test_evaluate_gpus_this_machine_lacks_are_refused(tmp_path, monkeypatch, capsys, mlflow_store_restored):
    """``--gpus 1`` on a machine without a GPU (the embedded local Ray: nothing can join it) asked
    Ray Train for a GPU worker and waited for it forever ("No available node types can fulfill
    resource request {'GPU': 1.0, 'CPU': 1.0}", still waiting when killed at 170 s). It is now a
    usage error (exit 2) naming the GPUs there are; a joined cluster (``RAY_ADDRESS``) may still be
    given GPU nodes, so it waits."""
    import ray

    import dino_scale.engine.api
    from pipelines import _common, evaluate
    from pipelines._common import run_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = preset("tiny", ["model.num_classes=91"])
    save_weights(tmp_path / "ckpt", build_dino(cfg.model)[0].state_dict(), config=to_dict(cfg))
    monkeypatch.setattr(evaluate, "synthetic_dirs", lambda *a, **k: (str(tmp_path / "val"),))
    monkeypatch.setattr(evaluate, "whole_dataset", lambda val: None)
    monkeypatch.setattr(evaluate, "categories_of", lambda val: [{"id": 1, "name": "person"}])
    started = []
    monkeypatch.setattr(_common, "connect_ray",
                        lambda *a, **k: started.append(1) or "started embedded local Ray (4 logical CPUs)")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(_common, "local_gpu_count", lambda: 1)  # past the early check of the flags

    def train(*args, **kwargs):
        raise AssertionError("Ray Train was asked for GPU workers")

    monkeypatch.setattr(dino_scale.engine.api, "evaluate_weights", train)
    argv = ["--model", str(tmp_path / "ckpt"), "--work-dir", str(tmp_path / "work"), "--gpus", "1"]
    assert run_main(evaluate.main, argv) == 2
    err = capsys.readouterr().err
    assert "--gpus 1" in err and "0 GPU" in err and len(err.strip().splitlines()) == 1, err
    assert started == [1]  # refused by the check of Ray's resources, not the early one


def test_evaluate_reads_an_official_file_once(tmp_path, monkeypatch, capsys, mlflow_store_restored):
    """An official ``.pth`` (no config) was read twice on the driver: for the preset check, then
    again by the engine to hand to the workers (a Swin-L file: ~1 GB read and unpickled twice).
    The state dict of the check is now handed to the engine. Stopped where Ray would start. It
    records no validation set: the generated one it is scored on is said (was without a word)."""
    from dino_scale.engine import api
    from dino_scale.models import build_model
    from pipelines import _common, evaluate

    class RayStarted(Exception):
        pass

    def ray_started(*args, **kwargs):
        raise RayStarted

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(_common, "_gpus_available", lambda: False)  # the default preset: tiny
    monkeypatch.setattr(_common, "connect_ray", lambda *a, **k: "started embedded local Ray (4 logical CPUs)")
    monkeypatch.setattr(api, "ensure_ray", ray_started)
    path = tmp_path / "checkpoint.pth"
    model = build_model(preset("tiny", ["model.num_classes=91"]).model)
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    reads, load = [], torch.load

    def counting_load(f, *args, **kwargs):
        if Path(getattr(f, "name", f)).resolve() == path.resolve():
            reads.append(f)
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    with pytest.raises(RayStarted):  # read, checked against tiny, handed on: the engine reached Ray
        evaluate.run(["--model", str(path), "--work-dir", str(tmp_path / "work")])
    assert len(reads) == 1
    said = capsys.readouterr()
    assert "note: the model records no validation set (no lineage.json beside its weights); using a synthetic " \
           "one (give --data)" in said.out + said.err


def test_evaluate_on_another_val_set_reads_its_own_images(tmp_path, monkeypatch, capsys, mlflow_store_restored):
    """A model trained with ``--set data.val_image_root=<the cluster's folder>`` carries it in its
    config, and ``evaluate --data <a val set here>`` applied it to that set: refused when the
    folder is absent here, or scored on that folder's files of the same names. Another set is read
    from its own manifest's image root; the lineage's own set, or a root set in this call, keeps
    the value. Stopped where Ray Train would start."""
    import dino_scale.engine.api
    import pipelines._datasets
    from pipelines import _common, evaluate
    from pipelines._common import run_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    trained_val, here = tmp_path / "trained-val", tmp_path / "val-here"
    trained_val.mkdir()
    cfg = preset("tiny", ["model.num_classes=91", "data.image_root=/mnt/cluster/images",
                          "data.val_image_root=/mnt/cluster/val2017"])
    save_weights(tmp_path / "ckpt", build_dino(cfg.model)[0].state_dict(), config=to_dict(cfg))
    (tmp_path / "ckpt" / "lineage.json").write_text(json.dumps({"val_dir": str(trained_val)}))
    monkeypatch.setattr(pipelines._datasets, "_one", lambda path, *a, **k: str(path))
    monkeypatch.setattr(evaluate, "whole_dataset", lambda val: None)
    monkeypatch.setattr(evaluate, "categories_of", lambda val: [{"id": 1, "name": "person"}])
    monkeypatch.setattr(_common, "connect_ray", lambda *a, **k: "started embedded local Ray (4 logical CPUs)")
    monkeypatch.setattr(_common, "_gpus_available", lambda: False)
    seen = []

    def train(cfg, weights, val, *args, **kwargs):
        seen.append((val, cfg.data.image_root, cfg.data.val_image_root))
        raise SystemExit(0)

    monkeypatch.setattr(dino_scale.engine.api, "evaluate_weights", train)

    def evaluated(*argv):
        assert run_main(evaluate.main, ["--model", str(tmp_path / "ckpt"), "--work-dir", str(tmp_path / "w"),
                                        *argv]) == 0
        return seen.pop(), capsys.readouterr().out

    (val, root, val_root), out = evaluated("--data", str(here))
    assert (val, root, val_root) == (str(here), None, None)
    assert f"note: data.val_image_root=/mnt/cluster/val2017 of the model's training run is not applied to {here}" \
           in out and "note: data.image_root=/mnt/cluster/images" in out
    assert evaluated("--data", str(here), "--set", "data.val_image_root=/data/val")[0] == \
        (str(here), None, "/data/val")
    (val, root, val_root), out = evaluated()  # the set it was trained with: the run's roots are its own
    assert (val, root, val_root) == (str(trained_val), "/mnt/cluster/images", "/mnt/cluster/val2017")
    assert "is not applied" not in out


def test_boxes_clipped_at_conversion_are_noted_beside_the_ap():
    """The val set's boxes clipped to their image at conversion (scored clipped, not as the file
    draws them) were in no line: a note now, after the warning about what was lost."""
    from pipelines._results import conversion_note

    note = conversion_note({"val_images_skipped_at_conversion": 0, "val_boxes_dropped_at_conversion": 0,
                            "val_boxes_clipped_at_conversion": 1})
    assert note == ("note: 1 box(es) of the validation set cross their image's border and are scored clipped to it "
                    "(the conversion clips them), not as the annotation file draws them")
    both = conversion_note({"val_images_skipped_at_conversion": 2, "val_boxes_dropped_at_conversion": 3,
                            "val_boxes_clipped_at_conversion": 1})
    assert both.startswith("warning: the validation set lost 2 image(s) and 3 box(es)") and both.count("\n") == 1
    assert conversion_note({"val_boxes_clipped_at_conversion": 0}) is None

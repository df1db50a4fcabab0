"""`dino-scale prepare-data` and `check-data` (and `python -m pipelines.prepare_data`): flags named
when at fault, exit status, one-line failures, the folders and files check-data reads."""
from __future__ import annotations

import json
import os
import sys

import pytest

from dino_scale import cli


def test_cli_check_data_exit_status_names_damaged_records(tmp_path, capsys):
    """``dino-scale check-data``: 0 when every record matches its checksums, 1 listing the damaged
    records (and --json), 2 with one line when a folder's shards are not all there."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
    from test_data_integrity import BOX, _convert, _replace_in_shard

    import struct

    good, _ = _convert(tmp_path / "good")
    bad, _ = _convert(tmp_path / "bad")
    _replace_in_shard(bad, struct.pack("<f", BOX), struct.pack("<f", BOX + 8))
    assert cli.main(["check-data", str(good)]) == 0
    out = capsys.readouterr().out
    assert "1/1 shards read" in out and f"{good}: 4 records in 1 shards match their checksums" in out
    report = tmp_path / "report.json"
    assert cli.main(["check-data", str(good), str(bad), "--quiet", "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "shards read" not in out and f"{bad}: 1 damaged record(s)" in out
    assert "(image id 2): its labels do not match" in out
    assert [len(r["damaged"]) for r in json.loads(report.read_text())] == [0, 1]
    (bad / "shard-00000.parquet").unlink()
    assert cli.main(["check-data", str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert "shards read" not in captured.out  # the folders are checked whole before any is read
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: 1 of 1 shards do not match manifest.json")


@pytest.mark.parametrize("flag,value", [("--shard-size-mb", "0"), ("--shard-size-mb", "-1"),
                                        ("--shard-size-mb", "nan"), ("--shard-size-mb", "inf"),
                                        ("--max-images-per-shard", "0")])
def test_cli_prepare_data_shard_limits_must_be_positive(flag, value, tmp_path, capsys):
    """A shard limit <= 0 wrote one image per shard (Objects365: 1.7M shards) and exited 0; NaN
    and inf failed inside the converter without naming the flag."""
    from dino_scale.data import synthetic

    root, ann = synthetic.generate(tmp_path / "raw", flavour="coco-like", num_images=2)
    out = tmp_path / "out"
    code = cli.main(["prepare-data", "--annotations", str(ann), "--images", str(root), "--out", str(out),
                     flag, value])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("error: " + flag), err
    assert not out.exists()


@pytest.mark.parametrize("case", ["out_is_a_file", "images_is_a_file", "negative_val_split", "zero_val_split",
                                  "comma_in_out"])
def test_cli_prepare_data_names_the_flag_at_fault(case, tmp_path, capsys):
    """Was: "[Errno 17] File exists" (--out a file), "image folder not found" for an --images
    that exists as a file, "o365_val_split must be >= 0" (no flag name); an --out with a comma
    converted, then no pipeline could read it ("dataset path not found" for its first half)."""
    from dino_scale.data import synthetic

    root, ann = synthetic.generate(tmp_path / "raw", flavour="coco-like", num_images=2)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = {"out_is_a_file": ["--images", str(root), "--out", str(blocker)],
            "images_is_a_file": ["--images", str(blocker), "--out", str(tmp_path / "out")],
            "negative_val_split": ["--images", str(root), "--out", str(tmp_path / "out"), "--o365-val-split", "-5"],
            "zero_val_split": ["--images", str(root), "--out", str(tmp_path / "out"), "--o365-val-split", "0"],
            "comma_in_out": ["--images", str(root), "--out", str(tmp_path / "out" / "coco,v2")]}
    flag = {"out_is_a_file": "--out", "images_is_a_file": "--images", "negative_val_split": "--o365-val-split",
            "zero_val_split": "--o365-val-split", "comma_in_out": "--out"}
    code = cli.main(["prepare-data", "--annotations", str(ann), *argv[case]])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {flag[case]} "), err
    assert not (tmp_path / "out").exists()


def test_prepare_data_module_help_names_the_module():
    """`python -m pipelines.prepare_data --help` said `usage: prepare_data.py`, a file that is not
    the command (like every other pipeline, the usage line is what the user types)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pipelines.prepare_data", "--help"], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m pipelines.prepare_data "), proc.stdout[:200]


def test_prepare_data_module_fails_with_one_line(tmp_path):
    """`python -m pipelines.prepare_data` ended an unexpected failure (or Ctrl-C) with a traceback;
    `dino-scale prepare-data` printed one line: both now go through the same handler."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ann = tmp_path / "a.json"
    ann.write_text("{}")
    code = ("import runpy, sys, dino_scale.data as d\n"
            "def boom(*a, **k):\n    raise RuntimeError('disk on fire')\n"
            "d.convert_coco = boom\n"
            "sys.argv = ['prepare_data', '--annotations', sys.argv[1], '--images', sys.argv[2], '--out', sys.argv[2]]\n"
            "runpy.run_module('pipelines.prepare_data', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ann), str(tmp_path / "out")], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "error: RuntimeError: disk on fire" in proc.stderr, proc.stderr


def test_cli_check_data_of_a_folder_holding_train_and_val_checks_both(tmp_path, capsys):
    """A folder holding train/ and val/ (what --data takes) was refused: "no manifest.json in ...:
    not a converted dataset"."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
    from test_data_integrity import _convert

    _convert(tmp_path / "coco", name="train")
    _convert(tmp_path / "coco", name="val")
    (tmp_path / "coco" / "img").rename(tmp_path / "img")  # not a dataset: not checked
    assert cli.main(["check-data", str(tmp_path / "coco"), "--no-image-files"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'coco'} holds datasets: checking train, val" in out
    assert all(f"{tmp_path / 'coco' / n}: 4 records in 1 shards match" in out for n in ("train", "val")), out
    # a folder named twice (itself and through its parent) is checked once; --quiet: the summaries only
    assert cli.main(["check-data", str(tmp_path / "coco"), str(tmp_path / "coco" / "val"), "--quiet",
                     "--no-image-files"]) == 0
    out = capsys.readouterr().out
    assert out.count("records in 1 shards match") == 2 and "holds datasets" not in out, out
    # a split whose manifest is gone (an incomplete copy, a conversion cut short) was passed over, exit 0
    (tmp_path / "coco" / "val" / "manifest.json").unlink()
    assert cli.main(["check-data", str(tmp_path / "coco"), "--no-image-files"]) == 2
    err = capsys.readouterr().err
    assert f"no manifest.json in {tmp_path / 'coco' / 'val'}, which holds shards: an incomplete copy" in err, err
    (tmp_path / "empty").mkdir()  # neither a dataset nor a folder of datasets: the manifest error, as before
    assert cli.main(["check-data", str(tmp_path / "empty")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_cli_check_data_looks_for_the_image_files_a_dataset_names(tmp_path, capsys):
    """A dataset converted without --embed-images passed check-data with its images gone (it read
    the shards only): training then skipped every image, or refused the folder after Ray started.
    Each record's file is now looked up (exit 1 naming the missing ones; --image-root for images
    that moved; --no-image-files to skip the lookups); an embedded dataset is not looked at."""
    import shutil

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
    from test_data_integrity import _convert

    ref, _ = _convert(tmp_path, embed=False, name="ref")
    report = tmp_path / "r.json"
    assert cli.main(["check-data", str(ref), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert f"{ref}: all 4 image files are there" in out and "4/4 image files looked up" in out
    assert json.loads(report.read_text())[0]["image_files"]["missing"] == 0
    (tmp_path / "img" / "3.jpg").unlink()
    assert cli.main(["check-data", str(ref), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"{ref}: 1 of 4 image files are missing" in out and str(tmp_path / "img" / "3.jpg") in out
    assert "looked up" not in out  # --quiet
    assert cli.main(["check-data", str(ref), "--no-image-files"]) == 0
    assert "image files" not in capsys.readouterr().out
    shutil.move(str(tmp_path / "img"), str(tmp_path / "moved"))  # every image elsewhere now
    assert cli.main(["check-data", str(ref), "--quiet"]) == 1
    assert f"{ref}: 4 of 4 image files are missing" in capsys.readouterr().out
    (tmp_path / "moved" / "3.jpg").write_bytes(b"x")
    assert cli.main(["check-data", str(ref), "--image-root", str(tmp_path / "moved")]) == 0
    assert "all 4 image files are there" in capsys.readouterr().out
    embedded, _ = _convert(tmp_path / "e", embed=True)
    shutil.rmtree(tmp_path / "e" / "img")
    assert cli.main(["check-data", str(embedded)]) == 0
    assert "image files" not in capsys.readouterr().out
    # one root per folder, in order (was: refused, after the first folder's full read); one root for
    # folders converted against different roots is ambiguous: refused before any read
    other, _ = _convert(tmp_path / "o", embed=False, name="other")
    assert cli.main(["check-data", str(ref), str(other), "--quiet", "--image-root",
                     f"{tmp_path / 'moved'},{tmp_path / 'o' / 'img'}"]) == 0
    out = capsys.readouterr().out
    assert f"{ref}: all 4 image files are there" in out and f"{other}: all 4 image files are there" in out
    assert cli.main(["check-data", str(ref), str(other), "--image-root", str(tmp_path / "moved")]) == 2
    captured = capsys.readouterr()
    assert "ambiguous" in captured.err and "match their checksums" not in captured.out
    # a folder converted (by the library) without an image root: not looked up, and said so
    from dino_scale.data import convert_coco

    bare = tmp_path / "bare"
    convert_coco(tmp_path / "ann.json", None, bare, check_files=False, progress=False)
    assert cli.main(["check-data", str(bare)]) == 0
    assert "no image root recorded" in capsys.readouterr().out


def test_cli_check_data_json_destination_is_checked_before_reading(tmp_path, capsys):
    """A --json in a folder that does not exist failed only after every shard was read (minutes
    to hours on a cluster copy), with exit 2 instead of the check's own 0/1 and the report lost."""
    assert cli.main(["synth", str(tmp_path / "d"), "-n", "2"]) == 0
    capsys.readouterr()
    assert cli.main(["check-data", str(tmp_path / "d"), "--json", str(tmp_path / "no" / "r.json")]) == 2
    captured = capsys.readouterr()
    assert "shards read" not in captured.out and "match their checksums" not in captured.out
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: --json") and str(tmp_path / "no") in err[0], err


def test_cli_check_data_waits_for_a_conversion_of_its_folder(tmp_path, capsys, monkeypatch):
    """check-data read without the readers' lock: a conversion of the folder run meanwhile
    replaced shards under it (false "unreadable shard(s) ... copy the folder again", exit 1). It
    now holds the lock a training job holds: it waits while the folder is being converted again,
    and a conversion started during its read is refused (as for a job)."""
    import threading

    from dino_scale.data.readers import DatasetInUseError, rewriting_dataset

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
    from test_data_integrity import _convert

    good, _ = _convert(tmp_path / "good")
    result = []
    with rewriting_dataset(good, "a test's conversion"):  # a conversion in progress
        reader = threading.Thread(target=lambda: result.append(cli.main(["check-data", str(good)])))
        reader.start()
        reader.join(1.5)
        assert reader.is_alive() and not result  # waiting, not reading
    reader.join(60)
    assert result == [0]
    assert "being converted again by another process; waiting for it to finish" in capsys.readouterr().out
    from pipelines import check_data

    real = check_data._check

    def check_then_convert(a):  # a conversion attempted while check-data reads
        with pytest.raises(DatasetInUseError, match="a running job reads it"):
            with rewriting_dataset(good, "a test's conversion"):
                pass
        return real(a)

    monkeypatch.setattr(check_data, "_check", check_then_convert)
    assert cli.main(["check-data", str(good)]) == 0

"""Converting again into a dataset folder: a damaged shard is rewritten, a folder a running job
reads is not touched, a job waits for a rewrite, and the old dataset stays until the new one is
usable."""
from __future__ import annotations

import json

import pytest

from dino_scale.data import convert_coco, iter_records, read_manifest
from dino_scale.data import shards as shards_mod
from test_data_convert import _shard_bytes


@pytest.mark.parametrize("damage", ["footer overwritten", "column renamed"])
def test_data_convert_again_rewrites_a_shard_damaged_at_its_size(coco_like, tmp_path, capsys, damage):
    """Converting the same input again over a folder whose shard was damaged in place (same size)
    converts again, as it does for a missing or cut-short shard. It answered "already converted"
    (it compared sizes only) and returned the damaged folder, which the check before a run then
    refused with the advice to convert again: the advice could not be followed."""
    from dino_scale.data import ShardError
    from dino_scale.data.preflight import preflight_shards

    root, ann = coco_like
    out = tmp_path / "out"
    convert_coco(ann, root, out, embed_images=True, max_images_per_shard=8, progress=False)
    before = [r["image_id"] for r in iter_records(out)]
    shard = out / read_manifest(out)["shards"][1]["file"]
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-204] + bytes(200) + whole[-4:] if damage == "footer overwritten"
                      else whole.replace(b"category_ids", b"category_idz"))
    with pytest.raises(ShardError, match=f"{shard.name} (has a footer|does not hold)"):
        preflight_shards(out)
    capsys.readouterr()
    convert_coco(ann, root, out, embed_images=True, max_images_per_shard=8, progress=True)
    said = capsys.readouterr().out
    assert f"{shard.name} " in said and "converting again" in said and "already converted" not in said
    assert preflight_shards(out) and [r["image_id"] for r in iter_records(out)] == before
    convert_coco(ann, root, out, embed_images=True, max_images_per_shard=8, progress=True)
    assert "already converted" in capsys.readouterr().out


_READ = ("import sys, time; from dino_scale.data.readers import reading_datasets\n"
         "with reading_datasets([sys.argv[1]], print):\n"
         "    print('reading', flush=True); time.sleep(120)\n")


def test_data_convert_again_refuses_a_folder_a_running_job_reads(coco_like, tmp_path):
    """A second job converting an edited annotation file into the folder a running job trains on
    deleted its shards and wrote new ones under the same names: the first job failed mid-epoch on
    an unreadable shard, or read other data part-way. While a job reads it (a shared lock its
    driver holds), such a conversion is refused and leaves the folder as it was; the same input
    again ("already converted") is fine, and once the job ends the conversion goes ahead."""
    import subprocess
    import sys

    from dino_scale.data.readers import DatasetInUseError

    root, original = coco_like
    ann, out = tmp_path / "annotations.json", tmp_path / "out"
    ann.write_text(original.read_text())
    convert_coco(ann, root, out, max_images_per_shard=8, progress=False)

    def state():
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.parquet"))} | {
            "manifest": (out / "manifest.json").read_bytes()}

    before = state()
    job = subprocess.Popen([sys.executable, "-c", _READ, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert job.stdout.readline().strip() == "reading"
        convert_coco(ann, root, out, max_images_per_shard=8, progress=False)  # unchanged: nothing rewritten
        data = json.loads(ann.read_text())
        data["annotations"] = data["annotations"][:-3]  # edited in place
        ann.write_text(json.dumps(data))
        with pytest.raises(DatasetInUseError, match=r"the annotation file or the settings changed .* a running "
                                                    r"job reads it .* Wait for that job to end, or convert into"):
            convert_coco(ann, root, out, max_images_per_shard=8, progress=False)
        assert state() == before
    finally:
        job.kill()
        job.wait()
    convert_coco(ann, root, out, max_images_per_shard=8, progress=False)
    assert state()["manifest"] != before["manifest"]


def test_a_job_waits_for_a_conversion_rewriting_its_dataset(tmp_path):
    """A job that starts while its dataset folder is being converted again waits for the new
    folder, saying so, instead of reading shards as they are deleted and written."""
    import subprocess
    import sys
    import threading
    import time

    from dino_scale.data.readers import reading_datasets

    folder = tmp_path / "data"
    folder.mkdir()
    # the rewrite ends when told to (a line on its stdin), once the job has said it waits
    rewrite = ("import sys, time; from dino_scale.data.readers import rewriting_dataset\n"
               "with rewriting_dataset(sys.argv[1], 'changed'):\n"
               "    print('rewriting', flush=True); sys.stdin.readline(); released = time.time()\n"
               "print(released, flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", rewrite, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "rewriting"
        said, entered, failed = [], [], []

        def job():
            try:
                with reading_datasets([str(folder)], said.append):
                    entered.append(time.time())
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                failed.append(exc)

        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not said and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not failed, failed
        assert said == [f"{folder.resolve()}: being converted again by another process; waiting for it to finish"]
        assert not entered  # still waiting
        proc.stdin.write("go\n")
        proc.stdin.flush()
        released = float(proc.stdout.readline())
        thread.join(timeout=60)
        assert not failed and entered and entered[0] >= released, failed  # entered once the rewrite had ended
    finally:
        proc.kill()
        proc.wait()


def test_data_convert_again_keeps_the_dataset_until_the_new_one_is_usable(coco_like, tmp_path, monkeypatch):
    """A rerun with other settings removed the dataset before converting again: with a mistyped
    image folder (every image missing) the new conversion failed, and the folder was left with
    nothing (hours of conversion lost). The new conversion is staged in ``.next/`` and swapped in
    once usable; a swap cut short (a crash) is finished by the next run."""
    import os

    from dino_scale.data import ConversionError
    from dino_scale.data.manifest import shard_paths

    root, ann = coco_like
    out = tmp_path / "out"
    first = convert_coco(ann, root, out, progress=False)
    before = _shard_bytes(out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="could be used from the image folder"):
        convert_coco(ann, tmp_path / "empty", out, progress=False)
    assert read_manifest(out) == first and _shard_bytes(out) == before and not (out / ".next").exists()
    assert len(list(iter_records(out))) == first["num_images"]

    # other settings that work: swapped in; the swap cut short after its first shard is finished next time
    replace, moved = os.replace, []

    def crash_after_one_shard(src, dst):
        if str(src).endswith(".parquet") and ".next" in str(src) and moved:
            raise KeyboardInterrupt("killed mid-swap")
        moved.append(src)
        return replace(src, dst)

    monkeypatch.setattr(shards_mod.os, "replace", crash_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        convert_coco(ann, root, out, progress=False, max_images_per_shard=3)
    monkeypatch.setattr(shards_mod.os, "replace", replace)
    assert not (out / "manifest.json").exists() and (out / ".next" / "manifest.json").exists()
    again = convert_coco(ann, root, out, progress=False, max_images_per_shard=3)  # finishes the swap
    assert again["num_images"] == first["num_images"] and len(again["shards"]) > len(first["shards"])
    assert read_manifest(out) == again and not (out / ".next").exists()
    assert sorted(p.name for p in shard_paths(out)) == sorted(p.name for p in out.glob("shard-*.parquet"))
    assert len(list(iter_records(out))) == first["num_images"]


def test_data_a_staged_swap_is_finished_for_this_command_only_and_not_under_a_reader(coco_like, tmp_path,
                                                                                     monkeypatch, capsys):
    """A staged conversion (other settings) stopped before its swap: the next run swapped it in
    before it looked at the readers' lock (shards replaced under a running job, then "refused"),
    and whatever its settings (the command given again with the first settings swapped in the
    other ones). Now the swap waits for no reader and is finished only for this command's
    settings; another command's staged output is removed, the dataset in place kept."""
    from dino_scale.data import convert as convert_mod
    from dino_scale.data.readers import DatasetInUseError, reading_datasets

    root, ann = coco_like
    out = tmp_path / "out"
    first = convert_coco(ann, root, out, progress=False)
    before = _shard_bytes(out)
    swap = convert_mod.finish_swap

    def stopped_before_the_swap(folder, *args, **kwargs):
        raise KeyboardInterrupt("stopped")

    monkeypatch.setattr(convert_mod, "finish_swap", stopped_before_the_swap)
    with pytest.raises(KeyboardInterrupt):
        convert_coco(ann, root, out, progress=False, max_images_per_shard=3)
    monkeypatch.setattr(convert_mod, "finish_swap", swap)
    assert (out / ".next" / "manifest.json").is_file() and _shard_bytes(out) == before
    with reading_datasets([out], print):  # a running job reads the dataset in place
        with pytest.raises(DatasetInUseError, match="a running job reads it"):
            convert_coco(ann, root, out, progress=False, max_images_per_shard=3)
        assert _shard_bytes(out) == before and read_manifest(out) == first
    capsys.readouterr()
    assert convert_coco(ann, root, out, progress=True) == first  # the first command again: its dataset
    said = capsys.readouterr().out
    assert "removed .next/, a finished conversion with other settings" in said and "already converted" in said
    assert _shard_bytes(out) == before and not (out / ".next").exists()


def test_data_a_work_folder_left_beside_a_written_manifest_is_not_resumed(coco_like, tmp_path, monkeypatch):
    """A conversion stopped between writing its manifest and removing its work folder left the
    work folder for good ("already converted" kept it), and a later run that found a shard cut
    short resumed over it: "resuming after N finished shards" kept the damaged shard, and every
    run after failed the same way."""
    from dino_scale.data import convert as convert_mod
    from dino_scale.data.preflight import preflight_shards

    root, ann = coco_like
    out = tmp_path / "out"
    rmtree = convert_mod.shutil.rmtree

    def stopped_removing_the_work(path, *args, **kwargs):
        if str(path).endswith(".convert-work") and (out / "manifest.json").exists():
            raise KeyboardInterrupt("stopped")
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(convert_mod.shutil, "rmtree", stopped_removing_the_work)
    with pytest.raises(KeyboardInterrupt):
        convert_coco(ann, root, out, progress=False, max_images_per_shard=8)
    monkeypatch.setattr(convert_mod.shutil, "rmtree", rmtree)
    assert (out / ".convert-work").is_dir()
    before = _shard_bytes(out)
    shard = out / read_manifest(out)["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:1000])
    convert_coco(ann, root, out, progress=False, max_images_per_shard=8)
    assert preflight_shards(out) and _shard_bytes(out) == before and not (out / ".convert-work").exists()


def test_data_convert_refuses_a_folder_of_the_other_layout(o365_like, tmp_path):
    """An Objects365 split into a folder holding a dataset put val/ and train_extra/ inside it, exit
    0; ``--data`` then read the folder as the old dataset (the val images among the training ones)
    and never its parts. A plain conversion into a folder holding split parts hid them the same
    way. Both are refused and leave the folder as it was; each layout converts again into itself."""
    from dino_scale.data import ConversionError
    from pipelines._datasets import dataset_parts

    root, ann = o365_like
    plain = tmp_path / "plain"
    convert_coco(ann, root, plain, progress=False)
    before = sorted(p.name for p in plain.iterdir())
    with pytest.raises(ConversionError, match=f"{plain} holds a dataset converted without --o365-val-split"):
        convert_coco(ann, root, plain, o365_val_split=10, progress=False)
    assert sorted(p.name for p in plain.iterdir()) == before
    convert_coco(ann, root, plain, progress=False)  # the same layout again: fine
    split = tmp_path / "split"
    convert_coco(ann, root, split, o365_val_split=10, progress=False)
    convert_coco(ann, root, split, o365_val_split=10, progress=False)
    with pytest.raises(ConversionError, match=r"holds the datasets train_extra/, val/ \(a folder given as --data\)"):
        convert_coco(ann, root, split, progress=False)
    assert not (split / "manifest.json").exists() and not list(split.glob("shard-*"))
    assert list(dataset_parts(split)) == ["train_extra", "val"]
    (split / "train").mkdir()  # the recipe's layout: Objects365 train beside the split's parts
    convert_coco(ann, root, split / "train", progress=False)
    assert list(dataset_parts(split)) == ["train", "train_extra", "val"]

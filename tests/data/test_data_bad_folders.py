"""Bad input, the folders: shards missing or cut short, a damaged manifest, a wrong image folder,
a dead image-pass child, reruns once skipped files are there, an output folder holding another
dataset; each named, nothing converted over silently."""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest

from dino_scale.config import preset
from dino_scale.data import ConversionError, convert_coco, iter_records
from dino_scale.data.loader import LocalLoader
from test_data_bad_input import _dataset, _jpeg


def test_data_missing_or_truncated_shards_are_a_clear_error(tmp_path, capsys):
    """A shard deleted, or cut short by a copy that did not finish, is named before any read (a
    read fails on it mid-epoch, or on every worker at once); converting the same input again
    rewrites the dataset instead of answering "already converted"."""
    from dino_scale.data import ShardError, shard_paths, to_coco_gt

    images = {f"{i}.jpg": _jpeg(colour=(20 * i, 30, 30)) for i in range(1, 7)}
    anns = [{"image_id": i, "category_id": 1, "bbox": [1, 2, 10, 10]} for i in range(1, 7)]
    root, ann = _dataset(tmp_path, images, anns)
    out = tmp_path / "out"
    m = convert_coco(ann, root, out, embed_images=True, max_images_per_shard=2, progress=False)
    sound = tmp_path / "sound"
    convert_coco(ann, root, sound, embed_images=True, max_images_per_shard=2, progress=False)
    names = [s["file"] for s in m["shards"]]
    assert len(names) == 3 and len(shard_paths(out)) == 3
    order = [r["image_id"] for r in iter_records(out)]
    assert sorted(order) == [1, 2, 3, 4, 5, 6]
    whole = (out / names[1]).read_bytes()
    (out / names[1]).write_bytes(whole[: len(whole) // 2])
    (out / names[2]).unlink()
    needle = (rf"2 of 3 shards do not match manifest.json: {names[1]} has {len(whole) // 2} bytes, "
              rf"the manifest {len(whole)}; {names[2]} is missing \(copy the folder again, or run the python -m "
              rf"pipelines.prepare_data command that made it again: it converts such a folder anew\)")
    with pytest.raises(ShardError, match=needle) as raised:
        shard_paths(out)
    assert str(pickle.loads(pickle.dumps(raised.value))) == str(raised.value)  # from a Ray task too
    with pytest.raises(ShardError, match=needle):
        to_coco_gt(out)
    with pytest.raises(ShardError, match=needle):
        next(iter(LocalLoader(out, preset("tiny").data, train=False, batch_size=2)))
    with pytest.raises(ShardError, match=needle):  # two folders: the broken one is named
        shard_paths([sound, out])
    # the same conversion again, as the error advises (it said "remove it", "a folder whose manifest is intact
    # reads as already converted"): not "already converted" (the manifest's shards are not there)
    capsys.readouterr()
    again = convert_coco(ann, root, out, embed_images=True, max_images_per_shard=2, progress=True)
    assert "converting again" in capsys.readouterr().out
    assert again["num_images"] == 6 and [r["image_id"] for r in iter_records(out)] == order  # same seed
    convert_coco(ann, root, out, embed_images=True, max_images_per_shard=2, progress=True)
    assert "already converted" in capsys.readouterr().out


def test_data_unreadable_manifest_is_a_clear_error_and_converted_again(tmp_path, capsys):
    """A manifest.json cut short or edited into something else names itself (was: a JSONDecodeError
    or a KeyError without the file), and converting the same input again rewrites the folder (was:
    the same JSONDecodeError: the folder could only be fixed by hand)."""
    from dino_scale.data import ManifestError, read_manifest, shard_paths

    root, ann = _dataset(tmp_path, {"1.jpg": _jpeg()}, [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]}])
    out = tmp_path / "out"
    convert_coco(ann, root, out, embed_images=True, progress=False)
    path = out / "manifest.json"
    whole = json.loads(path.read_text())
    for text, needle in [(path.read_text()[:200], "not valid JSON"), ("[]", "a JSON list, not an object"),
                         (json.dumps({**whole, "categories": [{"id": 1}]}), "categories is not a list of"),
                         (json.dumps({k: v for k, v in whole.items() if k != "shards"}), "shards is not a list"),
                         (json.dumps({**whole, "num_images": "1"}), "no integer num_images")]:
        path.write_text(text)
        with pytest.raises(ManifestError, match=rf"{path}: {needle}"):
            read_manifest(out)
        with pytest.raises(ManifestError, match=needle):
            shard_paths(out)
    capsys.readouterr()
    again = convert_coco(ann, root, out, embed_images=True, progress=True)
    assert "unreadable or not a dataset manifest; converting again" in capsys.readouterr().out
    assert again["num_images"] == 1 and [r["image_id"] for r in iter_records(out)] == [1]


@pytest.mark.parametrize("embed", [False, True])
def test_data_an_image_folder_holding_none_of_the_images_is_an_error(tmp_path, embed):
    """``--images`` naming a folder that holds none of the files (its parent, say): every image a
    counted ``missing_file`` made a dataset of 0 images and exit 0. Now a ConversionError naming the
    folder, with no manifest and nothing to resume, so the run with the right folder converts."""
    root, ann = _dataset(tmp_path, {"a.jpg": _jpeg(), "b.jpg": _jpeg()},
                         [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]}])
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=rf"none of the 2 images of .* from the image folder {wrong} "
                                              r"\(missing_file: 2\): is it the folder that holds the files"):
        convert_coco(ann, wrong, out, embed_images=embed, progress=False)
    assert not out.exists()  # made by the refused run: removed (was left with .lock and .convert-work/)
    m = convert_coco(ann, root, out, embed_images=embed, progress=False)
    assert m["num_images"] == 2
    # some usable images: the rest are counted skips, as before
    (root / "b.jpg").unlink()
    assert convert_coco(ann, root, tmp_path / "out2", embed_images=embed, progress=False)["num_images"] == 1


def _image_pass_child_that_dies(conn, args, parent_pid):
    """Stands in for the image pass's child: exits with code 3 without a word (as one killed would)."""
    import os
    os._exit(3)


def test_data_a_dead_image_pass_child_is_a_clear_error(tmp_path, monkeypatch):
    """The image pass runs in a spawned child for large files: a child that died (killed for memory,
    or a script without a ``__main__`` guard) surfaced as a bare EOFError after the annotation pass.
    The error names the child's exit code."""
    from dino_scale.data import convert as convert_module

    root, ann = _dataset(tmp_path, {"a.jpg": _jpeg()}, [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]}])
    monkeypatch.setattr(convert_module, "images_child", _image_pass_child_that_dies)
    with pytest.raises(ConversionError, match=r"image pass .* ended without a result, exit code 3 .*parallel=False"):
        convert_coco(ann, root, tmp_path / "out", parallel=True, progress=False)


_PARENT = """
import multiprocessing as mp, os, sys, time
from dino_scale.data.convert_child import die_with_parent

def child(ppid, ready):
    die_with_parent(ppid)
    open(ready, "w").close()
    time.sleep(120)

if __name__ == "__main__":
    p = mp.get_context("spawn").Process(target=child, args=(os.getpid(), sys.argv[1]), daemon=True)
    p.start()
    print(p.pid, flush=True)
    time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_data_the_image_pass_child_ends_with_its_killed_parent(tmp_path):
    """A conversion killed with SIGKILL (the OOM killer, ``kill -9``, a node's job killed) left its
    image pass child running: it went on appending to the work folder the rerun's own scan used,
    and the rerun, and every run after it, failed ("manifest counts do not add up")."""
    import signal
    import subprocess
    import time

    ready, script = tmp_path / "ready", tmp_path / "parent.py"  # a file: the spawned child imports its function
    script.write_text(_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(ready)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 120
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), "the child did not start"
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)

        def running(pid: int) -> bool:
            try:
                return " Z" not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:3]
            except OSError:
                return False

        deadline = time.monotonic() + 30
        while running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(child), "the image pass child outlived its killed parent"
    finally:
        parent.kill()


@pytest.mark.parametrize("embed", [False, True])
def test_data_rerun_converts_again_once_skipped_files_are_there(tmp_path, embed, capsys):
    """An image skipped as missing (an archive not unpacked yet) and put in place afterwards: the
    same command answered "already converted" and kept it skipped. Listed skips now name their
    file; one that is there now makes the rerun convert again. Without a change it is reused."""
    root, ann = _dataset(tmp_path, {"a.jpg": _jpeg(), "b.jpg": None, "c.jpg": _jpeg()},
                         [{"image_id": i, "category_id": 1, "bbox": [1, 2, 10, 10]} for i in (1, 2, 3)])
    out = tmp_path / "out"
    m = convert_coco(ann, root, out, embed_images=embed)
    assert m["num_images"] == 2 and m["skipped_images"] == [{"image_id": 2, "reason": "missing_file",
                                                            "file_name": "b.jpg"}]
    capsys.readouterr()
    assert convert_coco(ann, root, out, embed_images=embed)["num_images"] == 2  # nothing changed: reused
    assert "already converted" in capsys.readouterr().out
    (root / "b.jpg").write_bytes(_jpeg())
    again = convert_coco(ann, root, out, embed_images=embed)
    assert "1 image file(s) skipped at the last conversion (missing, empty, unreadable ...) are there now or " \
           "changed since (e.g. b.jpg)" in capsys.readouterr().out
    assert again["num_images"] == 3 and again["images_skipped"] == {}
    assert sorted(r["image_id"] for r in iter_records(out)) == [1, 2, 3]


def test_data_rerun_converts_again_once_a_corrupt_file_was_replaced(tmp_path, capsys):
    """Only missing and empty files were looked at again: an image skipped as corrupt (a download
    cut short) stayed skipped after it was downloaded again ("already converted"). A skipped file
    changed since the conversion makes the rerun convert again; an unchanged one does not."""
    import time

    good = _jpeg()
    root, ann = _dataset(tmp_path, {"a.jpg": good, "b.jpg": good[: len(good) // 2]},
                         [{"image_id": i, "category_id": 1, "bbox": [1, 2, 10, 10]} for i in (1, 2)])
    out = tmp_path / "out"
    assert convert_coco(ann, root, out, embed_images=True)["images_skipped"] == {"corrupt": 1}
    capsys.readouterr()
    assert convert_coco(ann, root, out, embed_images=True)["num_images"] == 1  # unchanged: reused
    assert "already converted" in capsys.readouterr().out
    time.sleep(0.05)  # past the file-time tick of the manifest's write
    (root / "b.jpg").write_bytes(good)
    again = convert_coco(ann, root, out, embed_images=True)
    assert "are there now or changed since (e.g. b.jpg)" in capsys.readouterr().out
    assert again["num_images"] == 2 and again["images_skipped"] == {}


def test_data_an_output_folder_holding_another_dataset_is_not_replaced(tmp_path):
    """Converting a second annotation file into the folder of the first replaced that dataset
    without a word, and deleted any file named like a shard (``shard-old.parquet``, a ``.bak``
    copy); such a file also stopped every later run with a bare int() error."""
    root, ann = _dataset(tmp_path, {"a.jpg": _jpeg()}, [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 12]}])
    out = tmp_path / "out"
    out.mkdir()
    keep = {"shard-old.parquet": b"mine", "shard-00000.parquet.bak": b"backup"}
    for name, data in keep.items():
        (out / name).write_bytes(data)
    first = convert_coco(ann, root, out, progress=False)
    assert {name: (out / name).read_bytes() for name in keep} == keep
    other = tmp_path / "other.json"
    other.write_text(ann.read_text())
    with pytest.raises(ConversionError, match=rf"{out} holds the dataset converted from {ann}.*choose another"):
        convert_coco(other, root, out, progress=False)
    assert json.loads((out / "manifest.json").read_text())["shards"] == first["shards"]
    manifest = json.loads((out / "manifest.json").read_text())  # a manifest this release cannot read
    (out / "manifest.json").write_text(json.dumps({**manifest, "format": "records-v99"}))  # (a newer one's)
    with pytest.raises(ConversionError, match=rf"{out} holds the dataset converted from {ann}.*choose another"):
        convert_coco(other, root, out, progress=False)  # was: manifest and shards deleted, converted over
    assert {p.name for p in out.glob("shard-0*.parquet")} == {s["file"] for s in first["shards"]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    # its own file, edited: converted again
    doc = json.loads(ann.read_text())
    doc["annotations"].append({"id": 9, "iscrowd": 0, "image_id": 1, "category_id": 5, "bbox": [3, 3, 5, 5]})
    ann.write_text(json.dumps(doc))
    assert convert_coco(ann, root, out, progress=False)["num_boxes"] == 2
    assert {name: (out / name).read_bytes() for name in keep} == keep


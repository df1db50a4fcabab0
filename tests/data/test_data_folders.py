"""Several dataset folders read as one: each folder's records use that folder's image root."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from dino_scale.config import preset
from dino_scale.data import convert_coco
from dino_scale.data.loader import LocalLoader, folder_image_roots, iter_samples
from dino_scale.data.transforms import DetectionTransform

@pytest.mark.parametrize("shuffle", [False, True])
def test_data_folders_each_use_their_own_image_root(image_folders, shuffle):
    first, _ = image_folders.convert("first")
    second, _ = image_folders.convert("second")
    cfg = preset("tiny").data
    loader = LocalLoader(f"{first},{second}", cfg, train=False, batch_size=1, shuffle=shuffle)
    seen = []
    for images, _, targets in loader:
        seen.append(int(targets[0]["image_id"]))
        image_folders.check_sample(seen[-1], images[0].numpy(), targets[0]["orig_size"].tolist())
    assert sorted(seen) == [1, 2, 11, 12] and loader.skips["count"] == 0


def test_data_folders_image_root_override(image_folders, tmp_path):
    first, root1 = image_folders.convert("first")
    second, root2 = image_folders.convert("second")
    both = [first, second]
    assert folder_image_roots(both) == [(first, str(root1.resolve())), (second, str(root2.resolve()))]
    # one root for folders converted against different roots cannot be right for both
    with pytest.raises(ValueError, match="ambiguous.*one root per folder"):
        folder_image_roots(both, str(root1))
    with pytest.raises(ValueError, match="ambiguous"):
        LocalLoader(both, preset("tiny").data, image_root=str(root1))
    with pytest.raises(ValueError, match="3 roots for 2 dataset folders"):
        folder_image_roots([first, second], f"{root1},{root2},{root1}")
    # one root per folder, in folder order (moved copies of the image folders)
    moved1, moved2 = tmp_path / "moved1", tmp_path / "moved2"
    root1.rename(moved1)
    root2.rename(moved2)
    assert folder_image_roots(both, f"{moved1},{moved2}") == [(first, str(moved1)), (second, str(moved2))]
    t = DetectionTransform(preset("tiny").data, train=False)
    skips: dict = {}
    samples = list(iter_samples(both, t, skips=skips, image_root=[str(moved1), str(moved2)]))
    assert [s["image_id"] for s in samples] == [1, 2, 11, 12] and not skips
    for s in samples:
        image_folders.check_sample(s["image_id"], s["image"].numpy(), s["orig_size"].tolist())


def test_data_folders_one_root_applies_to_all_when_unambiguous(image_folders, tmp_path):
    """An embedded folder records no root: a single override is then the file folder's."""
    first, root1 = image_folders.convert("first")
    second, _ = image_folders.convert("second", embed=True)
    moved = tmp_path / "moved"
    root1.rename(moved)
    assert folder_image_roots([first, second], str(moved)) == [(first, str(moved)), (second, str(moved))]
    loader = LocalLoader([first, second], preset("tiny").data, train=False, batch_size=4, image_root=str(moved))
    (images, _, targets), = list(loader)
    assert [int(t["image_id"]) for t in targets] == [1, 2, 11, 12] and loader.skips["count"] == 0


def test_data_folders_rows_get_their_shard_folders_root():
    """One Ray Data read over every folder's shards (``include_paths``): each row's
    ``image_root`` is its shard's folder's root (run inside Ray tasks)."""
    from dino_scale.data.ray_data import _path_key, image_root_from_path

    roots = {_path_key("file:///d/a/shard-0.parquet"): "/r", _path_key("/d/b/shard-0.parquet"): None}
    table = pa.table({"image_id": pa.array([1, 2, 3], pa.int64()),
                      "path": pa.array(["/d/a/shard-0.parquet", "/d/b/shard-0.parquet", "/d/a/shard-0.parquet"])})
    out = image_root_from_path(table, roots)
    assert out.column_names == ["image_id", "image_root"] and out.column("image_root").type == pa.string()
    assert out.column("image_root").to_pylist() == ["/r", None, "/r"]
    with pytest.raises(ValueError, match="'/d/c/shard-0.parquet', which is not one of the dataset's shards"):
        image_root_from_path(pa.table({"path": pa.array(["/d/c/shard-0.parquet"])}), roots)


def test_data_folders_made_absolute_for_the_run(tmp_path, monkeypatch):
    """What a run reads and records (``fit``'s train/val folders): each folder of a comma list
    absolute, ``~`` expanded, None kept."""
    from dino_scale.data.manifest import absolute_data_dirs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert absolute_data_dirs(None) is None
    assert absolute_data_dirs("a, ./b/../c,~/d") == f"{tmp_path / 'a'},{tmp_path / 'c'},{tmp_path / 'home' / 'd'}"
    assert absolute_data_dirs(str(tmp_path / "x")) == str(tmp_path / "x")


def test_data_folders_read_with_a_tilde(tmp_path, monkeypatch):
    """``convert_coco(..., "~/out")`` wrote ``<home>/out``; reading ``"~/out"`` back
    (``iter_records``, ``to_coco_gt``) said "not a converted dataset"."""
    from dino_scale.data import iter_records
    from dino_scale.data.manifest import data_dirs

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_dirs("~/a, ~/b") == [tmp_path / "home" / "a", tmp_path / "home" / "b"]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg", "width": 8, "height": 6}],
                               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}],
                               "categories": [{"id": 1, "name": "a"}]}))
    convert_coco(ann, None, "~/out", check_files=False, progress=False)
    assert [r["image_id"] for r in iter_records("~/out")] == [1]


def test_data_folders_keep_the_symlinked_name(tmp_path, monkeypatch):
    """A mount reached through a symlink on the driver keeps the name the nodes know it by."""
    from dino_scale.data.manifest import absolute_data_dirs

    (tmp_path / "nfs").mkdir()
    (tmp_path / "data").symlink_to(tmp_path / "nfs")
    monkeypatch.chdir(tmp_path)
    assert absolute_data_dirs("data/train") == str(tmp_path / "data" / "train")


@pytest.mark.parametrize("shuffle", [False, True])
def test_data_local_loader_reads_the_val_root_and_counts_a_skip_once_per_epoch(image_folders, tmp_path, shuffle):
    """``LocalLoader(train=False)`` took ``data.image_root`` (the training images' root) where the
    Ray eval dataset takes ``data.val_image_root``: a val set whose images moved read none. And a
    second pass over one epoch counted its bad images again (the Ray path counts once per epoch)."""
    first, root = image_folders.convert("first")
    moved = tmp_path / "moved_val"
    root.rename(moved)
    cfg = preset("tiny", [f"data.image_root={tmp_path / 'train_images'}", f"data.val_image_root={moved}"]).data
    loader = LocalLoader(first, cfg, train=False, batch_size=1, shuffle=shuffle)
    assert sorted(int(t[0]["image_id"]) for _, _, t in loader) == [1, 2] and loader.skips["count"] == 0
    (moved / next(p.name for p in moved.iterdir())).write_bytes(b"")  # one image broken
    for _ in range(2):  # two passes over epoch 0
        assert len(list(loader)) == 1
    assert loader.skips["count"] == 1 and len(loader.skips["image_ids"]) == 1
    loader.set_epoch(1)
    list(loader)
    assert loader.skips["count"] == 2 and len(loader.skips["image_ids"]) == 1  # once per epoch, the id once

"""Shard damage found before a run (``dino_scale.data.preflight``): a shard missing, cut short,
with an overwritten footer, or whose footer no longer holds the record columns is refused with
one error naming every such shard, instead of failing (or quietly dropping its records) inside
Ray Data once the run has started."""
from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dino_scale.data import ShardError, convert_coco, iter_records, read_manifest, shard_paths
from dino_scale.data import preflight
from dino_scale.data.preflight import preflight_shards


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, coco_like):
    """A dataset folder of 24 coco-like images in 4 shards (images embedded)."""
    root, ann = coco_like
    out = tmp_path_factory.mktemp("preflight") / "healthy"
    convert_coco(ann, root, out, embed_images=True, max_images_per_shard=6, progress=False)
    assert len(read_manifest(out)["shards"]) == 4
    return out


def _copy(healthy, tmp_path, name: str = "broken"):
    out = tmp_path / name
    shutil.copytree(healthy, out)
    return out, [out / s["file"] for s in read_manifest(out)["shards"]]


def _set_manifest(folder, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _rewrite(folder, path, table: pa.Table) -> None:
    """Replace a shard by ``table`` as another tool would, the manifest's size updated to match."""
    pq.write_table(table, path)
    index = [s["file"] for s in read_manifest(folder)["shards"]].index(path.name)
    _set_manifest(folder, lambda m: m["shards"][index].update(bytes=path.stat().st_size))


def test_data_preflight_healthy_dataset_passes_unchanged(healthy):
    """A sound dataset: the same paths as ``shard_paths``, and its records read as before."""
    before = [r["image_id"] for r in iter_records(healthy)]
    assert preflight_shards(healthy) == shard_paths(healthy)
    with pytest.raises(ValueError, match="dataset folder given twice"):  # it would be read twice
        preflight_shards([healthy, healthy])
    assert [r["image_id"] for r in iter_records(healthy)] == before and len(before) == 24


def test_data_preflight_names_every_damaged_shard_in_one_error(healthy, tmp_path):
    """Each kind of structural damage, one per shard, all named in a single ShardError. Before,
    the check made before a run (``shard_paths``: sizes against the manifest) passed the three
    shards damaged at their recorded size, which then failed Ray Data's planning after Ray and
    the MLflow run had started (overwritten footer: "Couldn't deserialize thrift", no file name)
    or had all their records dropped as ``damaged`` in every epoch (a column renamed)."""
    out, paths = _copy(healthy, tmp_path)
    data = [p.read_bytes() for p in paths]
    paths[0].write_bytes(data[0][:-204] + b"\0" * 200 + data[0][-4:])  # overwritten footer, same size
    paths[1].write_bytes(data[1].replace(b"category_ids", b"category_idz"))  # renamed in the footer
    retyped = pq.read_table(paths[2])
    _rewrite(out, paths[2], retyped.set_column(retyped.schema.get_field_index("width"), "width",
                                               retyped["width"].cast(pa.int64())))
    paths[3].unlink()
    with pytest.raises(ShardError) as raised:
        preflight_shards(out)
    text = str(raised.value)
    assert text.startswith(f"{out}: 4 of 4 shards are damaged"), text
    assert f"{paths[0].name} has a footer Parquet cannot read (OSError: Couldn't deserialize thrift" in text
    assert (f"{paths[1].name} does not hold the record columns (category_ids is missing; "
            f"category_idz is not a record column)") in text
    assert f"{paths[2].name} does not hold the record columns (width is int64, not int32)" in text
    assert f"{paths[3].name} is missing" in text and "copy the folder again" in text


@pytest.mark.parametrize("kind", ["truncated", "truncated, no sizes in the manifest", "missing",
                                  "column dropped", "footer overwritten", "other rows"])
def test_data_preflight_refuses_each_kind_of_damage(healthy, tmp_path, kind):
    """One damaged shard of four, of each kind, is refused by name; the other shards are not named."""
    out, paths = _copy(healthy, tmp_path)
    bad, whole = paths[2], paths[2].read_bytes()
    if kind.startswith("truncated"):
        bad.write_bytes(whole[: len(whole) // 2])
        if "no sizes" in kind:  # a manifest without sizes: only the footer read finds it
            _set_manifest(out, lambda m: [s.pop("bytes") for s in m["shards"]])
        needle = (f"{bad.name} has a footer Parquet cannot read (ArrowInvalid: Parquet magic bytes" if "no sizes"
                  in kind else f"{bad.name} has {len(whole) // 2} bytes, the manifest {len(whole)}")
    elif kind == "missing":
        bad.unlink()
        needle = f"{bad.name} is missing"
    elif kind == "column dropped":
        _rewrite(out, bad, pq.read_table(bad).drop_columns(["image_id"]))
        needle = f"{bad.name} does not hold the record columns (image_id is missing)"
    elif kind == "footer overwritten":
        bad.write_bytes(whole[:-4] + b"PAR0")
        needle = f"{bad.name} has a footer Parquet cannot read (ArrowInvalid: Parquet magic bytes"
    else:  # another shard's file under this name: sound, of other rows
        _rewrite(out, bad, pq.read_table(paths[0]).slice(0, 2))
        needle = f"{bad.name} holds 2 records, the manifest 6"
    with pytest.raises(ShardError) as raised:
        preflight_shards(out)
    text = str(raised.value)
    assert "1 of 4 shards are damaged" in text and needle in text, text
    assert not any(p.name in text for p in paths if p != bad)


def test_data_preflight_names_the_damaged_shards_of_each_folder(healthy, tmp_path):
    """Several folders read as one dataset: the damaged shards of each are named, with their folder."""
    first, a = _copy(healthy, tmp_path, "first")
    second, b = _copy(healthy, tmp_path, "second")
    a[1].unlink()
    b[3].write_bytes(b[3].read_bytes()[:-4] + b"PAR0")
    with pytest.raises(ShardError) as raised:
        preflight_shards(f"{first},{second}")
    text = str(raised.value)
    assert text.startswith(f"{first}: 1 of 4 shards are damaged") and f"{a[1].name} is missing" in text
    assert f"; and in {second}: 1 of 4 shards are damaged" in text and f"{b[3].name} has a footer" in text


def test_data_preflight_reads_each_footer_once_while_the_file_is_unchanged(healthy, tmp_path, monkeypatch):
    """The engine's check, the pipelines' and the Ray datasets' builders all call preflight_shards:
    a footer found sound is not read again (thousands of shards on a bucket mount), unless the
    file changed since (its size or modification time)."""
    out, paths = _copy(healthy, tmp_path)
    reads = []
    real = pq.read_metadata
    monkeypatch.setattr(preflight.pq, "read_metadata", lambda p, *a, **k: reads.append(p) or real(p, *a, **k))
    preflight_shards(out)
    assert sorted(map(str, reads)) == sorted(map(str, paths))
    reads.clear()
    preflight_shards(out)
    assert reads == []
    paths[1].write_bytes(paths[1].read_bytes().replace(b"category_ids", b"category_idz"))  # same size, newer
    with pytest.raises(ShardError, match=f"{paths[1].name} does not hold the record columns"):
        preflight_shards(out)
    assert list(map(str, reads)) == [str(paths[1])]


def test_image_roots_that_hold_no_image_are_refused_before_a_run(image_folders, tmp_path):
    """A folder converted without ``--embed-images`` reads its images from the root recorded at
    conversion (or ``data.image_root``): a root that is not a folder here, or holds none of the
    first images, is a ConfigError naming the fix; embedded images need no root. Was: every record
    a counted ``missing_file`` skip, and a cluster run (data converted on another machine) trained
    on nothing for all its epochs."""
    from dino_scale.config import ConfigError, preset
    from dino_scale.data.preflight import check_image_roots
    from dino_scale.engine import fit

    first, root1 = image_folders.convert("first")
    second, root2 = image_folders.convert("second")
    embedded = tmp_path / "embedded"
    convert_coco(tmp_path / "first.json", root1, embedded, embed_images=True, progress=False)
    check_image_roots([first, second])
    moved = tmp_path / "elsewhere" / "images_first"
    moved.parent.mkdir()
    root1.rename(moved)
    with pytest.raises(ConfigError, match=rf"images of {first} are read from {root1.resolve()} \(recorded at "
                                          r"conversion\), which is not a folder on this machine.*data\.image_root="):
        check_image_roots([first, second])
    check_image_roots([first, second], f"{moved},{root2}")  # the override that finds them
    # roots that do not fit the folders are the setting's error (exit 2 in the pipelines), named by
    # its key (was: a ValueError, exit 1 with a traceback hint)
    with pytest.raises(ConfigError, match=r"^data\.val_image_root: image_root names 3 roots for 2 dataset"):
        check_image_roots([first, second], f"{moved},{root2},{root2}", key="data.val_image_root")
    with pytest.raises(ConfigError, match=r"^data\.image_root: image_root=.* is ambiguous"):
        check_image_roots([first, second], str(moved))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=rf"none of the first 2 images of {first} is under {empty} \(e\.g\. "
                                          r"'a\.png'\).*--embed-images"):
        check_image_roots([first, second], f"{empty},{root2}")  # a folder, but not these images
    (moved / "a.png").unlink()
    check_image_roots(first, str(moved))  # one image left: the rest are counted skips, not refused
    check_image_roots(embedded)  # its recorded root is gone: the shards hold the images
    # a training folder and a validation folder both moved: data.image_root (train) and
    # data.val_image_root (val); one data.image_root served both, and no value could work
    from dino_scale.engine.run_checks import _check_data

    moved2 = tmp_path / "elsewhere" / "images_second"
    root2.rename(moved2)
    _check_data(str(first), str(second), preset("tiny", [f"data.image_root={moved}",
                                                          f"data.val_image_root={moved2}"]))
    with pytest.raises(ConfigError, match=rf"none of the first 2 images of {second} is under {empty}.*"
                                          r"--set data\.val_image_root="):  # the validation folder's own root
        _check_data(str(first), str(second), preset("tiny", [f"data.image_root={moved}",
                                                              f"data.val_image_root={empty}"]))
    # the engine refuses before Ray starts or an MLflow run exists
    with pytest.raises(ConfigError, match="not a folder on this machine"):
        fit(preset("tiny"), str(first), None, tmp_path / "work", "never-starts", evaluate=False, progress=False)
    assert not (tmp_path / "work" / "mlflow.db").exists()

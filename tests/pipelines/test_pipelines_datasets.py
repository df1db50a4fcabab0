"""--data / --val-data forms: dataset folders, comma lists, train/+val/ parents, JSON + images."""
from __future__ import annotations

import argparse

import pytest

from dino_scale.data import convert_coco, synthetic
from pipelines._common import UsageError
from pipelines._datasets import categories_of, class_overrides, resolve_datasets, stored_pixels


def _args(**kw):
    base = dict(data=None, val_data=None, images=None, val_images=None, synthetic_images=None)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    root, ann = synthetic.generate(d / "coco", flavour="coco-like", num_images=4, seed=5)
    return root, ann


def test_pipelines_datasets_forms(raw, tmp_path, monkeypatch):
    root, ann = raw
    log = lambda m: None  # noqa: E731
    # annotation JSON + images: converted once into <work>/data, then reused
    train, val, synth = resolve_datasets(_args(data=str(ann), images=str(root)), tmp_path, "coco-like", 8, 0, log)
    assert train.startswith(str(tmp_path / "data")) and val is None and not synth
    again, _, _ = resolve_datasets(_args(data=str(ann), images=str(root)), tmp_path, "coco-like", 8, 0, log)
    assert again == train
    # parent folder with train/ and val/
    parent = tmp_path / "ds"
    convert_coco(ann, root, parent / "train", progress=False)
    convert_coco(ann, root, parent / "val", progress=False)
    t, v, _ = resolve_datasets(_args(data=str(parent)), tmp_path, "coco-like", 8, 0, log)
    assert (t, v) == (str(parent / "train"), str(parent / "val"))
    # comma list of dataset folders, explicit val
    t, v, _ = resolve_datasets(_args(data=f"{parent / 'train'},{train}", val_data=str(parent / "val")),
                               tmp_path, "coco-like", 8, 0, log)
    assert t == f"{parent / 'train'},{train}" and v == str(parent / "val")
    cats = categories_of(t)
    assert {c["name"] for c in cats} >= {"person", "kite"}
    assert class_overrides(cats, [], minimum=91) == ["model.num_classes=91", "model.dn_labelbook_size=91"]
    # the label book follows the head
    assert class_overrides(cats, ["model.num_classes=100"]) == ["model.dn_labelbook_size=100"]
    # relative folders come back absolute: what the run reads on other machines and records in
    # its lineage (evaluate, started elsewhere, read a relative val_dir against its own folder)
    monkeypatch.chdir(tmp_path)
    t, v, _ = resolve_datasets(_args(data="ds/train", val_data="./ds/val"), tmp_path, "coco-like", 8, 0, log)
    assert (t, v) == (str(parent / "train"), str(parent / "val"))
    # one folder named twice (was read twice: every image of it twice an epoch), however it is spelt
    for twice in ("ds/train,ds/train", f"ds/train,{parent / 'train'}/"):
        with pytest.raises(UsageError, match="twice"):
            resolve_datasets(_args(data=twice), tmp_path, "coco-like", 8, 0, log)
    converted = []
    monkeypatch.setattr("pipelines._datasets._convert", lambda *a, **k: converted.append(a) or tmp_path / "x")
    with pytest.raises(UsageError, match=f"names {ann} twice"):  # refused before converting it (hours for O365)
        resolve_datasets(_args(data=f"{ann},{ann}", images=str(root)), tmp_path, "coco-like", 8, 0, log)
    assert converted == []
    from dino_scale.data.manifest import data_dirs

    with pytest.raises(ValueError, match="dataset folder given twice: .*ds/train, ds/train"):  # the library's own
        data_dirs(f"ds/train,{parent / 'train'}")
    t, v, _ = resolve_datasets(_args(data="ds"), tmp_path, "coco-like", 8, 0, log)
    assert (t, v) == (str(parent / "train"), str(parent / "val"))
    # a train_extra/ beside them (prepare-data --o365-val-split) is trained on too: it was left out
    convert_coco(ann, root, parent / "train_extra", progress=False)
    said = []
    t, v, _ = resolve_datasets(_args(data="ds"), tmp_path, "coco-like", 8, 0, said.append)
    assert (t, v) == (f"{parent / 'train'},{parent / 'train_extra'}", str(parent / "val"))
    assert any("train_extra" in line for line in said)
    # evaluate's --data takes the same parent for its val/ (was: "not a dataset folder ... convert it")
    from pipelines._datasets import _one

    said = []
    assert _one("ds", None, tmp_path, "dataset path", said.append, split="val") == "ds/val"  # made absolute by fit
    assert said == ["using ds/val (the val split of ds)"]
    with pytest.raises(UsageError, match="not a dataset folder"):
        _one("ds", None, tmp_path, "dataset path", log)  # no split asked for: as before
    with pytest.raises(UsageError, match="dataset path not found"):
        resolve_datasets(_args(data=f"{parent / 'train'},/nope"), tmp_path, "coco-like", 8, 0, log)
    with pytest.raises(UsageError, match="needs --data"):
        resolve_datasets(_args(val_data=str(parent / "val")), tmp_path, "coco-like", 8, 0, log)


def test_pipelines_datasets_synthetic_default(tmp_path):
    train, val, synth = resolve_datasets(_args(synthetic_images=4), tmp_path, "o365-like", 64, 0, lambda m: None)
    assert synth and train.endswith("synthetic-o365-like-4-s0/train") and val.endswith("/val")
    assert class_overrides(categories_of(train), [], minimum=366)[0] == "model.num_classes=366"


def test_pipelines_datasets_synthetic_val_only(tmp_path):
    """What `evaluate` without --data asks for: the validation split alone (a 1-tuple)."""
    from pipelines._datasets import synthetic_dirs

    (val,) = synthetic_dirs(tmp_path, "coco-like", 4, 1, lambda m: None, splits=("val",))
    assert val.endswith("synthetic-coco-like-4-s1/val") and categories_of(val)
    assert not (tmp_path / "data" / "synthetic-coco-like-4-s1" / "train").exists()


def test_pipelines_datasets_missing_val_is_refused_before_converting(raw, tmp_path):
    """Fine-tuning needs a validation set: an annotation JSON without --val-data is refused
    before the (possibly hour-long) conversion of the training set, not after it."""
    root, ann = raw
    need = "give a validation set"
    with pytest.raises(UsageError, match=need):
        resolve_datasets(_args(data=str(ann), images=str(root)), tmp_path, "coco-like", 8, 0, lambda m: None,
                         require_val=need)
    assert not (tmp_path / "data").exists()  # nothing converted
    parent = tmp_path / "ds"  # a parent with train/ and val/ has one
    convert_coco(ann, root, parent / "train", progress=False)
    convert_coco(ann, root, parent / "val", progress=False)
    _, v, _ = resolve_datasets(_args(data=str(parent)), tmp_path, "coco-like", 8, 0, lambda m: None, require_val=need)
    assert v == str(parent / "val")


def test_pipelines_datasets_class_count_follows_the_user(raw):
    """`--set model.num_classes=N` alone sizes the denoising label book too (was: the data's
    91, and the model failed at its first training step with N > 92)."""
    from pipelines._datasets import check_classes
    from dino_scale.config import preset

    cats = [{"id": 1, "name": "a"}, {"id": 90, "name": "b"}]
    assert class_overrides(cats, [], minimum=0) == ["model.num_classes=91", "model.dn_labelbook_size=91"]
    assert class_overrides(cats, ["model.num_classes = 120"]) == ["model.dn_labelbook_size=120"]
    assert class_overrides(cats, ["model.num_classes=120", "model.dn_labelbook_size=130"]) == []
    cfg = preset("tiny", class_overrides(cats, ["model.num_classes=120"]) + ["model.num_classes=120"])
    check_classes(cfg, cats, "coco/train")
    with pytest.raises(UsageError, match="category ids up to 90: model.num_classes must be >= 91"):
        check_classes(preset("tiny", ["model.num_classes=50", "model.dn_labelbook_size=50"]), cats, "coco/train")
    with pytest.raises(UsageError, match="dn_labelbook_size >= 119"):
        check_classes(preset("tiny", ["model.num_classes=120", "model.dn_labelbook_size=91"]), cats, "coco/train")
    check_classes(preset("tiny", ["model.num_classes=120", "model.dn_labelbook_size=91", "model.dn_number=0"]),
                  cats, "coco/train")


def test_pipelines_datasets_edited_annotation_file_is_converted_again(tmp_path):
    """An annotation JSON given as --data is converted into <work-dir>/data once; after the
    user edits the file (fixes labels, drops boxes) the next run converts it again (was: the
    shards of the old file were reused and trained on without a word)."""
    import json

    from dino_scale.data import iter_records, read_manifest

    root, ann = synthetic.generate(tmp_path / "coco", flavour="coco-like", num_images=4, seed=5)
    args = _args(data=str(ann), images=str(root))
    train, _, _ = resolve_datasets(args, tmp_path / "work", "coco-like", 8, 0, lambda m: None)
    doc = json.loads(ann.read_text())
    assert read_manifest(train)["num_boxes"] == len(doc["annotations"]) > 1
    doc["annotations"] = doc["annotations"][:1]  # the user keeps one box, relabelled
    doc["annotations"][0]["category_id"] = doc["categories"][-1]["id"]
    ann.write_text(json.dumps(doc))
    again, _, _ = resolve_datasets(args, tmp_path / "work", "coco-like", 8, 0, lambda m: None)
    assert again == train
    assert read_manifest(again)["num_boxes"] == 1
    labels = [int(c) for r in iter_records(again) for c in r["category_ids"]]
    assert labels == [doc["categories"][-1]["id"]]
    unchanged, _, _ = resolve_datasets(args, tmp_path / "work", "coco-like", 8, 0, lambda m: None)
    assert unchanged == again and read_manifest(unchanged)["num_boxes"] == 1  # reused while unchanged


def test_pipelines_datasets_eval_fingerprint_names_the_labels_not_the_copy(raw, tmp_path):
    """The validation data's fingerprint (tagged on registered versions so that only APs of the
    same data are compared) is the same for any conversion of the same labels (other folder,
    other shard size), and differs for other labels."""
    import json

    from pipelines._datasets import eval_fingerprint

    root, ann = raw
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    convert_coco(ann, root, a, progress=False)
    convert_coco(ann, root, b, progress=False, max_images_per_shard=1)
    data = json.loads(ann.read_text())
    box = next(x for x in data["annotations"] if not x.get("iscrowd"))
    box["bbox"][0] += 5.0
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(data))
    convert_coco(moved, root, c, progress=False)
    fa = eval_fingerprint(str(a))
    assert len(fa) == 16 and fa == eval_fingerprint(str(b)) != eval_fingerprint(str(c))


def test_the_label_book_follows_a_num_classes_written_as_a_float():
    # the config reads '1e2' / '100.0' as 100; the label book used to stay at the data's 91
    cats = [{"id": 90, "name": "x"}]
    for text in ["100", "1e2", "100.0", " 100 "]:
        assert class_overrides(cats, [f"model.num_classes={text}"]) == ["model.dn_labelbook_size=100"], text
    assert class_overrides(cats, ["model.num_classes=many"]) == ["model.dn_labelbook_size=91"]  # the config refuses it


def test_coco_style_data_is_read_on_its_stored_pixels_unless_the_user_says_otherwise():
    assert stored_pixels([]) == ["data.exif_orientation=stored"]
    assert stored_pixels(["train.lr=1e-4"]) == ["data.exif_orientation=stored"]
    assert stored_pixels([" data.exif_orientation = upright"]) == []

"""Fine-tuning init from a local o365 checkpoint: class heads mapped by name (366 -> 91)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from dino_scale.config import preset, to_dict
from dino_scale.data import synthetic
from dino_scale.engine.checkpoint import load_weights, save_weights
from dino_scale.models import build_dino
from pipelines._common import UsageError
from pipelines._init import prepare_init


@pytest.fixture(scope="module")
def o365_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("o365")
    cfg = preset("tiny", ["model.num_classes=366", "model.dn_labelbook_size=366"])
    torch.manual_seed(1)
    model, _, _ = build_dino(cfg.model)
    save_weights(d, model.state_dict(), config=to_dict(cfg))
    (d / "categories.json").write_text(json.dumps(synthetic.categories("o365-like")))
    return d, model.state_dict()


def test_pipelines_init_maps_heads_by_name(o365_checkpoint, tmp_path):
    ckpt, src = o365_checkpoint
    o365 = {c["name"]: c["id"] for c in synthetic.categories("o365-like")}
    coco = [{"id": c["id"], "name": c["name"]} for c in synthetic.categories("coco-like")]
    cfg = preset("tiny", ["model.num_classes=91", "model.dn_labelbook_size=91"])
    init = prepare_init(str(ckpt), cfg, coco, tmp_path / "init", log=lambda m: None)
    state = load_weights(init.path)
    assert state["class_embed.0.weight"].shape[0] == 91 and state["label_enc.weight"].shape[0] == 92
    shared = [c for c in coco if c["name"] in o365]
    assert len(shared) == 8  # person, bicycle, car, bird, cat, dog, bottle, chair
    for c in shared:
        s = o365[c["name"]]
        for key in ("class_embed.0.weight", "class_embed.0.bias", "transformer.enc_out_class_embed.weight",
                    "label_enc.weight"):
            assert torch.equal(state[key][c["id"]], src[key][s]), (key, c)
    # kite/toothbrush have no source row: not equal to whatever o365 row had the same id
    assert not torch.equal(state["class_embed.0.weight"][38], src["class_embed.0.weight"][38])
    # every class-independent tensor comes from the checkpoint
    assert torch.equal(state["transformer.tgt_embed.weight"], src["transformer.tgt_embed.weight"])
    assert "kite" in json.loads((init.path / "lineage.json").read_text())["class_transfer"]["fresh"]
    assert init.lineage["source.uri"] == str(ckpt)
    assert "8 categories mapped by name" in init.summary
    # the written weights load strictly into a fresh COCO model
    model, _, _ = build_dino(cfg.model)
    model.load_state_dict(state, strict=True)


def test_pipelines_init_fresh_class_heads_take_no_source_row(o365_checkpoint, tmp_path):
    """``--class-heads fresh`` (the official fine-tuning): every class-head row is the seeded fresh
    model's, every other tensor the source's; the choice is part of the source's identity, so a
    mapped init of the same run name is kept in its own folder."""
    ckpt, src = o365_checkpoint
    coco = [{"id": c["id"], "name": c["name"]} for c in synthetic.categories("coco-like")]
    cfg = preset("tiny", ["model.num_classes=91", "model.dn_labelbook_size=91"])
    said: list[str] = []
    out = tmp_path / "init"
    mapped = prepare_init(str(ckpt), cfg, coco, out, log=lambda m: None)
    init = prepare_init(str(ckpt), cfg, coco, out, log=said.append, class_heads="fresh")
    assert mapped.path == out and init.path.name.startswith("init-") and init.created
    state = load_weights(init.path)
    torch.manual_seed(cfg.train.seed)
    fresh = build_dino(cfg.model)[0].state_dict()
    def is_head(key: str) -> bool:  # class_embed.*, transformer.decoder.class_embed.*, enc_out_class_embed, label_enc
        return "class_embed" in key or key.startswith("label_enc.")

    assert sum(map(is_head, state)) > 4
    for key, value in state.items():
        if is_head(key):
            assert torch.equal(value, fresh[key]), key
        else:
            assert torch.equal(value, src[key]), key
    person = 1  # shared by both label spaces: the mapped init took its source row, the fresh one did not
    assert not torch.equal(state["class_embed.0.weight"][person], load_weights(out)["class_embed.0.weight"][person])
    assert init.lineage["source.class_heads"] == "fresh" and "source.class_heads" not in mapped.lineage
    assert json.loads((init.path / "lineage.json").read_text())["source.class_heads"] == "fresh"
    assert "class heads freshly initialized (--class-heads fresh)" in said
    with pytest.raises(UsageError, match="class heads 'reinit': use one of map, fresh"):
        prepare_init(str(ckpt), cfg, coco, tmp_path / "other", log=lambda m: None, class_heads="reinit")


def test_pipelines_init_wrong_preset_is_a_usage_error(o365_checkpoint, tmp_path):
    """The source's preset is named (not the dozen keys that differ from the one given)."""
    ckpt, _ = o365_checkpoint
    bare = tmp_path / "bare"  # without its config: its tensors do not fit
    bare.mkdir()
    shutil.copy(ckpt / "model.safetensors", bare)
    cfg = preset("tiny", ["model.num_classes=91", "model.hidden_dim=32", "model.dim_feedforward=64"])
    with pytest.raises(UsageError, match="does not fit preset"):
        prepare_init(str(bare), cfg, [{"id": 1, "name": "person"}], tmp_path / "init", log=lambda m: None)
    person = [{"id": 1, "name": "person"}]
    with pytest.raises(UsageError, match=r"model.hidden_dim \d+ \(there\) vs 32 .* with --set model.hidden_dim"):
        prepare_init(str(ckpt), cfg, person, tmp_path / "init", log=lambda m: None)
    with pytest.raises(UsageError, match=r"than preset 'r50_4scale' builds: model.backbone .* with --preset tiny$"):
        prepare_init(str(ckpt), preset("r50_4scale"), person, tmp_path / "init", log=lambda m: None)


def test_pipelines_init_categories_of_a_checkpoint_folder(o365_checkpoint, tmp_path):
    """A final folder of an older run (no categories.json beside the weights) still maps by
    name: the categories come from the manifest of its lineage's ``train_dir``."""
    import shutil

    from dino_scale.data import convert_coco
    from dino_scale.data.synthetic import generate
    from pipelines._init import _source_categories, resolve

    ckpt, _ = o365_checkpoint
    folder = tmp_path / "final"
    shutil.copytree(ckpt, folder)
    (folder / "categories.json").unlink()
    assert _source_categories(resolve(str(folder), tmp_path / "dl")) is None
    images, ann = generate(tmp_path / "raw", "o365-like", 2, 0)
    convert_coco(ann, images, tmp_path / "shards", progress=False)
    (folder / "lineage.json").write_text(json.dumps({"train_dir": str(tmp_path / "shards")}))
    cats = _source_categories(resolve(str(folder), tmp_path / "dl"))
    assert cats is not None and {c["name"] for c in cats} == {c["name"] for c in synthetic.categories("o365-like")}


@pytest.mark.parametrize("override, named", [
    ("model.enc_layers=3", "transformer.encoder.layers.2."),  # the source lacks a layer: was left fresh
    ("model.dec_layers=1", "bbox_embed.1."),  # the source has a decoder layer more: was dropped
    ("model.dec_layers=3", "transformer.decoder.layers.2."),  # was a CheckpointMismatch about aliases
])
def test_pipelines_init_other_layer_count_is_a_usage_error(o365_checkpoint, tmp_path, override, named):
    """Same tensor shapes, other number of layers: every tensor of the model must come from the
    source and every tensor of the source must land in the model, else a UsageError names them
    (a fine-tune used to start with a freshly initialized encoder layer, logging success). A
    source without config (an official .pth) is checked by its tensors; one with a config by
    its settings first, naming the key."""
    ckpt, _ = o365_checkpoint
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(ckpt / "model.safetensors", bare)
    cfg = preset("tiny", ["model.num_classes=91", override])
    with pytest.raises(UsageError, match="does not fit preset") as err:
        prepare_init(str(bare), cfg, [{"id": 1, "name": "person"}], tmp_path / "init", log=lambda m: None)
    assert named in str(err.value)
    key, value = override.split("=")
    trained = getattr(preset("tiny").model, key.split(".")[1])
    with pytest.raises(UsageError, match=rf"{key} {trained} \(there\) vs {value} \(here\).* --set {key}={trained}$"):
        prepare_init(str(ckpt), cfg, [{"id": 1, "name": "person"}], tmp_path / "init", log=lambda m: None)
    assert not (tmp_path / "init" / "model.safetensors").exists()


def test_pipelines_init_a_source_trained_as_another_network_is_refused_naming_each_key(o365_checkpoint, tmp_path):
    """A source pretrained with --set model.activation=gelu (or another position temperature, or
    head count: every tensor keeps its shape) was fine-tuned with the preset's relu without a
    word; another num_queries was refused as a shape misfit with "pass the matching --preset",
    the preset being right. Each key is named with the --set that fine-tunes the source as
    trained, and that command line is accepted."""
    d = tmp_path / "gelu"
    overrides = ["model.num_classes=366", "model.dn_labelbook_size=366", "model.activation=gelu",
                 "model.position_temperature=10000", "model.num_queries=40", "model.dec_pred_class_embed_share=false"]
    model, _, _ = build_dino(preset("tiny", overrides).model)
    save_weights(d, model.state_dict(), config=to_dict(preset("tiny", overrides)))
    coco = [{"id": c["id"], "name": c["name"]} for c in synthetic.categories("coco-like")]
    with pytest.raises(UsageError) as err:
        prepare_init(str(d), preset("tiny", ["model.num_classes=91"]), coco, tmp_path / "init", log=lambda m: None)
    said = str(err.value)
    assert "was trained as another network than preset 'tiny' builds: model.activation 'gelu' (there) vs 'relu'" in said
    assert said.endswith("with --set model.activation=gelu --set model.num_queries=40 "
                         "--set model.position_temperature=10000.0 --set model.dec_pred_class_embed_share=false"), said
    sets = said.split("trained with ")[1].replace("--set ", "").split()
    init = prepare_init(str(d), preset("tiny", ["model.num_classes=91", *sets]), coco, tmp_path / "init",
                        log=lambda m: None)
    assert torch.equal(load_weights(init.path)["transformer.tgt_embed.weight"],
                       model.state_dict()["transformer.tgt_embed.weight"])


def test_pipelines_init_registry_typo_lists_what_exists(tmp_path, mlflow_store_restored):
    """A mistyped alias, version or model name in a registry URI names what the registry holds
    (the model's aliases with their versions, its versions, the closest model names). Was: MLflow's
    'Registered model alias pretraind not found.' and the advice to 'run pretraining first', for a
    model that pretraining had registered."""
    import mlflow

    from mlflow_store import seeded_store
    from pipelines import _common as common
    from pipelines._errors import _one_line
    from pipelines._init import check_exists

    seeded_store(tmp_path)
    uri = common.setup_tracking(tmp_path)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("dino-tiny-o365")
    client.create_registered_model("dino-tiny-coco")
    for _ in range(2):
        client.create_model_version("dino-tiny-o365", source=str(tmp_path / "w"))
    client.set_registered_model_alias("dino-tiny-o365", "pretrained", "2")
    check_exists("models:/dino-tiny-o365@pretrained")
    check_exists("models:/dino-tiny-o365/latest")  # MLflow's own form: the highest version
    cases = {
        "models:/dino-tiny-o365/Production": ["use an alias", "dino-tiny-o365 has alias @pretrained (v2)"],
        "models:/dino-tiny-coco/latest": ["'dino-tiny-coco' has no versions"],
        "models:/dino-tiny-o365@pretraind": ["dino-tiny-o365 has alias @pretrained (v2) and versions 1, 2"],
        "models:/dino-tiny-o365/7": ["dino-tiny-o365 has alias @pretrained (v2) and versions 1, 2"],
        "models:/dino-tiny-o36@pretrained": ["registered models: dino-tiny-o365, dino-tiny-coco"],
        # was: "list models with `dino-scale registry ... list`", which lists no runs
        "runs:/0123456789abcdef/model": ["a run id as MLflow shows it"],
    }
    for bad, needles in cases.items():
        with pytest.raises(UsageError) as err:
            check_exists(bad)
        msg = str(err.value)
        assert msg.startswith(f"cannot resolve {bad}: ") and "\n" not in msg, msg
        assert all(n in msg for n in needles), msg
        assert "run pretraining first" not in msg, msg
        assert not _one_line(err.value).endswith("..."), msg  # the stage hint was cut at 400 characters


def test_pipelines_init_does_not_read_the_imagenet_backbone_file(o365_checkpoint, tmp_path):
    """Every backbone tensor of the init comes from the source model, so model.backbone_weights
    is not read: a real ImageNet file gives the same init as none, and a path that does not exist
    here (a file only the workers have, or an unreachable URL) no longer fails the init (was:
    FileNotFoundError from build_dino, before anything was written)."""
    from dataclasses import replace

    ckpt, src = o365_checkpoint
    coco = [{"id": c["id"], "name": c["name"]} for c in synthetic.categories("coco-like")]
    cfg = preset("tiny", ["model.num_classes=91", "model.dn_labelbook_size=91"])
    reference = load_weights(prepare_init(str(ckpt), cfg, coco, tmp_path / "ref", log=lambda m: None).path)
    body = {k: v + 0.5 for k, v in src.items() if k.startswith("backbone.0.body.") and v.is_floating_point()}
    assert body
    torch.save(body, tmp_path / "imagenet.pth")
    for name, weights in (("file", str(tmp_path / "imagenet.pth")), ("missing", str(tmp_path / "nowhere.pth"))):
        with_file = replace(cfg, model=replace(cfg.model, backbone_weights=weights))
        init = prepare_init(str(ckpt), with_file, coco, tmp_path / name, log=lambda m: None)
        state = load_weights(init.path)
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in state), name
        assert all(torch.equal(state[k], src[k]) for k in state if k.startswith("backbone.")), name
        assert json.loads((init.path / "config.json").read_text())["model"]["backbone_weights"] == weights


def test_pipelines_init_removes_a_download_it_could_not_use(o365_checkpoint, tmp_path, mlflow_store_restored):
    """A registry model downloaded into ``<init>/source`` was removed only when the init got past
    reading it: a file that failed to load (here a truncated weights file) left the whole
    download in the work folder."""
    import mlflow

    from mlflow_store import seeded_store
    from pipelines import _common as common
    from dino_scale.models.weights_file import WeightsFileError

    ckpt, _ = o365_checkpoint
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "categories.json"):
        (bad / name).write_bytes((ckpt / name).read_bytes())
    (bad / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:5000])
    seeded_store(tmp_path)
    uri = common.setup_tracking(tmp_path)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("init-test", artifact_location=(tmp_path / "art").as_uri()))
    client.log_artifacts(run.info.run_id, str(bad), "model")
    client.create_registered_model("dino-tiny-o365")
    client.create_model_version("dino-tiny-o365", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    cfg = preset("tiny", ["model.num_classes=91"])
    with pytest.raises(WeightsFileError, match="model.safetensors"):
        prepare_init("models:/dino-tiny-o365/1", cfg, [{"id": 1, "name": "person"}], tmp_path / "init",
                     log=lambda m: None)
    assert not (tmp_path / "init" / "source").exists()


def _finetune_without_data_or_ray(monkeypatch, tmp_path, categories: list[dict]) -> None:
    """``finetune_coco.main`` up to its initial weights: the datasets, their categories and the
    Ray connection stood in (each test stops the pipeline before the engine)."""
    from pipelines import _common as common
    from pipelines import finetune_coco

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(finetune_coco, "resolve_datasets",
                        lambda *a, **k: (str(tmp_path / "train"), str(tmp_path / "val"), True))
    monkeypatch.setattr(finetune_coco, "categories_of", lambda data: categories)
    monkeypatch.setattr(finetune_coco, "check_classes", lambda *a, **k: None)
    monkeypatch.setattr(common, "connect_ray", lambda *a, **k: "Ray stand-in (stopped before the engine)")


def test_pipelines_init_of_another_source_keeps_the_earlier_runs_folder(o365_checkpoint, tmp_path, monkeypatch,
                                                                        capsys, mlflow_store_restored):
    """A rerun of a run name from other weights (`--init` changed) wrote its init over
    ``work/init/<run>``, the weights the earlier run of that name started from, and then the
    engine refused it (a resumed run must start from the same weights): the refused call had
    already destroyed them. Another source now goes to ``work/init/<run>-<digest>``, which a
    refused run removes; the same source reuses the folder."""
    import dino_scale.engine
    from dino_scale.config import ConfigError
    from pipelines import _common as common
    from pipelines import finetune_coco

    ckpt, src = o365_checkpoint
    other = tmp_path / "other"
    save_weights(other, {k: v + 1 if v.is_floating_point() else v for k, v in src.items()},
                 config=json.loads((ckpt / "config.json").read_text()))
    (other / "categories.json").write_text((ckpt / "categories.json").read_text())
    coco = [{"id": c["id"], "name": c["name"]} for c in synthetic.categories("coco-like")]
    cfg = preset("tiny", ["model.num_classes=91", "model.dn_labelbook_size=91"])
    out = tmp_path / "work" / "init" / "ft"
    first = prepare_init(str(ckpt), cfg, coco, out, log=lambda m: None)
    assert first.path == out and first.created
    kept = (out / "model.safetensors").read_bytes()
    again = prepare_init(str(ckpt), cfg, coco, out, log=lambda m: None)  # same source: same folder
    assert again.path == out and not again.created
    second = prepare_init(str(other), cfg, coco, out, log=lambda m: None)
    assert second.path.parent == out.parent and second.path.name.startswith("ft-") and second.created
    assert (out / "model.safetensors").read_bytes() == kept
    assert json.loads((second.path / "lineage.json").read_text())["init_uri"] == str(other)
    import shutil
    shutil.rmtree(second.path)

    # the pipeline: the engine refuses the rerun; the earlier run's weights are intact, no folder is left
    _finetune_without_data_or_ray(monkeypatch, tmp_path, coco)

    def refuse(*args, init_weights=None, **kwargs):
        assert init_weights != str(out)
        raise ConfigError("run name 'ft' resumes MLflow run abc, which started from other weights")

    monkeypatch.setattr(dino_scale.engine, "fit", refuse)
    argv = ["--work-dir", str(tmp_path / "work"), "--preset", "tiny", "--run-name", "ft", "--init", str(other)]
    assert common.run_main(finetune_coco.main, argv) == 2
    assert "resumes MLflow run" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == kept
    assert sorted(p.name for p in out.parent.iterdir()) == ["ft"]


def test_pipelines_init_finetune_passes_its_class_heads_flag(tmp_path, monkeypatch, capsys, mlflow_store_restored):
    """``finetune_coco --class-heads fresh`` reaches ``prepare_init``; the default maps; another
    value is refused by the parser (exit 2)."""
    from pipelines import _common as common
    from pipelines import _init, finetune_coco

    coco = [{"id": c["id"], "name": c["name"]} for c in synthetic.categories("coco-like")]
    _finetune_without_data_or_ray(monkeypatch, tmp_path, coco)
    monkeypatch.setattr(_init, "check_exists", lambda uri: None)
    asked: list[str] = []

    def stop(uri, cfg, categories, out_dir, log=print, class_heads="map"):
        asked.append(class_heads)
        raise UsageError("stop here")

    monkeypatch.setattr(_init, "prepare_init", stop)
    argv = ["--work-dir", str(tmp_path / "work"), "--preset", "tiny", "--init", str(tmp_path / "w")]
    assert common.run_main(finetune_coco.main, argv + ["--class-heads", "fresh"]) == 2
    assert common.run_main(finetune_coco.main, argv) == 2
    assert asked == ["fresh", "map"] and "stop here" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        finetune_coco.build_parser().parse_args(argv + ["--class-heads", "reinit"])
    assert exited.value.code == 2


def test_pipelines_init_local_sources_are_file_uris_too_and_recorded_absolute(o365_checkpoint, tmp_path, monkeypatch):
    """A ``file:`` URI lost its prefix as text: ``Path.as_uri()``'s percent-encoded space was not
    found, and ``file://localhost/...`` read as the relative ``localhost/...``. A relative path was
    recorded as typed (tags, lineage.json, the resume check's source identity): ``final`` from
    another folder passed as the same source, ``./final`` as another one. Recorded absolute now."""
    import shutil

    from pipelines._init import resolve

    ckpt, _src = o365_checkpoint
    spaced = tmp_path / "final dir"
    shutil.copytree(ckpt, spaced)
    for uri in (spaced.as_uri(), f"file://localhost{spaced}", f"file://{spaced}"):
        resolved = resolve(uri, tmp_path / "dl")
        assert resolved.weights_path.parent == spaced and resolved.uri == str(spaced), uri
    with pytest.raises(UsageError, match="names a file on the host 'elsewhere'"):
        resolve(f"file://elsewhere{spaced}", tmp_path / "dl")
    coco = [{"id": c["id"], "name": c["name"]} for c in synthetic.categories("coco-like")]
    cfg = preset("tiny", ["model.num_classes=91", "model.dn_labelbook_size=91"])
    monkeypatch.chdir(tmp_path)
    init = prepare_init("./final dir", cfg, coco, tmp_path / "init", log=lambda m: None)
    assert init.lineage["source.uri"] == str(spaced.resolve())
    assert json.loads((init.path / "lineage.json").read_text())["init_uri"] == str(spaced.resolve())

"""Config presets, overrides and round-trips."""
import json
import re

import pytest

from dino_scale import config as C


def test_presets_carry_official_hyperparameters():
    cfg = C.preset("r50_4scale")
    m = cfg.model
    assert (m.hidden_dim, m.nheads, m.dim_feedforward, m.enc_layers, m.dec_layers) == (256, 8, 2048, 6, 6)
    assert (m.num_queries, m.num_feature_levels, m.enc_n_points, m.dec_n_points) == (900, 4, 4, 4)
    assert m.dn_box_noise_scale == 1.0 and m.dn_label_noise_ratio == 0.5 and m.dn_number == 100
    assert (m.set_cost_class, m.set_cost_bbox, m.set_cost_giou) == (2.0, 5.0, 2.0)
    assert (cfg.train.lr, cfg.train.lr_backbone, cfg.train.weight_decay) == (1e-4, 1e-5, 1e-4)
    assert cfg.train.clip_max_norm == 0.1 and cfg.train.lr_drop_epochs is None  # 11 of 12 (optim)
    assert C.preset("r50_5scale").model.num_feature_levels == 5
    swin = C.preset("swinl_5scale").model
    assert swin.backbone == "swin_large_384" and swin.backbone_checkpointing and swin.num_feature_levels == 5
    tiny = C.preset("tiny")
    assert tiny.model.hidden_dim < 256 and tiny.data.eval_size <= 320


def test_dotted_overrides_and_types():
    cfg = C.preset("tiny", ["model.num_queries=300", "train.lr=2e-4", "model.backbone_weights=none",
                            "data.train_scales=[128,160]", "train.use_gpu=true"])
    assert cfg.model.num_queries == 300 and cfg.train.lr == 2e-4
    assert cfg.model.backbone_weights is None
    assert cfg.data.train_scales == [128, 160] and cfg.train.use_gpu is True


@pytest.mark.parametrize("bad", ["model.num_querys=3", "nosection.x=1", "model=3", "model.num_queries"])
def test_unknown_keys_are_clear_errors(bad):
    with pytest.raises(C.ConfigError, match="config key|must look like"):
        C.preset("tiny", [bad])


def test_bad_value_and_preset_typo():
    with pytest.raises(C.ConfigError, match="bad value 'many' for model.num_queries"):
        C.preset("tiny", ["model.num_queries=many"])
    with pytest.raises(C.ConfigError, match="unknown preset 'r50_4scal'"):
        C.preset("r50_4scal")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    cfg = C.preset("swinl_4scale", ["model.num_classes=366", "data.scale_factor=1.5"])
    path = tmp_path / f"cfg{suffix}"
    C.save(cfg, path)
    assert C.load(path) == cfg
    assert C.from_dict(json.loads(json.dumps(C.to_dict(cfg)))) == cfg
    flat = C.flatten(cfg)
    assert flat["model.num_classes"] == 366 and flat["name"] == "swinl_4scale"


def test_int_fields_take_whole_numbers_written_as_floats():
    cfg = C.preset("tiny", ["train.max_steps=1e4", "train.num_workers=2.0", "train.checkpoint_every_steps=1E3"])
    assert (cfg.train.max_steps, cfg.train.num_workers, cfg.train.checkpoint_every_steps) == (10000, 2, 1000)
    assert type(cfg.train.max_steps) is int and type(cfg.train.num_workers) is int
    for bad in ["train.num_workers=2.5", "train.max_steps=1e-3", "train.num_workers=two"]:
        with pytest.raises(C.ConfigError, match="bad value .* \\(expected int\\)"):
            C.preset("tiny", [bad])


@pytest.mark.parametrize("value, bad", [("none", "'none'"), ("800 1000", "'800 1000'"), ("[480,x]", "'x'")])
def test_a_bad_list_value_names_the_list_and_its_spellings(value, bad):
    """Said "bad value '800 1000' for eval.tta_scales (expected int)": the type of an item, for a
    key that takes a list, and no word of how one is written."""
    with pytest.raises(C.ConfigError) as err:
        C.preset("tiny", [f"eval.tta_scales={value}"])
    assert str(err.value) == (f"bad value {bad} in eval.tta_scales (expected a list of int, e.g. "
                              "eval.tta_scales=[480,512] or eval.tta_scales=480,512)")
    assert C.preset("tiny", ["eval.tta_scales=800, 1000"]).eval.tta_scales == [800, 1000]


@pytest.mark.parametrize("key, value", [("model.backbone", None), ("train.use_gpu", None), ("name", None),
                                        ("train.num_workers", True), ("train.lr", False)])
def test_null_or_bool_for_a_plain_field_is_an_error_not_a_silent_value(key, value):
    # JSON null used to become the backbone / name 'None' and use_gpu False; true became num_workers 1
    section, _, leaf = key.rpartition(".")
    with pytest.raises(C.ConfigError, match=f"bad value {value!r} for {key}"):
        C.from_dict({section: {leaf: value}} if section else {key: value})


@pytest.mark.parametrize("data, match", [(None, "mapping of sections, not NoneType"),
                                         ([], "mapping of sections, not list"),
                                         ({"model": None}, "section 'model' must be a mapping"),
                                         ({"bogus": 1}, "unknown config key 'bogus'")])
def test_from_dict_of_a_non_mapping_is_a_config_error(data, match):
    with pytest.raises(C.ConfigError, match=match):
        C.from_dict(data)


def test_load_names_the_file(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(C.ConfigError, match="empty.yaml: a config must be a mapping"):
        C.load(empty)
    extra = tmp_path / "old.json"
    extra.write_text(json.dumps({**C.to_dict(C.preset("tiny")), "model": {"removed_key": 1}}))
    with pytest.raises(C.ConfigError, match="old.json: unknown config key 'model.removed_key'"):
        C.load(extra)


def test_a_whole_section_is_not_an_override():
    with pytest.raises(C.ConfigError, match="'train' is a section: set its keys one by one"):
        C.preset("tiny", ["train={}"])


def test_overrides_do_not_touch_presets():
    before = json.dumps(C.PRESETS, sort_keys=True)
    a = C.preset("tiny", ["data.train_scales=[1,2]", "train.lr_drop_epochs=[3]"])
    a.data.train_scales.append(9)
    a.eval.tta_scales.append(9)
    b = C.preset("tiny")
    assert b.data.train_scales == [192, 224, 256] and b.eval.tta_scales == [256]
    assert json.dumps(C.PRESETS, sort_keys=True) == before


def test_override_text_is_stripped_or_refused_naming_it():
    """Whitespace around key and value is stripped; no key, a key holding a space or no value is
    refused naming the override. Was: '=1' read "unknown config key ''", 'train. lr=1' an
    unknown key, and 'model.backbone=' / 'data.train_scales=' set an empty name or list."""
    cfg = C.preset("tiny", [" train.lr = 1e-3 ", "\tmodel.num_queries=30"])
    assert cfg.train.lr == 1e-3 and cfg.model.num_queries == 30
    assert C.parse_override("  data.image_root =/a b ") == ("data.image_root", "/a b")
    assert C.preset("tiny", ["data.train_scales=[]", "model.backbone_weights=none"]).data.train_scales == []
    for bad, message in [("=1", "override '=1' names no key"), (" = 1", "names no key"),
                         ("train. lr=1", "the key 'train. lr' holds a space.*'train.lr'"),
                         ("train .lr=1", "holds a space"),
                         ("model.backbone=", "override 'model.backbone=' has no value: write model.backbone="),
                         ("data.train_scales= ", "has no value.*'\\[\\]' for an empty list"),
                         ("train.lr", "must look like section.key=value")]:
        with pytest.raises(C.ConfigError, match=message):
            C.preset("tiny", [bad])


def test_exif_orientation_is_a_data_setting_recorded_with_the_run(tmp_path):
    """Which pixels an EXIF-tagged image's boxes lie on is chosen once, in the config: default
    ``auto``, set by an override, kept through save/load and among the flattened (MLflow) params."""
    from dino_scale.data.decode import check_exif_orientation

    assert C.preset("r50_4scale").data.exif_orientation == "auto"
    cfg = C.preset("tiny", ["data.exif_orientation=stored"])
    assert C.flatten(cfg)["data.exif_orientation"] == "stored"
    C.save(cfg, tmp_path / "c.yaml")
    assert C.load(tmp_path / "c.yaml").data.exif_orientation == "stored"
    for mode in ("auto", "stored", "upright"):
        assert check_exif_orientation(mode) == mode
    with pytest.raises(C.ConfigError, match="data.exif_orientation must be one of auto, stored, upright.*'Stored'"):
        check_exif_orientation("Stored")


@pytest.mark.parametrize("override,hint", [
    ("train.lrr=1", "did you mean 'train.lr'?"),
    ("trian.lr=1", "did you mean 'train'?"),
    ("foo=1", "keys here: name, model, data, train, eval"),
    ("train.zzz=1", "keys here (train.epochs,"),
])
def test_an_unknown_key_says_what_is_there(override, hint):
    # was "unknown config key 'train.lrr'" alone: no near match, no list of the section's keys
    with pytest.raises(C.ConfigError, match=re.escape(hint)):
        C.preset("tiny", [override])

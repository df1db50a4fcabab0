"""Config presets, overrides and round-trips."""
import json

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

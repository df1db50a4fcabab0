"""Official checkpoint compatibility: key sets of every preset, strict loading, .pth reading."""
from __future__ import annotations

import argparse
import pickle
import re

import pytest
import torch

from dino_scale.models.official import (CheckpointMismatch, load_official_checkpoint, load_official_state_dict,
                                        official_state_dict)
from dino_model_cache import cached_model, golden_weights, meta_model

TSV_PRESETS = ["r50_4scale", "r50_5scale", "swinl_4scale"]


def _tsv_state_dict(golden, name):
    """A state dict holding every key of the .tsv (integer buffers as the official values)."""
    from dino_scale.models.swin import relative_position_index

    sd, fill = {}, {}
    for key, shape in golden.read_keys(name):
        if key.endswith("relative_position_index"):
            sd[key] = relative_position_index(12)
            assert tuple(sd[key].shape) == shape
        else:  # cheap distinct values per tensor (aliases of a shared head share them)
            value = fill.setdefault(golden._shared_head_key(key), float(len(fill)) / 100)
            sd[key] = torch.full(shape, value)
    return sd


@pytest.mark.parametrize("name", TSV_PRESETS)
def test_official_keys_and_shapes_match_tsv(golden, name):
    model = meta_model(name)
    ours = official_state_dict(model)
    expected = golden.read_keys(name)
    assert list(ours) == [k for k, _ in expected]  # same keys, same order
    assert {k: tuple(v.shape) for k, v in ours.items()} == dict(expected)


@pytest.mark.parametrize("name", TSV_PRESETS)
def test_tsv_state_dict_loads_strictly(golden, name):
    model = cached_model(name)
    sd = _tsv_state_dict(golden, name)
    load_official_state_dict(model, sd)
    ours = official_state_dict(model)
    for key, value in sd.items():
        assert torch.equal(ours[key], value.to(ours[key].dtype)), key
    # shared heads really are one module: all 12 names see the same (loaded) values
    assert model.bbox_embed[0] is model.transformer.decoder.bbox_embed[5]
    # integer buffers may be absent: drop them (Swin's relative_position_index)
    load_official_state_dict(model, {k: v for k, v in sd.items() if not k.endswith("position_index")})


def test_r50_4scale_unique_params():
    model = meta_model("r50_4scale")
    n = sum(p.numel() for p in model.parameters())  # unique: shared heads counted once
    assert round(n / 1e6, 2) == 46.89, n  # the facts page (FrozenBN statistics are buffers)
    params = dict(model.named_parameters())
    assert params["backbone.0.body.layer2.0.conv1.weight"].requires_grad
    assert not params["backbone.0.body.layer1.0.conv1.weight"].requires_grad
    assert not params["backbone.0.body.conv1.weight"].requires_grad


def test_swinl_5scale_key_pattern(golden):
    model = meta_model("swinl_5scale")
    ours = {k: tuple(v.shape) for k, v in official_state_dict(model).items()}
    swin4 = dict(golden.read_keys("swinl_4scale"))
    r50_5 = dict(golden.read_keys("r50_5scale"))
    bb4 = {k: s for k, s in swin4.items() if k.startswith("backbone.")}
    expected = dict(bb4)
    expected.update({"backbone.0.norm0.weight": (192,), "backbone.0.norm0.bias": (192,)})
    for k, s in r50_5.items():
        if k.startswith("backbone."):
            continue
        m = re.match(r"input_proj\.(\d)\.0\.weight", k)
        if m:
            lvl = int(m.group(1))
            s = (256, [192, 384, 768, 1536, 1536][lvl]) + s[2:]
        expected[k] = s
    assert ours == expected
    assert ours["input_proj.4.0.weight"] == (256, 1536, 3, 3)


def test_mismatches_are_reported_clearly(golden):
    model = cached_model("r50_4scale")
    good = golden_weights(golden, "r50_4scale")

    sd = dict(good)
    del sd["transformer.tgt_embed.weight"]
    sd["transformer.not_a_key"] = torch.zeros(1)
    sd["label_enc.weight"] = torch.zeros(366, 256)
    with pytest.raises(CheckpointMismatch) as err:
        load_official_state_dict(model, sd)
    msg = str(err.value)
    assert "missing keys: transformer.tgt_embed.weight" in msg
    assert "unexpected keys: transformer.not_a_key" in msg
    assert "label_enc.weight: checkpoint (366, 256) vs model (92, 256)" in msg

    sd = dict(good)
    sd["transformer.decoder.bbox_embed.3.layers.0.bias"] = sd["bbox_embed.0.layers.0.bias"] + 1
    with pytest.raises(CheckpointMismatch, match="aliased"):
        load_official_state_dict(model, sd)


def test_prefix_and_single_copy_heads_load(golden):
    model = cached_model("r50_4scale")
    good = golden_weights(golden, "r50_4scale")
    # one copy of each shared head is enough; DDP "module." prefixes are stripped
    sd = {f"module.{k}": v for k, v in good.items()
          if not re.match(r"^(transformer\.decoder\.)?(bbox|class)_embed\.[1-5]\.", k)
          and not k.startswith("transformer.decoder.bbox_embed.0") and not k.startswith("transformer.decoder.class")}
    assert len(sd) == len(good) - 11 * 6 - 11 * 2
    load_official_state_dict(model, {"model": sd, "epoch": 3})  # a whole checkpoint dict works too
    out = official_state_dict(model)
    assert torch.equal(out["transformer.decoder.bbox_embed.4.layers.2.bias"], good["bbox_embed.0.layers.2.bias"])
    assert torch.equal(out["class_embed.5.weight"], good["class_embed.0.weight"])


def test_wrapper_prefixes_are_stripped_in_any_order():
    """``_orig_mod.module.x`` (torch.compile of a DDP model) kept ``module.``: the prefixes were
    stripped in one order only, and the strict load failed with unexpected keys."""
    from dino_scale.models.official import normalize_keys

    one = torch.zeros(1)
    keys = ["module._orig_mod.a.b", "_orig_mod.module.a.c", "module.module.a.d", "a.e", "a.module.f"]
    assert list(normalize_keys({k: one for k in keys})) == ["a.b", "a.c", "a.d", "a.e", "a.module.f"]


class NotAllowed:  # any class outside the allowlist
    def __init__(self):
        self.x = 1


def test_pth_loads_weights_only_with_namespace(tmp_path, golden):
    sd = {k: v for k, v in list(golden_weights(golden, "r50_4scale").items())[:5]}
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "lr_scheduler": {"last_epoch": 3}, "epoch": 11,
                "args": argparse.Namespace(lr=1e-4, backbone="resnet50", dn_number=100)}, path)
    loaded = load_official_checkpoint(str(path))
    assert list(loaded) == list(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)

    bad = tmp_path / "evil.pth"
    torch.save({"model": sd, "args": NotAllowed()}, bad)
    with pytest.raises(pickle.UnpicklingError):
        load_official_checkpoint(str(bad))

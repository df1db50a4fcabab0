"""Class-head transfer between label spaces by category name (pure torch)."""
from __future__ import annotations

import torch
from torch import nn

from dino_scale.models.class_transfer import (category_map, is_class_key, normalize_name,
                                              transfer_class_heads)


class _Heads(nn.Module):
    """The class-dependent layout of DINO: shared decoder head (aliased), encoder head,
    denoising label embedding, plus one class-independent layer."""

    def __init__(self, num_classes: int, dim: int = 8, layers: int = 3):
        super().__init__()
        head = nn.Linear(dim, num_classes)
        self.class_embed = nn.ModuleList([head for _ in range(layers)])
        self.transformer = nn.Module()
        self.transformer.decoder = nn.Module()
        self.transformer.decoder.class_embed = self.class_embed
        self.transformer.enc_out_class_embed = nn.Linear(dim, num_classes)
        self.label_enc = nn.Embedding(num_classes + 1, dim)
        self.proj = nn.Linear(dim, dim)


SRC = [{"id": 1, "name": "Person"}, {"id": 2, "name": "Sneakers"}, {"id": 3, "name": "Car"},
       {"id": 4, "name": "Traffic Light"}, {"id": 5, "name": "Horse"}]
TGT = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "zebra"},
       {"id": 8, "name": "traffic_light"}]


def test_pipelines_normalize_and_map():
    assert normalize_name("  Traffic_Light ") == "traffic light"
    mapping, unmatched = category_map(SRC, TGT)
    assert mapping == {1: 1, 3: 3, 8: 4}
    assert unmatched == ["zebra"]
    mapping, unmatched = category_map(SRC, TGT, aliases={"zebra": "horse"})
    assert mapping[7] == 5 and unmatched == []


def test_pipelines_class_key_detection():
    for key in ["class_embed.0.weight", "transformer.decoder.class_embed.5.bias",
                "transformer.enc_out_class_embed.weight", "label_enc.weight",
                "module.class_embed.2.weight"]:
        assert is_class_key(key), key
    for key in ["bbox_embed.0.layers.0.weight", "transformer.enc_out_bbox_embed.layers.0.bias",
                "transformer.tgt_embed.weight", "input_proj.0.0.weight"]:
        assert not is_class_key(key), key


def test_pipelines_transfer_rows_by_name():
    torch.manual_seed(0)
    src_model, tgt_model = _Heads(6), _Heads(9)  # 5 + background-ish id 0; target ids up to 8
    fresh = {k: v.clone() for k, v in tgt_model.state_dict().items()}
    state, report = transfer_class_heads(src_model.state_dict(), tgt_model.state_dict(), SRC, TGT)
    tgt_model.load_state_dict(state, strict=True)
    s = src_model.state_dict()
    # matched rows come from the source, by name (target 8 'traffic_light' <- source 4)
    for t, src_id in {1: 1, 3: 3, 8: 4}.items():
        for key in ["class_embed.0.weight", "class_embed.0.bias",
                    "transformer.enc_out_class_embed.weight", "label_enc.weight"]:
            assert torch.equal(state[key][t], s[key][src_id]), (key, t)
    # unmatched and unused rows keep the fresh init
    for t in [0, 2, 4, 5, 6, 7]:
        assert torch.equal(state["class_embed.0.weight"][t], fresh["class_embed.0.weight"][t])
        assert torch.equal(state["label_enc.weight"][t], fresh["label_enc.weight"][t])
    assert torch.equal(state["label_enc.weight"][9], fresh["label_enc.weight"][9])
    # class-independent tensors come from the source; aliases stay tied after loading
    assert torch.equal(tgt_model.proj.weight, src_model.proj.weight)
    assert tgt_model.class_embed[0] is tgt_model.transformer.decoder.class_embed[2]
    assert torch.equal(tgt_model.class_embed[1].weight[8], s["class_embed.1.weight"][4])
    assert report.matched == {1: 1, 3: 3, 8: 4} and report.unmatched_target == ["zebra"]
    assert report.skipped_keys == [] and report.copied_keys == 2
    assert "3 categories mapped" in report.summary()


def test_pipelines_transfer_shape_mismatch_keeps_fresh():
    src_model, tgt_model = _Heads(6, dim=8), _Heads(9, dim=4)
    fresh = tgt_model.state_dict()
    state, report = transfer_class_heads(src_model.state_dict(), fresh, SRC, TGT)
    assert torch.equal(state["proj.weight"], fresh["proj.weight"])
    assert torch.equal(state["class_embed.0.weight"], fresh["class_embed.0.weight"])
    assert "proj.weight" in report.skipped_keys and "class_embed.0.weight" in report.skipped_keys


# Objects365 v2 spellings (its annotation file) of categories COCO names otherwise
O365_V2 = [{"id": 1, "name": "Person"}, {"id": 38, "name": "Monitor/TV"}, {"id": 28, "name": "Bowl/Basin"},
           {"id": 14, "name": "Handbag/Satchel"}, {"id": 99, "name": "Dinning Table"},
           {"id": 324, "name": "Hair Dryer"}, {"id": 55, "name": "Pen/Pencil"},
           {"id": 350, "name": "Cosmetics Brush/Eyeliner Pencil"}, {"id": 7, "name": "Lamp"},
           {"id": 300, "name": "Lamp/Lantern"}]
COCO = [{"id": 1, "name": "person"}, {"id": 72, "name": "tv"}, {"id": 51, "name": "bowl"},
        {"id": 31, "name": "handbag"}, {"id": 67, "name": "dining table"}, {"id": 89, "name": "hair drier"},
        {"id": 90, "name": "toothbrush"}]


def test_class_transfer_objects365_v2_names_map_to_coco():
    """Objects365 v2 names several categories "A/B" and spells two differently from COCO: the
    heads of tv, bowl, handbag, dining table and hair drier were left fresh (unmatched) when
    fine-tuning COCO from an Objects365 model. A slash part names its category unless another
    category claims it too; an exact full name wins over a part."""
    mapping, unmatched = category_map(O365_V2, COCO)
    assert mapping == {1: 1, 72: 38, 51: 28, 31: 14, 67: 99, 89: 324}
    assert unmatched == ["toothbrush"]
    # "lamp" is a full name: it wins over the alternative of "Lamp/Lantern"
    mapping, unmatched = category_map(O365_V2, [{"id": 1, "name": "pencil"}, {"id": 2, "name": "lamp"},
                                                {"id": 3, "name": "lantern"}])
    assert mapping == {1: 55, 2: 7, 3: 300} and unmatched == []
    # an alternative two source categories share is ambiguous: not mapped
    mapping, unmatched = category_map([{"id": 1, "name": "Glass/Cup"}, {"id": 2, "name": "Wine Glass/Glass"}],
                                      [{"id": 5, "name": "glass"}, {"id": 6, "name": "cup"}])
    assert mapping == {6: 1} and unmatched == ["glass"]

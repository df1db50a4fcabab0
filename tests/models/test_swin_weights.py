"""Loading ImageNet Swin weights into the detection backbone (the original and timm formats,
safetensors, errors, pickled objects refused)."""
import pytest
import torch

from dino_scale.models import swin as S
from swin_fixtures import randomize_norms, small


def _to_original_format(model):
    """What an original Swin repo ImageNet checkpoint looks like for this model."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("norm")}
    sd["norm.weight"] = torch.ones(model.num_features[-1])
    sd["norm.bias"] = torch.zeros(model.num_features[-1])
    sd["head.weight"] = torch.randn(7, model.num_features[-1])
    sd["head.bias"] = torch.zeros(7)
    sd["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 144, 144)
    sd["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(144, 144, dtype=torch.long)
    return {"model": sd}


def test_load_original_format(tmp_path):
    src = small()
    randomize_norms(src)
    path = tmp_path / "swin_orig.pth"
    torch.save(_to_original_format(src), path)
    dst = small(out_indices=(0, 1, 2, 3))
    report = S.load_swin_imagenet_weights(dst, str(path), strict=True)
    assert report.source_format == "original"
    assert report.unexpected == []
    assert sorted(report.missing) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert {"head.weight", "norm.weight", "layers.0.blocks.1.attn_mask"} <= set(report.dropped)
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    for k, v in src_sd.items():
        if not k.startswith("norm"):
            assert torch.equal(dst_sd[k], v), k
    # relative_position_index is recomputed, never taken from the file
    assert torch.equal(dst_sd["layers.0.blocks.0.attn.relative_position_index"],
                       S.relative_position_index(12))


def test_load_timm_format_with_prefix_and_safetensors(tmp_path):
    from safetensors.torch import save_file
    src = small()
    randomize_norms(src)
    sd = {}
    for k, v in src.state_dict().items():
        if k.startswith("norm") or k.endswith("relative_position_index"):
            continue
        k = k.replace(".downsample.", "#")
        if "#" in k:  # timm: downsample at the start of the next stage, FeatureListNet naming
            i, rest = k[len("layers."):].split("#")
            k = f"layers_{int(i) + 1}.downsample.{rest}"
        else:
            k = k.replace("layers.", "layers_", 1)
        sd["model." + k] = v.clone().contiguous()
    path = tmp_path / "swin_timm.safetensors"
    save_file(sd, str(path))
    dst = small()
    report = S.load_swin_imagenet_weights(dst, str(path))
    assert report.source_format == "timm" and report.unexpected == []
    for k, v in src.state_dict().items():
        if not k.startswith("norm"):
            assert torch.equal(dst.state_dict()[k], v), k


def test_load_errors(tmp_path, caplog):
    src = small(window_size=7)
    path = tmp_path / "ws7.pth"
    torch.save(src.state_dict(), path)
    with pytest.raises(ValueError, match="shape mismatch"):
        S.load_swin_imagenet_weights(small(), str(path))
    with pytest.raises(FileNotFoundError):
        S.load_swin_imagenet_weights(small(), str(tmp_path / "missing.pth"))
    sd = {k: v for k, v in small().state_dict().items() if not k.startswith("layers.3.")}
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, path)
    with pytest.raises(ValueError, match="unexpected"):
        S.load_swin_imagenet_weights(small(), str(path), strict=True)
    with caplog.at_level("WARNING"):
        report = S.load_swin_imagenet_weights(small(), str(path))
    assert report.unexpected == ["extra.weight"]
    assert any(k.startswith("layers.3.blocks.0") for k in report.missing)
    assert "extra.weight" in caplog.text


def test_load_refuses_pickled_objects(tmp_path):
    import argparse
    path = tmp_path / "with_args.pth"
    torch.save({"model": small().state_dict(), "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(ValueError, match="weights_only"):
        S.load_swin_imagenet_weights(small(), str(path))

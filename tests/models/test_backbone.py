"""ResNet backbones with FrozenBN: keys, freezing, masks, ImageNet weight loading (file and URL)."""
from __future__ import annotations

import functools
import http.server
import threading

import pytest
import torch
import torch.nn.functional as F
import torchvision

import dino_scale.models.backbone as backbone_module
from dino_scale.config import preset
from dino_scale.models.backbone import (FrozenBatchNorm2d, Joiner, ResNetBackbone, build_backbone,
                                        load_backbone_weights)


def _randomized_resnet18() -> torchvision.models.ResNet:
    """A torchvision resnet18 with non-trivial BN statistics (as an ImageNet file would have)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return net.eval()


def test_frozen_bn_equals_eval_batchnorm_and_drops_counter():
    bn = torch.nn.BatchNorm2d(6).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict())  # has num_batches_tracked: dropped
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    assert not list(frozen.parameters())
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-5)


def test_resnet50_keys_freezing_and_channels():
    with torch.device("meta"):
        bb = ResNetBackbone("resnet50", num_levels=3)
    tv = torchvision.models.resnet50(weights=None).state_dict()
    expected = {k for k in tv if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(bb.body.state_dict()) == expected
    assert bb.num_channels == [512, 1024, 2048] and bb.strides == [8, 16, 32]
    for name, p in bb.body.named_parameters():
        assert p.requires_grad == name.startswith(("layer2", "layer3", "layer4")), name
    with torch.device("meta"):
        assert ResNetBackbone("resnet50", num_levels=4).num_channels == [256, 512, 1024, 2048]


def test_tiny_backbone_features_masks_and_positions():
    joiner = build_backbone(preset("tiny").model)
    assert joiner[0].num_channels == [128, 256, 512]
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:, :] = True
    mask[1, :, 80:] = True
    feats, masks, pos = joiner(images, mask)
    assert [tuple(f.shape) for f in feats] == [(2, 128, 12, 16), (2, 256, 6, 8), (2, 512, 3, 4)]
    for f, m, p in zip(feats, masks, pos):
        assert m.shape == (2,) + f.shape[-2:] and m.dtype == torch.bool
        assert torch.equal(m, F.interpolate(mask[None].float(), size=f.shape[-2:]).bool()[0])
        assert p.shape == (2, 64) + f.shape[-2:]
    assert masks[0][1, :8, :10].logical_not().all() and masks[0][1, 8:].all() and masks[0][1, :, 10:].all()


def test_load_backbone_weights_from_file_matches_torchvision(tmp_path):
    net = _randomized_resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)  # torchvision format: fc.*, num_batches_tracked
    cfg = preset("tiny", {"model.backbone_weights": str(path)}).model
    joiner = build_backbone(cfg)
    x = torch.randn(1, 3, 64, 96)
    feats, _, _ = joiner(x, torch.zeros(1, 64, 96, dtype=torch.bool))
    with torch.no_grad():
        y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        y = net.layer2(net.layer1(y))
        torch.testing.assert_close(feats[0], y, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(feats[2], net.layer4(net.layer3(y)), rtol=1e-4, atol=1e-4)


def test_load_backbone_weights_rejects_wrong_architecture(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    joiner = build_backbone(preset("tiny").model)
    with pytest.raises(ValueError, match=r"unexpected \['layer1.2"):  # resnet34 has more blocks
        load_backbone_weights(joiner, str(path))
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"layer1.0.conv1.weight: file \(64, 64, 1, 1\) vs model \(64, 64, 3, 3\)"):
        load_backbone_weights(joiner, str(path))
    with pytest.raises(FileNotFoundError):
        load_backbone_weights(joiner, str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("prefix", ["module.", "backbone.0.body."])
def test_load_backbone_weights_ddp_saved_imagenet_file(tmp_path, prefix):
    """A DataParallel/DDP-saved ImageNet checkpoint (PyTorch's ImageNet example: keys under
    ``module.``, in ``state_dict``, classifier ``module.fc.*`` included) loads: the classifier
    is ignored under a prefix too (was: ValueError "unexpected ['module.fc.weight', ...]")."""
    net = _randomized_resnet18()
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 90, "arch": "resnet18", "best_acc1": torch.tensor(69.8),
                "state_dict": {prefix + k: v for k, v in net.state_dict().items()}}, path)
    joiner = build_backbone(preset("tiny").model)
    info = load_backbone_weights(joiner, str(path))
    file_sd = net.state_dict()
    own = joiner[0].body.state_dict()
    assert info["loaded"] == len(own)
    for k, v in own.items():
        assert torch.equal(v, file_sd[k]), k
    assert sorted(info["ignored"]) == sorted(prefix + k for k in ("fc.weight", "fc.bias"))


def test_load_backbone_weights_refused_pickle_names_the_file(tmp_path):
    """A training checkpoint holding objects beyond tensors (torchvision's reference scripts save
    an ``argparse.Namespace`` under ``args``) is refused by weights_only loading with a
    ValueError that names the file and says what to do, as the Swin loader does (was torch's
    bare UnpicklingError, naming no file, raised inside every training worker)."""
    import argparse

    path = tmp_path / "checkpoint.pth"
    torch.save({"model": _randomized_resnet18().state_dict(), "epoch": 89,
                "args": argparse.Namespace(model="resnet18")}, path)
    joiner = build_backbone(preset("tiny").model)
    with pytest.raises(ValueError, match=rf"{path}.*weights_only.*re-save its 'model' state dict"):
        load_backbone_weights(joiner, str(path))


def test_load_backbone_weights_from_url(tmp_path, monkeypatch):
    net = _randomized_resnet18()
    served = tmp_path / "served"
    served.mkdir()
    torch.save(net.state_dict(), served / "resnet18-test.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    url = f"http://127.0.0.1:{server.server_port}/resnet18-test.pth"
    # "imagenet" names the backbone's official ImageNet weights (served here in their place)
    monkeypatch.setitem(backbone_module.IMAGENET_WEIGHTS, "tiny_resnet", url)
    try:
        joiner = build_backbone(preset("tiny").model)
        info = load_backbone_weights(joiner, url)
        by_name = build_backbone(preset("tiny", {"model.backbone_weights": "imagenet"}).model)
    finally:
        server.shutdown()
        server.server_close()
    assert info["loaded"] == len(joiner[0].body.state_dict())
    torch.testing.assert_close(joiner[0].body.layer3[1].bn2.running_var, net.layer3[1].bn2.running_var)
    torch.testing.assert_close(by_name[0].body.layer3[1].bn2.running_var, net.layer3[1].bn2.running_var)
    assert isinstance(joiner, Joiner)
    assert backbone_module.resolve_backbone_weights("resnet50", "/w/r50.pth") == "/w/r50.pth"
    assert backbone_module.resolve_backbone_weights("resnet50", "ImageNet").endswith("resnet50-0676ba61.pth")
    monkeypatch.delitem(backbone_module.IMAGENET_WEIGHTS, "tiny_resnet")
    with pytest.raises(ValueError, match="no ImageNet weights for backbone 'tiny_resnet'"):
        backbone_module.resolve_backbone_weights("tiny_resnet", "imagenet")


def test_load_backbone_weights_delegates_swin(tmp_path):
    from dino_scale.models.swin import SwinTransformerDetection

    torch.manual_seed(0)
    small = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4, out_indices=(1, 2, 3))
    src = SwinTransformerDetection(**small)
    path = tmp_path / "swin.pth"
    torch.save({"model": {k: v for k, v in src.state_dict().items() if not k.startswith("norm")}}, path)
    dst = SwinTransformerDetection(**small)
    info = load_backbone_weights(dst, str(path))
    assert info["loaded"] > 0
    torch.testing.assert_close(dst.layers[2].blocks[0].attn.qkv.weight, src.layers[2].blocks[0].attn.qkv.weight)

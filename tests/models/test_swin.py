"""Tests for the detection-variant Swin backbone (dino_scale/models/swin.py)."""
import os
import re

import pytest
import torch
import torch.nn.functional as F

from dino_scale.models import swin as S
from swin_fixtures import SMALL, randomize_norms, small


# ---------------------------------------------------------------- shapes / API

@pytest.mark.parametrize("hw", [(100, 148), (320, 416), (33, 17)])
def test_shapes_channels_strides(hw):
    H, W = hw
    model = small(out_indices=(0, 1, 2, 3)).eval()
    assert model.num_channels == [32, 64, 128, 256]
    assert model.strides == [4, 8, 16, 32]
    with torch.no_grad():
        outs = model(torch.randn(2, 3, H, W))
    h, w = -(-H // 4), -(-W // 4)
    for out, c in zip(outs, model.num_channels):
        assert out.shape == (2, c, h, w)
        assert torch.isfinite(out).all()
        h, w = (h + 1) // 2, (w + 1) // 2


def test_default_out_indices_and_swin_large_meta_keys(reference_dir):
    with torch.device("meta"):
        m4 = S.swin_large_384()
        m5 = S.swin_large_384(out_indices=(0, 1, 2, 3))
    assert m4.num_channels == [384, 768, 1536] and m4.strides == [8, 16, 32]
    assert m5.num_channels == [192, 384, 768, 1536] and m5.strides == [4, 8, 16, 32]
    expected = []
    for line in open(os.path.join(reference_dir, "state_dict_swinl_4scale.tsv")):
        key, shape = line.rstrip("\n").split("\t")
        if key.startswith("backbone.0."):
            dims = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
            expected.append((key[len("backbone.0."):], dims))
    ours = [(k, tuple(v.shape)) for k, v in m4.state_dict().items()]
    assert sorted(ours) == sorted(expected)
    keys5 = set(m5.state_dict())
    assert keys5 == (set(k for k, _ in expected) | {"norm0.weight", "norm0.bias"})
    assert m5.state_dict()["norm0.weight"].shape == (192,)


def test_bad_arguments():
    order = "out_indices must be increasing stage indices in [0,4)"
    with pytest.raises(ValueError, match=re.escape(f"{order}, got (4,)")):
        small(out_indices=(4,))
    with pytest.raises(ValueError, match=re.escape(f"{order}, got (2, 1)")):
        small(out_indices=(2, 1))
    with pytest.raises(ValueError, match=re.escape("expected images (B,3,H,W), got (1, 1, 32, 32)")):
        small()(torch.randn(1, 1, 32, 32))


# ---------------------------------------------------------------- exact semantics

def test_relative_position_index_matches_direct_formula():
    for ws in (3, 7, 12):
        idx = S.relative_position_index(ws)
        n = ws * ws
        expected = torch.empty(n, n, dtype=torch.long)
        for a in range(n):
            for b in range(n):
                dh, dw = a // ws - b // ws, a % ws - b % ws
                expected[a, b] = (dh + ws - 1) * (2 * ws - 1) + (dw + ws - 1)
        assert torch.equal(idx, expected)
    assert S.relative_position_index(12).shape == (144, 144)
    assert int(S.relative_position_index(12).max()) == 23 * 23 - 1


def _region_labels(Hp, Wp, ws, s):
    """Region id per (row, col) of the rolled, padded map: 3 bands per axis."""
    def band(i, n):
        return 0 if i < n - ws else (1 if i < n - s else 2)
    return torch.tensor([[band(i, Hp) * 3 + band(j, Wp) for j in range(Wp)] for i in range(Hp)])


def _reference_block(blk, x, H, W):
    """Token-level reference for one block: global attention over the padded, rolled map,
    restricted to same-window pairs, -100 across shift regions (no partition/reverse)."""
    B, L, C = x.shape
    ws, s, nh = blk.window_size, blk.shift_size, blk.attn.num_heads
    y = blk.norm1(x).view(B, H, W, C)
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    y = F.pad(y, (0, 0, 0, Wp - W, 0, Hp - H))
    y = torch.roll(y, (-s, -s), (1, 2)) if s else y
    rows = torch.arange(Hp).repeat_interleave(Wp)
    cols = torch.arange(Wp).repeat(Hp)
    win = (rows // ws) * (Wp // ws) + cols // ws
    same_win = win[:, None] == win[None, :]
    dh = (rows % ws)[:, None] - (rows % ws)[None, :]
    dw = (cols % ws)[:, None] - (cols % ws)[None, :]
    table_idx = (dh + ws - 1) * (2 * ws - 1) + (dw + ws - 1)
    bias = blk.attn.relative_position_bias_table[table_idx].permute(2, 0, 1)  # nh, T, T
    if s:
        reg = _region_labels(Hp, Wp, ws, s).flatten()
        bias = bias + torch.where(reg[:, None] != reg[None, :], -100.0, 0.0)
    bias = bias.masked_fill(~same_win, float("-inf"))
    t = y.reshape(B, Hp * Wp, C)
    qkv = blk.attn.qkv(t).reshape(B, -1, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = (q * (C // nh) ** -0.5) @ k.transpose(-2, -1) + bias
    o = (a.softmax(-1) @ v).transpose(1, 2).reshape(B, Hp, Wp, C)
    o = blk.attn.proj(o)
    o = torch.roll(o, (s, s), (1, 2)) if s else o
    out = x + o[:, :H, :W].reshape(B, H * W, C)
    return out + blk.mlp(blk.norm2(out))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("hw", [(5, 7), (8, 8), (9, 13), (3, 2)])
def test_block_matches_token_level_reference(hw, fused):
    H, W = hw
    torch.manual_seed(0)
    stage = S.SwinStage(16, 2, 2, 4, 4.0, [0.0, 0.0], downsample=False).eval()
    randomize_norms(stage)
    for blk in stage.blocks:
        blk.attn.fused = fused
    x = torch.randn(2, H * W, 16)
    ws = 4
    mask = S.shifted_window_mask(-(-H // ws) * ws, -(-W // ws) * ws, ws, 2)
    with torch.no_grad():
        for blk in stage.blocks:  # shift 0 then shift 2
            ours = blk(x, H, W, mask)
            ref = _reference_block(blk, x, H, W)
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        out, _, _, _ = stage(x, H, W)
        ref = _reference_block(stage.blocks[1], _reference_block(stage.blocks[0], x, H, W), H, W)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_shifted_window_mask_values():
    Hp, Wp, ws, s = 8, 12, 4, 2
    mask = S.shifted_window_mask(Hp, Wp, ws, s)
    assert mask.shape == ((Hp // ws) * (Wp // ws), ws * ws, ws * ws)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    reg = _region_labels(Hp, Wp, ws, s)
    for wi in range(Hp // ws):
        for wj in range(Wp // ws):
            r = reg[wi * ws:(wi + 1) * ws, wj * ws:(wj + 1) * ws].flatten()
            expect = torch.where(r[:, None] != r[None, :], -100.0, 0.0)
            assert torch.equal(mask[wi * (Wp // ws) + wj], expect)
    # an unshifted-looking top-left window has no masking at all
    assert (mask[0] == 0).all()


def _slice_filled_mask(Hp, Wp, ws, shift, dtype=torch.float32):
    """The original Swin's construction (and this module's before the region table): regions
    filled slice by slice into a zeros map, windowed, pairwise differences masked."""
    img = torch.zeros(1, Hp, Wp, 1, dtype=dtype)
    slices = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for cnt, (h, w) in enumerate((h, w) for h in slices for w in slices):
        img[:, h, w, :] = cnt
    win = S.window_partition(img, ws).view(-1, ws * ws)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


@pytest.mark.parametrize("ws", [1, 2, 3, 4, 7, 12])
def test_shifted_window_mask_equals_the_slice_filled_construction(ws):
    for shift in sorted({0, 1, ws // 2, ws - 1, ws, ws + 1}):
        for Hp, Wp in [(ws, ws), (ws, 3 * ws), (2 * ws, ws), (5 * ws, 3 * ws)]:
            for dtype in (torch.float32, torch.bfloat16):
                got = S.shifted_window_mask(Hp, Wp, ws, shift, dtype=dtype)
                ref = _slice_filled_mask(Hp, Wp, ws, shift, dtype)
                assert got.dtype == ref.dtype and torch.equal(got, ref), (Hp, Wp, ws, shift, dtype)


def test_stage_makes_its_region_table_once_per_size():
    """The per-size table is cached on the device: a second forward at a size runs no factory
    (arange/full) and no indexing assignment, as a CUDA-graph capture needs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from dino_scale.ops.level_shapes import clear_level_cache

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    stage = S.SwinStage(16, 2, 2, 4, 4.0, [0.0, 0.0], downsample=False).eval()
    x = torch.randn(1, 9 * 13, 16)
    clear_level_cache()
    with torch.no_grad():
        first = Ops()
        with first:
            ref = stage(x, 9, 13)[0]
        again = Ops()
        with again:
            out = stage(x, 9, 13)[0]
    clear_level_cache()
    assert any(n.startswith("arange") for n in first.names)
    assert not [n for n in again.names if n.startswith(("arange", "full", "fill", "zeros", "index_put"))]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_patch_merging_order_and_odd_padding():
    torch.manual_seed(0)
    pm = S.PatchMerging(3)
    H, W = 3, 5
    x = torch.randn(1, H * W, 3)
    grid = F.pad(x.view(1, H, W, 3), (0, 0, 0, 1, 0, 1))
    manual = []
    for i in range(0, 4, 2):
        for j in range(0, 6, 2):  # row-major output tokens
            manual.append(torch.cat([grid[0, i, j], grid[0, i + 1, j], grid[0, i, j + 1], grid[0, i + 1, j + 1]]))
    manual = torch.stack(manual)[None]
    expected = pm.reduction(pm.norm(manual))
    torch.testing.assert_close(pm(x, H, W), expected)
    assert pm.reduction.bias is None


def test_patch_embed_pads_right_bottom():
    torch.manual_seed(0)
    pe = S.PatchEmbed(4, 3, 8)
    x = torch.randn(1, 3, 10, 13)
    y = pe(x)
    assert y.shape == (1, 8, 3, 4)
    manual = pe.proj(F.pad(x, (0, 3, 0, 2)))
    manual = pe.norm(manual.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(1, 8, 3, 4)
    torch.testing.assert_close(y, manual)


def test_matches_timm_where_timm_agrees(tmp_path):
    """On maps that are window multiples and larger than the window at every stage, timm's
    Swin computes the same function: load timm's weights (timm layout, from a file) and
    compare every stage (timm has no output norms: apply ours to its intermediates)."""
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(0)
    ref = timm_swin.SwinTransformer(img_size=256, patch_size=4, window_size=4, embed_dim=32,
                                    depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), num_classes=5).eval()
    randomize_norms(ref)
    path = tmp_path / "timm_swin.pth"
    torch.save(ref.state_dict(), path)
    ours = small(window_size=4, out_indices=(0, 1, 2, 3)).eval()
    report = S.load_swin_imagenet_weights(ours, str(path))
    assert report.source_format == "timm"
    assert report.unexpected == []
    assert sorted(report.missing) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert any(k.startswith("head.") for k in report.dropped)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        feats = ref.forward_intermediates(x, intermediates_only=True)
        outs = ours(x)
    assert len(outs) == len(feats) == 4  # every stage compared: zip would stop at the shorter list
    for i, (o, f) in enumerate(zip(outs, feats)):
        norm = getattr(ours, f"norm{i}")
        expected = norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(o, expected, rtol=1e-4, atol=1e-4)


def test_zero_padded_image_differs_from_cropped_only_through_padding():
    """The detector pads images with zeros; the backbone does not mask them, so features of a
    padded image differ from the unpadded one (as in the official code) but stay finite and
    the shapes follow the padded size."""
    model = small().eval()
    img = torch.randn(1, 3, 64, 96)
    padded = F.pad(img, (0, 32, 0, 32))
    with torch.no_grad():
        a = model(img)
        b = model(padded)
    assert [t.shape[-2:] for t in b] == [(12, 16), (6, 8), (3, 4)]
    assert all(torch.isfinite(t).all() for t in b)
    assert not torch.allclose(a[0], b[0][..., :8, :12])


# ---------------------------------------------------------------- checkpointing

def test_activation_checkpointing_same_outputs_and_grads(checkpointed):
    model = small(drop_path_rate=0.0)
    model.train()
    x = torch.randn(2, 3, 72, 100)

    def run():
        model.zero_grad()
        checkpointed.clear()
        outs = model(x)
        sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs).backward()
        return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters()}

    o1, g1 = run()
    assert checkpointed == []  # off: never checkpointed
    model.use_checkpoint = True
    assert all(layer.use_checkpoint for layer in model.layers)
    o2, g2 = run()
    blocks = [blk for layer in model.layers for blk in layer.blocks]
    assert len(blocks) == sum(SMALL["depths"])
    assert [id(f) for f in checkpointed] == [id(blk) for blk in blocks]  # on: every block, once each
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert set(g1) == set(g2)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-6, atol=1e-7, msg=n)
    assert g1["layers.0.blocks.1.attn.relative_position_bias_table"].abs().sum() > 0


def test_fused_and_explicit_attention_agree_with_grads():
    model = small()
    model.train()
    x = torch.randn(1, 3, 56, 80)
    res = []
    for fused in (True, False):
        model.set_fused_attention(fused)
        model.zero_grad()
        outs = model(x)
        sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs).backward()
        res.append(([o.detach() for o in outs],
                    model.layers[1].blocks[1].attn.relative_position_bias_table.grad.clone()))
    for a, b in zip(res[0][0], res[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-3, atol=1e-6)

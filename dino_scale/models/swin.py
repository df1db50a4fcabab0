"""Swin Transformer, detection variant (the one the official DINO uses for Swin-L).

Semantics follow the original Swin detection backbone, which differs from timm's
classification Swin on maps that are not window multiples:

- every block pads its (normed) input right/bottom with zeros to multiples of the window,
  keeps window 12 and shift 6 at every stage however small the map, rolls the padded map,
  and masks shifted windows (-100) over the padded size; the result is cropped back;
- PatchMerging (downsample) sits at the END of stage i (`layers.{i}.downsample`, i < 3);
- output LayerNorms `norm{i}` for each out index; no absolute position embedding.

Parameter and buffer names equal the official ones (under `backbone.0.` in a DINO
checkpoint). Tensors: images (B,3,H,W); tokens (B,L,C) with L = H*W of the stage;
outputs NCHW maps with `num_channels[k]` channels at stride `strides[k]`.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from timm.layers import DropPath, Mlp, trunc_normal_

from dino_scale.ops.level_shapes import cached_level_tensors

# ImageNet weights (original Swin repo layout or timm's) live in swin_weights.py; re-exported here
from .swin_weights import SwinLoadReport, convert_swin_state_dict, load_swin_imagenet_weights  # noqa: F401

MASK_VALUE = -100.0


def relative_position_index(window_size: int) -> torch.Tensor:
    """(ws*ws, ws*ws) long index into the (2ws-1)^2 bias table, as the original Swin."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                        indexing="ij"))  # (2, ws, ws)
    flat = coords.flatten(1)  # (2, ws*ws)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()  # (N, N, 2)
    rel[:, :, 0] += window_size - 1
    rel[:, :, 1] += window_size - 1
    rel[:, :, 0] *= 2 * window_size - 1
    return rel.sum(-1)


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B,H,W,C) with H,W multiples of ws -> (B*nW, ws, ws, C), windows row-major per image."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.contiguous().view(-1, ws, ws, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B*nW, ws, ws, C) -> (B,H,W,C)."""
    B = windows.shape[0] // ((H // ws) * (W // ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
    return x.contiguous().view(B, H, W, -1)


def shifted_window_regions(Hp: int, Wp: int, ws: int, shift: int, device=None) -> torch.Tensor:
    """(nW, ws*ws) uint8 region id 0..8 per token per window of a padded (Hp,Wp) map rolled by
    -shift: 3 bands per axis split at -ws and -shift from the end (the original's slice-filled
    ``img_mask``; shift 0: one band). Made on ``device``; SwinStage caches it per size."""
    def band(n: int) -> torch.Tensor:  # (n,) 0 | 1 | 2; shift 0: slice(-0, None) is everything
        i = torch.arange(n, device=device)
        return torch.full_like(i, 2) if shift == 0 else torch.where(i >= n - shift, 2, (i >= n - ws).long())
    img = (3 * band(Hp)[:, None] + band(Wp)[None, :]).to(torch.uint8)[None, :, :, None]
    return window_partition(img, ws).view(-1, ws * ws)


def window_mask(regions: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """regions (nW, N) -> (nW, N, N) additive mask: 0 within a region, -100 across."""
    return torch.where(regions[:, None, :] != regions[:, :, None], MASK_VALUE, 0.0).to(dtype)


def shifted_window_mask(Hp: int, Wp: int, ws: int, shift: int, device=None,
                        dtype=torch.float32) -> torch.Tensor:
    """(nW, ws*ws, ws*ws) additive mask for shifted windows of a padded (Hp,Wp) map:
    0 within the same region, -100 across regions (original Swin semantics)."""
    return window_mask(shifted_window_regions(Hp, Wp, ws, shift, device), dtype)


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows, with relative position bias.

    forward(x (B*nW, N, C), mask (nW, N, N) or None) -> (B*nW, N, C), N = ws*ws.
    `fused` uses F.scaled_dot_product_attention with the bias (+mask) as float mask
    (same math; the explicit path is the original formulation).
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, fused: bool = True):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused = fused
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _bias(self) -> torch.Tensor:
        N = self.window_size ** 2
        idx = self.relative_position_index.view(-1)
        return self.relative_position_bias_table[idx].view(N, N, -1).permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        Bw, N, C = x.shape
        qkv = self.qkv(x).reshape(Bw, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (Bw, nH, N, hd)
        bias = self._bias()  # (nH, N, N)
        if mask is not None:  # shifted windows: bias + mask per window, (nW, nH, N, N)
            nW = mask.shape[0]
            bias = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)
        else:
            nW = 1
            bias = bias.unsqueeze(0)
        # group windows by image so the (nW*nH, N, N) bias broadcasts over images
        B = Bw // nW
        q, k, v = (t.reshape(B, nW * self.num_heads, N, t.shape[-1]) for t in (q, k, v))
        bias = bias.reshape(1, nW * self.num_heads, N, N)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias
            out = attn.softmax(dim=-1) @ v
        out = out.reshape(Bw, self.num_heads, N, -1)
        return self.proj(out.transpose(1, 2).reshape(Bw, N, C))


class SwinBlock(nn.Module):
    """One (shifted-)window transformer block. forward(x (B,H*W,C), H, W, mask) -> same."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int,
                 mlp_ratio: float, drop_path: float):
        super().__init__()
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, H: int, W: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, L, C = x.shape
        if L != H * W:
            raise ValueError(f"token count {L} != H*W = {H}*{W}")
        ws, s = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # zeros right/bottom, after norm1
        Hp, Wp = x.shape[1], x.shape[2]
        if s > 0:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        else:
            mask = None
        win = window_partition(x, ws).view(-1, ws * ws, C)
        win = self.attn(win, mask=mask).view(-1, ws, ws, C)
        x = window_reverse(win, ws, Hp, Wp)
        if s > 0:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        x = x[:, :H, :W, :].reshape(B, H * W, C)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 merge: (B,H*W,C) -> (B,ceil(H/2)*ceil(W/2),2C); odd H/W padded with zeros."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class SwinStage(nn.Module):
    """Blocks (alternating shift 0 / ws//2) then optional PatchMerging.

    forward(x (B,H*W,C), H, W) -> (out (B,H*W,C), x_down (B,H'*W',C'), H', W').
    """

    def __init__(self, dim, depth, num_heads, window_size, mlp_ratio, drop_paths, downsample):
        super().__init__()
        self.window_size, self.shift_size = window_size, window_size // 2
        self.use_checkpoint = False
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window_size, 0 if j % 2 == 0 else window_size // 2,
                      mlp_ratio, drop_paths[j]) for j in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, H: int, W: int):
        ws = self.window_size
        Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
        s = self.shift_size  # region table made once per (size, device): no per-forward construction
        regions = cached_level_tensors("swin_regions", ((Hp, Wp), (ws, s)), x.device, lambda _, dev: (
            shifted_window_regions(Hp, Wp, ws, s, dev),))[0]
        mask = window_mask(regions)
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, H, W, mask, use_reentrant=False)
            else:
                x = blk(x, H, W, mask)
        if self.downsample is None:
            return x, x, H, W
        return x, self.downsample(x, H, W), (H + 1) // 2, (W + 1) // 2


class PatchEmbed(nn.Module):
    """(B,3,H,W) -> (B,C,ceil(H/p),ceil(W/p)): zero-pad right/bottom, conv p x p, LayerNorm."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 192):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        H, W = x.shape[-2:]
        x = F.pad(x, (0, (p - W % p) % p, 0, (p - H % p) % p))
        x = self.proj(x)
        B, C, Wh, Ww = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(B, C, Wh, Ww)


class SwinTransformerDetection(nn.Module):
    """Swin backbone returning NCHW maps for `out_indices` (stage i has stride 4*2**i and
    embed_dim*2**i channels). `use_checkpoint` (settable at runtime) turns on activation
    checkpointing per block (torch.utils.checkpoint, use_reentrant=False)."""

    def __init__(self, embed_dim: int = 192, depths: Sequence[int] = (2, 2, 18, 2),
                 num_heads: Sequence[int] = (6, 12, 24, 48), window_size: int = 12,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.2,
                 out_indices: Sequence[int] = (1, 2, 3), use_checkpoint: bool = False,
                 patch_size: int = 4):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError("depths and num_heads must have the same length")
        n = len(depths)
        if not out_indices or any(i < 0 or i >= n for i in out_indices) or \
                list(out_indices) != sorted(set(out_indices)):
            raise ValueError(f"out_indices must be increasing stage indices in [0,{n}), got {out_indices}")
        self.out_indices = tuple(out_indices)
        self.window_size = window_size
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        dims = [embed_dim * 2 ** i for i in range(n)]
        self.layers = nn.ModuleList()
        for i in range(n):
            self.layers.append(SwinStage(dims[i], depths[i], num_heads[i], window_size, mlp_ratio,
                                         dpr[sum(depths[:i]):sum(depths[:i + 1])], downsample=i < n - 1))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))
        self.num_features = dims
        self.num_channels: List[int] = [dims[i] for i in self.out_indices]
        self.strides: List[int] = [patch_size * 2 ** i for i in self.out_indices]
        self.apply(self._init_weights)
        self.use_checkpoint = use_checkpoint

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def use_checkpoint(self) -> bool:
        return self._use_checkpoint

    @use_checkpoint.setter
    def use_checkpoint(self, value: bool) -> None:
        self._use_checkpoint = bool(value)
        for layer in self.layers:
            layer.use_checkpoint = self._use_checkpoint

    def set_fused_attention(self, fused: bool) -> None:
        """Switch all blocks between SDPA and the explicit softmax(qk^T*s + bias) path."""
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.fused = bool(fused)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x (B,3,H,W) -> [ (B, num_channels[k], ceil(H/strides[k]), ...) ] (ceil at each stage)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B,3,H,W), got {tuple(x.shape)}")
        x = self.patch_embed(x)
        H, W = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        outs = []
        for i, layer in enumerate(self.layers):
            out, x, Hn, Wn = layer(x, H, W)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.view(-1, H, W, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
            H, W = Hn, Wn
        return outs


def swin_large_384(out_indices: Sequence[int] = (1, 2, 3), drop_path_rate: float = 0.2,
                   use_checkpoint: bool = False) -> SwinTransformerDetection:
    """Swin-L as DINO's `swin_L_384_22k`: embed 192, depths 2/2/18/2, heads 6/12/24/48, ws 12."""
    return SwinTransformerDetection(192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 4.0, drop_path_rate,
                                    out_indices, use_checkpoint)


"""Batching: pad samples to one (B,3,H,W) tensor with a (B,H,W) padding mask.

``collate(samples)`` takes samples as produced by
:class:`~.transforms.DetectionTransform` (torch tensors) or rows from Ray Data
(numpy arrays); :func:`collate_numpy_batch` takes a Ray Data numpy batch (dict of
columns). Padding goes right and bottom, to the largest H and W in the batch, rounded
up to a multiple of ``pad_multiple`` when given (e.g. 32 keeps every backbone stride
exact; the reference pads to the batch max only, which is the default here).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

__all__ = ["collate", "collate_numpy_batch"]


def _tensor(x, dtype=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        arr = np.asarray(x)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    return t.to(dtype) if dtype is not None else t


def collate(samples: Sequence[dict[str, Any]], pad_multiple: Optional[int] = None,
            normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """-> (images uint8 (B,3,Hmax,Wmax) [float normalized if ``normalize``],
    masks bool (B,Hmax,Wmax) True on padding, targets list of dicts with ``labels``
    int64 (n,), ``boxes`` float32 (n,4) cx,cy,w,h normalized, ``image_id`` int64 (),
    ``orig_size`` int64 (2,), ``size`` int64 (2,)).

    Images are CHW (3,H,W) uint8, as :class:`~.transforms.DetectionTransform` makes them (HWC
    was accepted too, by guessing: a (3,W,3) HWC image, 3 rows high, was taken as CHW).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    imgs = []
    for s in samples:
        im = _tensor(s["image"])
        if im.ndim != 3 or im.shape[0] != 3:
            raise ValueError(f"image of sample {s.get('image_id')!r} must be CHW (3, H, W), got shape "
                             f"{tuple(im.shape)}" + (" (HWC? permute it to CHW)" if im.ndim == 3 and
                                                     im.shape[-1] == 3 else ""))
        imgs.append(im)
    H = max(int(i.shape[1]) for i in imgs)
    W = max(int(i.shape[2]) for i in imgs)
    if pad_multiple:
        H, W = -(-H // pad_multiple) * pad_multiple, -(-W // pad_multiple) * pad_multiple
    batch = torch.zeros((len(imgs), 3, H, W), dtype=imgs[0].dtype)
    masks = torch.ones((len(imgs), H, W), dtype=torch.bool)
    targets = []
    for i, (im, s) in enumerate(zip(imgs, samples)):
        h, w = int(im.shape[1]), int(im.shape[2])
        batch[i, :, :h, :w].copy_(im)
        masks[i, :h, :w] = False
        targets.append({
            "labels": _tensor(s["labels"], torch.int64).reshape(-1),
            "boxes": _tensor(s["boxes"], torch.float32).reshape(-1, 4),
            "image_id": torch.tensor(int(s["image_id"]), dtype=torch.int64),
            "orig_size": _tensor(s["orig_size"], torch.int64).reshape(2),
            "size": torch.tensor([h, w], dtype=torch.int64),
        })
    if normalize:
        from .transforms import normalize_batch
        batch = normalize_batch(batch, masks)
    return batch, masks, targets


def collate_numpy_batch(batch: dict[str, Any], pad_multiple: Optional[int] = None, normalize: bool = False):
    """Ray Data numpy batch (dict of columns, variable-shaped ones as object arrays) -> collate()."""
    keys = ("image", "boxes", "labels", "image_id", "orig_size")
    n = len(batch["image_id"])
    rows = [{k: batch[k][i] for k in keys} for i in range(n)]
    return collate(rows, pad_multiple=pad_multiple, normalize=normalize)

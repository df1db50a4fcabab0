"""Official IDEA-Research/DINO checkpoints <-> this project's DINO module.

Our module names equal the official ones, so the key map is the identity. What needs care:

- Shared decoder heads: one box MLP and one class Linear are stored under 12 names each
  (``bbox_embed.{0..5}`` and ``transformer.decoder.bbox_embed.{0..5}``). Our model has the
  same aliasing (the same module objects), so its ``state_dict()`` lists the same keys.
  On loading, every alias group must hold equal tensors (verified) and is loaded once; a
  dict holding only one name of a group (e.g. ``bbox_embed.0.*``) also loads.
- Integer buffers (Swin ``relative_position_index``) may be absent: the model computes its
  own; when present they must equal ours.
- ``module.`` prefixes (DDP saves) are stripped; FrozenBN ``num_batches_tracked`` dropped.
- ``.pth`` files are read with ``torch.load(weights_only=True)`` allowing only
  ``argparse.Namespace`` (the ``args`` entry) beyond plain tensors and containers.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from .weights_file import read_torch_file

__all__ = ["load_official_state_dict", "normalize_keys", "official_state_dict", "load_official_checkpoint",
           "CheckpointMismatch"]

OPTIONAL_BUFFERS = ("relative_position_index",)
DROPPED_SUFFIXES = ("num_batches_tracked",)


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the model; the message lists missing/unexpected keys and shapes."""


def _alias_groups(model: nn.Module) -> Dict[str, List[str]]:
    """Model state-dict keys grouped by the tensor they name: {first key: [all keys]}."""
    groups: Dict[int, List[str]] = defaultdict(list)
    for key, value in model.state_dict(keep_vars=True).items():
        groups[id(value)].append(key)
    return {keys[0]: keys for keys in groups.values()}


def _summary(items: List[str], limit: int = 15) -> str:
    head = ", ".join(items[:limit])
    return f"{head}{', ...' if len(items) > limit else ''} ({len(items)})"


def normalize_keys(state_dict) -> Dict[str, Tensor]:
    """``state_dict`` (or a whole checkpoint's ``model`` entry) with the wrapper prefixes
    (``module.``: DDP / DeepSpeed, ``_orig_mod.``: torch.compile) stripped and FrozenBN
    ``num_batches_tracked`` dropped: the keys as this project's model names them."""
    if not isinstance(state_dict, dict):
        raise CheckpointMismatch(f"expected a state dict, got {type(state_dict).__name__}")
    if isinstance(state_dict.get("model"), dict):  # a whole checkpoint was passed: use its model entry
        state_dict = state_dict["model"]
    sd = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):  # in any order, nested (compile of DDP, DDP of compile)
            key = key.partition(".")[2]
        if key.endswith(DROPPED_SUFFIXES):
            continue
        sd[key] = value
    return sd


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Whether two copies of one shared (aliased) tensor hold the same values, NaN equal to NaN:
    the copies of a diverged model's shared heads are NaN alike (``torch.equal`` called them
    different, so the model was refused as "does not fit" instead of scored as diverged)."""
    if torch.equal(a, b):
        return True
    return a.dtype == b.dtype and a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all())


def load_official_state_dict(model: nn.Module, state_dict: Dict[str, Tensor],
                             strict: bool = True) -> Tuple[List[str], List[str]]:
    """Load an official DINO ``model`` state dict (or one of this project's) into ``model``.

    A whole checkpoint dict (with a ``model`` entry) is accepted too; keys are normalized
    (:func:`normalize_keys`) and shared heads loaded from any one of their names.

    Raises :class:`CheckpointMismatch` listing missing keys, unexpected keys, shape
    mismatches and alias groups whose copies differ. Tensors are copied (cast to each
    parameter's dtype/device by ``load_state_dict``). ``strict=False`` tolerates missing and
    unexpected keys (returned as ``(missing, unexpected)``; ``([], [])`` when strict), not
    the other faults, nor a dict that holds fewer than half of the model's tensors (another
    model or key layout: nothing or little would load, silently).
    """
    sd = normalize_keys(state_dict)
    own = model.state_dict()
    groups = _alias_groups(model)
    known = {k for keys in groups.values() for k in keys}
    full: Dict[str, Tensor] = {}
    missing, shapes, differing, bad_buffers = [], [], [], []
    for canon, keys in groups.items():
        present = [k for k in keys if k in sd]
        if not present:
            if canon.endswith(OPTIONAL_BUFFERS):
                value = own[canon]
            else:
                missing.append(canon if len(keys) == 1 else f"{canon} (+{len(keys) - 1} aliases)")
                continue
        else:
            value = sd[present[0]]
            if not isinstance(value, Tensor):
                shapes.append(f"{present[0]}: not a tensor ({type(value).__name__})")
                continue
            if any(not isinstance(sd[k], Tensor) or sd[k].shape != value.shape or not _same_values(sd[k], value)
                   for k in present[1:]):
                differing.append(f"{present[0]} vs {[k for k in present[1:]]}")
                continue
            if tuple(value.shape) != tuple(own[canon].shape):
                shapes.append(f"{present[0]}: checkpoint {tuple(value.shape)} vs model {tuple(own[canon].shape)}")
                continue
            if canon.endswith(OPTIONAL_BUFFERS) and not torch.equal(value.to(own[canon].dtype), own[canon]):
                bad_buffers.append(present[0])
                continue
        for k in keys:
            full[k] = value
    unexpected = sorted(k for k in sd if k not in known)
    if not strict and not (shapes or differing or bad_buffers):
        needed = sum(1 for canon in groups if not canon.endswith(OPTIONAL_BUFFERS))
        found = needed - len(missing)
        if 2 * found < needed:
            raise CheckpointMismatch(
                f"checkpoint holds only {found} of the model's {needed} tensors ({len(unexpected)} of its "
                f"{len(sd)} keys are unknown to the model: {_summary(unexpected, 5)}): a non-strict load "
                f"tolerates a few missing or extra keys, not another model or key layout; give weights of "
                f"this model (for ImageNet backbone weights: model.backbone_weights)")
    if (strict and (missing or unexpected)) or shapes or differing or bad_buffers:
        parts = []
        if missing:
            parts.append(f"missing keys: {_summary(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_summary(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_summary(shapes)}")
        if differing:
            parts.append(f"aliased (shared-head) keys hold different tensors: {_summary(differing)}")
        if bad_buffers:
            parts.append(f"integer buffers differ from the model's own: {_summary(bad_buffers)}")
        raise CheckpointMismatch("checkpoint does not fit the model; " + "; ".join(parts))
    model.load_state_dict(full, strict=strict)
    return missing, unexpected


def official_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """The model's weights in the official format: exactly the official keys (shared heads
    under all 12 names, integer buffers included), detached tensors."""
    return {k: v.detach() for k, v in model.state_dict().items()}


def load_official_checkpoint(path: str) -> Dict[str, Tensor]:
    """Read an official ``.pth`` (``{"model", "optimizer", "lr_scheduler", "epoch", "args"}``)
    with ``weights_only=True``, allowing ``argparse.Namespace`` and nothing else beyond
    torch's weights-only set. Returns the ``model`` entry (or the file itself when it is
    already a flat state dict). Any other pickled class raises ``pickle.UnpicklingError``.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = read_torch_file(path, weights_only=True)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt["model"]
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        return ckpt
    raise CheckpointMismatch(f"{path}: no 'model' state dict in checkpoint (keys: {list(ckpt)[:10]})"
                             if isinstance(ckpt, dict) else f"{path}: not a checkpoint dict")

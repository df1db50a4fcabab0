"""The tensors of a training checkpoint DeepSpeed may not restore: frozen parameters and buffers.

DeepSpeed (0.19.8, checked on CPU) restores them from the module state dict of a plain load
only. Its *universal* load (ZeRO-1/2 resumed on another worker count,
:mod:`dino_scale.engine.elastic`) restores the optimizer's (trained) parameters and skips the
module state dict: the frozen ResNet stem and layer1 and the FrozenBatchNorm statistics kept
the values the resumed model was built with, i.e. ``model.backbone_weights`` read again, which a
rerun may point at another file. Under fp16 the exact fp32 values of the frozen weights, which
:func:`~dino_scale.engine.deepspeed_utils.full_state_dict` saves (``engine.dino_fp32_frozen``),
were taken from the build on every resume.

So each training checkpoint holds them itself (``frozen.safetensors``, written by rank 0 with
:func:`frozen_tensors`) and every resume loads them back (:func:`restore_frozen`) after
DeepSpeed's load. A checkpoint written before lacks the file; resuming from it still needs the
backbone file where DeepSpeed skips them
(:func:`~dino_scale.engine.elastic.resume_restores_every_tensor`).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

__all__ = ["FROZEN_NAME", "frozen_tensors", "restore_frozen"]

FROZEN_NAME = "frozen.safetensors"


def _frozen_entries(module: nn.Module) -> dict[str, Any]:
    """``state dict key -> tensor`` (``keep_vars``: parameters as ``nn.Parameter``) of every
    parameter with ``requires_grad=False`` and every (persistent) buffer of ``module``."""
    trained = {id(p) for p in module.parameters() if p.requires_grad}
    return {k: v for k, v in module.state_dict(keep_vars=True).items() if id(v) not in trained}


def _gathered(engine, params: list):
    """ZeRO-3 partitions every parameter: gather ``params`` whole (collective); else nothing to do."""
    if engine.zero_optimization_stage() != 3 or not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def frozen_tensors(engine) -> dict[str, torch.Tensor]:
    """``state dict key -> CPU tensor`` of the frozen parameters and buffers of ``engine.module``
    (each of its own shape, e.g. ``backbone.0.body.conv1.weight`` (64, 3, 7, 7),
    ``...bn1.running_mean`` (64,)), floating ones in fp32: under fp16 the frozen parameters'
    values from before DeepSpeed cast them (``engine.dino_fp32_frozen``), not the module's fp16
    copies (DeepSpeed 0.19.8 casts parameters only: buffers stay fp32). Cloned, so safetensors
    can write them (no shared storage). Collective under ZeRO-3 (frozen partitions are
    gathered): every rank calls it."""
    entries = _frozen_entries(engine.module)
    exact = getattr(engine, "dino_fp32_frozen", None) or {}
    params = [v for v in entries.values() if isinstance(v, nn.Parameter) and id(v) not in exact]
    with torch.no_grad(), _gathered(engine, params):
        out = {}
        for key, value in entries.items():
            value = exact.get(id(value), value).detach()
            out[key] = (value.float() if value.is_floating_point() else value).cpu().contiguous().clone()
    return out


def restore_frozen(engine, saved: dict[str, torch.Tensor], where: str) -> None:
    """Load ``saved`` (:func:`frozen_tensors` of the run that wrote the checkpoint, read from
    ``where``) into ``engine.module``'s frozen parameters and buffers, and into the fp32 originals
    of an fp16 engine's frozen parameters (``engine.dino_fp32_frozen``); the module's fp16
    copies get them rounded, as DeepSpeed's cast rounded the originals. Under ZeRO-3 the
    module's partitioned parameters are left to DeepSpeed's load (a plain one: ZeRO-3 resumes
    on its own worker count only). RuntimeError naming ``where`` when the keys or shapes are
    not the model's."""
    entries = _frozen_entries(engine.module)
    if set(saved) != set(entries):
        missing, unknown = sorted(set(entries) - set(saved)), sorted(set(saved) - set(entries))
        raise RuntimeError(f"{where} does not hold this model's frozen parameters and buffers: "
                           f"{len(missing)} missing (first: {missing[:3]}), {len(unknown)} unknown "
                           f"(first: {unknown[:3]})")
    exact = getattr(engine, "dino_fp32_frozen", None) or {}
    partitioned = engine.zero_optimization_stage() == 3
    with torch.no_grad():
        for key, value in entries.items():
            shape = tuple(getattr(value, "ds_shape", value.shape))
            if tuple(saved[key].shape) != shape:
                raise RuntimeError(f"{where}: {key} has shape {tuple(saved[key].shape)}, the model's {shape}")
            if id(value) in exact:
                exact[id(value)].copy_(saved[key])
            if not (partitioned and isinstance(value, nn.Parameter)):
                value.data.copy_(saved[key])

"""Regional ``torch.compile`` of DINO: compile the repeated blocks, not the whole detector.

The whole model does not compile well (host-side matching, denoising bookkeeping, varying
query counts), but its cost on a GPU is dominated by launch overhead in a few repeated
blocks: the 6 encoder layers, the 6 decoder layers and the backbone. Compiling each in place
(``nn.Module.compile``) fuses their elementwise chains and turns each layer into one autograd
node, while state-dict keys stay unchanged (no ``_orig_mod.`` prefix), so checkpoints and the
official-weight loader are unaffected. Layers of one stack share their compiled code.

Shapes vary between batches (multi-scale training, denoising padding): the first recompile
marks the varying dimensions dynamic (``dynamic=None``), so a run settles after a few steps.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

__all__ = ["compile_regions"]


_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_GRANULARITY = {
    "layer": ("DeformableEncoderLayer", "DeformableDecoderLayer"),
    "stack": ("DeformableEncoder", "DeformableDecoder"),
}


def compile_regions(model: nn.Module, backbone: bool = True, mode: Optional[str] = None,
                    dynamic: Optional[bool] = None, granularity: str = "layer") -> list[str]:
    """Compile, in place, the transformer blocks and (``backbone``) the backbone body of a DINO
    ``model``. ``granularity``: "layer" (default, measured: each encoder and decoder layer;
    one compiled code shared by the layers of a stack) or "stack" (the whole encoder and the
    whole decoder with its box refinement: fewer, larger graphs and fewer calls per step, at a
    longer first compile; not yet timed on a GPU). ``mode`` is torch.compile's: "reduce-overhead"
    replays each region as CUDA graphs (inputs of a fixed size; a new size records new graphs).
    Returns the compiled modules' names."""
    if mode not in _MODES:
        raise ValueError(f"compile mode must be one of {_MODES}, got {mode!r}")
    if granularity not in _GRANULARITY:
        raise ValueError(f"compile granularity must be one of {sorted(_GRANULARITY)}, got {granularity!r}")
    names = []
    for name, module in model.named_modules():
        if type(module).__name__ in _GRANULARITY[granularity]:
            module.compile(mode=mode, dynamic=dynamic)
            names.append(name)
    if backbone and hasattr(model, "backbone"):
        body = model.backbone[0] if isinstance(model.backbone, nn.Sequential) else model.backbone
        body.compile(mode=mode, dynamic=dynamic)
        names.append("backbone.0" if isinstance(model.backbone, nn.Sequential) else "backbone")
    return names

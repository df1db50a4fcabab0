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

import torch
from torch import nn

__all__ = ["compile_regions", "compile_criterion", "region_methods", "method_owner", "METHOD_REGIONS",
           "CRITERION_REGIONS"]


_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Methods compiled as regions of their own (attribute paths from the DINO module): every level's
# padding mask and sine position embedding in one call (with ``backbone``), the flattening of
# the levels into encoder tokens, the two-stage query selection, the decoder heads and the
# denoising queries (noise, label embedding, scatter into the padded slots; training only).
METHOD_REGIONS = ("backbone.level_encodings", "transformer.flatten_levels", "transformer.select_queries",
                  "_decoder_heads", "_dn_queries")
# Per granularity: module types compiled in place, and methods compiled as regions. At layer
# granularity the decoder's region is its step (layer + query positions + box refinement + norm).
_GRANULARITY = {
    "layer": {"modules": ("DeformableEncoderLayer",), "methods": ("transformer.decoder.step",)},
    "stack": {"modules": ("DeformableEncoder", "DeformableDecoder"), "methods": ()},
}


def _mark_step_begin(_module, _args) -> None:
    torch.compiler.cudagraph_mark_step_begin()


def _mark_step_per_forward(model: nn.Module) -> None:
    """With CUDA-graph regions, start a CUDA-graph-tree iteration at every top-level forward.

    Without it, torch starts a new iteration at each region call that has no pending backward,
    i.e. at every region of an eval forward, cloning the previous region's live outputs (the
    encoder memory, the features) each time. Marking the step explicitly makes one forward (and
    its backward) one iteration in training and in eval. Once marked, torch advances iterations
    only on these calls, so the hook stays on the model for every later forward (added once)."""
    if not getattr(model, "_dino_scale_marks_cudagraph_steps", False):
        model.register_forward_pre_hook(_mark_step_begin)
        model._dino_scale_marks_cudagraph_steps = True


def _options(mode: Optional[str], dynamic: Optional[bool], backend: str) -> dict:
    if mode not in _MODES:
        raise ValueError(f"compile mode must be one of {_MODES}, got {mode!r}")
    # torch.compile accepts a mode only with the inductor backend
    return {"dynamic": dynamic, "backend": backend, **({"mode": mode} if mode is not None else {})}


def method_owner(root: nn.Module, path: str) -> tuple[Optional[nn.Module], str]:
    """Attribute path from ``root`` ("transformer.select_queries", "_decoder_heads") -> (the
    module holding it, or None when ``root`` has no such submodule; the attribute name)."""
    owner_path, _, attr = path.rpartition(".")
    try:
        return (root.get_submodule(owner_path) if owner_path else root), attr
    except AttributeError:
        return None, attr


def _compile_methods(root: nn.Module, paths, options: dict) -> list[str]:
    """torch.compile each method at ``paths`` in place, as an instance attribute shadowing it
    (state-dict keys unaffected); skips missing ones and ones already compiled."""
    names = []
    for path in paths:
        owner, attr = method_owner(root, path)
        method = getattr(owner, attr, None) if owner is not None else None
        if method is not None and not hasattr(method, "_torchdynamo_orig_callable"):
            setattr(owner, attr, torch.compile(method, **options))
            names.append(path)
    return names


def region_methods(granularity: str, backbone: bool = True) -> list[str]:
    """The attribute paths (from the DINO module) of the methods compiled as regions."""
    methods = list(_GRANULARITY[granularity]["methods"]) + list(METHOD_REGIONS)
    return [m for m in methods if backbone or not m.startswith("backbone.")]


def compile_regions(model: nn.Module, backbone: bool = True, mode: Optional[str] = None,
                    dynamic: Optional[bool] = None, granularity: str = "layer",
                    backend: str = "inductor") -> list[str]:
    """Compile, in place, the transformer blocks and (``backbone``) the backbone body of a DINO
    ``model``. ``granularity``: "layer" (default: each encoder layer, and each decoder step,
    i.e. layer + query positions + box refinement; one compiled code shared by the layers of a
    stack) or "stack" (the whole encoder and the
    whole decoder with its box refinement: fewer, larger graphs and fewer calls per step, at a
    longer first compile; not yet timed on a GPU). The levels' flattening, the two-stage query
    selection, the decoder heads and the denoising queries are compiled as regions of their
    own, and with ``backbone`` all levels' masks and position embeddings (:data:`METHOD_REGIONS`). ``mode`` is torch.compile's:
    "reduce-overhead" replays each region as CUDA graphs (inputs of a fixed size; a new size
    records new graphs). ``backend`` is torch.compile's (``"aot_eager"``: traced without code
    generation, for debugging and quick CPU tests). Returns the compiled regions' names."""
    if granularity not in _GRANULARITY:
        raise ValueError(f"compile granularity must be one of {sorted(_GRANULARITY)}, got {granularity!r}")
    options = _options(mode, dynamic, backend)
    if mode == "reduce-overhead":
        _mark_step_per_forward(model)
    names = []
    for name, module in model.named_modules():
        if type(module).__name__ in _GRANULARITY[granularity]["modules"]:
            module.compile(**options)
            names.append(name)
    if backbone and hasattr(model, "backbone"):
        body = model.backbone[0] if isinstance(model.backbone, nn.Sequential) else model.backbone
        body.compile(**options)
        names.append("backbone.0" if isinstance(model.backbone, nn.Sequential) else "backbone")
    return names + _compile_methods(model, region_methods(granularity, backbone), options)


# Tensor-only methods of the loss (attribute paths from the SetCriterion): the batched matching
# cost, the stacked matched-set losses and the stacked denoising losses.
CRITERION_REGIONS = ("matcher.cost_matrix", "matched_set_terms", "dn_set_terms")


def compile_criterion(criterion: nn.Module, mode: Optional[str] = None, dynamic: Optional[bool] = None,
                      backend: str = "inductor") -> list[str]:
    """Compile, in place, the tensor parts of a :class:`dino_scale.models.criterion.SetCriterion`
    (:data:`CRITERION_REGIONS`; ~440 eager operator calls per step before). The host parts
    (the assignment, the match index building) stay eager; the number of matches changes every
    step, so the second shape seen marks it dynamic and later steps reuse the code. Options as
    :func:`compile_regions`. Returns the compiled methods' paths (none twice)."""
    return _compile_methods(criterion, CRITERION_REGIONS, _options(mode, dynamic, backend))

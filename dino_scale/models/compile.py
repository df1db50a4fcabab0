"""Regional ``torch.compile`` of DINO: compile the repeated blocks, not the whole detector.

The whole model does not compile well (host-side matching, denoising bookkeeping, varying
query counts), but its cost on a GPU is dominated by launch overhead in a few repeated
blocks: the 6 encoder layers, the 6 decoder layers and the backbone. Compiling each in place
(as ``nn.Module.compile`` does) fuses their elementwise chains and turns each layer into one
autograd node, while state-dict keys stay unchanged (no ``_orig_mod.`` prefix), so checkpoints
and the official-weight loader are unaffected. Layers of one stack share their compiled code.

Shapes vary between batches (multi-scale training, denoising padding): the first recompile
marks the varying dimensions dynamic (``dynamic=None``), so a run settles after a few steps.

Phases compile apart (:class:`_Region`): every region has one compiled entry point per phase
(module ``training`` flag x grad mode), each a code object of its own, so dynamo keeps separate
caches and separate automatic-dynamic shape records for training and evaluation. One code
object for both made the first eval after training compile dynamic-shape graphs wherever eval
sizes differ from training's (the decoder's query count without denoising queries; every
token count after multi-scale training), where eval alone compiles static ones. The split adds
no compile: graphs of another grad mode or training flag never serve a call (dynamo guards on
both). A region that hits dynamo's recompile limit (later new shapes then run eagerly) is
logged as a warning naming it and counted in :data:`RECOMPILE_LIMIT_HITS`.
"""
from __future__ import annotations

import collections
import functools
import logging
import re
import types
from typing import Callable, Optional

import torch
from torch import nn

from dino_scale.config_checks import COMPILE_MODES, CUDA_GRAPH_MODES

__all__ = ["compile_regions", "compile_criterion", "region_methods", "method_owner", "METHOD_REGIONS",
           "CRITERION_REGIONS", "RECOMPILE_LIMIT_HITS"]

log = logging.getLogger(__name__)


_MODES = COMPILE_MODES
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


_PREFIX = "dino_region__"
_CODES: dict = {}  # (label, phase, options) -> the compiled entry point, shared by a region's instances
_NAMES: dict = {}  # code name -> "label (phase)"
_OPTION_SETS: list = []  # distinct compile options seen (an index in the code names)
# "label (phase)" -> how often that region hit dynamo's recompile limit (its new shapes then run eagerly)
RECOMPILE_LIMIT_HITS: collections.Counter = collections.Counter()


def _call_method(func: Callable, owner: nn.Module, *args, **kwargs):
    """Entry point (copied per phase) of a method whose own code dynamo would not trace as a
    frame (a decorated one: the wrapper's code lives in torch or functools)."""
    return func(owner, *args, **kwargs)


def _phase(owner) -> str:
    """The states dynamo guards on that always tell training and evaluation calls apart."""
    return ("train" if getattr(owner, "training", False) else "eval") + \
        ("_grad" if torch.is_grad_enabled() else "_nograd")


def _entry(label: str, phase: str, options: tuple, func: Callable) -> Callable:
    """torch.compile of a copy of ``func`` (the region's function, called with its owner first)
    under a code object of its own for (label, phase, options): dynamo keys its cache and its
    automatic-dynamic records by code object and name. The copy traces as the function does."""
    key = (label, phase, options)
    fn = _CODES.get(key)
    if fn is None:
        if options not in _OPTION_SETS:
            _OPTION_SETS.append(options)
        index = _OPTION_SETS.index(options)
        name = _PREFIX + re.sub(r"\W", "_", label) + f"__{phase}" + (f"__{index}" if index else "")
        direct = not hasattr(func, "__wrapped__")
        template = func if direct else _call_method
        code = template.__code__.replace(co_name=name, **(
            {"co_qualname": name} if hasattr(template.__code__, "co_qualname") else {}))
        copy = types.FunctionType(code, template.__globals__, name, template.__defaults__, template.__closure__)
        copy.__kwdefaults__ = template.__kwdefaults__
        compiled = torch.compile(copy, **dict(options))
        fn = _CODES[key] = compiled if direct else functools.partial(compiled, func)
        _NAMES[name] = f"{label} ({phase})"
    return fn


class _Region:
    """Installed as an instance attribute shadowing a region's method (``forward`` of a module
    region): calls the compiled entry point of the current phase. Instances of one class (the
    encoder layers) share the entry points, hence the compiled graphs, as they shared the
    method's code before; a module's hooks stay outside, as with ``nn.Module.compile``."""

    def __init__(self, label: str, options: dict, method: types.MethodType):
        self.label, self.options = label, tuple(sorted(options.items(), key=lambda kv: kv[0]))
        self.func, self.owner = method.__func__, method.__self__
        self.entries: dict = {}  # phase -> compiled entry point

    def __call__(self, *args, **kwargs):
        phase = _phase(self.owner)
        fn = self.entries.get(phase)
        if fn is None:
            fn = self.entries[phase] = _entry(self.label, phase, self.options, self.func)
        return fn(self.owner, *args, **kwargs)


class _RecompileLimitWatch(logging.Filter):
    """On dynamo's own logger: its warning that a code object hit the recompile limit (from then
    on, inputs none of its graphs accept run eagerly) becomes one naming the region."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        if msg.startswith("torch._dynamo hit config."):
            try:
                _report_limit_hit(record.getMessage())
            except Exception:  # noqa: BLE001 - never break dynamo's logging
                pass
        return True


def _report_limit_hit(message: str) -> None:
    limit = re.search(r"hit config\.(\w+) \(([^)]*)\)", message)
    limit_name, value = (limit.group(1), limit.group(2)) if limit else ("recompile_limit", "?")
    ours = re.search(rf"'({_PREFIX}\w+)'", message)
    if ours is not None:
        region = _NAMES.get(ours.group(1), ours.group(1))
    elif "dino_scale" in message:  # a frame of its own inside a region (after a graph break)
        func = re.search(r"function: (.*)", message)
        region = f"inside a region: {func.group(1) if func else '?'}"
    else:
        return
    RECOMPILE_LIMIT_HITS[region] += 1
    log.warning("regional torch.compile: %s hit torch._dynamo.config.%s (%s); from now on its inputs that "
                "match none of its compiled graphs run EAGERLY (uncompiled, slower). TORCH_LOGS=recompiles lists "
                "the recompiles; raise the limit or keep input shapes steadier", region, limit_name, value)


def _watch_recompile_limit() -> None:
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if not any(isinstance(f, _RecompileLimitWatch) for f in logger.filters):
        logger.addFilter(_RecompileLimitWatch())


def _compile_method(owner: nn.Module, attr: str, options: dict) -> bool:
    """Compile ``owner.<attr>`` in place as a :class:`_Region` (an instance attribute: state-dict
    keys unaffected); False when it is missing or compiled already."""
    method = getattr(owner, attr, None)
    if not isinstance(method, types.MethodType):  # missing, or a _Region already
        return False
    setattr(owner, attr, _Region(f"{type(owner).__qualname__}.{attr}", options, method))
    return True


def method_owner(root: nn.Module, path: str) -> tuple[Optional[nn.Module], str]:
    """Attribute path from ``root`` ("transformer.select_queries", "_decoder_heads") -> (the
    module holding it, or None when ``root`` has no such submodule; the attribute name)."""
    owner_path, _, attr = path.rpartition(".")
    try:
        return (root.get_submodule(owner_path) if owner_path else root), attr
    except AttributeError:
        return None, attr


def _compile_methods(root: nn.Module, paths, options: dict) -> list[str]:
    """Compile each method at ``paths`` in place (:func:`_compile_method`); skips missing ones
    and ones already compiled."""
    _watch_recompile_limit()
    names = []
    for path in paths:
        owner, attr = method_owner(root, path)
        if owner is not None and _compile_method(owner, attr, options):
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
    own, and with ``backbone`` all levels' masks and position embeddings (:data:`METHOD_REGIONS`).
    ``mode`` is torch.compile's: "reduce-overhead" replays each region as CUDA graphs (inputs of
    a fixed size; a new size records new graphs). ``backend`` is torch.compile's
    (``"aot_eager"``: traced without code generation, for debugging and quick CPU tests).
    Returns the compiled regions' names (ones compiled before are skipped). Training and
    evaluation calls reach separate compiled entries (module doc), so evaluating during training
    compiles what evaluation alone would."""
    if granularity not in _GRANULARITY:
        raise ValueError(f"compile granularity must be one of {sorted(_GRANULARITY)}, got {granularity!r}")
    options = _options(mode, dynamic, backend)
    if mode == "reduce-overhead":
        _mark_step_per_forward(model)
    if mode in CUDA_GRAPH_MODES:
        # a region called at a new size (multi-scale training: nearly every batch) records a new
        # graph set that is never freed; once dynamo makes the region dynamic, run that graph
        # without CUDA graphs instead: recorded graphs stay bounded (process-wide inductor setting)
        import torch._inductor.config as inductor_config
        inductor_config.triton.cudagraph_skip_dynamic_graphs = True
    _load_msda_extension(model)
    names = []
    for name, module in model.named_modules():
        if type(module).__name__ in _GRANULARITY[granularity]["modules"]:
            names += [name] if _compile_method(module, "forward", options) else []
    if backbone and hasattr(model, "backbone"):
        body = model.backbone[0] if isinstance(model.backbone, nn.Sequential) else model.backbone
        name = "backbone.0" if isinstance(model.backbone, nn.Sequential) else "backbone"
        names += [name] if _compile_method(body, "forward", options) else []
    return names + _compile_methods(model, region_methods(granularity, backbone), options)


def _load_msda_extension(model: nn.Module) -> None:
    """Load the deformable-attention CUDA extension before the first trace when the model is on a
    GPU: loaded inside a trace, it splits that first graph of every MSDA region (``load`` runs
    outside the compiler) and the split graphs stay in use for that phase. Failures are left to
    the op's own fallback and warning."""
    from .deformable_attention import MSDeformAttn

    on_gpu = any(p.is_cuda for p in model.parameters())
    if on_gpu and any(isinstance(m, MSDeformAttn) and m.backend != "pytorch" for m in model.modules()):
        from dino_scale.ops import ms_deform_attn_cuda
        try:
            ms_deform_attn_cuda.load()
        except Exception:  # noqa: BLE001 - the op falls back (and warns) at its first call
            pass


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

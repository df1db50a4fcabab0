"""ImageNet(-22k) Swin weights for the detection Swin (`swin.SwinTransformerDetection`): the
original Swin repo's layout or timm's, from a local file (.pth/.pt through weights_only
``torch.load``, or .safetensors) or a URL, loaded as the official DINO does."""
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Tuple

import torch

from .weights_file import download_weights, read_safetensors, read_torch_file

if TYPE_CHECKING:
    from .swin import SwinTransformerDetection

logger = logging.getLogger(__name__)

_DROP_PATTERNS = (r"^head\.", r"^norm\.", r"relative_position_index$", r"attn_mask$")
_PREFIXES = ("module.", "backbone.0.", "backbone.", "model.", "encoder.")


@dataclass
class SwinLoadReport:
    """What `load_swin_imagenet_weights` did. `missing`: model keys not in the file (the
    output norms `norm{i}` always are); `unexpected`: file keys the model lacks (not
    loaded); `dropped`: classifier/final-norm/derived buffers ignored on purpose."""
    source_format: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)


def _read_state_dict(path_or_url: str) -> dict:
    path = path_or_url
    if re.match(r"^[a-z]+://", str(path_or_url)):
        path = download_weights(path_or_url)  # WeightsDownloadError naming the URL
    elif os.path.isdir(path_or_url):
        raise IsADirectoryError(f"Swin weights {path_or_url}: a directory, not a weights file")
    elif not os.path.isfile(path_or_url):
        raise FileNotFoundError(f"Swin weights not found: {path_or_url}")
    if str(path_or_url).endswith(".safetensors"):
        return read_safetensors(path)
    try:
        return read_torch_file(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"Swin weights {path_or_url}: refused by weights_only loading (the file "
                         f"holds non-tensor objects; re-save its 'model' state dict): {e}") from e


def convert_swin_state_dict(sd: dict, num_stages: int = 4) -> Tuple[dict, str, List[str]]:
    """Original-Swin or timm state dict -> (official-layout dict, format name, dropped keys).

    Unwraps `model`/`state_dict` entries, strips common prefixes, maps timm's
    `layers_{i}`/`layers.{i}` downsample-at-start (i >= 1) to `layers.{i-1}.downsample`."""
    for entry in ("model", "state_dict"):
        if isinstance(sd, dict) and entry in sd and isinstance(sd[entry], dict):
            sd = sd[entry]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError("Swin weights: expected a state dict of tensors (optionally under 'model')")
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if sd and all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    sd = {re.sub(r"^layers_(\d+)\.", r"layers.\1.", k): v for k, v in sd.items()}  # timm features
    ds = {int(m.group(1)) for k in sd if (m := re.match(r"^layers\.(\d+)\.downsample\.", k))}
    timm_layout = bool(ds) and 0 not in ds and max(ds) == num_stages - 1
    if ds and not timm_layout and max(ds) > num_stages - 2:
        raise ValueError(f"Swin weights: downsample in stages {sorted(ds)} fits neither layout")
    out, dropped = {}, []
    for k, v in sd.items():
        if any(re.search(p, k) for p in _DROP_PATTERNS):
            dropped.append(k)
            continue
        if timm_layout:
            k = re.sub(r"^layers\.(\d+)\.downsample\.",
                       lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        out[k] = v
    return out, ("timm" if timm_layout else "original"), dropped


def _short(keys: List[str], n: int = 20) -> str:
    return str(keys[:n])[:-1] + (f", ... {len(keys) - n} more]" if len(keys) > n else "]")


def load_swin_imagenet_weights(model: "SwinTransformerDetection", path_or_url: str,
                               strict: bool = False) -> SwinLoadReport:
    """Load ImageNet(-22k) Swin weights (file path or URL; .pth/.pt via weights_only
    torch.load, or .safetensors) into `model`, as the official DINO does (classifier and
    final norm dropped, relative_position_index recomputed, output norms left as built).

    Shape mismatches raise ValueError. `strict=True` also raises on unexpected keys or on
    missing keys other than the output norms. Returns a `SwinLoadReport`."""
    sd, fmt, dropped = convert_swin_state_dict(_read_state_dict(path_or_url), len(model.layers))
    own = model.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError("Swin weights: shape mismatch (wrong variant or window size?):\n  "
                         + "\n  ".join(bad))
    report = SwinLoadReport(fmt, dropped=dropped)
    report.unexpected = sorted(k for k in sd if k not in own)
    report.loaded = [k for k in sd if k in own]
    report.missing = [k for k in own if k not in sd and not k.endswith("relative_position_index")]
    expected_missing = [k for k in report.missing if re.match(r"^norm\d+\.", k)]
    other_missing = [k for k in report.missing if k not in expected_missing]
    if strict and (other_missing or report.unexpected):
        raise ValueError(f"Swin weights ({fmt}): {len(other_missing)} missing {_short(other_missing)}, "
                         f"{len(report.unexpected)} unexpected {_short(report.unexpected)}")
    model.load_state_dict({k: sd[k] for k in report.loaded}, strict=False)
    if other_missing or report.unexpected:
        logger.warning("Swin weights %s (%s format): %d loaded; %d missing %s; %d unexpected %s",
                       path_or_url, fmt, len(report.loaded), len(other_missing), _short(other_missing),
                       len(report.unexpected), _short(report.unexpected))
    logger.info("Swin weights %s (%s format): %d tensors loaded, output norms %s left as "
                "initialised, %d keys dropped", path_or_url, fmt, len(report.loaded),
                expected_missing, len(dropped))
    return report

"""CUDA architecture lists of the extension's builds: the default list
(:func:`default_arch_list`), what a list targets (:func:`arch_targets`), whether a GPU runs a
list's code (:func:`arch_list_runs_on`) and the visible GPUs (:func:`visible_capabilities`).
Used by :mod:`dino_scale.ops._build`."""
from __future__ import annotations

import os

import torch


def default_arch_list() -> str:
    """$TORCH_CUDA_ARCH_LIST, else the visible GPUs' capabilities, else "9.0"."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps)
    return "9.0"


def arch_targets(arch_list: str) -> set[tuple[int, int]]:
    """``"8.0;9.0+PTX"`` -> {(8, 0), (9, 0)} (separators ``;`` or spaces, suffixes ignored)."""
    out = set()
    for entry in arch_list.replace(";", " ").split():
        major, _, minor = entry.split("+")[0].partition(".")
        digits = "".join(ch for ch in minor if ch in "0123456789")
        if major.isascii() and major.isdigit() and digits:
            out.add((int(major), int(digits)))
    return out


def arch_list_runs_on(arch_list: str, cap: tuple[int, int]) -> bool:
    """Whether a library built for ``arch_list`` has code a GPU of compute capability ``cap`` runs:
    machine code of the same major and a minor <= cap's ("8.0" runs on 8.6; an arch-specific
    "9.0a" only on 9.0), or PTX ("+PTX") of an arch <= cap. An entry this does not parse (a named
    arch such as "Hopper") counts as runnable: only a list known to lack code is refused."""
    for entry in arch_list.replace(";", " ").split():
        base, _, extra = entry.partition("+")
        major, _, minor = base.partition(".")
        digits = "".join(ch for ch in minor if ch in "0123456789")
        if not (major.isascii() and major.isdigit() and digits):
            return True
        target, specific = (int(major), int(digits)), minor[len(digits):].lower() == "a"
        if extra.upper() == "PTX" and target <= cap:
            return True
        if target == cap or (not specific and target[0] == cap[0] and target[1] <= cap[1]):
            return True
    return False


def visible_capabilities() -> set[tuple[int, int]]:
    """The compute capabilities of the visible GPUs (empty without CUDA)."""
    if not torch.cuda.is_available():
        return set()
    return {tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())}

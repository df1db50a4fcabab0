"""Transfer the class-dependent heads of a detector between label spaces by category name.

Fine-tuning an Objects365 model (366 rows: raw ids 0..365) on COCO (91 rows: raw ids
0..90) needs new class heads. The official recipe re-initializes them; here a row of
the target head is copied from the source head when the two categories have the same
(normalized) name, and keeps the target model's fresh initialization otherwise.

Class-dependent tensors, found by key name in a state dict:

- ``*class_embed*.weight`` (C, D) and ``*.bias`` (C,): decoder heads ``class_embed.i``
  (and their aliases ``transformer.decoder.class_embed.i``) and the encoder head
  ``transformer.enc_out_class_embed``; row ``c`` scores raw category id ``c``.
- ``label_enc.weight`` (L + 1, D): denoising label embedding; row ``c`` embeds raw
  category id ``c`` (the last row is the "unknown" label of the official code, left
  fresh).

Pure PyTorch: no Ray, DeepSpeed or MLflow.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import torch

__all__ = ["TransferReport", "is_class_key", "normalize_name", "category_map", "transfer_class_heads"]

_CLASS_KEY = re.compile(r"(^|\.)(\w*class_embed)(\.\d+)?\.(weight|bias)$")
_LABEL_KEY = re.compile(r"(^|\.)label_enc\.weight$")


@dataclass
class TransferReport:
    """What :func:`transfer_class_heads` did."""

    matched: dict[int, int] = field(default_factory=dict)  # target id -> source id
    unmatched_target: list[str] = field(default_factory=list)  # target names left fresh
    class_keys: list[str] = field(default_factory=list)  # keys treated as class heads
    copied_keys: int = 0  # class-independent tensors taken from the source
    skipped_keys: list[str] = field(default_factory=list)  # source keys absent/mismatched in target

    def summary(self) -> str:
        return (f"class heads: {len(self.matched)} categories mapped by name, "
                f"{len(self.unmatched_target)} freshly initialized; "
                f"{self.copied_keys} other tensors copied, {len(self.skipped_keys)} skipped")


def is_class_key(key: str) -> bool:
    """True for the tensors whose first dimension is indexed by category id."""
    return bool(_CLASS_KEY.search(key) or _LABEL_KEY.search(key))


def normalize_name(name: str) -> str:
    """Case, separators and surrounding space do not matter: ``"Traffic_Light"`` ->
    ``"traffic light"``."""
    return " ".join(re.sub(r"[_\-/]+", " ", str(name)).lower().split())


# the same category spelled differently by COCO (key) and Objects365 v2 (value), normalized
SPELLINGS = {"dining table": "dinning table", "hair drier": "hair dryer"}


def category_map(source: Iterable[Mapping], target: Iterable[Mapping],
                 aliases: Optional[Mapping[str, str]] = None) -> tuple[dict[int, int], list[str]]:
    """Map target category ids to source category ids by normalized name.

    ``source``/``target``: ``[{"id": int, "name": str}, ...]``. A source name made of
    alternatives (Objects365's ``"Monitor/TV"``, ``"Bowl/Basin"``) also answers to each
    alternative (``"tv"``, ``"bowl"``) that no other source category claims; a full name wins
    over an alternative. :data:`SPELLINGS` holds COCO names Objects365 spells otherwise.
    ``aliases`` maps a target name to the source name to use (e.g. ``{"bird": "wild bird"}``);
    it wins over all of that. Returns ``({target_id: source_id}, [unmatched target names])``.
    """
    source = list(source)
    by_name: dict[str, int] = {}
    for cat in source:
        by_name.setdefault(normalize_name(cat["name"]), int(cat["id"]))
    parts: dict[str, set[int]] = {}
    for cat in source:
        alternatives = str(cat["name"]).split("/")
        for part in alternatives if len(alternatives) > 1 else ():
            parts.setdefault(normalize_name(part), set()).add(int(cat["id"]))
    for part, ids in parts.items():
        if part and len(ids) == 1:
            by_name.setdefault(part, next(iter(ids)))
    alias = {normalize_name(k): normalize_name(v) for k, v in (aliases or {}).items()}
    mapping: dict[int, int] = {}
    unmatched: list[str] = []
    for cat in target:
        key = normalize_name(cat["name"])
        src = by_name.get(alias[key]) if key in alias else by_name.get(key)
        if src is None and key not in alias and key in SPELLINGS:
            src = by_name.get(SPELLINGS[key])
        if src is None:
            unmatched.append(str(cat["name"]))
        else:
            mapping[int(cat["id"])] = src
    return mapping, unmatched


def _copy_rows(src: torch.Tensor, dst: torch.Tensor, mapping: dict[int, int]) -> tuple[torch.Tensor, int]:
    """A copy of ``dst`` with row ``t`` replaced by ``src[s]`` for each ``t -> s``."""
    out = dst.clone()
    n = 0
    for t, s in mapping.items():
        if 0 <= t < dst.shape[0] and 0 <= s < src.shape[0]:
            out[t] = src[s].to(dtype=dst.dtype, device=dst.device)
            n += 1
    return out, n


def transfer_class_heads(source_state: Mapping[str, torch.Tensor],
                         target_state: Mapping[str, torch.Tensor],
                         source_categories: Iterable[Mapping],
                         target_categories: Iterable[Mapping],
                         aliases: Optional[Mapping[str, str]] = None,
                         ) -> tuple[dict[str, torch.Tensor], TransferReport]:
    """Build a target-shaped state dict from a source checkpoint.

    ``target_state`` is the state dict of a freshly built target model (e.g. COCO, 91
    classes): it provides the shapes and the fresh initialization. Every
    class-independent tensor is taken from ``source_state`` when its shape matches
    (else kept fresh and listed in ``report.skipped_keys``). Class-dependent tensors
    (see module doc) start from the target's values and get the source rows of the
    categories whose names match. Aliased tensors (shared decoder heads stored under
    several keys) receive identical values, so loading keeps them tied.

    Returns ``(state_dict, report)``; load it with ``model.load_state_dict(state, strict=True)``.
    """
    source_categories = list(source_categories)
    target_categories = list(target_categories)
    mapping, unmatched = category_map(source_categories, target_categories, aliases)
    report = TransferReport(matched=dict(mapping), unmatched_target=unmatched)
    out: dict[str, torch.Tensor] = {}
    for key, fresh in target_state.items():
        src = source_state.get(key)
        if is_class_key(key):
            report.class_keys.append(key)
            if src is None or src.dim() != fresh.dim() or src.shape[1:] != fresh.shape[1:]:
                out[key] = fresh.clone()
                if src is not None:
                    report.skipped_keys.append(key)
                continue
            out[key], _ = _copy_rows(src, fresh, mapping)
            continue
        if src is not None and src.shape == fresh.shape:
            out[key] = src.to(dtype=fresh.dtype, device=fresh.device).clone()
            report.copied_keys += 1
        else:
            out[key] = fresh.clone()
            if src is not None:
                report.skipped_keys.append(key)
    report.skipped_keys += [k for k in source_state if k not in target_state]
    return out, report

"""The champion policy of fine-tuning: which registered version holds ``@champion``.

:func:`promote_if_better` moves alias ``champion`` to a new version only when its AP
(tag ``AP`` on the version) beats the AP of the current champion, measured on the same
validation data with the same protocol (tags ``eval.data``, ``eval.tta``; a version without
them is compared on its AP alone).

The registry has no compare-and-set, so two fine-tunes that finish together can both read
the same champion, both beat it, and the worse one's alias write can land last. Every
promotion therefore stamps its version with a fresh id (tag ``<alias>.promotion``) and the
id of the holder it compared against (``<alias>.basis``), and after its write settles the
race: among the versions promoted from the same holder (and promotions stacked on those)
since shortly before this promotion read the holder (tag ``<alias>.promoted_at``), the best
holds the alias, by the rule of a promotion applied between the rivals (real data over synthetic,
APs compared only on the same validation data and protocol). A holder from outside that family
(a later, legitimate promotion, or ``promote`` by hand, which stamps a fresh id) is left alone,
and so is a version promoted from the same holder long before: the holder got the alias back in
between (moved in the MLflow UI, which stamps nothing) and the old promotion is no rival.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from dino_scale.tracking.registry import is_not_found, store_client
from dino_scale.tracking.search import filter_literal, pages

AP_TAG = "AP"
# per alias: "<alias>.promotion", a fresh id each time the alias is moved to the version;
# "<alias>.basis", the promotion id of the holder an automatic promotion beat
PROMOTION_TAG, BASIS_TAG = "{}.promotion", "{}.basis"
PROMOTED_AT_TAG = "{}.promoted_at"  # the promotion's time (Unix seconds): rivals are promoted at about the same time
_RACE_SLACK_S = 60.0  # a rival's promotion is at most this much older than the holder's read (clocks, latency)
_NO_HOLDER = "none"
_SETTLE_ROUNDS = 10
# what the AP was measured on (pipelines._datasets.eval_fingerprint of the val set; eval.tta): only
# APs of the same data and protocol are compared
EVAL_DATA_TAG, EVAL_TTA_TAG = "eval.data", "eval.tta"
SYNTHETIC_TAG = "synthetic_data"  # "true" on a version trained and evaluated on a generated set
LINEAGE_TAGS = ("source.uri", "source.model_name", "source.model_version", "source.run_id", "source.class_heads")


@dataclass
class Promotion:
    promoted: bool
    version: str
    ap: Optional[float]
    previous_version: Optional[str]
    previous_ap: Optional[float]
    reason: str


def _version_by_alias(client, name: str, alias: str):
    """The version holding ``alias``, or ``None`` (no such model or alias yet). Any other
    error (a locked sqlite store, a server error) is raised: read as "no champion", it would
    promote the new version whatever its AP."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if is_not_found(exc):
            return None
        raise


def _ap_of(version) -> Optional[float]:
    try:
        value = float(version.tags.get(AP_TAG))
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _ap_text(ap: Optional[float]) -> str:
    return "no AP" if ap is None else f"AP {ap:.4f}"  # (an AP of 0.0 printed as nan)


def promote_if_better(name: str, version: str | int, ap: Optional[float], alias: str = "champion",
                      client=None) -> Promotion:
    """Tag ``AP`` on ``name`` version ``version``; move ``alias`` to it only when ``ap``
    is strictly greater than the current holder's AP (or no version holds the alias).
    A version without a measured AP is never promoted; a current holder without an AP
    tag counts as beaten. When both versions say what their AP was measured on (tags
    ``eval.data``, ``eval.tta``) and that differs, the APs are not comparable: not promoted,
    unless the holder was measured on a generated set (tag ``synthetic_data``) and this version
    on real data (a smoke test that took the alias first held it for good). A concurrent
    promotion from the same holder with a better AP wins the alias back (module docstring)."""
    client = client or store_client()
    version = str(version)
    if ap is not None and not math.isnan(ap):
        client.set_model_version_tag(name, version, AP_TAG, f"{ap:.6f}")
        # compared as tagged: the holder's AP is read back from its 6-decimal tag, so the full
        # value of an equal AP (0.000157140... against 0.000157) beat it and moved the alias
        ap = float(f"{ap:.6f}")
    else:
        ap = None
    read_at = time.time()
    current = _version_by_alias(client, name, alias)
    prev_v = None if current is None else str(current.version)
    prev_ap = None if current is None else _ap_of(current)
    if ap is None:
        return Promotion(False, version, None, prev_v, prev_ap, "no AP measured; alias not moved")
    if current is not None and prev_v == version:
        return Promotion(True, version, ap, prev_v, prev_ap, f"already @{alias}")
    mine = client.get_model_version(name, version)
    refusal = _refusal(mine, ap, current, alias)
    if refusal:
        return Promotion(False, version, ap, prev_v, prev_ap, refusal)
    over_synthetic = _over_synthetic(mine, current)
    basis = _NO_HOLDER if current is None else _promotion_id(current, alias)
    _stamp_and_set(client, name, alias, version, basis)
    why = ("first version with an AP" if current is None else
           f"replaces v{prev_v}, measured on synthetic data" if over_synthetic else
           f"beats v{prev_v} ({_ap_text(prev_ap)})")
    holder, rival = _settle(client, name, alias, basis, since=read_at - _RACE_SLACK_S)
    if rival and str(holder.version) != version:
        return Promotion(False, version, ap, prev_v, prev_ap,
                         f"AP {ap:.4f} {why}, but v{holder.version} ({_ap_text(_ap_of(holder))}), "
                         f"promoted at the same time from the same @{alias}, is better")
    return Promotion(True, version, ap, prev_v, prev_ap, f"AP {ap:.4f} {why}")


def _over_synthetic(mine, holder) -> bool:
    """``mine`` was measured on real data and ``holder`` on a generated set: it replaces it."""
    return bool(_synthetic(holder)) and _synthetic(mine) is False


def _refusal(mine, ap: float, holder, alias: str, tie_wins: bool = False) -> Optional[str]:
    """Why ``mine`` (AP ``ap``) may not take ``alias`` from ``holder``; None when it beats it.
    One rule for a promotion and for settling a race between promotions (:func:`_settle`):
    a version measured on synthetic data never replaces one measured on real data; one measured
    on real data replaces one measured on synthetic data whatever the APs; otherwise APs of other
    validation data or protocol are not comparable, and the AP must be strictly greater (a
    holder without an AP counts as beaten; ``tie_wins``: an equal AP is enough)."""
    if holder is None:
        return None
    prev_v, prev_ap = str(holder.version), _ap_of(holder)
    if _synthetic(mine) is True and _synthetic(holder) is False:  # even where the holder carries no
        # evaluation tags to compare (registered by an older release or by hand)
        return (f"AP {ap:.4f} was measured on synthetic data and @{alias} v{prev_v} on real data: "
                f"alias not moved")
    if _over_synthetic(mine, holder):  # real data replaces a smoke test that took the alias first
        return None
    ours, theirs = _evaluation(mine), _evaluation(holder)
    if ours is not None and theirs is not None and ours != theirs:
        return (f"AP {ap:.4f} was measured on other validation data or protocol ({_eval_text(ours)}) than "
                f"@{alias} v{prev_v}'s (AP {'-' if prev_ap is None else f'{prev_ap:.4f}'}, "
                f"{_eval_text(theirs)}): not comparable, alias not moved (move it by hand with "
                f"`dino-scale registry promote`)")
    if prev_ap is not None and not (ap > prev_ap or tie_wins and ap == prev_ap):
        return f"AP {ap:.4f} does not beat @{alias} v{prev_v} (AP {prev_ap:.4f})"
    return None


def tta_protocol(cfg) -> str:
    """The ``eval.tta`` tag of an AP measured with ``cfg.eval``: ``"false"``, or ``"true:"`` and
    the TTA sizes (``"true:800,1000"``): APs with other sizes are not comparable either (a plain
    ``"true"``, which said nothing of the sizes, compares equal only to itself)."""
    if not cfg.eval.tta:
        return "false"
    return "true:" + ",".join(str(int(s)) for s in sorted(cfg.eval.tta_scales))


def _synthetic(version) -> Optional[bool]:
    """A version's ``synthetic_data`` tag: True / False, None when absent (or no version)."""
    value = None if version is None else version.tags.get(SYNTHETIC_TAG)
    return None if value is None else value.lower() == "true"


def _evaluation(version) -> Optional[tuple[str, str]]:
    """What a version's AP was measured on: (fingerprint of the validation labels, TTA) from its
    ``eval.data`` / ``eval.tta`` tags; None for a version without them (registered before these
    tags, or by hand), which is compared on its AP alone."""
    if version is None or not version.tags.get(EVAL_DATA_TAG):
        return None
    return version.tags[EVAL_DATA_TAG], version.tags.get(EVAL_TTA_TAG, "false")


def _eval_text(evaluation: tuple[str, str]) -> str:
    """``val data <fingerprint>`` and the TTA protocol (:func:`tta_protocol`): ``, TTA 800,1000``."""
    tta = evaluation[1]
    if tta in ("", "false"):
        return f"val data {evaluation[0]}"
    sizes = tta.partition(":")[2]
    return f"val data {evaluation[0]}, TTA" + (f" {sizes}" if sizes else "")


def _promotion_id(holder, alias: str) -> str:
    """The id of the alias move that made ``holder`` the holder (``v<version>`` for a
    holder set outside this module, e.g. in the MLflow UI)."""
    return holder.tags.get(PROMOTION_TAG.format(alias)) or f"v{holder.version}"


def _stamp_and_set(client, name: str, alias: str, version: str, basis: str) -> None:
    """Move ``alias`` to ``version`` under a fresh promotion id. ``basis``: the promotion id
    of the holder an automatic promotion beat, ``"manual"`` for a move by hand (which
    no automatic promotion's family contains)."""
    client.set_model_version_tag(name, version, BASIS_TAG.format(alias), basis)
    client.set_model_version_tag(name, version, PROMOTED_AT_TAG.format(alias), f"{time.time():.3f}")
    client.set_model_version_tag(name, version, PROMOTION_TAG.format(alias), uuid.uuid4().hex[:12])
    set_alias(client, name, alias, version)


def _promoted_at(version, alias: str) -> float:
    """When ``version`` was last promoted to ``alias`` (Unix seconds; -inf: never, or before the tag)."""
    try:
        return float(version.tags.get(PROMOTED_AT_TAG.format(alias)))
    except (TypeError, ValueError):
        return -math.inf


def _settle(client, name: str, alias: str, basis: str, since: float = -math.inf):
    """After an automatic promotion from the holder with promotion id ``basis``: while the
    alias holder is one of the versions promoted from that holder (or from one of those,
    transitively) at ``since`` or later and others of them beat it by the rule of a promotion
    (:func:`_refusal`: real data over synthetic, a strictly better AP on the same validation data
    and protocol; ties: the older version), move the alias to the best of those. Repeats until
    stable, so that the last writer always leaves a holder no rival beats. Returns the final
    holder (None: no holder) and whether it is of the family."""
    holder = None
    for _ in range(_SETTLE_ROUNDS):
        holder = _version_by_alias(client, name, alias)
        if holder is None:
            return None, False
        versions = _versions(client, name)
        family, ids, grown = {}, {basis}, True
        while grown:
            grown = False
            for v in versions:
                if (v.tags.get(BASIS_TAG.format(alias)) in ids and str(v.version) not in family
                        and _promoted_at(v, alias) >= since):
                    family[str(v.version)] = v
                    ids.add(_promotion_id(v, alias))
                    grown = True
        if str(holder.version) not in family:
            return holder, False  # moved by something outside this race: left alone
        # each rival passed the rule against the holder it was promoted from, not against the
        # others: one measured on other data, or on a generated set, must not win on its AP alone
        rivals = [v for v in family.values() if str(v.version) != str(holder.version)
                  and _ap_of(v) is not None and _beats(v, holder, alias)]
        if not rivals:
            return holder, True
        best = max(rivals, key=lambda v: (_synthetic(v) is not True, _ap_of(v), -int(v.version)))
        set_alias(client, name, alias, str(best.version))
    holder = _version_by_alias(client, name, alias)
    return holder, holder is not None


def _beats(rival, holder, alias: str) -> bool:
    """``rival`` would take ``alias`` from ``holder`` (:func:`_refusal`); an equal AP on comparable
    data goes to the older version."""
    older = int(rival.version) < int(holder.version)
    return _refusal(rival, _ap_of(rival), holder, alias, tie_wins=older) is None


def set_alias(client, name: str, alias: str, version: str) -> None:
    """``name@alias`` -> ``version`` in the store ``client`` points at."""
    from dino_scale.tracking.registry import set_alias as _set

    _set(name, alias, version, tracking_uri=getattr(client, "_registry_uri", None) or client.tracking_uri)


def _all_pages(search, **kwargs) -> list:
    """Every result of an MLflow ``search_*`` call (they return one page, 100 models by default)."""
    return list(pages(search, **kwargs))


def _versions(client, name: str) -> list:
    """Every version of the registered model ``name``. The search filter is quoted so that a
    name holding ``'`` works; a name holding both ``'`` and ``"`` (the registry accepts it,
    MLflow's filter has no escape for it) is picked out of a search of every version."""
    literal = filter_literal(name)
    if literal is None:
        return [v for v in _all_pages(client.search_model_versions) if v.name == name]
    return _all_pages(client.search_model_versions, filter_string=f"name={literal}")

"""The model registry from the command line: list, show, and move aliases.

    python -m pipelines.registry [--work-dir runs] list
    python -m pipelines.registry show dino-tiny-coco
    python -m pipelines.registry promote dino-tiny-coco 3 [--alias champion] [--if-better]

``promote`` moves an alias by hand (stamped as a promotion of its own); ``--if-better`` applies
the fine-tuning pipeline's champion rule instead (:mod:`pipelines.champion`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from dino_scale.tracking.registry import is_not_found, store_client
from pipelines import _common as common
from pipelines.champion import LINEAGE_TAGS, _all_pages, _ap_of, _stamp_and_set, _versions, promote_if_better

# --------------------------------------------------------------------------- display

def _aliases(model) -> dict[str, list[str]]:
    """version -> aliases of a RegisteredModel."""
    out: dict[str, list[str]] = {}
    for alias, version in (getattr(model, "aliases", None) or {}).items():
        out.setdefault(str(version), []).append(alias)
    return out


def _get_model(client, name: str):
    """The registered model ``name``, or None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if is_not_found(exc):
            return None
        raise


def registry_state(client=None, names: Optional[Sequence[str]] = None) -> list[dict]:
    """Every registered model (or those in ``names``) as plain dicts: versions with run
    id, aliases, AP and lineage tags. Sorted by name, versions ascending."""
    client = client or store_client()
    if names:
        models = [m for m in (_get_model(client, n) for n in names) if m is not None]
    else:
        models = _all_pages(client.search_registered_models)
    out = []
    for m in sorted(models, key=lambda m: m.name):
        aliases = _aliases(m)
        versions = _versions(client, m.name)
        rows = []
        for v in sorted(versions, key=lambda v: int(v.version)):
            rows.append({"version": str(v.version), "run_id": v.run_id,
                         "aliases": sorted(aliases.get(str(v.version), [])),
                         "AP": _ap_of(v),
                         "lineage": {k: v.tags[k] for k in LINEAGE_TAGS if k in v.tags}})
        out.append({"name": m.name, "versions": rows})
    return out


def format_state(state: list[dict]) -> str:
    if not state:
        return "(registry is empty)"
    lines = []
    for m in state:
        lines.append(f"{m['name']}")
        for v in m["versions"]:
            alias = " ".join(f"@{a}" for a in v["aliases"]) or "-"
            ap = "-" if v["AP"] is None else f"{v['AP']:.4f}"
            src = v["lineage"].get("source.uri")
            if v["lineage"].get("source.model_name"):
                src = (f"{v['lineage']['source.model_name']} v{v['lineage'].get('source.model_version', '?')}"
                       f" (run {v['lineage'].get('source.run_id', '?')[:12]})")
            lines.append(f"  v{v['version']:<3} {alias:<22} AP {ap:<8} run {str(v['run_id'])[:12]}"
                         + (f"  <- {src}" if src else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m pipelines.registry",
                                description="Inspect the MLflow model registry (MLFLOW_TRACKING_URI, "
                                            "else <work-dir>/mlflow.db) and move aliases.")
    p.add_argument("--work-dir", default="./runs",
                   help="work folder of the default MLflow store, <work-dir>/mlflow.db (default ./runs); "
                        "MLFLOW_TRACKING_URI overrides it")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    # --work-dir / --debug after the action too (`registry list --work-dir X` was refused);
    # SUPPRESS: an action's parser sets them only when given, over the value before the action
    after = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    after.add_argument("--work-dir", default=argparse.SUPPRESS, help="as before the action")
    after.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="as before the action")
    sub = p.add_subparsers(dest="action", metavar="<action>")
    sub.required = True
    action = {"parents": [after], "allow_abbrev": False}  # --alias given whole (--al was taken for it)
    sub.add_parser("list", **action, help="every registered model with its versions, aliases, AP, lineage")
    show = sub.add_parser("show", **action, help="one model's versions: aliases, AP, lineage")
    show.add_argument("name")
    prom = sub.add_parser("promote", **action, help="point an alias at a version (no AP check, unless --if-better)")
    prom.add_argument("name")
    prom.add_argument("version")
    prom.add_argument("--alias", default="champion", help="alias to move (default champion)")
    prom.add_argument("--if-better", action="store_true",
                      help="the fine-tuning pipeline's check: move the alias only when the version's AP tag beats "
                           "the holder's, measured on the same data (a fine-tune whose promotion failed)")
    return p


def model_names_hint(client, name: str) -> str:
    """For a model ``name`` the registry does not hold: the closest names it does hold, in a few
    words (raises the store's MlflowException when the listing fails)."""
    import difflib

    names = [m.name for m in _all_pages(client.search_registered_models)]
    if not names:
        return "the registry holds no models: run pretraining first, or give the --work-dir it used"
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    shown = close + [n for n in sorted(names) if n not in close][:max(0, 5 - len(close))]
    return f"registered models: {', '.join(shown)}" + (f", ... {len(names)} in all" if len(names) > 5 else "")


def _not_found(client, name: str) -> common.UsageError:
    from mlflow.exceptions import MlflowException

    try:
        hint = f" ({model_names_hint(client, name)})"
    except MlflowException:  # the listing is only a help: the "not found" is the message
        hint = ""
    return common.UsageError(f"registered model {name!r} not found{hint}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    common.check_flag_values(args)  # an alias MLflow refuses: before promote tags the version
    common.require_store(common.setup_tracking(args.work_dir, create=False))
    client = store_client()
    if args.action == "list":
        print(format_state(registry_state(client)))
    elif args.action == "show":
        state = registry_state(client, [args.name])
        if not state:
            raise _not_found(client, args.name)
        print(format_state(state))
    else:
        if _get_model(client, args.name) is None:
            raise _not_found(client, args.name)
        text = args.version.strip()
        if not (text.isascii() and text.isdigit()) or int(text) < 1:  # "²" is a digit int() refuses
            raise common.UsageError(f"version {args.version!r}: give a version number (1, 2, ...; "
                                    f"'registry show {args.name}' lists them)")
        version = str(int(text))  # ' 2', '02' -> '2': the form MLflow stores and prints
        known = sorted(int(v.version) for v in _versions(client, args.name))
        if int(version) not in known:  # was MLflow's raw "Model Version (...) not found"
            listed = ", ".join(map(str, known[-10:])) if known else "none"
            raise common.UsageError(f"{args.name} has no version {version} (versions: {listed}; "
                                    f"'registry show {args.name}' lists them)")
        if args.if_better:
            mine = client.get_model_version(args.name, version)
            promo = promote_if_better(args.name, version, _ap_of(mine), alias=args.alias, client=client)
            print(f"{args.name}@{args.alias} -> version {version}" if promo.promoted else
                  f"{args.name}@{args.alias} unchanged", f"({promo.reason})")
            return 0
        _stamp_and_set(client, args.name, args.alias, version, "manual")
        print(f"{args.name}@{args.alias} -> version {version}")
    return 0


if __name__ == "__main__":
    sys.exit(common.run_main(main))

"""What the training pipelines do with a finished run: its AP, its final checkpoint folder,
and its registration as a model version (after making sure the run's model artifact holds every
file of that folder)."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Optional


def result_ap(result) -> Optional[float]:
    """The COCO AP (0..1) of a :class:`dino_scale.engine.FitResult`, or ``None`` when not
    evaluated."""
    value = (result.metrics or {}).get("AP")
    return None if value is None else float(value)


def conversion_note(metrics: dict) -> Optional[str]:
    """A warning line when the validation set lost images or boxes at conversion (the engine's
    ``val_*_at_conversion`` metrics): the AP is over the rest; a note when it holds boxes clipped
    to their image; else None."""
    images = int(metrics.get("val_images_skipped_at_conversion") or 0)
    boxes = int(metrics.get("val_boxes_dropped_at_conversion") or 0)
    clipped = int(metrics.get("val_boxes_clipped_at_conversion") or 0)
    lines = []
    if images or boxes:
        lines.append(f"warning: the validation set lost {images} image(s) and {boxes} box(es) at conversion (missing "
                     f"or bad files, malformed boxes: its manifest.json lists why); the AP is over the rest, so it is "
                     f"not the AP of the whole annotation file")
    if clipped:  # was not a word: the AP differed from the official evaluation's on the file, unexplained
        lines.append(f"note: {clipped} box(es) of the validation set cross their image's border and are scored "
                     f"clipped to it (the conversion clips them), not as the annotation file draws them")
    return "\n".join(lines) or None


def ensure_logged_model(client, run_id: str, final: Path, artifact_path: str) -> None:
    """The run's ``artifact_path`` must hold every file of ``final`` (weights, ``config.json``,
    ``lineage.json``, ``categories.json``...) at its local size before a version is registered:
    the engine logs the final folder in the background, and an MLflow outage longer than its
    close timeout leaves the upload pending or cut short (a version registered then, or its
    alias, would point at no weights, at weights without their config, or at a truncated file).
    Uploads the files that are missing or of another size; raises when some still are."""
    def differing() -> list[str]:
        logged: dict[str, Optional[int]] = {}
        folders = [artifact_path]
        while folders:
            for a in client.list_artifacts(run_id, folders.pop()):
                if a.is_dir:
                    folders.append(a.path)
                else:
                    logged[a.path] = a.file_size
        out = []
        for f in sorted(p for p in final.rglob("*") if p.is_file()):
            rel = f.relative_to(final).as_posix()
            if logged.get(f"{artifact_path}/{rel}", -1) != f.stat().st_size:
                out.append(rel)
        return out

    todo = differing()
    if not todo:
        return
    print(f"warning: run {run_id}: {artifact_path}/ lacks or holds a cut-short copy of {', '.join(todo)} (the "
          f"tracking upload did not finish); uploading them from {final} now", file=sys.stderr, flush=True)
    for rel in todo:
        parent = Path(rel).parent.as_posix()
        client.log_artifact(run_id, str(final / rel),
                            artifact_path=artifact_path if parent == "." else f"{artifact_path}/{parent}")
    still = differing()
    if still:
        raise RuntimeError(f"run {run_id}: {artifact_path}/ still lacks {', '.join(still)} after uploading "
                           f"{final}; the model was not registered (the weights are in {final})")


def result_checkpoint(result) -> str:
    """The folder with the final ``model.safetensors`` + ``config.json`` + ``lineage.json``."""
    return str(Path(result.weights_path).parent)


def register(result, name: str, alias: Optional[str], categories: list[dict],
             tags: Optional[dict] = None, stage: str = "the same command") -> str:
    """Write ``categories.json`` beside the final weights (so the checkpoint folder maps class
    heads by name too) and log it into the run's model artifact; make sure the artifact holds
    every file of the final folder at its size; register the model as a new version of ``name``
    and (when ``alias``) point the alias at it. All of it in the store that holds the run
    (``result.tracking_uri``), whatever MLflow's process-wide URIs say."""
    import json

    from dino_scale.engine.checkpoint import atomic_write_text
    from dino_scale.tracking.registry import MODEL_ARTIFACT_PATH, register_model, set_alias, store_client

    # the run's own end first (final metrics, checkpoint tag, FINISHED): buffered when the store
    # was down as the run ended, which left it RUNNING while its version was registered
    finish = getattr(result, "finish_tracking", None)
    if finish is not None and not finish(timeout_s=60):
        print(f"warning: MLflow run {result.run_id}: its final metrics and end status could not be sent "
              f"(store unreachable); it shows RUNNING", file=sys.stderr, flush=True)
    final = Path(result_checkpoint(result))
    uri = result.tracking_uri
    try:
        atomic_write_text(final / "categories.json", json.dumps(categories))  # read by --init and predict
        client = store_client(uri)
        client.log_artifact(result.run_id, str(final / "categories.json"), artifact_path=MODEL_ARTIFACT_PATH)
        ensure_logged_model(client, result.run_id, final, MODEL_ARTIFACT_PATH)
        tags = dict(tags or {})
        ap = result_ap(result)
        if ap is not None:
            tags.setdefault("AP", f"{ap:.6f}")
        version = register_model(result.run_id, name, tags=tags, tracking_uri=uri)
        if alias:
            set_alias(name, alias, version, tracking_uri=uri)
    except Exception as exc:  # training is done: say how to register it without training again
        print(f"note: training finished (MLflow run {result.run_id}, weights in {final}) but registering {name} "
              f"failed ({type(exc).__name__}). To register it without training again, run {stage} (with the "
              f"flags this run had) with --run-name {result.run_name} once {uri} answers: the run resumes its "
              f"final checkpoint, evaluates it again and registers it", file=sys.stderr, flush=True)
        raise
    return version


@contextlib.contextmanager
def alias_note(name: str, version: str, alias: str, uri: str, flags: str = "", synthetic: bool = False):
    """Around moving ``name@alias`` to the just registered ``version``: when that fails (a store
    error, a locked sqlite database), a note says the version is registered and the command that
    moves the alias, before the error goes on. The job ended without naming the version, and the
    ``--run-name`` rerun the register note advises registered a duplicate. ``synthetic``: the
    version was trained on a generated set, and the command moves the alias whatever its holder
    was trained on (:func:`move_alias` keeps one trained on real data): the note says so."""
    try:
        yield
    except Exception as exc:
        caution = (f"; this version was trained on a synthetic set and promote moves @{alias} from any holder: "
                   f"look first (dino-scale registry show {name}), and leave it on a model trained on real data"
                   if synthetic else "")
        print(f"note: {name} version {version} is registered, but moving @{alias} to it failed "
              f"({type(exc).__name__}); once {uri} answers, run: dino-scale registry promote {name} {version} "
              f"--alias {alias}{' ' + flags if flags else ''} (with this job's MLFLOW_TRACKING_URI or "
              f"--work-dir); do not run the training again{caution}", file=sys.stderr, flush=True)
        raise


def move_alias(result, name: str, alias: str, version: str, synthetic: bool) -> Optional[str]:
    """Point ``name@alias`` at ``version`` (a new pretraining), unless ``version`` was trained on
    generated data and the holder on real data: a smoke test (``--preset swinl_4scale
    --max-steps 10``) in a shared store took ``@pretrained`` from the Objects365 model, and the
    next default fine-tune started from its weights. Returns why the alias stayed (None: moved)."""
    from dino_scale.tracking.registry import get_version_by_alias, set_alias
    from pipelines.champion import _synthetic  # the champion rule's reading of the synthetic_data tag

    uri = result.tracking_uri
    holder = get_version_by_alias(name, alias, tracking_uri=uri)
    if synthetic and _synthetic(holder) is False:
        return (f"@{alias} stays on v{holder.version} (trained on real data); this version was trained on a "
                f"synthetic set (move it by hand: dino-scale registry promote {name} {version} --alias {alias})")
    set_alias(name, alias, version, tracking_uri=uri)
    return None

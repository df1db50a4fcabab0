"""How the pipelines fail: :class:`UsageError` and :func:`run_main`, the top-level handler.

Usage errors (unknown registry name, missing path, preset typo, unknown override key) print
``error: ...`` on one line and exit 2; other failures print one line and exit 1; ``--debug``
(or ``DINO_SCALE_DEBUG=1``) shows the traceback.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from typing import Callable, Optional, Sequence

from dino_scale.config import ConfigError
from dino_scale.tracking.registry import is_not_found

__all__ = ["UsageError", "run_main"]


class UsageError(Exception):
    """A user mistake with a one-line explanation (exit code 2)."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0].strip()
    return first if len(first) <= 600 else first[:597] + "..."  # a lookup's message + what the registry holds


def _is_usage_error(exc: BaseException) -> bool:
    if isinstance(exc, (UsageError, ConfigError, FileNotFoundError)):
        return True
    manifest = sys.modules.get("dino_scale.data.manifest")  # loaded wherever one was raised
    if manifest is not None and isinstance(exc, (manifest.ShardError, manifest.ManifestError)):
        return True  # a dataset folder a copy left incomplete: the input, as a missing path is
    official = sys.modules.get("dino_scale.models.official")
    if official is not None and isinstance(exc, official.CheckpointMismatch):
        return True  # a model file that does not fit the model asked for: the input
    weights = sys.modules.get("dino_scale.models.weights_file")
    if weights is not None and isinstance(exc, weights.WeightsFileError):
        return True  # a weights file cut short: the input too
    lock = sys.modules.get("dino_scale.engine.run_lock")
    if lock is not None and isinstance(exc, lock.RunInUseError):
        return True  # a run name a live job uses: the user's choice of name
    for module, name in (("dino_scale.data.json_stream", "MalformedJSONError"),
                         ("dino_scale.data.convert_passes", "ConversionError")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True  # an annotation file that cannot be converted: exit 2, as prepare-data says it
    readers = sys.modules.get("dino_scale.data.readers")
    if readers is not None and isinstance(exc, readers.DatasetInUseError):
        return True  # a dataset folder a live job reads: the user's choice of folder
    # an MLflow error implies MLflow is imported: importing it here (~2 s) only slowed the
    # usage errors raised before any MLflow work
    if "mlflow.exceptions" in sys.modules:
        from mlflow.exceptions import MlflowException

        if isinstance(exc, MlflowException) and is_not_found(exc):
            return True
    return False  # anything else (an IndexError, a KeyError...) is a failure, not the user's mistake


class Terminated(SystemExit):
    """SIGTERM (``ray job stop``, a pod stopped) as an exception before Ray starts (``ray.init``
    then installs its own handler, ``sys.exit(15)``): Python's default ended the process without
    running any cleanup, e.g. a conversion's image-pass child was left running."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated(143)


def run_main(main: Callable[[Optional[Sequence[str]]], int | None],
             argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)``; turn failures into one ``error: ...`` line and an exit code
    (2: usage, 1: other, 130: interrupted, 143: terminated). ``--debug`` in argv (or
    ``DINO_SCALE_DEBUG=1``) prints the traceback first; the exit code is the same.
    SIGTERM raises :class:`Terminated` while ``main`` runs (main thread, where no handler was
    set), so cleanup code runs (after ``ray.init``, Ray's handler exits with 15: the same
    message and 143)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("DINO_SCALE_DEBUG") == "1"
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
            signal.SIG_DFL, None):
        previous = signal.signal(signal.SIGTERM, _on_sigterm) or signal.SIG_DFL
    try:
        return int(main(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # argparse; SIGTERM: ours before Ray starts, Ray's after (sys.exit(15))
        if isinstance(exc, Terminated) or exc.code == signal.SIGTERM:
            print("error: terminated (SIGTERM)", file=sys.stderr)
            return 143
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except BaseException as exc:  # noqa: BLE001 - this is the top-level handler
        if debug:  # the traceback, and the exit code all the same (a RayJob's env sets it: 2 stays a usage error)
            traceback.print_exc()
        usage = _is_usage_error(exc)
        prefix = "" if usage else f"{type(exc).__name__}: "
        hint = "" if usage or debug else " (run with --debug for the traceback)"
        print(f"error: {prefix}{_one_line(exc)}{hint}", file=sys.stderr, flush=True)
        return 2 if usage else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

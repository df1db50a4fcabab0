"""pipelines._errors: the top-level handler's exit codes and one-line errors, --debug, SIGTERM
before and after Ray's start, and which errors are the user's."""
from __future__ import annotations

from dino_scale.config import ConfigError
from pipelines import _common as common


def test_pipelines_errors_run_main_exit_codes(capsys, monkeypatch):
    def usage(argv):
        raise ConfigError("unknown config key 'x.y'")

    def crash(argv):
        raise RuntimeError("worker died\nlong details")

    assert common.run_main(usage, []) == 2
    assert capsys.readouterr().err == "error: unknown config key 'x.y'\n"
    assert common.run_main(crash, []) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: RuntimeError: worker died (run with --debug") and err.count("\n") == 1
    from dino_scale.models.official import CheckpointMismatch

    def misfit(argv):  # a model file that does not fit the model asked for: was exit 1 with the class name
        raise CheckpointMismatch("aliased (shared-head) keys hold different tensors: class_embed.0 / class_embed.1")

    assert common.run_main(misfit, []) == 2
    assert capsys.readouterr().err.startswith("error: aliased (shared-head) keys")
    # --debug: the traceback, then the same line and exit code (was re-raised: exit 1 for a usage error too)
    assert common.run_main(crash, ["--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "RuntimeError: worker died\nlong details\n" in err
    assert err.endswith("\nerror: RuntimeError: worker died\n")
    monkeypatch.setenv("DINO_SCALE_DEBUG", "1")
    assert common.run_main(usage, []) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: unknown config key 'x.y'\n")
    assert common.run_main(lambda argv: 0, []) == 0


def test_pipelines_errors_sigterm_runs_the_cleanup(capsys):
    """SIGTERM (``ray job stop``, a pod stopped) before Ray started ended the process at once: no
    cleanup ran (a conversion's child process was left running). It is an exception while a
    pipeline runs (exit 143, as after ``ray.init``, whose handler exits with 15), and the default
    handler is back afterwards."""
    import os
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    cleaned: list[str] = []

    def main(argv):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises here
        except BaseException as exc:  # what fit does: end the MLflow run as KILLED
            cleaned.append(type(exc).__name__)
            raise
        return 0

    assert common.run_main(main, []) == 143
    assert cleaned == ["Terminated"] and "terminated (SIGTERM)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    def ray_started(argv):  # ray.init's own handler: sys.exit(15)
        raise SystemExit(signal.SIGTERM)

    assert common.run_main(ray_started, []) == 143 and "terminated (SIGTERM)" in capsys.readouterr().err


def test_pipelines_errors_usage_errors_before_any_work_import_no_mlflow(tmp_path):
    """A preset typo is reported without importing MLflow (~2 s): the error handler imported it
    to classify every error, and pretrain's default --alias was validated with it."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from pipelines import pretrain_o365 as p; from pipelines._common import run_main; "
            f"rc = run_main(p.main, ['--preset', 'tinny', '--work-dir', {str(tmp_path)!r}]); "
            "print(rc, 'mlflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr[-2000:]
    assert "unknown preset 'tinny'" in proc.stderr


def test_pipelines_errors_internal_errors_are_not_usage_errors(capsys):
    """An IndexError inside a pipeline is a failure (exit 1, with the --debug hint), not a
    user mistake: `evaluate` without --data crashed as `error: list index out of range`, exit 2."""
    def crash(argv):
        return [][0]

    assert common.run_main(crash, []) == 1
    assert capsys.readouterr().err.startswith("error: IndexError: list index out of range (run with --debug")

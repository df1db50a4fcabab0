"""Shared test fixtures.

``ray_lock``: every test that starts Ray (``ray.init``, ``ray start``, a Cluster) holds
this host-wide file lock, because ``ray stop`` and the fake autoscaler end every Ray
process on the host. `make test` runs the modules that start Ray (``RAY_MODULES``) on one
pytest-xdist worker and the rest on another; the lock also covers several pytest processes
sharing a machine.
"""
from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "reference"  # copy of ../shared/reference (official key lists, golden outputs)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train settings for tests only (fit() copies RAY_TRAIN_* into its controller; the Ray
# processes a test starts inherit them). The controller looks at its workers (reports,
# checkpoints, the end of the train function) every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by
# default: a run waited up to that long at each report it blocked on and at its end. Every
# worker group also starts a PreemptionWatcher actor (one more process importing Ray Train) that
# watches for nodes being drained, which no test does. A 4-step, 2-worker fit on the 2-core box
# (second and third of one Ray session): 30-32 s with Ray's defaults, 21-28 s with the shorter
# interval, 19 s with both.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# OpenMP threads that wait for work sleep instead of spinning (GNU libgomp: read when torch loads
# it, so set before any import of torch here; Ray's processes and subprocesses inherit it). `make
# test` runs two workers on 2 cores beside Ray's processes: a spinning thread of one takes a core
# from the others. The whole suite through .ci/run on one 2-core box: 814.7, 870.5 and 929.2 s of
# pytest with PASSIVE, 928.7, 1017.3 and 1085.1 s without; the Ray tests faster, the in-process
# model tests slower (alone, a 2-thread process trains 6.1-6.3 s with the default, 8.2-8.3 s with
# PASSIVE; benchmarks/README.md, "CI suite time", fifty-second session).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session", autouse=True)
def _mlflow_store_template(tmp_path_factory):
    """Where tests/mlflow_store.py builds the session's empty store (on first use only)."""
    import mlflow_store

    mlflow_store.TEMPLATE_DIR = tmp_path_factory.getbasetemp() / "mlflow-template"
    yield


# `make test` runs the suite on two pytest-xdist workers. The tests of these modules start Ray
# (ray.init, a Cluster, `ray start`, fit/evaluate_weights, or a pipeline in a subprocess that
# joins or starts Ray): they are one unit of work, run by one worker in file order, while the
# other worker runs the rest, a module at a time (the first worker takes the modules left once its
# group is done). Two workers each starting Ray would take turns at the lock below anyway, and
# `ray stop` ends every Ray process on the host. Modules whose tests stop where Ray would start
# (``connect_ray`` / ``ensure_ray`` replaced) are not in it: a process sampler saw no Ray process
# start during any of their tests (fifty-third session), and :func:`_ray_only_in_its_group`
# fails a test outside the group that leaves Ray running.
RAY_MODULES = frozenset(f"tests/{name}.py" for name in (
    "cluster/test_cluster_autoscale", "cluster/test_cluster_elastic", "data/test_data_ray",
    "engine/test_engine_interrupt", "engine/test_engine_ray", "engine/test_engine_ray_zero3",
    "engine/test_engine_rerun", "pipelines/test_pipelines_joined_cluster", "pipelines/test_pipelines_ray_job",
))


def _in_ray_group(path: Path) -> bool:
    """Whether the test file at ``path`` is one of :data:`RAY_MODULES` (wherever pytest's root is)."""
    return path.resolve().relative_to(ROOT).as_posix() in RAY_MODULES


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scheduling by scope with two kinds of scope: every test of
    :data:`RAY_MODULES` in one, any other test in its module's. Scopes go out largest (most
    tests) first, so the Ray group starts at once. (xdist's own ``--dist loadgroup`` reads
    ``xdist_group`` marks into a node id attribute that pytest 9 no longer uses: its groups
    never formed.)"""
    if config.getvalue("dist") in ("no", "each"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    root = config.rootpath

    class RayGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "ray" if _in_ray_group(root / module) else module

    return RayGroupScheduling(config, log)


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def _ray_only_in_its_group(request):
    """Fails a test outside :data:`RAY_MODULES` that starts Ray in this process and leaves it
    running: under xdist it would run beside the group's tests and their `ray stop`. (Ray that a
    group test left running, as ``fit`` does, is not this test's.)"""
    before = _ray_running()
    yield
    if not before and _ray_running() and not _in_ray_group(request.node.path):
        sys.modules["ray"].shutdown()
        pytest.fail(f"{request.node.nodeid} started Ray: add its module to RAY_MODULES in tests/conftest.py")


@pytest.fixture
def ray_lock(request):
    if not _in_ray_group(request.node.path):
        pytest.fail(f"{request.node.nodeid} takes the Ray lock: add its module to RAY_MODULES in tests/conftest.py")
    with open("/tmp/dino_scale_ray.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def _mlflow_store_state() -> dict[str, object]:
    """Where MLflow points this process: the two URI variables and MLflow's globals (which
    ``mlflow.set_tracking_uri`` / ``set_registry_uri`` set, and which also export the
    variables; ``set_registry_uri(None)`` leaves ``MLFLOW_REGISTRY_URI`` set)."""
    state: dict[str, object] = {k: os.environ.get(k) for k in _MLFLOW_ENV}
    tracking = sys.modules.get("mlflow.tracking._tracking_service.utils")
    registry = sys.modules.get("mlflow.tracking._model_registry.utils")
    state["mlflow._tracking_uri"] = getattr(tracking, "_tracking_uri", None)
    state["mlflow._registry_uri"] = getattr(registry, "_registry_uri", None)
    return state


def _restore_mlflow_store(state: dict[str, object]) -> None:
    """Put back a :func:`_mlflow_store_state`: MLflow's setters first (they also reset what
    depends on the URI, e.g. the tracer), then the variables (the setters export theirs)."""
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(state["mlflow._tracking_uri"])
        mlflow.set_registry_uri(state["mlflow._registry_uri"])
    for key in _MLFLOW_ENV:
        if state[key] is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = str(state[key])


@pytest.fixture(autouse=True)
def _mlflow_store_not_leaked():
    """A test that leaves MLflow pointed at its store fails here, and the state is put back:
    otherwise a later test's bare ``MlflowClient()`` would use that store (CI once registered
    into another test's store). Tests that run a pipeline in-process use ``mlflow_store_restored``."""
    before = _mlflow_store_state()
    yield
    after = _mlflow_store_state()
    if after != before:
        _restore_mlflow_store(before)
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        pytest.fail(f"the test left MLflow pointed elsewhere (before, after): {changed}", pytrace=False)


@pytest.fixture
def mlflow_store_restored():
    """For a test that runs a pipeline in-process (``setup_tracking`` points MLflow's globals
    and both URI variables at the pipeline's store): afterwards MLflow points where it did."""
    before = _mlflow_store_state()
    yield
    _restore_mlflow_store(before)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """tests/reference: official key lists, golden.py and golden outputs."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference material not found at {REFERENCE}")
    return REFERENCE


@pytest.fixture(scope="session")
def golden(reference_dir):
    sys.path.insert(0, str(reference_dir))
    import golden as golden_module  # noqa: E402

    return golden_module


# `make test` sets DINO_SCALE_TEST_HARD_EXIT=1. Once the session has finished (every result and
# the summary written), the process ends with pytest's own exit status and skips the
# interpreter's finalization. A clean-clone run of the whole suite (341 passed) crashed there
# once with a segmentation fault (make: Error 139), after the summary, in native teardown; the
# cause was not found, and the test modules run alone exit cleanly. A failing test still fails
# the run: the status is pytest's.
_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if os.environ.get("DINO_SCALE_TEST_HARD_EXIT") == "1" and _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[-1])

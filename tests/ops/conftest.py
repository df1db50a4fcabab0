"""The csrc/ compile of ``test_ops_msda_build.py`` starts in the background as soon as the
session has collected it, and its test waits for it.

nvcc works on one translation unit at a time for ~1.5 min. In one pytest process, the Ray tests
that run before it (tests/cluster, tests/data, tests/engine) leave most of this 2-core machine
idle waiting on process start-up and health checks. The build is the same call as before
(``_build.build_extension`` in a fresh process, ``force=True``, sm_90, into a temporary cache
directory); only its start moved. Skipped where there is no toolkit, like the test itself.

Under pytest-xdist (`make test`) every worker collects every test, and only one runs this test:
there the build starts when the test asks for it, while the other worker runs the Ray tests.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

BUILD_TEST = "test_extension_compiles_for_sm90_and_registers_ops"
ARCH = "9.0"

_BUILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from dino_scale.ops import _build
    t0 = time.perf_counter()
    lib = _build.build_extension(build_dir=Path(sys.argv[1]), arch_list=sys.argv[2], force=True)
    print("REPORT " + json.dumps({"lib": str(lib), "seconds": time.perf_counter() - t0}))
""")


class BackgroundBuild:
    """One ``build_extension`` process; ``wait()`` returns its REPORT (lib path, seconds)."""

    def __init__(self):
        from dino_scale.ops import _build

        self.root = Path(tempfile.mkdtemp(prefix="dino_msda_ci_build_"))
        # the runtime loader looks here when DINO_SCALE_EXT_DIR is the root
        self.env = dict(os.environ, MAX_JOBS="1", TORCH_CUDA_ARCH_LIST=ARCH, DINO_SCALE_EXT_DIR=str(self.root),
                        DINO_SCALE_MSDA_NO_JIT="1")
        self.build_dir = _build.build_dir_for(ARCH, root=self.root)
        self.log = self.root / "build.log"
        self.started = time.monotonic()
        with open(self.log, "w") as out:  # a file, not a pipe: nobody reads it until the end
            # its own process group: close() ends ninja and nvcc with it, not only the Python parent
            self.proc = subprocess.Popen([sys.executable, "-c", _BUILD, str(self.build_dir), ARCH], env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def wait(self, timeout: float) -> dict:
        rc = self.proc.wait(timeout=timeout)
        text = self.log.read_text()
        assert rc == 0, f"csrc/ build failed (exit {rc}):\n{text[-8000:]}"
        line = next(l for l in text.splitlines() if l.startswith("REPORT "))
        report = json.loads(line[len("REPORT "):])
        report["wall_since_start"] = time.monotonic() - self.started
        return report

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


_builds: list[BackgroundBuild] = []


def pytest_collection_finish(session):
    if os.environ.get("PYTEST_XDIST_WORKER") or not any(item.name == BUILD_TEST for item in session.items):
        return
    from dino_scale.ops import _build

    if _build.find_cuda_home() is not None:
        _builds.append(BackgroundBuild())


def pytest_sessionfinish(session, exitstatus):
    while _builds:
        _builds.pop().close()


@pytest.fixture
def msda_build() -> BackgroundBuild:
    """The session's background build (started at collection); one afresh when there is none
    (the test collected some other way, or under pytest-xdist)."""
    if not _builds:
        _builds.append(BackgroundBuild())
    return _builds[0]

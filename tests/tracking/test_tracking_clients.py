"""Jobs that open one new sqlite store at once: one migrates its schema, the others wait."""
from __future__ import annotations

import subprocess
import sys

_OPEN = """
import sys, time
from pathlib import Path
from dino_scale.tracking import ResilientLogger, store_client
go = Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
try:
    logger = ResilientLogger(sys.argv[1]) if sys.argv[3] == "logger" else None
    client = logger.client if logger else store_client(sys.argv[1])
    client.search_experiments()
    client.search_registered_models()
    print("ok")
except Exception as exc:
    print("FAILED", type(exc).__name__, str(exc)[:200])
"""


def test_three_jobs_opening_a_new_sqlite_store_at_once_all_get_it(tmp_path):
    """Was: 2 or 3 of 3 processes started together on a new store failed ('duplicate column
    name: step', 'table _alembic_tmp_model_versions already exists'): MLflow migrated the new
    file in each of them at once. The processes import first and then open the store together."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN, uri, str(go), kind], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for kind in ("logger", "client", "logger")]
    assert all(p.stdout.readline().strip() == "ready" for p in procs)  # imported: now all at once
    go.touch()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(out.strip().splitlines()[-1] == "ok" for out in outs), outs

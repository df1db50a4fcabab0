"""Empty MLflow sqlite stores for tests, without the schema migrations each time.

MLflow builds a new sqlite store by running its whole migration history on first use: 2.5 s
of CPU a store on the 2-core CI box (15 in-process stores took 38.3 s in the CLI, tracking
and pipeline modules alone), paid again by every test whose run tracks into a fresh work
folder. :func:`seeded_store` copies one empty store, built by MLflow once per session, to
where a test's store will live, before anything opens it; MLflow then finds the schema
current and opens it at once. The copy is MLflow's own store (this MLflow, its migrations),
so nothing the tests check of dino_scale's tracking changes; MLflow's creation path still
runs for the template and for every store a test does not seed.

``tests/conftest.py`` points :data:`TEMPLATE_DIR` at a session folder; outside pytest the
template goes to a temporary folder. The copies share the template's Default experiment (id 0),
whose artifact folder is ``<TEMPLATE_DIR>/mlruns/0``: dino_scale never logs there (its runs go
to named experiments with artifacts next to the store), and a test that does should use a
named experiment too.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Optional

TEMPLATE_DIR: Optional[Path] = None  # set by tests/conftest.py
_lock = threading.Lock()
_template: Optional[Path] = None


def _template_db() -> Path:
    """The session's empty, fully migrated store (built on first use)."""
    global _template
    with _lock:
        if _template is None:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            folder = TEMPLATE_DIR or Path(tempfile.mkdtemp(prefix="mlflow-template-"))
            folder.mkdir(parents=True, exist_ok=True)
            db = folder / "mlflow.db"
            # the migrations create the tracking and the registry tables; the Default
            # experiment's artifact folder stays inside the template's own folder
            store = SqlAlchemyStore(f"sqlite:///{db}", (folder / "mlruns").as_uri())
            store.engine.dispose()
            _template = db
        return _template


def seeded_store(where: str | Path) -> str:
    """Put an empty store at ``where``: a folder (the store is ``<where>/mlflow.db``, where
    dino_scale keeps a work folder's store) or a ``.db`` path. A file already there is left
    as it is. Returns the store's sqlite URI (absolute)."""
    path = Path(where).expanduser().resolve()
    db = path if path.suffix == ".db" else path / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    if not db.exists():
        shutil.copyfile(_template_db(), db)
    return f"sqlite:///{db}"

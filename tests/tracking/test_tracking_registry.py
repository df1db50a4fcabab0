"""Registry helpers on a sqlite store: register, alias, resolve every URI form, load."""
from __future__ import annotations

import json
import tempfile

import pytest
import torch

from mlflow_store import seeded_store
from dino_scale.config import preset, to_dict
from dino_scale.engine.checkpoint import save_weights
from dino_scale.models import build_dino
from dino_scale.tracking import (
    ResilientLogger, get_version_by_alias, load_model_from_uri, register_model, resolve_model_uri, set_alias,
)


@pytest.fixture
def logged_model(tmp_path):
    uri = seeded_store(tmp_path)
    cfg = preset("tiny")
    torch.manual_seed(3)
    model, _, _ = build_dino(cfg.model)
    # trained from ImageNet weights at a path of its training cluster, absent here: loading the
    # model must not read them (its weights replace the backbone's; was FileNotFoundError)
    cfg.model.backbone_weights = str(tmp_path / "cluster-only" / "resnet18.pth")
    folder = tmp_path / "final"
    save_weights(folder, model.state_dict(), config=to_dict(cfg))
    (folder / "lineage.json").write_text(json.dumps({"init_weights": "models:/dino-tiny-o365@pretrained"}))
    (folder / "categories.json").write_text(json.dumps([{"id": 1, "name": "person"}]))
    runs = []
    for i in range(2):
        logger = ResilientLogger(uri)
        run_id = logger.start_run("registry-test", f"train-{i}")
        logger.log_artifacts(folder, "model")
        logger.end_run()
        assert logger.close(timeout_s=5)
        runs.append(run_id)
    return uri, cfg, model, folder, runs


def test_register_alias_resolve_load(logged_model, tmp_path, monkeypatch):
    uri, cfg, model, folder, (run1, run2) = logged_model
    v1 = register_model(run1, "dino-tiny-coco", "model", tags={"AP": 0.1}, tracking_uri=uri)
    v2 = register_model(run2, "dino-tiny-coco", "model", tags={"AP": 0.2}, tracking_uri=uri)
    assert (v1, v2) == ("1", "2")
    assert get_version_by_alias("dino-tiny-coco", "champion", tracking_uri=uri) is None
    assert get_version_by_alias("no-such-model", "champion", tracking_uri=uri) is None
    set_alias("dino-tiny-coco", "champion", v1, tracking_uri=uri)
    set_alias("dino-tiny-coco", "champion", v2, tracking_uri=uri)  # moves
    mv = get_version_by_alias("dino-tiny-coco", "champion", tracking_uri=uri)
    assert str(mv.version) == "2" and mv.run_id == run2 and mv.tags["AP"] == "0.2"

    by_alias = resolve_model_uri("models:/dino-tiny-coco@champion", dst_dir=tmp_path / "dl1", tracking_uri=uri)
    assert by_alias.weights_path.is_file() and by_alias.config.model.hidden_dim == cfg.model.hidden_dim
    assert by_alias.lineage["version"] == "2" and by_alias.lineage["run_id"] == run2
    assert "champion" in by_alias.lineage["aliases"]
    assert by_alias.lineage["init_weights"] == "models:/dino-tiny-o365@pretrained"
    by_version = resolve_model_uri("models:/dino-tiny-coco/1", dst_dir=tmp_path / "dl2", tracking_uri=uri)
    assert by_version.lineage["run_id"] == run1
    by_run = resolve_model_uri(f"runs:/{run1}/model", dst_dir=tmp_path / "dl3", tracking_uri=uri)
    assert by_run.lineage["run_id"] == run1 and by_run.weights_path.name == "model.safetensors"
    local_dir = resolve_model_uri(str(folder))
    local_file = resolve_model_uri(str(folder / "model.safetensors"))
    assert local_dir.config is not None and local_file.weights_path == folder / "model.safetensors"

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    loaded, loaded_cfg = load_model_from_uri("models:/dino-tiny-coco@champion", tracking_uri=uri)
    assert list(scratch.iterdir()) == []  # the downloaded copy is not left behind
    assert loaded_cfg.name == "tiny" and not loaded.training
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


def test_an_explicit_store_is_also_the_registry(logged_model, tmp_path, monkeypatch):
    """``tracking_uri=`` names the registry too, whatever registry this process was pointed at
    before (a pipeline's ``setup_tracking`` sets the global one): the version goes next to its
    run, and lookups in that store find it. Was: registered in, and looked up in, the other store."""
    import mlflow

    uri, _cfg, _model, _folder, (run1, _run2) = logged_model
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", other)  # removed again after the test
    try:
        mlflow.set_registry_uri(other)
        assert register_model(run1, "dino-tiny-coco", "model", tracking_uri=uri) == "1"
        set_alias("dino-tiny-coco", "champion", "1", tracking_uri=uri)
        assert str(get_version_by_alias("dino-tiny-coco", "champion", tracking_uri=uri).version) == "1"
        resolved = resolve_model_uri("models:/dino-tiny-coco/1", dst_dir=tmp_path / "dl", tracking_uri=uri)
        assert resolved.lineage["run_id"] == run1 and resolved.weights_path.is_file()
        assert mlflow.MlflowClient(tracking_uri=other, registry_uri=other).search_registered_models() == []
    finally:
        mlflow.set_registry_uri(None)


def test_registry_uri_latest_and_stages(logged_model, tmp_path):
    """``models:/<name>/latest`` is the highest version number (MLflow's own URI form); a model
    without versions is named in the error. A stage (``Production``: deprecated in MLflow 3, never
    set here) is refused with the advice to use an alias. Was: MLflow's "Parameter 'version' must
    be an integer, got 'latest'" for both, and a ValueError from unpacking for ``models:/<name>``."""
    from mlflow.exceptions import MlflowException

    from dino_scale.tracking import store_client
    from dino_scale.tracking.registry import is_not_found, parse_model_uri

    uri, _cfg, _model, _folder, (run1, run2) = logged_model
    for run_id in (run1, run2, run1):
        register_model(run_id, "dino-tiny-coco", "model", tracking_uri=uri)
    set_alias("dino-tiny-coco", "champion", "2", tracking_uri=uri)
    latest = resolve_model_uri("models:/dino-tiny-coco/latest", dst_dir=tmp_path / "dl", tracking_uri=uri)
    assert latest.lineage["version"] == "3" and latest.lineage["run_id"] == run1
    assert latest.weights_path.is_file()
    # a trailing slash (shell completion of a path-like URI) names the same version, not model "name@alias"
    assert parse_model_uri("models:/dino-tiny-coco@champion/") == ("dino-tiny-coco", "champion", None)
    assert parse_model_uri("models:/dino-tiny-coco/2/") == ("dino-tiny-coco", None, "2")

    store_client(uri).create_registered_model("dino-tiny-o365")
    cases = {
        "models:/dino-tiny-o365/latest": ["Registered model 'dino-tiny-o365' has no versions"],
        "models:/dino-tiny-coco/Production": ["stages", "use an alias", "models:/dino-tiny-coco@<alias>"],
        "models:/dino-tiny-coco/Staging": ["stages", "use an alias"],
        "models:/dino-tiny-coco/v2": ["'v2' is not a version number", "models:/dino-tiny-coco/latest"],
        "models:/dino-tiny-coco/²": ["'²' is not a version number"],  # str.isdigit's digit, no number
        "models:/dino-tiny-coco": ["bad model URI models:/dino-tiny-coco: no version"],
        "models:/no-such-model/latest": ["no-such-model"],
    }
    for bad, needles in cases.items():
        with pytest.raises(MlflowException) as err:
            resolve_model_uri(bad, dst_dir=tmp_path / "dl2", tracking_uri=uri)
        msg = str(err.value)
        assert is_not_found(err.value) and all(n in msg for n in needles), (bad, msg)


def test_a_failed_download_into_a_folder_of_its_own_leaves_nothing(logged_model, tmp_path, monkeypatch):
    """Without ``dst_dir`` the download goes to a temporary folder the caller learns of only from
    the result: when the lookup or the download failed, that folder stayed in /tmp for good."""
    uri = logged_model[0]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    from mlflow.exceptions import MlflowException

    for bad in ("models:/no-such-model/1", "runs:/0123456789abcdef0123456789abcdef/model"):
        with pytest.raises(MlflowException):
            resolve_model_uri(bad, tracking_uri=uri)
        assert list(scratch.iterdir()) == [], bad


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        resolve_model_uri(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        resolve_model_uri(str(tmp_path / "empty"))


def test_resolve_names_a_config_json_of_another_version(tmp_path):
    import json

    from dino_scale.config import ConfigError, preset, to_dict

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    data = to_dict(preset("tiny"))
    data["model"]["removed_key"] = 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="config.json: unknown config key 'model.removed_key'.*another version"):
        resolve_model_uri(str(tmp_path / "m"))


def test_a_version_registered_from_another_artifact_resolves_to_that_artifact(tmp_path):
    """A version registered by hand or by another tool with a source other than the run's
    ``model`` folder (``runs:/<id>/best``, a plain path) resolved to the run's ``model`` folder:
    another artifact than the registered one, without a word."""
    from mlflow.tracking import MlflowClient

    from dino_scale.engine.checkpoint import WEIGHTS_NAME

    uri = seeded_store(tmp_path)
    for sub in ("best", "model", "elsewhere"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / WEIGHTS_NAME).write_text(sub)
    logger = ResilientLogger(uri)
    run_id = logger.start_run("registry-sources", "two-artifacts")
    logger.log_artifacts(tmp_path / "best", "best")
    logger.log_artifacts(tmp_path / "model", "model")
    logger.end_run()
    assert logger.close(timeout_s=5)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("dino-@sources")  # MLflow takes "@" in a name
    client.create_model_version("dino-@sources", source=f"runs:/{run_id}/best", run_id=run_id)
    client.create_model_version("dino-@sources", source=str(tmp_path / "elsewhere"), run_id=run_id)
    assert register_model(run_id, "dino-@sources", tracking_uri=uri) == "3"
    set_alias("dino-@sources", "champion", "1", tracking_uri=uri)
    for model_uri, want in (("models:/dino-@sources/1", "best"), ("models:/dino-@sources@champion", "best"),
                            ("models:/dino-@sources/2", "elsewhere"), ("models:/dino-@sources/latest", "model")):
        resolved = resolve_model_uri(model_uri, dst_dir=tmp_path / "dl" / want, tracking_uri=uri)
        assert resolved.weights_path.read_text() == want, model_uri


def test_a_run_uri_naming_the_weights_file_brings_its_config(logged_model, tmp_path):
    """``runs:/<id>/model/model.safetensors`` downloaded the file alone: the model's config.json
    beside it in the run was not read ("carries no config"). Its categories.json was still left
    behind (fine-tuning then initialized the class heads fresh instead of mapping them by name, and
    predict printed numbers for labels), and a registered version of the file brought nothing
    beside it. A damaged config.json was a bare JSONDecodeError naming no file."""
    from dino_scale.config import ConfigError

    uri, cfg, _model, folder, runs = logged_model
    file_version = register_model(runs[0], "dino-file-version", "model/model.safetensors", tracking_uri=uri)
    file_uris = (f"runs:/{runs[0]}/model/model.safetensors", f"models:/dino-file-version/{file_version}")
    for n, model_uri in enumerate(file_uris):
        resolved = resolve_model_uri(model_uri, dst_dir=tmp_path / f"dl{n}", tracking_uri=uri)
        assert resolved.weights_path.name == "model.safetensors" and resolved.config is not None, model_uri
        assert resolved.config.model.num_classes == cfg.model.num_classes
        assert resolved.lineage["init_weights"] == "models:/dino-tiny-o365@pretrained"
        categories = resolved.weights_path.with_name("categories.json")
        assert json.loads(categories.read_text()) == [{"id": 1, "name": "person"}], model_uri
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json is not a readable config .*damaged"):
        resolve_model_uri(str(folder))


_MAKE_ALIASES = """
import sys, time
from pathlib import Path
from dino_scale.tracking import set_alias
uri, me, other, version, n = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
failed = []
for i in range(n):
    Path(f"{me}.{i}").touch()
    while not Path(f"{other}.{i}").exists():  # both make alias a<i> at the same moment
        time.sleep(0.002)
    try:
        set_alias("dino-tiny-coco", f"a{i}", version, tracking_uri=uri)
    except Exception as exc:
        failed.append(f"a{i}: {type(exc).__name__}: {str(exc)[:120]}")
print(len(failed), failed[:2])
"""


def test_two_processes_making_one_new_alias_at_once_both_succeed(tmp_path):
    """MLflow's sqlite store reads whether an alias exists, then inserts it: two processes making
    the same new alias (two first fine-tunes promoting to an empty @champion) failed the loser
    with 'UNIQUE constraint failed' after its version was registered (11 of 80 tries). Here two
    processes make 30 new aliases in lockstep: none may fail (a regression fails ~99 % of runs)."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    uri = seeded_store(tmp_path)
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("dino-tiny-coco")
    for _ in range(2):
        client.create_model_version("dino-tiny-coco", source=str(tmp_path / "w"))
    a, b = tmp_path / "a", tmp_path / "b"
    procs = [subprocess.Popen([sys.executable, "-c", _MAKE_ALIASES, uri, str(me), str(other), version, "30"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me, other, version in ((a, b, "1"), (b, a, "2"))]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [out.split(" ", 1)[0] for out, _ in outs] == ["0", "0"], outs
    aliases = client.get_registered_model("dino-tiny-coco").aliases
    assert sorted(aliases) == sorted(f"a{i}" for i in range(30))


# the duplicate-key errors of the SQL databases MLflow's store runs on, as their drivers word them
_DUPLICATE_KEY_ERRORS = {
    "sqlite": "(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases.name, "
              "registered_model_aliases.alias",
    "postgresql": '(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint '
                  '"registered_model_alias_pk"',
    "mysql": "(pymysql.err.IntegrityError) (1062, \"Duplicate entry 'dino-tiny-coco-champion' for key "
             "'registered_model_aliases.PRIMARY'\")",
    "mssql": "(pyodbc.IntegrityError) Violation of PRIMARY KEY constraint 'registered_model_alias_pk'. "
             "Cannot insert duplicate key in object 'dbo.registered_model_aliases'.",
}


@pytest.mark.parametrize("database", sorted(_DUPLICATE_KEY_ERRORS))
def test_an_alias_race_lost_on_any_sql_database_is_set_again(tmp_path, monkeypatch, database):
    """The loser of two processes making one new alias is set again whatever database the store
    runs on: only SQLite's wording ('UNIQUE constraint failed') was recognised, so on PostgreSQL or
    MySQL the second first fine-tune failed after its version was registered. The race is injected
    (the first insert answers with that database's duplicate-key error); the store is real."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from dino_scale.tracking.registry import is_unique_violation

    uri = seeded_store(tmp_path)
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("dino-tiny-coco")
    client.create_model_version("dino-tiny-coco", source=str(tmp_path / "w"))
    real = MlflowClient.set_registered_model_alias
    calls = []

    def lose_the_first_race(self, name, alias, version):
        calls.append(version)
        if len(calls) == 1:
            raise MlflowException(_DUPLICATE_KEY_ERRORS[database])
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", lose_the_first_race)
    set_alias("dino-tiny-coco", "champion", "1", tracking_uri=uri)
    assert calls == ["1", "1"]
    assert str(client.get_model_version_by_alias("dino-tiny-coco", "champion").version) == "1"
    assert is_unique_violation(MlflowException(_DUPLICATE_KEY_ERRORS[database]))


def test_other_registry_errors_are_not_taken_for_an_alias_race():
    from mlflow.exceptions import MlflowException

    from dino_scale.tracking.registry import is_unique_violation

    for text in ("Registered Model with name=dino-tiny-coco not found",
                 "(sqlite3.OperationalError) database is locked", "Model Version (name=x, version=9) not found"):
        assert not is_unique_violation(MlflowException(text)), text


def test_a_store_copied_off_its_machine_still_loads_its_models(logged_model, tmp_path):
    """The head's work folder copied down (``ray rsync-down``, as cluster/README.md says) keeps a
    store whose runs record absolute ``file://`` artifact roots of the head: every model version
    failed to download ("please ensure that the path is correct"). A root that is gone here is
    read from the copy's own ``mlartifacts`` folder."""
    import shutil

    uri, cfg, model, folder, (run1, _) = logged_model
    assert register_model(run1, "dino-tiny-coco", "model", tracking_uri=uri) == "1"
    here = tmp_path.parent / f"{tmp_path.name}-copied"
    shutil.copytree(tmp_path, here)
    shutil.rmtree(tmp_path / "mlartifacts")  # the head's folder: not on this machine
    copied = f"sqlite:///{here / 'mlflow.db'}"
    for model_uri in ("models:/dino-tiny-coco/1", f"runs:/{run1}/model", f"runs:/{run1}/model/model.safetensors"):
        loaded, loaded_cfg = load_model_from_uri(model_uri, tracking_uri=copied)
        assert loaded_cfg.model.num_queries == cfg.model.num_queries, model_uri
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items()), model_uri
    shutil.rmtree(here)


def test_a_download_into_a_used_folder_takes_nothing_of_the_earlier_one(logged_model, tmp_path):
    """Resolving one version, then another into the same folder, merged the second into the
    first's files: version 2 (no lineage.json) came back with version 1's lineage. Each download
    goes to a fresh folder in it; a damaged lineage.json is an error naming the file."""
    from pathlib import Path
    from urllib.parse import urlparse

    from mlflow.tracking import MlflowClient

    from dino_scale.config import ConfigError

    uri, cfg, model, folder, (run1, run2) = logged_model
    client = MlflowClient(uri)
    register_model(run1, "dino-tiny-coco", "model", tracking_uri=uri)
    (Path(urlparse(client.get_run(run2).info.artifact_uri).path) / "model" / "lineage.json").unlink()
    register_model(run2, "dino-tiny-coco", "model", tracking_uri=uri)
    dst = tmp_path / "dl"
    first = resolve_model_uri("models:/dino-tiny-coco/1", dst, tracking_uri=uri)
    second = resolve_model_uri("models:/dino-tiny-coco/2", dst, tracking_uri=uri)
    assert "init_weights" in first.lineage and "init_weights" not in second.lineage
    assert first.weights_path.parent != second.weights_path.parent
    (first.weights_path.parent / "lineage.json").write_text("{cut")
    with pytest.raises(ConfigError, match=r"lineage.json is not a readable lineage file"):
        resolve_model_uri(str(first.weights_path.parent), tracking_uri=uri)

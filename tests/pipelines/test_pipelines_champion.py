"""Alias `champion` moves only when a new version's AP beats the current champion's
(real sqlite MLflow registry)."""
from __future__ import annotations

import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow_store import seeded_store
from pipelines.champion import promote_if_better  # noqa: E402
from pipelines.registry import format_state, registry_state  # noqa: E402


@pytest.fixture(scope="module")
def _store(tmp_path_factory):
    """One sqlite store for the module."""
    return seeded_store(tmp_path_factory.mktemp("registry"))


@pytest.fixture
def client(_store, monkeypatch):
    """A client on the shared store, with a fresh ``dino-tiny-coco`` model."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _store)
    c = mlflow.MlflowClient(tracking_uri=_store, registry_uri=_store)
    for m in c.search_registered_models():
        c.delete_registered_model(m.name)
    c.create_registered_model("dino-tiny-coco")
    return c


def _new_version(client, tmp_path) -> str:
    src = tmp_path / "weights"
    src.mkdir(exist_ok=True)
    return str(client.create_model_version("dino-tiny-coco", source=str(src)).version)


def test_pipelines_champion_moves_only_on_better_ap(client, tmp_path):
    v1 = _new_version(client, tmp_path)
    p = promote_if_better("dino-tiny-coco", v1, 0.10, client=client)
    assert p.promoted and p.previous_version is None
    assert str(client.get_model_version_by_alias("dino-tiny-coco", "champion").version) == v1

    v2 = _new_version(client, tmp_path)  # worse: alias stays
    p = promote_if_better("dino-tiny-coco", v2, 0.05, client=client)
    assert not p.promoted and p.previous_version == v1 and p.previous_ap == pytest.approx(0.10)
    assert str(client.get_model_version_by_alias("dino-tiny-coco", "champion").version) == v1

    v3 = _new_version(client, tmp_path)  # equal: not strictly better, alias stays
    assert not promote_if_better("dino-tiny-coco", v3, 0.10, client=client).promoted
    assert str(client.get_model_version_by_alias("dino-tiny-coco", "champion").version) == v1

    v4 = _new_version(client, tmp_path)  # better: alias moves
    p = promote_if_better("dino-tiny-coco", v4, 0.25, client=client)
    assert p.promoted and p.previous_version == v1
    assert str(client.get_model_version_by_alias("dino-tiny-coco", "champion").version) == v4

    # every version carries its AP tag; none measured -> never promoted, not tagged
    assert client.get_model_version("dino-tiny-coco", v2).tags["AP"] == "0.050000"
    v5 = _new_version(client, tmp_path)
    assert not promote_if_better("dino-tiny-coco", v5, None, client=client).promoted
    assert "AP" not in client.get_model_version("dino-tiny-coco", v5).tags
    assert str(client.get_model_version_by_alias("dino-tiny-coco", "champion").version) == v4

    # lineage tags, the class-head choice of a fresh-heads fine-tune among them (other tags are not lineage)
    client.set_model_version_tag("dino-tiny-coco", v5, "source.class_heads", "fresh")
    client.set_model_version_tag("dino-tiny-coco", v5, "source.uri", "models:/dino-tiny-o365/1")
    client.set_model_version_tag("dino-tiny-coco", v5, "stage", "finetune")
    state = registry_state(client)
    assert [v["aliases"] for v in state[0]["versions"]] == [[], [], [], ["champion"], []]
    assert "@champion" in format_state(state) and "0.2500" in format_state(state)
    assert state[0]["versions"][-1]["lineage"] == {"source.uri": "models:/dino-tiny-o365/1",
                                                   "source.class_heads": "fresh"}


def test_pipelines_champion_an_ap_equal_as_tagged_is_a_tie(client, tmp_path):
    # the holder's AP is read back from its 6-decimal tag: the full value of the same AP
    # (0.000157140714... against "0.000157") beat it and moved the alias, "AP 0.0002 beats v1 (AP 0.0002)"
    v1 = _new_version(client, tmp_path)
    assert promote_if_better("dino-tiny-coco", v1, 0.00015714071407140715, client=client).promoted
    v2 = _new_version(client, tmp_path)
    p = promote_if_better("dino-tiny-coco", v2, 0.00015714071407140715, client=client)
    assert not p.promoted and "does not beat" in p.reason, p.reason
    assert str(client.get_model_version_by_alias("dino-tiny-coco", "champion").version) == v1
    v3 = _new_version(client, tmp_path)  # better in the 6th decimal: moves
    assert promote_if_better("dino-tiny-coco", v3, 0.000158, client=client).promoted


def test_pipelines_champion_without_ap_tag_is_beaten(client, tmp_path):
    v1 = _new_version(client, tmp_path)
    client.set_registered_model_alias("dino-tiny-coco", "champion", v1)  # set by hand, no AP
    v2 = _new_version(client, tmp_path)
    assert promote_if_better("dino-tiny-coco", v2, 0.01, client=client).promoted
    assert str(client.get_model_version_by_alias("dino-tiny-coco", "champion").version) == v2


class _LockedAliasLookup(mlflow.MlflowClient):
    """The real client, except that the alias lookup fails the way a locked sqlite store does."""

    def get_model_version_by_alias(self, name, alias):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

        raise MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE)


def test_pipelines_champion_store_error_is_not_an_empty_alias(client, _store, tmp_path):
    from mlflow.exceptions import MlflowException

    v1 = _new_version(client, tmp_path)
    assert promote_if_better("dino-tiny-coco", v1, 0.50, client=client).promoted
    v2 = _new_version(client, tmp_path)
    failing = _LockedAliasLookup(tracking_uri=_store, registry_uri=_store)
    with pytest.raises(MlflowException, match="locked"):  # was: "first version with an AP", promoted
        promote_if_better("dino-tiny-coco", v2, 0.10, client=failing)
    assert str(client.get_model_version_by_alias("dino-tiny-coco", "champion").version) == v1


def test_pipelines_champion_registry_lists_a_name_with_a_quote(client, tmp_path):
    client.create_registered_model("bob's-model")
    client.create_model_version("bob's-model", source=str(tmp_path))
    state = {m["name"]: m for m in registry_state(client)}
    assert [v["version"] for v in state["bob's-model"]["versions"]] == ["1"]
    assert [m["name"] for m in registry_state(client, names=["bob's-model"])] == ["bob's-model"]


def test_pipelines_champion_name_with_both_quotes_lists_and_promotes(client, tmp_path):
    """The registry accepts a name holding ' and " (no search filter can quote it): it was a
    ValueError for `registry list` (every model) and for the champion check after a fine-tune."""
    name = """bob's "best" model"""
    client.create_registered_model(name)
    v1, v2 = (str(client.create_model_version(name, source=str(tmp_path)).version) for _ in range(2))
    client.create_model_version("dino-tiny-coco", source=str(tmp_path))  # not one of its versions
    state = {m["name"]: m for m in registry_state(client)}
    assert [v["version"] for v in state[name]["versions"]] == ["1", "2"]
    assert [v["version"] for v in state["dino-tiny-coco"]["versions"]] == ["1"]
    assert promote_if_better(name, v1, 0.2, client=client).promoted
    assert promote_if_better(name, v2, 0.3, client=client).promoted
    (only,) = registry_state(client, names=[name])
    assert [v["aliases"] for v in only["versions"]] == [[], ["champion"]]


def test_pipelines_champion_first_registration_race(client, _store, tmp_path, monkeypatch):
    """Two jobs registering a new name at once: the one whose create loses finds the model
    there (RESOURCE_ALREADY_EXISTS from the real store) and registers its version."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from dino_scale.tracking.registry import register_model

    run = client.create_run(client.create_experiment(f"race-{tmp_path.name}"))
    client.create_registered_model("dino-race")  # the other job's create won
    real_get = mlflow.MlflowClient.get_registered_model
    looked = []

    def not_there_yet(self, name):  # this job's first look came before the other job's create
        if name == "dino-race" and not looked:
            looked.append(name)
            raise MlflowException(f"Registered Model with name={name} not found", error_code=RESOURCE_DOES_NOT_EXIST)
        return real_get(self, name)

    monkeypatch.setattr(mlflow.MlflowClient, "get_registered_model", not_there_yet)
    assert register_model(run.info.run_id, "dino-race", tracking_uri=_store) == "1"
    assert looked == ["dino-race"]


class _StaleAliasRead(mlflow.MlflowClient):
    """The real client, except that its first alias lookup returns ``stale``: the champion
    this job read before a concurrent job moved the alias."""

    def __init__(self, stale, **kwargs):
        super().__init__(**kwargs)
        self._stale = stale

    def get_model_version_by_alias(self, name, alias):
        if self._stale is not None:
            stale, self._stale = self._stale, None
            return stale
        return super().get_model_version_by_alias(name, alias)


def _champion(client) -> str:
    return str(client.get_model_version_by_alias("dino-tiny-coco", "champion").version)


def test_pipelines_champion_concurrent_promotions_keep_the_better(client, _store, tmp_path):
    """Two fine-tunes read the same champion and both beat it; the worse one's alias write
    lands last. The better one holds the alias in the end, in either order (was: the last
    writer, AP 0.53, over AP 0.55)."""
    v1 = _new_version(client, tmp_path)
    assert promote_if_better("dino-tiny-coco", v1, 0.50, client=client).promoted
    read_v1 = client.get_model_version_by_alias("dino-tiny-coco", "champion")
    v2, v3 = _new_version(client, tmp_path), _new_version(client, tmp_path)

    assert promote_if_better("dino-tiny-coco", v2, 0.55, client=client).promoted
    late = _StaleAliasRead(read_v1, tracking_uri=_store, registry_uri=_store)
    p = promote_if_better("dino-tiny-coco", v3, 0.53, client=late)
    assert _champion(client) == v2
    assert not p.promoted and f"v{v2}" in p.reason and p.previous_version == v1

    # the other order: the better one writes last and keeps it
    v4, v5 = _new_version(client, tmp_path), _new_version(client, tmp_path)
    read_v2 = client.get_model_version_by_alias("dino-tiny-coco", "champion")
    assert promote_if_better("dino-tiny-coco", v4, 0.56, client=client).promoted
    late = _StaleAliasRead(read_v2, tracking_uri=_store, registry_uri=_store)
    assert promote_if_better("dino-tiny-coco", v5, 0.60, client=late).promoted
    assert _champion(client) == v5


def test_pipelines_champion_hand_set_champion_is_kept(client, _store, tmp_path, monkeypatch, mlflow_store_restored):
    """`registry promote` rolls back to an older version; a later, better-than-it fine-tune
    becomes champion, and the rolled-back-from version (higher AP, promoted from the same
    version long before) does not take the alias back."""
    from pipelines import registry

    v1 = _new_version(client, tmp_path)
    assert promote_if_better("dino-tiny-coco", v1, 0.50, client=client).promoted
    v2 = _new_version(client, tmp_path)
    assert promote_if_better("dino-tiny-coco", v2, 0.70, client=client).promoted
    monkeypatch.setattr(registry, "store_client", lambda uri=None: client)
    assert registry.main(["--work-dir", str(tmp_path), "promote", "dino-tiny-coco", v1]) == 0
    assert _champion(client) == v1
    v3 = _new_version(client, tmp_path)
    assert promote_if_better("dino-tiny-coco", v3, 0.55, client=client).promoted
    assert _champion(client) == v3


def test_pipelines_champion_promotion_that_failed_is_applied_later(client, _store, tmp_path, monkeypatch, capsys,
                                                                   mlflow_store_restored):
    """A fine-tune whose promotion failed after its version was registered (a store error, a locked
    sqlite database) exited without naming the version, and no command applied the AP check later
    (the advised rerun registered a duplicate). The job names the version and the command:
    ``registry promote NAME V --if-better``, the fine-tune's own rule on the version's AP tag."""
    from pipelines import _results, registry

    v1 = _new_version(client, tmp_path)
    assert promote_if_better("dino-tiny-coco", v1, 0.50, client=client).promoted
    v2, v3 = _new_version(client, tmp_path), _new_version(client, tmp_path)
    client.set_model_version_tag("dino-tiny-coco", v2, "AP", "0.400000")
    client.set_model_version_tag("dino-tiny-coco", v3, "AP", "0.600000")
    with pytest.raises(RuntimeError, match="database is locked"):
        with _results.alias_note("dino-tiny-coco", v3, "champion", _store, "--if-better"):
            raise RuntimeError("database is locked")
    assert (f"note: dino-tiny-coco version {v3} is registered, but moving @champion to it failed (RuntimeError)"
            in capsys.readouterr().err)
    # a pretraining on generated data: the advised plain promote would move @pretrained off a model trained on
    # real data, which the pipeline's own move (move_alias) never does; the note says to look first
    with pytest.raises(RuntimeError):
        with _results.alias_note("dino-tiny-o365", "4", "pretrained", _store, synthetic=True):
            raise RuntimeError("database is locked")
    note = capsys.readouterr().err
    assert "registry promote dino-tiny-o365 4 --alias pretrained" in note
    assert "trained on a synthetic set" in note and "registry show dino-tiny-o365" in note
    assert _champion(client) == v1
    monkeypatch.setattr(registry, "store_client", lambda uri=None: client)
    argv = ["--work-dir", str(tmp_path), "promote", "dino-tiny-coco"]
    assert registry.main(argv + [v2, "--if-better"]) == 0  # AP 0.40 does not beat 0.50
    assert _champion(client) == v1 and "dino-tiny-coco@champion unchanged (AP 0.4000" in capsys.readouterr().out
    assert registry.main(argv + [v3, "--if-better"]) == 0
    assert _champion(client) == v3 and f"@champion -> version {v3} (AP 0.6000 beats v{v1}" in capsys.readouterr().out


def test_pipelines_champion_reverted_in_the_ui_is_not_taken_back_by_an_old_promotion(client, tmp_path):
    """v2 was promoted over v1 an hour ago; someone moved the alias back to v1 in the MLflow UI
    (which stamps nothing, so v1 keeps its promotion id). A new version that beats v1 became
    champion and then gave it to v2, "promoted at the same time from the same @champion": any
    promotion ever made from v1 counted as a rival. Rivals are promoted at about the same time."""
    from pipelines.champion import PROMOTED_AT_TAG

    v1 = _new_version(client, tmp_path)
    client.set_registered_model_alias("dino-tiny-coco", "champion", v1)  # set by hand, no tags
    v2 = _new_version(client, tmp_path)
    assert promote_if_better("dino-tiny-coco", v2, 0.95, client=client).promoted
    promoted_at = float(client.get_model_version("dino-tiny-coco", v2).tags[PROMOTED_AT_TAG.format("champion")])
    client.set_model_version_tag("dino-tiny-coco", v2, PROMOTED_AT_TAG.format("champion"), str(promoted_at - 3600))
    client.set_registered_model_alias("dino-tiny-coco", "champion", v1)  # reverted in the UI
    v3 = _new_version(client, tmp_path)
    p = promote_if_better("dino-tiny-coco", v3, 0.80, client=client)
    assert p.promoted and p.previous_version == v1, p.reason
    assert _champion(client) == v3


def test_pipelines_champion_ap_of_other_val_data_does_not_move_it(client, tmp_path):
    """APs measured on different validation data (a synthetic smoke-test set, a subset of val)
    or with/without test-time augmentation are not comparable: a fine-tune evaluated on other
    data than the champion's must not take ``@champion`` with a higher number. Was: AP 0.90 on
    an easy 8-image set beat the champion's 0.30 on the real val set and moved the alias."""
    def version(data: str, tta: bool = False) -> str:
        v = _new_version(client, tmp_path)
        for key, value in (("eval.data", data), ("eval.tta", str(tta).lower())):
            client.set_model_version_tag("dino-tiny-coco", v, key, value)
        return v

    v1 = version("val2017-fp")
    assert promote_if_better("dino-tiny-coco", v1, 0.30, client=client).promoted
    v2 = version("synthetic-fp")  # a much higher AP on other data: alias stays
    p = promote_if_better("dino-tiny-coco", v2, 0.90, client=client)
    assert not p.promoted and "other" in p.reason and p.previous_version == v1
    assert str(client.get_model_version_by_alias("dino-tiny-coco", "champion").version) == v1
    assert client.get_model_version("dino-tiny-coco", v2).tags["AP"] == "0.900000"  # still recorded
    v3 = version("val2017-fp", tta=True)  # same data, TTA: not comparable either
    assert not promote_if_better("dino-tiny-coco", v3, 0.35, client=client).promoted
    v3s = version("val2017-fp")
    client.set_model_version_tag("dino-tiny-coco", v3s, "eval.tta", "true:800,1000")  # as tta_protocol writes it
    p = promote_if_better("dino-tiny-coco", v3s, 0.35, client=client)
    assert not p.promoted and "(val data val2017-fp, TTA 800,1000) than" in p.reason, p.reason
    v4 = version("val2017-fp")  # same data, same protocol, better: moves
    p = promote_if_better("dino-tiny-coco", v4, 0.31, client=client)
    assert p.promoted and p.previous_version == v1
    v5 = _new_version(client, tmp_path)  # no evaluation tags (registered by hand): compared as before
    assert promote_if_better("dino-tiny-coco", v5, 0.32, client=client).promoted


def test_pipelines_champion_held_by_a_smoke_test_gives_way_to_real_data(client, tmp_path):
    """The first version with an AP takes ``@champion``: when that was a smoke test on generated
    data, every real fine-tune after it (other ``eval.data``) was "not comparable" and the alias
    never moved again. A version measured on real data now replaces a holder measured on
    synthetic data (tag ``synthetic_data``), whatever the two APs; not the other way round, and
    two real sets stay not comparable."""
    def version(data: str, synthetic: bool) -> str:
        v = _new_version(client, tmp_path)
        for key, value in (("eval.data", data), ("eval.tta", "false"), ("synthetic_data", str(synthetic).lower())):
            client.set_model_version_tag("dino-tiny-coco", v, key, value)
        return v

    smoke = version("synthetic-fp", synthetic=True)
    assert promote_if_better("dino-tiny-coco", smoke, 0.80, client=client).promoted
    real = version("val2017-fp", synthetic=False)
    p = promote_if_better("dino-tiny-coco", real, 0.30, client=client)  # lower AP, but on real data
    assert p.promoted and p.previous_version == smoke and "synthetic" in p.reason
    assert str(client.get_model_version_by_alias("dino-tiny-coco", "champion").version) == real
    smoke2 = version("synthetic-fp", synthetic=True)  # a smoke test never takes it back from real data
    assert not promote_if_better("dino-tiny-coco", smoke2, 0.95, client=client).promoted
    subset = version("val-subset-fp", synthetic=False)  # other real data: not comparable, as before
    assert not promote_if_better("dino-tiny-coco", subset, 0.60, client=client).promoted
    for key in ("eval.data", "eval.tta"):  # not even from a holder with nothing to compare (set by hand)
        client.delete_model_version_tag("dino-tiny-coco", real, key)
    p = promote_if_better("dino-tiny-coco", smoke2, 0.95, client=client)
    assert not p.promoted and "synthetic data and @champion" in p.reason, p.reason
    assert str(client.get_model_version_by_alias("dino-tiny-coco", "champion").version) == real


def test_pipelines_champion_tta_sizes_are_part_of_the_protocol(client, tmp_path):
    """``eval.tta`` said true/false only: APs measured with other TTA sizes compared as equal."""
    from dino_scale.config import preset
    from pipelines.champion import tta_protocol

    assert tta_protocol(preset("tiny")) == "false"
    assert tta_protocol(preset("tiny", ["eval.tta=true", "eval.tta_scales=[1000,800]"])) == "true:800,1000"
    assert tta_protocol(preset("r50_4scale", ["eval.tta=true"])) == "true:800"  # the default sizes

    def version(tta: str) -> str:
        v = _new_version(client, tmp_path)
        for key, value in (("eval.data", "val2017-fp"), ("eval.tta", tta)):
            client.set_model_version_tag("dino-tiny-coco", v, key, value)
        return v

    assert promote_if_better("dino-tiny-coco", version("true:800"), 0.30, client=client).promoted
    assert not promote_if_better("dino-tiny-coco", version("true:800,1000"), 0.40, client=client).promoted
    assert promote_if_better("dino-tiny-coco", version("true:800"), 0.31, client=client).promoted


def test_pipelines_champion_race_is_settled_by_the_rule_of_a_promotion(client, _store, tmp_path):
    """Two fine-tunes beat a champion set by hand (no evaluation tags), at the same time: one
    measured on real data, one on a generated set with a higher AP. Settling the race compared
    the two APs alone and gave the alias to the smoke test, which a promotion never does over
    real data; and a real version on other validation data lost the alias to a higher AP it
    cannot be compared with. Settling now applies the promotion rule between the rivals."""
    def version(data: str, synthetic: bool) -> str:
        v = _new_version(client, tmp_path)
        for key, value in (("eval.data", data), ("eval.tta", "false"), ("synthetic_data", str(synthetic).lower())):
            client.set_model_version_tag("dino-tiny-coco", v, key, value)
        return v

    v1 = _new_version(client, tmp_path)
    client.set_model_version_tag("dino-tiny-coco", v1, "AP", "0.500000")
    client.set_registered_model_alias("dino-tiny-coco", "champion", v1)  # by hand: nothing to compare
    read_v1 = client.get_model_version_by_alias("dino-tiny-coco", "champion")
    real, smoke = version("val2017-fp", False), version("synthetic-fp", True)
    assert promote_if_better("dino-tiny-coco", real, 0.55, client=client).promoted
    late = _StaleAliasRead(read_v1, tracking_uri=_store, registry_uri=_store)
    p = promote_if_better("dino-tiny-coco", smoke, 0.90, client=late)  # read v1 before `real` took it
    assert _champion(client) == real
    assert not p.promoted and f"v{real}" in p.reason, p.reason

    # two real sets: neither AP beats the other, so the settled holder is not moved on its AP
    by_hand = _new_version(client, tmp_path)
    client.set_model_version_tag("dino-tiny-coco", by_hand, "AP", "0.500000")
    client.set_registered_model_alias("dino-tiny-coco", "champion", by_hand)
    read = client.get_model_version_by_alias("dino-tiny-coco", "champion")
    other, subset = version("val2017-fp", False), version("val-subset-fp", False)
    assert promote_if_better("dino-tiny-coco", other, 0.95, client=client).promoted
    late = _StaleAliasRead(read, tracking_uri=_store, registry_uri=_store)
    p = promote_if_better("dino-tiny-coco", subset, 0.60, client=late)
    assert p.promoted and _champion(client) == subset, p.reason  # was: given to v(0.95) "is better"

"""Alias `champion` moves only when a new version's AP beats the current champion's
(real sqlite MLflow registry)."""
from __future__ import annotations

import pytest

mlflow = pytest.importorskip("mlflow")

from pipelines.registry import format_state, promote_if_better, registry_state  # noqa: E402


@pytest.fixture(scope="module")
def _store(tmp_path_factory):
    """One sqlite store for the module (creating its schema takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"


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

    state = registry_state(client)
    assert [v["aliases"] for v in state[0]["versions"]] == [[], [], [], ["champion"], []]
    assert "@champion" in format_state(state) and "0.2500" in format_state(state)


def test_pipelines_champion_without_ap_tag_is_beaten(client, tmp_path):
    v1 = _new_version(client, tmp_path)
    client.set_registered_model_alias("dino-tiny-coco", "champion", v1)  # set by hand, no AP
    v2 = _new_version(client, tmp_path)
    assert promote_if_better("dino-tiny-coco", v2, 0.01, client=client).promoted
    assert str(client.get_model_version_by_alias("dino-tiny-coco", "champion").version) == v2

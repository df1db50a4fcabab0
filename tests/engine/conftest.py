"""Per-module fixtures of the engine tests: the tiny synthetic shards, and a local Ray session
(holding the host-wide Ray lock) for the modules that train on Ray; a module's runs never share a
Ray cluster with another module's."""
from __future__ import annotations

import pytest

from engine_fixtures import RaySession, RayStarted, make_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(train shards folder, val shards folder) of the tiny synthetic dataset."""
    return make_data(tmp_path_factory.mktemp("engine_data"))


@pytest.fixture(scope="module")
def ray_session():
    with RaySession(num_cpus=4) as session:
        yield session


@pytest.fixture
def ray_refused(monkeypatch):
    """``api.ensure_ray`` raises :class:`~engine_fixtures.RayStarted` instead of starting Ray."""
    from dino_scale.engine import api

    def refuse(*args, **kwargs):
        raise RayStarted

    monkeypatch.setattr(api, "ensure_ray", refuse)

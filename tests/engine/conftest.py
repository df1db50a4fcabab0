"""Fixtures of the engine tests that start Ray: each module gets its own synthetic shards and
its own local Ray session (holding the host-wide Ray lock), so a module's runs never share a
cluster with another module's."""
from __future__ import annotations

import pytest

from engine_fixtures import RaySession, make_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(train shards folder, val shards folder) of the tiny synthetic dataset."""
    return make_data(tmp_path_factory.mktemp("engine_data"))


@pytest.fixture(scope="module")
def ray_session():
    with RaySession(num_cpus=4) as session:
        yield session

"""Small synthetic datasets shared by the data tests (generated once per session)."""
from __future__ import annotations

import pytest

from dino_scale.data.synthetic import generate


@pytest.fixture(scope="session")
def coco_like(tmp_path_factory):
    """(image root, annotation json) of 24 coco-like images."""
    return generate(tmp_path_factory.mktemp("coco_like"), "coco-like", num_images=24, seed=3,
                    image_size=((96, 160), (112, 192)))


@pytest.fixture(scope="session")
def o365_like(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("o365_like"), "o365-like", num_images=30, seed=4,
                    image_size=((96, 160), (112, 192)))

"""Small synthetic datasets shared by the data tests (generated once per session)."""
from __future__ import annotations

import contextlib
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from dino_scale.data import convert_coco
from dino_scale.data import shards as shards_mod

from dino_scale.data.synthetic import generate


@pytest.fixture
def cut_short_after(monkeypatch):
    """``with cut_short_after(n): convert(...)``: the conversion inside is interrupted
    (KeyboardInterrupt, as Ctrl-C) when it would write shard ``n + 1``; shard writes after the
    block are real again."""
    @contextlib.contextmanager
    def cut(n: int):
        real_flush = shards_mod.ShardWriter._flush
        calls = {"n": 0}

        def flaky(self, end_index):
            if calls["n"] == n:
                raise KeyboardInterrupt("simulated interruption")
            calls["n"] += 1
            return real_flush(self, end_index)

        monkeypatch.setattr(shards_mod.ShardWriter, "_flush", flaky)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(shards_mod.ShardWriter, "_flush", real_flush)

    return cut


@pytest.fixture(scope="session")
def coco_like(tmp_path_factory):
    """(image root, annotation json) of 24 coco-like images."""
    return generate(tmp_path_factory.mktemp("coco_like"), "coco-like", num_images=24, seed=3,
                    image_size=((96, 160), (112, 192)))


@pytest.fixture(scope="session")
def o365_like(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("o365_like"), "o365-like", num_images=30, seed=4,
                    image_size=((96, 160), (112, 192)))


# folder -> (image ids, pixel size (w, h), colour): the same file names in both image roots
FOLDERS = {"first": ((1, 2), (64, 48), (250, 0, 0)), "second": ((11, 12), (96, 40), (0, 0, 250))}


def _convert_folder(tmp_path, name: str, embed: bool = False):
    """Convert folder ``name`` of FOLDERS (PNGs a.png, b.png) into ``tmp_path/name``: (out, image root)."""
    ids, (w, h), colour = FOLDERS[name]
    root = tmp_path / f"images_{name}"
    root.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    images = []
    for iid, fname in zip(ids, ("a.png", "b.png")):
        (root / fname).write_bytes(buf.getvalue())
        images.append({"id": iid, "file_name": fname, "width": w, "height": h})
    doc = {"images": images, "categories": [{"id": 1, "name": "x"}],
           "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 10]} for i in ids]}
    ann = tmp_path / f"{name}.json"
    ann.write_text(json.dumps(doc))
    out = tmp_path / name
    convert_coco(ann, root, out, embed_images=embed, progress=False)
    return out, root


def _folder_of(image_id: int) -> str:
    return next(name for name, (ids, _, _) in FOLDERS.items() if image_id in ids)


def _check_sample(image_id: int, image: np.ndarray, orig_size) -> None:
    """``image`` uint8 (3,H,W) of an eval sample: its own folder's colour and annotated size."""
    _, (w, h), colour = FOLDERS[_folder_of(image_id)]
    assert list(orig_size) == [h, w]
    np.testing.assert_allclose(image.reshape(3, -1).mean(1), colour, atol=3)


@pytest.fixture
def image_folders(tmp_path):
    """Two dataset folders converted against different image roots holding the same file
    names: ``convert(name, embed=False)`` -> (folder, image root); ``check_sample(id, image, orig_size)``."""
    return SimpleNamespace(convert=lambda name, embed=False: _convert_folder(tmp_path, name, embed),
                           check_sample=_check_sample, folders=FOLDERS)

"""dino_scale.models.weights_file: a weights file cut short names itself."""
from __future__ import annotations

import argparse
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dino_scale.models.weights_file import WeightsFileError, check_weights_file, read_safetensors, read_torch_file


def _cut(path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_safetensors_cut_short_or_empty_names_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(6.0)}, str(path))
    assert torch.equal(read_safetensors(path)["a"], torch.arange(6.0))
    for keep in (0.5, 0.0):
        save_file({"a": torch.arange(6.0)}, str(path))
        _cut(path, keep)
        with pytest.raises(WeightsFileError, match=rf"{path}: not a readable safetensors file \(SafetensorError: "):
            read_safetensors(path)


@pytest.mark.parametrize("weights_only", [True, False])
@pytest.mark.parametrize("damage", ["half", "empty", "garbage"])
def test_torch_file_cut_short_or_garbage_names_the_file(tmp_path, weights_only, damage):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"a": torch.ones(3)}}, path)
    assert torch.equal(read_torch_file(path, weights_only=weights_only)["model"]["a"], torch.ones(3))
    if damage == "garbage":
        path.write_bytes(b"certainly not a torch file")
    else:
        _cut(path, 0.5 if damage == "half" else 0.0)
    with pytest.raises(WeightsFileError, match=rf"{path}: not a readable torch file \("):
        read_torch_file(path, weights_only=weights_only)


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.05, 0.0])
def test_check_weights_file_finds_a_cut_short_file_from_its_structure(tmp_path, keep):
    """The driver's cheap check (no tensor data read) refuses what the readers refuse: a
    safetensors file or a torch archive cut anywhere (was: only the workers' full read, after
    Ray started). Whole files, and the legacy pickle format it cannot check, pass."""
    tensors = {"a": torch.arange(4096.0), "b": torch.ones(3, 5)}
    st, pth, legacy = tmp_path / "w.safetensors", tmp_path / "w.pth", tmp_path / "legacy.pth"
    save_file(tensors, str(st))
    torch.save({"model": tensors}, pth)
    torch.save({"model": tensors}, legacy, _use_new_zipfile_serialization=False)
    for path in (st, pth, legacy):
        check_weights_file(path)
    _cut(st, keep)
    _cut(pth, keep)
    with pytest.raises(WeightsFileError, match=rf"{st}: not a readable safetensors file \("):
        check_weights_file(st)
    with pytest.raises(WeightsFileError, match=rf"{pth}: not a readable torch file \("):
        check_weights_file(pth)
    pth.write_bytes(b"certainly not a torch file")
    with pytest.raises(WeightsFileError, match="begins with"):
        check_weights_file(pth)


def test_weights_only_refusal_keeps_torchs_error(tmp_path):
    """A whole file refused for the objects it holds is not called broken: torch's
    UnpicklingError stays (the official-checkpoint and Swin loaders explain it)."""
    path = tmp_path / "objects.pth"
    torch.save({"model": {"a": torch.ones(3)}, "parser": argparse.ArgumentParser}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        read_torch_file(path, weights_only=True)
    assert "parser" in read_torch_file(path, weights_only=False)


def test_model_loaders_name_a_cut_short_file(tmp_path):
    """The loaders of the model layer use these readers: official .pth, ResNet and Swin weights."""
    from dino_scale.config import preset
    from dino_scale.models import build_dino
    from dino_scale.models.backbone import load_backbone_weights
    from dino_scale.models.official import load_official_checkpoint
    from dino_scale.models.swin_weights import _read_state_dict

    pth = tmp_path / "checkpoint0033_4scale.pth"
    torch.save({"model": {"a": torch.ones(3)}}, pth)
    _cut(pth, 0.5)
    sft = tmp_path / "swin.safetensors"
    save_file({"a": torch.ones(3)}, str(sft))
    _cut(sft, 0.5)
    model, _, _ = build_dino(preset("tiny").model)
    with pytest.raises(WeightsFileError, match=str(pth)):
        load_official_checkpoint(str(pth))
    with pytest.raises(WeightsFileError, match=str(pth)):
        load_backbone_weights(model.backbone, str(pth))
    for path in (pth, sft):
        with pytest.raises(WeightsFileError, match=str(path)):
            _read_state_dict(str(path))


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_or_missing_url_names_the_url(tmp_path, monkeypatch):
    """A weights URL that cannot be downloaded raised urllib's URLError ('<urlopen error [Errno
    111] Connection refused>', naming no URL) from under a dozen urllib frames, in ResNet's and
    Swin's loaders alike."""
    import functools
    import http.server
    import threading

    from dino_scale.config import preset
    from dino_scale.models.backbone import build_backbone, load_backbone_weights
    from dino_scale.models.swin_weights import _read_state_dict
    from dino_scale.models.weights_file import WeightsDownloadError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    joiner = build_backbone(preset("tiny").model)
    refused = f"http://127.0.0.1:{_closed_port()}/resnet50.pth"
    with pytest.raises(WeightsDownloadError, match=rf"{refused}: could not be downloaded .*refused"):
        load_backbone_weights(joiner, refused)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for name in ("swin.pth", "swin.safetensors"):
            missing = f"http://127.0.0.1:{server.server_port}/{name}"
            with pytest.raises(WeightsDownloadError, match=rf"{missing}: could not be downloaded \(HTTP 404"):
                _read_state_dict(missing)
    finally:
        server.shutdown()
        server.server_close()
    assert not list((tmp_path / "torch_home").rglob("*.pth")), "no partial download left in the cache"


def test_a_directory_given_as_weights_file_says_so(tmp_path):
    """A folder was reported as 'not found' (it exists)."""
    from dino_scale.config import preset
    from dino_scale.models.backbone import build_backbone, load_backbone_weights
    from dino_scale.models.swin_weights import _read_state_dict

    with pytest.raises(IsADirectoryError, match=rf"{tmp_path}: a directory"):
        load_backbone_weights(build_backbone(preset("tiny").model), str(tmp_path))
    with pytest.raises(IsADirectoryError, match=rf"{tmp_path}: a directory"):
        _read_state_dict(str(tmp_path))


def test_two_urls_of_one_file_name_get_their_own_weights(tmp_path, monkeypatch):
    """The cache kept a download under its file name alone: ``.../a/model.pth`` then
    ``.../b/model.pth`` returned a's weights for b (so does every Hugging Face
    ``resolve/main/model.safetensors``). A name stating torch hub's hash suffix is checked, and
    an address naming no file is refused (it returned the cache folder itself)."""
    import functools
    import hashlib
    import http.server
    import threading

    from dino_scale.models.weights_file import WeightsDownloadError, download_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    served = tmp_path / "served"
    for folder, value in (("a", 1.0), ("b", 2.0)):
        (served / folder).mkdir(parents=True)
        torch.save({"w": torch.tensor([value])}, served / folder / "model.pth")
    good = (served / "a" / "model.pth").read_bytes()
    (served / f"ok-{hashlib.sha256(good).hexdigest()[:8]}.pth").write_bytes(good)
    (served / "bad-0123abcd.pth").write_bytes(good)
    (served / "checkpoint-00010000.pth").write_bytes(good)  # digits only: a step count, not a hash
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        values = [torch.load(download_weights(f"{base}/{f}/model.pth"), weights_only=True)["w"].item()
                  for f in ("a", "b", "a", "b")]
        assert values == [1.0, 2.0, 1.0, 2.0]
        assert download_weights(f"{base}/ok-{hashlib.sha256(good).hexdigest()[:8]}.pth")
        with pytest.raises(WeightsDownloadError, match=r"bad-0123abcd.pth: the download is not the file its name"):
            download_weights(f"{base}/bad-0123abcd.pth")
        with pytest.raises(WeightsDownloadError, match="names no file"):
            download_weights(f"{base}/a/")
        assert download_weights(f"{base}/checkpoint-00010000.pth")
        # a file of the URL's name put in the cache by hand (an offline cluster) is used as it is
        by_hand = tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
        by_hand.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.tensor([7.0])}, by_hand)
        assert download_weights(f"{base}/resnet50-0676ba61.pth") == str(by_hand)
    finally:
        server.shutdown()
        server.server_close()
    assert not list((tmp_path / "torch_home").rglob("bad-*")), "no unchecked download left in the cache"

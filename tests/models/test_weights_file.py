"""dino_scale.models.weights_file: a weights file cut short names itself."""
from __future__ import annotations

import argparse
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dino_scale.models.weights_file import WeightsFileError, read_safetensors, read_torch_file


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
    from dino_scale.models.swin import _read_state_dict

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

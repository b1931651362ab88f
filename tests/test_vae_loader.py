"""load_vae on real files (the tiny config saved with torch.save in the official layout):
round trip, config inferred from shapes, and the errors for a missing / incomplete / foreign / damaged file."""
from __future__ import annotations

import pytest
import torch

from infinitetalk.errors import CheckpointError, MissingWeightsError
from infinitetalk.models.vae import WanVAE, WanVAEConfig
from infinitetalk.weights.vae_loader import VAE_FILENAME, load_vae


@pytest.fixture(scope="module")
def tiny_state() -> dict:
    torch.manual_seed(99)
    return WanVAE(WanVAEConfig.tiny()).state_dict()


@pytest.fixture
def saved(tmp_path, tiny_state):
    path = tmp_path / VAE_FILENAME
    torch.save(tiny_state, path)
    return path


def test_round_trip_and_inferred_config(saved, tiny_state):
    model = load_vae(saved)  # no config: base width and block count read from the file
    assert model.config == WanVAEConfig.tiny()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, tiny_state[key]), key
    half = load_vae(saved.parent, dtype=torch.bfloat16)  # a directory holding Wan2.1_VAE.pth
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_missing_file_names_it(tmp_path):
    with pytest.raises(MissingWeightsError) as info:
        load_vae(tmp_path / "nowhere.pth")
    assert "nowhere.pth" in str(info.value) and info.value.missing == [str(tmp_path / "nowhere.pth")]
    with pytest.raises(MissingWeightsError, match=VAE_FILENAME):
        load_vae(tmp_path)  # directory without the file


def test_deleted_key_is_named(tmp_path, tiny_state):
    state = dict(tiny_state)
    del state["decoder.head.2.bias"]
    path = tmp_path / "vae.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_vae(path)
    assert "decoder.head.2.bias" in str(info.value) and str(path) in str(info.value)


def test_extra_key_is_named(tmp_path, tiny_state):
    state = dict(tiny_state)
    state["decoder.extra.weight"] = torch.zeros(3)
    path = tmp_path / "vae.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_vae(path)
    assert "decoder.extra.weight" in str(info.value) and str(path) in str(info.value)


def test_wrong_size_is_named(saved):
    with pytest.raises(CheckpointError) as info:
        load_vae(saved, config=WanVAEConfig(dim=24, num_res_blocks=1))  # other width, same keys
    assert "encoder.conv1.weight" in str(info.value) and str(saved) in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_file_is_named(saved, damage):
    data = saved.read_bytes()
    if damage == "truncated":
        saved.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        saved.write_bytes(b"not a checkpoint at all" * 100)
    else:
        saved.write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_vae(saved)
    assert str(saved) in str(info.value)

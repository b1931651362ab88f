"""load_dit on official-layout checkpoints: success paths and every error naming its file/key.

A tiny random DiT is written in the release layout (config.json, sharded safetensors with an
index, adapter keys in a separate infinitetalk.safetensors) and then damaged in one way per test.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from infinitetalk.errors import CheckpointError, MissingWeightsError
from infinitetalk.models.dit import InfiniteTalkDiT, WanDiTConfig
from infinitetalk.weights.dit_loader import find_dit_files, load_dit

ADAPTER_PARTS = ("audio_proj.", ".audio_cross_attn.", ".norm_x.")
SHARDS = 3


def _is_adapter(key: str) -> bool:
    return key.startswith(ADAPTER_PARTS[0]) or any(p in key for p in ADAPTER_PARTS[1:])


@pytest.fixture()
def release(tmp_path):
    """(checkpoint dir, adapter file, full state dict, config) in the official file layout."""
    cfg = WanDiTConfig.tiny(num_layers=2)
    torch.manual_seed(3)
    state = {k: v.contiguous() for k, v in InfiniteTalkDiT(cfg).state_dict().items()}
    base = {k: v for k, v in state.items() if not _is_adapter(k)}
    adapter = {k: v for k, v in state.items() if _is_adapter(k)}
    ckpt = tmp_path / "Wan2.1-I2V-14B-480P"
    ckpt.mkdir()
    keys = list(base)
    weight_map = {}
    for i in range(SHARDS):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        part = {k: base[k] for k in keys[i::SHARDS]}
        save_file(part, str(ckpt / name))
        weight_map.update({k: name for k in part})
    (ckpt / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(v.numel() * 4 for v in base.values())}, "weight_map": weight_map})
    )
    (ckpt / "config.json").write_text(json.dumps(dict(cfg.to_json_dict(), _diffusers_version="0.30.0")))
    adapter_dir = tmp_path / "InfiniteTalk" / "single"
    adapter_dir.mkdir(parents=True)
    adapter_file = adapter_dir / "infinitetalk.safetensors"
    save_file(adapter, str(adapter_file))
    return ckpt, adapter_file, state, cfg


def _assert_same(model, state):
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k].float(), v.float()), k


def test_loads_sharded_checkpoint_with_adapter(release):
    ckpt, adapter, state, cfg = release
    model = load_dit(ckpt, adapter)
    assert model.config == cfg
    _assert_same(model, state)
    assert not any(p.requires_grad for p in model.parameters())


def test_adapter_folder_and_bfloat16(release):
    ckpt, adapter, state, _ = release
    model = load_dit(ckpt, adapter.parent, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_later_file_wins(release, tmp_path):
    ckpt, adapter, state, _ = release
    override = dict(load_file(str(adapter)))
    key = "blocks.0.self_attn.q.bias"  # a base key, overridden by the adapter file
    override[key] = torch.full_like(state[key], 7.0)
    save_file(override, str(adapter))
    assert torch.equal(load_dit(ckpt, adapter).state_dict()[key], override[key])


def test_single_file_checkpoints(release, tmp_path):
    ckpt, adapter, state, cfg = release
    single_dir = tmp_path / "single_dir"
    single_dir.mkdir()
    shutil.copy(ckpt / "config.json", single_dir / "config.json")
    base = {}
    for f in find_dit_files(ckpt):
        base.update(load_file(str(f)))
    save_file(base, str(single_dir / "diffusion_pytorch_model.safetensors"))
    _assert_same(load_dit(single_dir, adapter), state)
    # one file holding everything, config given
    merged = tmp_path / "merged.safetensors"
    save_file(dict(base, **load_file(str(adapter))), str(merged))
    _assert_same(load_dit(merged, config=cfg), state)
    # the same as a pickled state dict, read with torch.load(weights_only=True)
    pth = tmp_path / "merged.pth"
    torch.save(dict(base, **load_file(str(adapter))), pth)
    _assert_same(load_dit(pth, config=cfg), state)


def test_deleted_shard_is_named(release):
    ckpt, adapter, _, _ = release
    victim = sorted(ckpt.glob("*-00002-of-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(MissingWeightsError, match=victim.name) as info:
        load_dit(ckpt, adapter)
    assert str(victim) in info.value.missing


def test_missing_config_is_named(release):
    ckpt, adapter, _, _ = release
    (ckpt / "config.json").unlink()
    with pytest.raises(MissingWeightsError, match="config.json"):
        load_dit(ckpt, adapter)


def test_missing_directory_and_adapter(release, tmp_path):
    ckpt, adapter, _, _ = release
    with pytest.raises(MissingWeightsError, match="nowhere"):
        load_dit(tmp_path / "nowhere", adapter)
    with pytest.raises(MissingWeightsError, match="infinitetalk.safetensors"):
        load_dit(ckpt, tmp_path / "multi" / "infinitetalk.safetensors")


def test_key_removed_from_adapter(release):
    ckpt, adapter, _, _ = release
    data = dict(load_file(str(adapter)))
    del data["blocks.1.audio_cross_attn.kv_linear.weight"]
    save_file(data, str(adapter))
    with pytest.raises(CheckpointError) as info:
        load_dit(ckpt, adapter)
    message = str(info.value)
    assert "blocks.1.audio_cross_attn.kv_linear.weight" in message and str(adapter) in message


def test_unexpected_key(release):
    ckpt, adapter, _, _ = release
    data = dict(load_file(str(adapter)))
    data["blocks.0.audio_cross_attn.extra.weight"] = torch.zeros(2)
    save_file(data, str(adapter))
    with pytest.raises(CheckpointError) as info:
        load_dit(ckpt, adapter)
    message = str(info.value)
    assert "blocks.0.audio_cross_attn.extra.weight" in message and str(adapter) in message


def test_wrong_shape_is_named(release):
    ckpt, adapter, _, _ = release
    data = dict(load_file(str(adapter)))
    data["audio_proj.proj2.weight"] = torch.zeros(3, 3)
    save_file(data, str(adapter))
    with pytest.raises(CheckpointError, match=r"audio_proj\.proj2\.weight"):
        load_dit(ckpt, adapter)


def test_corrupt_shard_is_named(release):
    ckpt, adapter, _, _ = release
    victim = sorted(ckpt.glob("*-00001-of-*.safetensors"))[0]
    victim.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(CheckpointError, match=victim.name):
        load_dit(ckpt, adapter)


def test_truncated_shard_is_named(release):
    ckpt, adapter, _, _ = release
    victim = sorted(ckpt.glob("*-00003-of-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=victim.name):
        load_dit(ckpt, adapter)


def test_corrupt_index_is_named(release):
    ckpt, adapter, _, _ = release
    (ckpt / "diffusion_pytorch_model.safetensors.index.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="index.json"):
        load_dit(ckpt, adapter)


def test_base_without_adapter_says_to_pass_it(release):
    ckpt, _, _, _ = release
    with pytest.raises(CheckpointError, match="adapter"):
        load_dit(ckpt)


def test_parity_checkpoint_copy_with_missing_shard(parity_dir, tmp_path):
    """The same check on a copy of the official-layout fixture checkpoint."""
    src = parity_dir / "dit" / "checkpoint"
    copy = tmp_path / "checkpoint"
    shutil.copytree(src, copy)
    index = json.loads((copy / "diffusion_pytorch_model.safetensors.index.json").read_text())
    victim = copy / sorted(set(index["weight_map"].values()))[-1]
    victim.unlink()
    with pytest.raises(MissingWeightsError, match=victim.name):
        load_dit(copy, parity_dir / "dit" / "infinitetalk.safetensors")

"""CLIP image encoder: loading rules and errors on a tiny model in the official file layout."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from infinitetalk.errors import CheckpointError, MissingWeightsError
from infinitetalk.models.image import CLIPVisionConfig, CLIPVisionEncoder
from infinitetalk.weights.clip_loader import load_clip_vision

TINY = CLIPVisionConfig.tiny()


def official_state(cfg: CLIPVisionConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A whole-CLIP state dict in the official layout: every visual block, post_norm, head,
    plus text-tower keys and log_scale that the loader must leave alone."""
    g = torch.Generator().manual_seed(seed)
    full = replace(cfg, num_used_layers=cfg.num_layers)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CLIPVisionEncoder(full).state_dict().items()}
    shapes["post_norm.weight"] = shapes["post_norm.bias"] = (cfg.dim,)
    shapes["head"] = (cfg.dim, 16)
    state = {f"visual.{k}": torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    state["textual.token_embedding.weight"] = torch.randn(10, 8, generator=g)
    state["textual.head.0.weight"] = torch.randn(8, 8, generator=g)
    state["log_scale"] = torch.tensor(4.6)
    return state


@pytest.fixture()
def tiny_file(tmp_path: Path) -> Path:
    path = tmp_path / "models_clip_tiny.pth"
    torch.save(official_state(TINY), path)
    return path


def test_loads_visual_tower_only_and_runs(tiny_file: Path):
    t0 = time.process_time()
    model = load_clip_vision(tiny_file, TINY)
    names = set(model.state_dict())
    assert not any(n.startswith(("textual", "visual.", "post_norm", "head")) for n in names)
    assert f"transformer.{TINY.num_layers - 1}.norm1.weight" not in names  # last block is not built
    assert len(model.transformer) == TINY.num_used_layers
    ref = official_state(TINY)
    assert torch.equal(model.transformer[0].attn.to_qkv.weight, ref["visual.transformer.0.attn.to_qkv.weight"])

    image = torch.rand(2, 3, 40, 56) * 2 - 1
    with torch.no_grad():
        out = model(image)
        video = model(image.unsqueeze(2))  # the official [B, 3, 1, H, W] layout
    assert out.shape == (2, TINY.num_tokens, TINY.dim)
    assert torch.equal(out, video)
    print(f"[time] clip tiny load+forward: {time.process_time() - t0:.2f}s cpu")


def test_video_frames_become_images_in_batch_frame_order(tiny_file: Path):
    model = load_clip_vision(tiny_file, TINY)
    video = torch.rand(2, 3, 3, 30, 30) * 2 - 1
    with torch.no_grad():
        out = model(video)
        single = model(video[1, :, 2][None])
    assert out.shape[0] == 6
    torch.testing.assert_close(out[5:6], single)


def test_bfloat16_load(tiny_file: Path):
    model = load_clip_vision(tiny_file, TINY, dtype=torch.bfloat16)
    assert model.pos_embedding.dtype == torch.bfloat16
    image = torch.rand(1, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        got = model(image).float()
        ref = load_clip_vision(tiny_file, TINY)(image)
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_missing_file_names_it(tmp_path: Path):
    path = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    with pytest.raises(MissingWeightsError) as err:
        load_clip_vision(path, TINY)
    assert str(path) in str(err.value) and err.value.missing == [str(path)]


def test_missing_visual_key_names_key_and_file(tmp_path: Path):
    state = official_state(TINY)
    del state["visual.transformer.0.attn.proj.bias"]
    path = tmp_path / "clip_incomplete.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_clip_vision(path, TINY)
    assert "transformer.0.attn.proj.bias" in str(err.value) and str(path) in str(err.value)


def test_missing_unused_last_block_is_fine(tmp_path: Path):
    state = {k: v for k, v in official_state(TINY).items() if not k.startswith(f"visual.transformer.{TINY.num_layers - 1}.")}
    path = tmp_path / "clip_31.pth"
    torch.save(state, path)
    assert len(load_clip_vision(path, TINY).transformer) == TINY.num_used_layers


def test_unknown_visual_key_is_refused(tmp_path: Path):
    state = official_state(TINY)
    state["visual.extra.weight"] = torch.zeros(3)
    path = tmp_path / "clip_extra.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="extra.weight"):
        load_clip_vision(path, TINY)


def test_file_without_visual_tower_is_refused(tmp_path: Path):
    path = tmp_path / "not_clip.pth"
    torch.save({"token_embedding.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(CheckpointError, match="visual"):
        load_clip_vision(path, TINY)


def test_corrupt_file_names_it(tmp_path: Path, tiny_file: Path):
    path = tmp_path / "clip_truncated.pth"
    path.write_bytes(tiny_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as err:
        load_clip_vision(path, TINY)
    assert str(path) in str(err.value)


def test_wrong_size_names_key(tiny_file: Path):
    other = CLIPVisionConfig(image_size=28, patch_size=14, dim=32, num_heads=4, num_layers=3, num_used_layers=2)
    with pytest.raises(CheckpointError, match="shape"):
        load_clip_vision(tiny_file, other)


def test_real_size_layout_matches_official_keys(parity_dir: Path):
    """The ViT-H/14 module built on meta has exactly the official visual keys and shapes
    (minus the last block, post_norm and head), checked against parity/clip/keys.json."""
    keys = json.loads((parity_dir / "clip" / "keys.json").read_text())
    keys = keys["keys"] if isinstance(keys, dict) else keys
    official = {k[len("visual."):]: tuple(s) for k, s in keys}
    cfg = CLIPVisionConfig.from_shapes(official)
    with torch.device("meta"):
        model = CLIPVisionEncoder(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    last = f"transformer.{cfg.num_layers - 1}."
    unused = {k for k in official if k.startswith(last) or k.startswith("post_norm") or k == "head"}
    assert ours == {k: s for k, s in official.items() if k not in unused}
    if cfg.dim == 1280:  # the real release: 257 tokens x 1280, 31 of 32 blocks
        assert cfg == CLIPVisionConfig.vit_h_14()
        assert cfg.num_tokens == 257 and cfg.num_used_layers == 31


def test_default_config_is_vit_h_14():
    cfg = CLIPVisionConfig()
    with torch.device("meta"):
        model = CLIPVisionEncoder(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.num_used_layers, cfg.num_tokens) == (1280, 16, 32, 31, 257)
    assert 600e6 < n < 632e6  # 632M in the file, minus the last block, post_norm and head

"""DiT structure: the 14B parameter count, config parsing, and the tiny model's forward."""
from __future__ import annotations

import re

import pytest
import torch

from infinitetalk.errors import InternalError
from infinitetalk.models.dit import InfiniteTalkDiT, WanDiTConfig, count_parameters

# config.json of Wan2.1-I2V-14B-480P as released (the audio-adapter sizes are absent).
OFFICIAL_14B_JSON = {
    "_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 5120, "eps": 1e-06, "ffn_dim": 13824,
    "freq_dim": 256, "in_dim": 36, "model_type": "i2v", "num_heads": 40, "num_layers": 40, "out_dim": 16,
    "text_len": 512,
}


def _meta_model(cfg: WanDiTConfig) -> InfiniteTalkDiT:
    with torch.device("meta"):
        return InfiniteTalkDiT(cfg)


def test_14b_parameter_count_is_the_official_one():
    assert count_parameters(_meta_model(WanDiTConfig.infinitetalk_14b())) == 18_882_046_784


def test_official_json_gives_the_14b_config():
    cfg = WanDiTConfig.from_official_json(OFFICIAL_14B_JSON)
    assert cfg == WanDiTConfig.infinitetalk_14b()
    assert (cfg.text_dim, cfg.intermediate_dim, cfg.context_tokens, cfg.output_dim) == (4096, 512, 32, 768)
    assert WanDiTConfig.from_official_json(cfg.to_json_dict()) == cfg


def test_official_json_rejects_other_models():
    with pytest.raises(ValueError, match="i2v"):
        WanDiTConfig.from_official_json(dict(OFFICIAL_14B_JSON, model_type="t2v"))


def test_14b_shapes_of_adapter_layers():
    model = _meta_model(WanDiTConfig.infinitetalk_14b())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["audio_proj.proj1.weight"] == (512, 5 * 12 * 768)
    assert shapes["audio_proj.proj1_vf.weight"] == (512, 8 * 12 * 768)
    assert shapes["audio_proj.proj3.weight"] == (32 * 768, 512)
    assert shapes["blocks.39.audio_cross_attn.kv_linear.weight"] == (2 * 5120, 768)
    assert shapes["img_emb.proj.1.weight"] == (1280, 1280)
    assert shapes["patch_embedding.weight"] == (5120, 36, 1, 2, 2)
    assert shapes["head.head.weight"] == (64, 5120)
    assert shapes["blocks.0.modulation"] == (1, 6, 5120)


def test_tiny_has_the_same_parameter_names_as_14b():
    def names(cfg):
        return {re.sub(r"^blocks\.\d+\.", "blocks.N.", k) for k in _meta_model(cfg).state_dict()}

    assert names(WanDiTConfig.tiny()) == names(WanDiTConfig.infinitetalk_14b())


def _tiny_inputs(cfg: WanDiTConfig, speakers: int, frames: int = 2, h: int = 4, w: int = 6, batch: int = 1):
    g = torch.Generator().manual_seed(1)
    video_frames = 1 + cfg.vae_scale * (frames - 1)
    masks = torch.zeros(3, h, w)
    masks[0, :, : w // 2] = 1
    masks[1, :, w // 2 :] = 1
    return dict(
        x=torch.randn(batch, cfg.out_dim, frames, h, w, generator=g),
        t=torch.tensor([900.0]),
        context=[torch.randn(5, cfg.text_dim, generator=g) for _ in range(batch)],
        clip_fea=torch.randn(batch, 257, cfg.clip_dim, generator=g),
        y=torch.randn(batch, cfg.in_dim - cfg.out_dim, frames, h, w, generator=g),
        audio=torch.randn(batch, speakers, video_frames, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, generator=g),
        ref_target_masks=masks,
    )


@pytest.mark.parametrize("speakers", [1, 2])
def test_tiny_forward_shapes(speakers):
    cfg = WanDiTConfig.tiny()
    torch.manual_seed(0)
    model = InfiniteTalkDiT(cfg).eval()
    inputs = _tiny_inputs(cfg, speakers, batch=2)
    with torch.inference_mode():
        out = model(**inputs)
    assert out.shape == (2, cfg.out_dim, 2, 4, 6) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_residual_stream_is_row_major():
    """Every block gets (and returns) a contiguous [B, L, dim] stream: a channel-major one (the
    transposed patch-embedding view) would make every norm and residual read across rows."""
    cfg = WanDiTConfig.tiny()
    torch.manual_seed(0)
    model = InfiniteTalkDiT(cfg).eval()
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda _m, args, out: seen.append((args[0].is_contiguous(), out.is_contiguous())))
    with torch.inference_mode():
        model(**_tiny_inputs(cfg, 1))
    assert seen == [(True, True)] * len(model.blocks)


def test_tiny_bfloat16_runs_close_to_float32():
    cfg = WanDiTConfig.tiny()
    torch.manual_seed(0)
    model = InfiniteTalkDiT(cfg).eval()
    inputs = _tiny_inputs(cfg, 2)
    with torch.inference_mode():
        ref = model(**inputs)
        out = model.to(torch.bfloat16)(**inputs)
    assert out.dtype == torch.float32
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel


def test_bad_inputs_raise_internal_error():
    from infinitetalk.errors import InfiniteTalkError

    assert not issubclass(InternalError, InfiniteTalkError)  # a bug, not the user's input
    cfg = WanDiTConfig.tiny()
    model = InfiniteTalkDiT(cfg).eval()
    inputs = _tiny_inputs(cfg, 1)
    with torch.inference_mode():
        with pytest.raises(InternalError, match="audio"):
            model(**dict(inputs, audio=inputs["audio"][:, :, :-1]))
        with pytest.raises(InternalError, match="speakers"):
            model(**dict(inputs, audio=inputs["audio"].expand(-1, 3, -1, -1, -1, -1)))
        with pytest.raises(InternalError, match="at most"):
            model(**dict(inputs, context=[torch.zeros(cfg.text_len + 1, cfg.text_dim)]))

"""Behaviour of the Wan VAE module on the tiny config (random weights, no fixtures needed):
shapes, causality, free choice of chunk size, exact tiled decode, bfloat16."""
from __future__ import annotations

import time

import pytest
import torch

from infinitetalk.errors import InternalError
from infinitetalk.models.vae import DecodeTiling, WanVAE, WanVAEConfig, count_parameters


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def tiny() -> WanVAE:
    torch.manual_seed(1234)
    model = WanVAE(WanVAEConfig.tiny()).eval()
    with torch.no_grad():  # non-trivial norms and attention output so that every path matters
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.rand(1, 3, 9, 32, 48, generator=g) * 2 - 1


def test_release_config_sizes():
    cfg = WanVAEConfig()
    assert (cfg.temporal_stride, cfg.spatial_stride) == (4, 8)
    assert count_parameters(cfg) == 126_892_531  # the official Wan2.1_VAE.pth
    tiny = WanVAEConfig.tiny()
    assert (tiny.temporal_stride, tiny.spatial_stride, tiny.z_dim) == (4, 8, 16)
    assert count_parameters(tiny) < 3_000_000


def test_shapes_and_range(tiny, video):
    latent = tiny.encode(video)
    assert latent.shape == (1, 16, 3, 4, 6) and latent.dtype == torch.float32
    out = tiny.decode(latent)
    assert out.shape == (1, 3, 9, 32, 48) and out.dtype == torch.float32
    assert float(out.abs().max()) <= 1.0
    raw = tiny.decode(latent, clamp=False)
    assert torch.equal(raw.clamp(-1, 1), out)


def test_trailing_frames_are_ignored_like_the_official_encoder(tiny, video):
    assert torch.equal(tiny.encode(video[:, :, :7]), tiny.encode(video[:, :, :5]))


def test_encoder_and_decoder_are_causal(tiny, video):
    latent = tiny.encode(video)
    assert _rel(tiny.encode(video[:, :, :5]), latent[:, :, :2]) < 1e-5
    assert _rel(tiny.encode(video[:, :, :1]), latent[:, :, :1]) < 1e-5
    out = tiny.decode(latent, clamp=False)
    assert _rel(tiny.decode(latent[:, :, :2], clamp=False), out[:, :, :5]) < 1e-5


def test_chunk_size_does_not_change_the_result(tiny, video):
    latent = tiny.encode(video)
    assert _rel(tiny.encode(video, chunk_latents=2), latent) < 1e-5
    assert _rel(tiny.encode(video, chunk_latents=5), latent) < 1e-5
    out = tiny.decode(latent, clamp=False)
    for chunk in (2, 3):
        assert _rel(tiny.decode(latent, clamp=False, chunk_latents=chunk), out) < 1e-5


def test_batch_is_independent(tiny, video):
    other = video.flip(-1)
    both = tiny.encode(torch.cat([video, other]))
    assert _rel(both[1:], tiny.encode(other)) < 1e-5
    assert _rel(tiny.decode(both, clamp=False)[:1], tiny.decode(both[:1], clamp=False)) < 1e-5


def test_tiled_decode_equals_untiled(tiny):
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(1, 16, 2, 12, 20, generator=g)
    tiling = DecodeTiling(tile=8)
    overhead = tiny.tiling_overhead(tiling, 12, 20)
    assert overhead > 1.5  # really tiled, with halos (6 tiles)
    start = time.process_time()
    full = tiny.decode(latent, clamp=False)
    t_full = time.process_time() - start
    start = time.process_time()
    tiled = tiny.decode(latent, clamp=False, tiling=tiling)
    t_tiled = time.process_time() - start
    err = _rel(tiled, full)
    print(f"\n[tiling] tile 8 on 12x20 latent: rel max diff {err:.2e}, area overhead {overhead:.2f}, "
          f"CPU time {t_tiled:.2f} s vs {t_full:.2f} s untiled")
    assert err < 1e-5
    # chunked tiles too
    assert _rel(tiny.decode(latent, clamp=False, tiling=tiling, chunk_latents=2), full) < 1e-5


def test_tiling_geometry():
    tiling = DecodeTiling(tile=32)
    assert tiling.cores(90) == [(0, 32), (32, 64), (64, 90)]
    assert tiling.overhead(10, 10, 0) == 1.0
    with torch.device("meta"):
        model = WanVAE()
    assert model.decoder.tiling_split() == (8, 2, 12)  # whole frames up to the first upsampling, 6-latent-px halo
    assert 1.5 < model.tiling_overhead(tiling, 90, 160) < 1.8  # 720x1280


def test_bfloat16_runs_and_stays_close(tiny, video):
    ref_latent = tiny.encode(video)
    ref_out = tiny.decode(ref_latent, clamp=False)
    half = WanVAE(tiny.config).eval()
    half.load_state_dict(tiny.state_dict())
    half.to(torch.bfloat16)
    latent = half.encode(video)
    out = half.decode(ref_latent, clamp=False)
    assert latent.dtype == out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert _rel(latent, ref_latent) < 5e-2
    assert _rel(out, ref_out) < 1e-1


def test_bad_shapes_raise_internal_error(tiny):
    with pytest.raises(InternalError, match="frames, height, width"):
        tiny.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(InternalError, match="16, frames"):
        tiny.decode(torch.zeros(1, 8, 2, 2, 2))

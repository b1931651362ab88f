"""The VAE fast-path options (`VAEFastOptions`) compute the same function as the reference path.

Tiny config, random weights, float32 on the CPU: every norm/SiLU mode, channels-last activations,
larger chunks and tiled decode against the reference `encode` / `decode` (no options). The
compiled mode is the "fused" function through torch.compile; it is checked on the GPU by
benchmarks/bench_vae.py (compiling on these CPUs takes longer than the whole test file)."""
from __future__ import annotations

import pytest
import torch

from infinitetalk.models.vae import DecodeTiling, VAEFastOptions, WanVAE, WanVAEConfig, norm_act_inplace


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def tiny() -> WanVAE:
    torch.manual_seed(4321)
    model = WanVAE(WanVAEConfig.tiny()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def reference(tiny):
    g = torch.Generator().manual_seed(11)
    video = torch.rand(1, 3, 9, 32, 40, generator=g) * 2 - 1
    latent = tiny.encode(video)
    return video, latent, tiny.decode(latent, clamp=False)


@pytest.mark.parametrize("norm_act", ["reference", "inplace", "fused"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_options_compute_the_reference_function(tiny, reference, norm_act, channels_last):
    video, latent, out = reference
    fast = VAEFastOptions(channels_last=channels_last, norm_act=norm_act, chunk_latents=2)
    got_latent = tiny.encode(video, fast=fast)
    got_out = tiny.decode(latent, clamp=False, fast=fast)
    tiled = tiny.decode(latent, clamp=False, fast=fast, tiling=DecodeTiling(tile=2), chunk_latents=1)
    errs = (_rel(got_latent, latent), _rel(got_out, out), _rel(tiled, out))
    print(f"\n[vae fast] {norm_act} channels_last={channels_last}: encode {errs[0]:.1e} decode {errs[1]:.1e} "
          f"tiled {errs[2]:.1e}")
    assert got_latent.shape == latent.shape and got_out.shape == out.shape
    assert got_latent.is_contiguous() and got_out.is_contiguous()
    assert max(errs) < 1e-5


@torch.no_grad()
def test_channels_last_layers_keep_the_layout(tiny):
    """The non-convolution layers keep channels-last (cuDNN keeps it through the convolutions;
    the CPU convolutions return contiguous tensors, so those are not checked here)."""
    cl = torch.channels_last_3d
    block = tiny.decoder.middle[0]
    x = torch.randn(1, 64, 3, 4, 5).contiguous(memory_format=cl)
    padded = norm_act_inplace(x, block.residual[0], torch.zeros(1, 64, 2, 4, 5).contiguous(memory_format=cl))
    assert padded.shape[2] == 5 and padded.is_contiguous(memory_format=cl)
    assert tiny.decoder.middle[1](x).is_contiguous(memory_format=cl)  # attention block
    up = next(m for m in tiny.decoder.upsamples if getattr(m, "mode", "") == "upsample3d")
    z = up._time_upsample(torch.randn(1, up.time_conv.in_channels, 3, 4, 5).contiguous(memory_format=cl), None)
    assert z.shape[2] == 5  # first frame + 2 x 2 interleaved (layout follows the CPU conv: not checked)


def test_options_are_checked(tiny):
    with pytest.raises(ValueError, match="norm_act"):
        VAEFastOptions(norm_act="fast")
    with pytest.raises(ValueError, match="chunk_latents"):
        VAEFastOptions(chunk_latents=0)
    with pytest.raises(ValueError, match="chunk_latents"):
        tiny.encode(torch.zeros(1, 3, 1, 16, 16), chunk_latents=0)

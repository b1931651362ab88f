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



def _dense(x: torch.Tensor) -> bool:
    """x is contiguous in one of the two layouts (a tile view of a frame is in neither)."""
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("channels_last", [False, True])
def test_tiles_reach_the_norm_kernel_as_dense_tensors(tiny, channels_last):
    """The tiled decode hands each tile to the decoder as a dense copy, not a view of the frame: the
    compiled norm kernel guards on strides, and the views (strides of the whole frame) compiled
    graphs the untiled decode had not, one more per tile layout, up to dynamo's recompile limit (the
    720p budgeted window on the GPU logged it), after which new shapes ran eagerly."""
    from infinitetalk.models.vae.blocks import CausalCache, FusedNormAct

    # 16 x 20 latent pixels: tile cores of 4 with a halo of 6 cut real windows (not the whole frame)
    latent = torch.randn(1, tiny.config.z_dim, 2, 16, 20, generator=torch.Generator().manual_seed(5))
    whole = tiny.decode(latent, clamp=False)
    fused = FusedNormAct(compile=False)
    seen: list[bool] = []

    def recording(x, norm, prev):
        seen.append(_dense(x))
        return fused(x, norm, prev)

    fast = VAEFastOptions(channels_last=channels_last, norm_act="fused")
    tiny._new_cache = lambda _fast: CausalCache(recording)  # the fused kernel, with its inputs recorded
    try:
        tiled = tiny.decode(latent, clamp=False, fast=fast, tiling=DecodeTiling(tile=4), chunk_latents=1)
    finally:
        del tiny._new_cache
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} norm inputs were views"
    assert _rel(tiled, whole) < 1e-5

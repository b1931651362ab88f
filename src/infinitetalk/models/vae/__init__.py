"""The Wan2.1 causal 3D VAE (``Wan2.1_VAE.pth``): video <-> normalised 16-channel latent.

What it computes (the official ``WanVAE`` / ``WanVAE_`` of Wan2.1 as InfiniteTalk uses it):

* ``encode(video [B, 3, F, H, W] in [-1, 1])`` -> ``[B, 16, 1 + (F - 1) // 4, H / 8, W / 8]``:
  the encoder mean, normalised per channel as ``(mu - mean) * inv_std`` with ``inv_std = 1 / std``
  computed in float32 (the official order of rounding). The log-variance is dropped and nothing is
  sampled. Frames past the last complete group of four are ignored, as the official code does.
* ``decode(latent [B, 16, T, h, w])`` -> ``[B, 3, 1 + 4 (T - 1), 8 h, 8 w]`` float32, clamped to
  [-1, 1] unless ``clamp=False``. The decoder receives ``latent / inv_std + mean``.

Causality and chunking. Every 3x3x3 convolution is causal in time (two frames of left context,
zeros before the first frame). The official code runs the encoder on chunks of 1, 4, 4, ... frames
and the decoder on one latent frame at a time, each convolution keeping the last two input frames
of the previous chunk in a feature cache. That is exactly a causal pass over the whole sequence,
except for the time resampling layers, whose first-frame rules are reproduced here:

* time downsampling (encoder): the first frame passes through; every later output frame is a
  stride-2, kernel-3 convolution over [previous frame, two new frames], i.e. windows
  (0, 1, 2), (2, 3, 4), ... with no padding;
* time upsampling (decoder): the first frame passes through; all later frames go through a causal
  kernel-3 convolution whose history starts with zeros (the first frame is *not* part of it), and
  each result's 2C channels become two consecutive frames (first half, then second half).

Here the state carried between chunks lives in an explicit ``CausalCache`` passed down the call,
keyed by layer, so chunk sizes are a free choice: ``chunk_latents=1`` reproduces the official
schedule; larger chunks compute the same function (up to float round-off) with fewer, larger
kernel launches and more activation memory. Nothing is stored on the modules between calls.

Layouts. Per-frame 2D convolutions (the spatial resampling convs and the attention projections)
keep their official ``nn.Conv2d`` parameters but run on the 5D tensor (weights viewed as
``(k, 1, kh, kw)`` conv3d / linear kernels), so no ``(b t) c h w`` permute copies are made. No op
assumes a memory format (a ``torch.channels_last_3d`` input gives the same result, and the layers
keep the input's layout), so the GPU path can choose the faster layout (channels-last on Hopper).

Fast path. ``encode``/``decode`` take ``fast=VAEFastOptions(...)`` (explicit, nothing is patched):
channels-last activations for cuDNN, cuDNN autotuning scoped to the call, larger time chunks, and
the norm + SiLU in front of every causal convolution written straight into the convolution's
time-padded input (no ``torch.cat`` copy), optionally as one ``torch.compile``-d kernel computed in
float32. ``norm_act="inplace"`` is the reference arithmetic (equal up to the convolutions' summation
order); ``"compiled"`` differs by float round-off (the norm factor is not rounded to the activation
dtype, which makes the bf16 path slightly more accurate). Use it with bf16
weights (``load_vae(..., dtype=torch.bfloat16)``) on a GPU; see ``benchmarks/bench_vae.py``.

Low memory. ``decode(..., tiling=DecodeTiling(...))`` runs the high-resolution decoder levels on
spatial tiles with halos, one at a time (each through the full causal time pass with its own
cache); same result as the untiled decode up to round-off. See ``DecodeTiling`` for memory and cost.
Memory does not grow with the window length beyond the output itself and, when tiling, the
coarse-level activations: time is always processed ``chunk_latents`` latent frames at a time.

dtypes. Parameters may be float32 or bfloat16; activations follow the parameter dtype. Channel norms
accumulate in float32; the latent (de)normalisation is always float32 and both public methods return
float32 tensors (the official wrapper does the same with ``.float()``).
"""
from .blocks import (
    AttentionBlock,
    CausalCache,
    CausalConv3d,
    FrameConv2d,
    FusedNormAct,
    NormActFn,
    OutputHead,
    Resample,
    ResidualBlock,
    RMSNorm,
    fused_norm_silu_pad,
    norm_act_inplace,
)
from .config import (
    CAUSAL_CONTEXT,
    NORM_ACT_MODES,
    WAN21_LATENT_MEAN,
    WAN21_LATENT_STD,
    DecodeTiling,
    VAEFastOptions,
    WanVAEConfig,
)
from .model import Decoder3d, Encoder3d, WanVAE, count_parameters

__all__ = [
    "CAUSAL_CONTEXT",
    "NORM_ACT_MODES",
    "WAN21_LATENT_MEAN",
    "WAN21_LATENT_STD",
    "AttentionBlock",
    "CausalCache",
    "CausalConv3d",
    "DecodeTiling",
    "Decoder3d",
    "Encoder3d",
    "FrameConv2d",
    "FusedNormAct",
    "NormActFn",
    "OutputHead",
    "RMSNorm",
    "Resample",
    "ResidualBlock",
    "VAEFastOptions",
    "WanVAE",
    "WanVAEConfig",
    "count_parameters",
    "fused_norm_silu_pad",
    "norm_act_inplace",
]

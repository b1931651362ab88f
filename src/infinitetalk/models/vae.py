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
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

log = logging.getLogger(__name__)

#: Per-channel latent statistics of the released Wan2.1 VAE (the 16 constants of wan/modules/vae.py).
WAN21_LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

#: Frames of left context a kernel-3 causal convolution needs from the previous chunk.
CAUSAL_CONTEXT = 2


@dataclass(frozen=True)
class WanVAEConfig:
    """Sizes of the Wan VAE. The defaults are the released ``Wan2.1_VAE.pth`` (about 127M parameters).

    ``temporal_downsample[i]`` says whether the i-th downsampling step of the encoder also halves
    time; the decoder mirrors it. ``attn_scales`` lists the resolutions (1.0 = full, 0.5, ...) that
    get an extra attention block in the down/up paths (none in the release; the middle blocks always
    have one).
    """

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = field(default=WAN21_LATENT_MEAN)
    latent_std: tuple[float, ...] = field(default=WAN21_LATENT_STD)

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temporal_downsample needs one entry per downsampling step (len(dim_mult) - 1)")
        if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
            raise ValueError(f"latent_mean and latent_std need z_dim={self.z_dim} values each")

    @classmethod
    def tiny(cls) -> "WanVAEConfig":
        """A small VAE with the same strides and latent (16 channels, 4x8x8) for tests and ``--model tiny``."""
        return cls(dim=16, num_res_blocks=1)

    @property
    def temporal_stride(self) -> int:
        """Video frames per latent frame after the first (4 for the release)."""
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent pixel along height and width (8 for the release)."""
        return 2 ** (len(self.dim_mult) - 1)


@dataclass(frozen=True)
class DecodeTiling:
    """Low-memory decode: the high-resolution part of the decoder runs on spatial tiles of ``tile`` x
    ``tile`` latent pixels, one tile at a time, each with a halo wide enough to cover the receptive
    field of the remaining layers, so the result equals the untiled decode up to float round-off.

    How: the decoder's first layers (conv1, the middle blocks with their frame-global attention, the
    first level and its upsampling) run on whole frames; their output (half the latent width of
    channels at 2x latent resolution, e.g. 192 x 2h x 2w per frame for the release, ~0.9 GB in bf16
    for 81 frames of 720x1280) is kept for the whole window. The remaining levels, which hold almost
    all of the activation memory, then run tile by tile through the full causal time pass (each tile
    with its own cache), and only each tile's core is written to the output.

    Memory: peak activations and feature caches of the tiled levels scale with the tile area (core +
    2 halos) instead of the frame area: with the default 32 latent pixels (256 px core, 6 latent
    pixels = 48 px of halo per side) an interior tile holds about 1/7 of a 720x1280 frame's.
    Compute overhead: the tiled levels (most of the decoder's work) recompute the halos; their work
    grows by ``WanVAE.tiling_overhead`` = 1.65x for 720x1280 and 1.69x for 640x640 with ``tile=32``,
    1.30x / 1.32x with ``tile=64``, plus one sequence of kernel launches per tile and chunk.
    Accuracy: not an approximation. Measured max |tiled - untiled| / max |untiled| <= 2.4e-6 in
    float32 (release architecture, synthetic weights, 24x24 latent, 3 frames; 0 on the parity fixture).
    """

    tile: int = 32

    def __post_init__(self) -> None:
        if self.tile < 1:
            raise ValueError("DecodeTiling.tile must be >= 1")

    def cores(self, length: int) -> list[tuple[int, int]]:
        """[start, stop) of the tile cores along an axis of `length` pixels (same units as `tile`)."""
        return [(a, min(a + self.tile, length)) for a in range(0, length, self.tile)]

    def overhead(self, height: int, width: int, halo: int) -> float:
        """Computed area over frame area when tiling a `height` x `width` grid with `halo` pixels (same units)."""
        def covered(length: int) -> int:
            return sum(min(length, b + halo) - max(0, a - halo) for a, b in self.cores(length))

        return covered(height) * covered(width) / float(height * width)


NORM_ACT_MODES = ("reference", "inplace", "fused", "compiled")


@dataclass(frozen=True)
class VAEFastOptions:
    """Speed options of ``WanVAE.encode`` / ``WanVAE.decode`` (pass as ``fast=``).

    channels_last: run the activations in ``torch.channels_last_3d`` (NDHWC), the layout of
        cuDNN's fastest 3-D convolutions on recent GPUs.
    cudnn_benchmark: let cuDNN time its algorithms for each convolution shape (scoped to the call
        with ``torch.backends.cudnn.flags``; the first call per shape pays the search).
    chunk_latents: latent frames per step when the call does not name ``chunk_latents``
        (same result as 1, fewer launches, more activation memory).
    norm_act: how the RMS norm + SiLU in front of each causal convolution runs:
        "reference" (norm, SiLU, then ``cat`` with the cached frames), "inplace" (same arithmetic,
        written straight into the convolution's padded input: one copy less) or "compiled" (one ``torch.compile``-d float32 kernel producing the padded input:
        one read and one write of the activation instead of ~6 passes); "fused" is that float32
        function run eagerly (for checking it, and for devices without a compiler).
    """

    channels_last: bool = True
    cudnn_benchmark: bool = True
    chunk_latents: int = 4
    norm_act: str = "compiled"

    def __post_init__(self) -> None:
        if self.norm_act not in NORM_ACT_MODES:
            raise ValueError(f"norm_act must be one of {NORM_ACT_MODES}, got {self.norm_act!r}")
        if self.chunk_latents < 1:
            raise ValueError("VAEFastOptions.chunk_latents must be >= 1")


NormActFn = Callable[[torch.Tensor, "RMSNorm", torch.Tensor], torch.Tensor]
"""(x [B, C, T, H, W], norm, prev [B, C, ctx, H, W]) -> cat([prev, silu(norm(x))], time)."""


def norm_act_inplace(x: torch.Tensor, norm: "RMSNorm", prev: torch.Tensor) -> torch.Tensor:
    """The reference norm + SiLU arithmetic, written into a fresh time-padded buffer after `prev`
    (keeps x's memory format; equal to ``cat([prev, silu(norm(x))])`` element for element)."""
    b, c, t, h, w = x.shape
    ctx = prev.shape[2]
    padded = torch.empty((b, c, ctx + t, h, w), dtype=x.dtype, device=x.device, memory_format=_layout_of(x))
    padded[:, :, :ctx] = prev
    out = padded[:, :, ctx:]
    torch.mul(x, norm.factor(x), out=out)
    out.mul_(norm.gamma.view(-1, 1, 1, 1))
    F.silu(out, inplace=True)
    return padded


def fused_norm_silu_pad(x: torch.Tensor, gamma_scaled: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """cat([prev, silu(x / ||x||_C * gamma_scaled)], time) computed in float32 (the function that
    ``norm_act="compiled"`` hands to ``torch.compile``; gamma_scaled = gamma * sqrt(C), [1, C, 1, 1, 1])."""
    xf = x.float()
    norm = torch.linalg.vector_norm(xf, dim=1, keepdim=True).clamp_min(1e-12)
    h = F.silu(xf * (gamma_scaled / norm)).to(x.dtype)
    return torch.cat([prev, h], dim=2)


class FusedNormAct:
    """A `NormActFn` running `fused_norm_silu_pad`, through ``torch.compile`` when `compile` (one
    compiled instance per VAE, built on first use; shapes that change recompile with dynamic sizes)."""

    def __init__(self, compile: bool = True) -> None:
        self._fn = torch.compile(fused_norm_silu_pad, dynamic=None) if compile else fused_norm_silu_pad

    def __call__(self, x: torch.Tensor, norm: "RMSNorm", prev: torch.Tensor) -> torch.Tensor:
        gamma = norm.gamma.detach().float().view(1, -1, 1, 1, 1) * norm.scale
        out = self._fn(x, gamma, prev)
        fmt = _layout_of(x)
        return out if out.is_contiguous(memory_format=fmt) else out.contiguous(memory_format=fmt)


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d when x is stored that way (and is not trivially both), else contiguous."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class CausalCache:
    """State carried from one temporal chunk to the next during one encode or decode pass.

    For each causal layer (the key is the layer module itself) it holds what that layer still needs
    from frames it has already seen: the last two input frames of a causal convolution, the last
    frame before a time downsampling, or a marker that a time upsampling layer has already passed
    its first frame through. A cache belongs to exactly one pass over one sequence (one spatial tile);
    create a new one for every call. It also carries the pass's norm + SiLU kernel (``norm_act``),
    chosen by ``VAEFastOptions.norm_act``.
    """

    def __init__(self, norm_act: Optional[NormActFn] = None) -> None:
        self._state: dict[nn.Module, object] = {}
        #: how `CausalConv3d.forward_normed` computes norm + SiLU + padding (None: the reference way).
        self.norm_act = norm_act

    def get(self, layer: nn.Module):
        return self._state.get(layer)

    def put(self, layer: nn.Module, value) -> None:
        self._state[layer] = value

    def __contains__(self, layer: nn.Module) -> bool:
        return layer in self._state


class CausalConv3d(nn.Conv3d):
    """A Conv3d that is causal in time: ``2 * padding_t`` frames of left context (zeros at the start
    of the sequence, the cached frames of the previous chunk otherwise), none on the right. Spatial
    padding is symmetric and done inside the convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        pad = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, pad[1], pad[2]))
        self.time_context = 2 * pad[0]

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        ctx = self.time_context
        if ctx:
            prev = cache.get(self) if cache is not None else None
            x = F.pad(x, (0, 0, 0, 0, ctx, 0)) if prev is None else torch.cat([prev, x], dim=2)
            if cache is not None:
                cache.put(self, x[:, :, -ctx:].clone())
        return super().forward(x)

    def forward_normed(self, x: torch.Tensor, norm: "RMSNorm", cache: Optional[CausalCache] = None) -> torch.Tensor:
        """``self(silu(norm(x)), cache)``, with the norm + SiLU done by the cache's ``norm_act`` when
        it has one (writing directly into the time-padded convolution input)."""
        fn = cache.norm_act if cache is not None else None
        ctx = self.time_context
        if fn is None or not ctx:
            return self(F.silu(norm(x), inplace=True), cache)
        prev = cache.get(self)
        if prev is None:
            b, c, _, h, w = x.shape
            prev = torch.empty((b, c, ctx, h, w), dtype=x.dtype, device=x.device, memory_format=_layout_of(x)).zero_()
        padded = fn(x, norm, prev)
        cache.put(self, padded[:, :, -ctx:].clone())
        return super().forward(padded)


class FrameConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (official parameter shape) applied to every frame of a [B, C, T, H, W] tensor,
    computed as a conv3d with a depth-1 kernel so that no frame-batching permute copy is needed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self.weight.unsqueeze(2), self.bias, (1, *self.stride), (0, *self.padding))


class RMSNorm(nn.Module):
    """``F.normalize`` over channels times sqrt(C) times gamma (the official ``RMS_norm``, no bias).

    ``gamma_dims`` only sets the stored shape of gamma, (C, 1, 1, 1) in 3D blocks and (C, 1, 1) in
    the attention block, as in the official file; the input is always [B, C, T, H, W]. The norm is
    accumulated in float32 whatever the activation dtype.
    """

    def __init__(self, dim: int, gamma_dims: int = 3):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * gamma_dims)))

    def factor(self, x: torch.Tensor) -> torch.Tensor:
        """sqrt(C) / ||x||_C per position, [B, 1, ...], accumulated in float32, in x's dtype."""
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32).clamp_min_(1e-12)
        return (self.scale / norm).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor(x) * self.gamma.view(-1, 1, 1, 1)


class ResidualBlock(nn.Module):
    """norm, SiLU, causal conv, norm, SiLU, (dropout), causal conv, plus a 1x1x1 shortcut when widths differ.

    The ``residual`` Sequential keeps the official indices (0 norm, 2 conv, 3 norm, 6 conv)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        r = self.residual
        h = self.shortcut(x)
        y = r[2].forward_normed(x, r[0], cache)
        y = r[6].forward_normed(y, r[3], cache)
        return y.add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across time), residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, gamma_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        qkv = F.linear(tokens, self.to_qkv.weight.view(3 * c, c), self.to_qkv.bias)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = F.linear(out, self.proj.weight.view(c, c), self.proj.bias)
        return x + out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class OutputHead(nn.Sequential):
    """norm, SiLU, causal 3x3x3 conv (official indices 0 and 2), the last stage of encoder and decoder."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        return self[2].forward_normed(x, self[0], cache)


class Resample(nn.Module):
    """Spatial x2 up/down sampling, optionally with the causal time x2 up/down sampling.

    ``resample`` keeps the official indices: 0 is the parameter-free nearest-exact upsampling or the
    right/bottom zero padding, 1 the per-frame 3x3 conv (stride 2 when downsampling; upsampling halves
    the channels). ``time_conv`` exists for the 3d modes.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact"),
                FrameConv2d(dim, dim // 2, 3, padding=1),
            )
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), FrameConv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_upsample(x, cache)
        x = self.resample(x)
        if self.mode == "downsample3d":
            x = self._time_downsample(x, cache)
        return x

    def _time_upsample(self, x: torch.Tensor, cache: Optional[CausalCache]) -> torch.Tensor:
        first = None
        if cache is None or self not in cache:
            first, x = x[:, :, :1], x[:, :, 1:]
            if cache is not None:
                cache.put(self, True)
        if x.shape[2] == 0:
            return first
        y = self.time_conv(x, cache)  # [B, 2C, t, H, W] -> [B, C, 2t, H, W], halves interleaved in time
        b, c2, t, h, w = y.shape
        c = c2 // 2
        lead = 0 if first is None else 1
        out = torch.empty((b, c, lead + 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=_layout_of(y))
        if first is not None:
            out[:, :, :1] = first
        out[:, :, lead::2] = y[:, :c]
        out[:, :, lead + 1 :: 2] = y[:, c:]
        return out

    def _time_downsample(self, x: torch.Tensor, cache: Optional[CausalCache]) -> torch.Tensor:
        prev = cache.get(self) if cache is not None else None
        if cache is not None:
            cache.put(self, x[:, :, -1:].clone())
        if prev is not None:
            return self.time_conv(torch.cat([prev, x], dim=2))
        if x.shape[2] == 1:
            return x
        return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)


class Encoder3d(nn.Module):
    """conv1, ``downsamples`` (residual blocks and resampling per level), ``middle`` (res, attention,
    res) and ``head`` (norm, SiLU, causal conv to 2 x z_dim channels: mean and log-variance)."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        scale = 1.0
        last = len(cfg.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != last:
                blocks.append(Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*blocks)
        top = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.head = OutputHead(top, 2 * cfg.z_dim)

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in self.downsamples:
            x = layer(x, cache)
        for layer in self.middle:
            x = layer(x, cache)
        return self.head(x, cache)


class Decoder3d(nn.Module):
    """conv1, ``middle`` (res, attention, res), ``upsamples`` (num_res_blocks + 1 residual blocks and a
    resampling per level; each upsampling halves the width, so later levels start at half width) and
    ``head`` (norm, SiLU, causal conv to RGB)."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = tuple(cfg.temporal_downsample[::-1])
        scale = 1.0 / 2 ** (len(mult) - 2)
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0]))
        blocks: list[nn.Module] = []
        last = len(mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != last:
                blocks.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*blocks)
        self.head = OutputHead(dims[-1], 3)

    def stages(self) -> list[nn.Module]:
        """The layers in execution order; each is called as ``layer(x, cache)``."""
        return [self.conv1, *self.middle, *self.upsamples, self.head]

    def forward(
        self, x: torch.Tensor, cache: Optional[CausalCache] = None, start: int = 0, stop: Optional[int] = None
    ) -> torch.Tensor:
        """Run ``stages()[start:stop]`` (all by default) on one temporal chunk."""
        for layer in self.stages()[start:stop]:
            x = layer(x, cache)
        return x

    def tiling_split(self) -> tuple[int, int, int]:
        """Where a tiled decode may start tiling: (stage index, resolution factor over the latent there,
        halo in pixels at that resolution covering the spatial receptive field of every later stage).

        The split is just after the first spatial upsampling (all frame-global attention is before it);
        the halo sums the conv radii of the later stages, each scaled to the split resolution."""
        stages = self.stages()
        split = next(i for i, layer in enumerate(stages) if isinstance(layer, Resample)) + 1
        halo, scale = 0.0, 1.0
        for layer in stages[split:]:
            if isinstance(layer, AttentionBlock):
                raise ValueError("tiled decode needs the attention blocks before the first upsampling")
            if isinstance(layer, ResidualBlock):
                halo += sum(conv.kernel_size[-1] // 2 for conv in (layer.residual[2], layer.residual[6])) / scale
            elif isinstance(layer, Resample):
                scale *= 2.0
                halo += layer.resample[1].kernel_size[-1] // 2 / scale
            elif isinstance(layer, OutputHead):
                halo += layer[2].kernel_size[-1] // 2 / scale
        return split, 2, math.ceil(halo)


class WanVAE(nn.Module):
    """The Wan VAE with the official parameter names (``encoder.*``, ``conv1.*``, ``conv2.*``, ``decoder.*``).

    Build on the meta device and fill with ``infinitetalk.weights.vae_loader.load_vae``; see the
    module docstring for the exact semantics of ``encode`` and ``decode``.
    """

    def __init__(self, config: WanVAEConfig = WanVAEConfig()):
        super().__init__()
        self.config = config
        z = config.z_dim
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(config)

    # ----------------------------------------------------------------- helpers
    def _param(self) -> torch.Tensor:
        return self.conv2.weight

    def latent_stats(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, inv_std) as float32 [1, z, 1, 1, 1]; inv_std = 1 / std computed in float32 like the official code."""
        device = device if device is not None else self._param().device
        mean = torch.tensor(self.config.latent_mean, dtype=torch.float32, device=device)
        inv_std = 1.0 / torch.tensor(self.config.latent_std, dtype=torch.float32, device=device)
        return mean.view(1, -1, 1, 1, 1), inv_std.view(1, -1, 1, 1, 1)

    def _frames_used(self, frames: int) -> int:
        s = self.config.temporal_stride
        return 1 + s * ((frames - 1) // s)

    # ----------------------------------------------------------------- encode
    @torch.no_grad()
    def encode(
        self, video: torch.Tensor, *, chunk_latents: Optional[int] = None, fast: Optional[VAEFastOptions] = None
    ) -> torch.Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] -> normalised latent float32 [B, z, 1 + (F - 1) // 4, H / 8, W / 8].

        The first frame is encoded alone, then ``4 * chunk_latents`` frames at a time (1 = the
        official schedule; larger values give the same result with fewer steps and more memory;
        None = 1, or ``fast.chunk_latents`` with ``fast``). ``fast`` selects the speed options
        (``VAEFastOptions``). Frames after the last complete group of 4 are ignored, as in the
        official code.
        """
        if video.dim() != 5 or video.shape[1] != 3 or video.shape[2] < 1:
            raise InputError(f"The VAE encodes videos shaped [batch, 3, frames, height, width]; got {tuple(video.shape)}.")
        chunk_latents = self._chunk_latents(chunk_latents, fast)
        param = self._param()
        frames = self._frames_used(video.shape[2])
        if frames != video.shape[2]:
            log.debug("VAE encode ignores the last %d frame(s) (not a full group of %d)",
                      video.shape[2] - frames, self.config.temporal_stride)
        fmt = torch.channels_last_3d if fast is not None and fast.channels_last else torch.contiguous_format
        cache = self._new_cache(fast)
        with self._kernel_flags(fast):
            outs = [
                self.encoder(video[:, :, start:stop].to(device=param.device, dtype=param.dtype).contiguous(memory_format=fmt), cache)
                for start, stop in _chunks(frames, 1, self.config.temporal_stride * chunk_latents)
            ]
            moments = self.conv1(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
        mu = moments[:, : self.config.z_dim].float()
        mean, inv_std = self.latent_stats(mu.device)
        return ((mu - mean) * inv_std).contiguous()

    # ----------------------------------------------------------------- fast-path plumbing
    @staticmethod
    def _chunk_latents(chunk_latents: Optional[int], fast: Optional[VAEFastOptions]) -> int:
        if chunk_latents is None:
            chunk_latents = fast.chunk_latents if fast is not None else 1
        if chunk_latents < 1:
            raise ValueError("chunk_latents must be >= 1")
        return int(chunk_latents)

    def _new_cache(self, fast: Optional[VAEFastOptions]) -> CausalCache:
        """A fresh pass cache carrying the norm + SiLU kernel that `fast` asks for."""
        if fast is None or fast.norm_act == "reference":
            return CausalCache()
        if fast.norm_act == "inplace":
            return CausalCache(norm_act_inplace)
        if fast.norm_act == "fused":
            return CausalCache(FusedNormAct(compile=False))
        compiled = self.__dict__.get("_compiled_norm_act")
        if compiled is None:
            compiled = self.__dict__["_compiled_norm_act"] = FusedNormAct(compile=True)
        return CausalCache(compiled)

    @staticmethod
    def _kernel_flags(fast: Optional[VAEFastOptions]):
        """cuDNN autotuning for the duration of one call (restored afterwards)."""
        if fast is None or not fast.cudnn_benchmark:
            return contextlib.nullcontext()
        cudnn = torch.backends.cudnn
        return cudnn.flags(enabled=cudnn.enabled, benchmark=True, deterministic=cudnn.deterministic,
                           allow_tf32=cudnn.allow_tf32)

    # ----------------------------------------------------------------- decode
    @torch.no_grad()
    def decode(
        self,
        latent: torch.Tensor,
        *,
        clamp: bool = True,
        chunk_latents: Optional[int] = None,
        tiling: Optional[DecodeTiling] = None,
        fast: Optional[VAEFastOptions] = None,
    ) -> torch.Tensor:
        """Normalised latent [B, z, T, h, w] -> video float32 [B, 3, 1 + 4 (T - 1), 8 h, 8 w].

        ``clamp`` clamps to [-1, 1] (the official ``WanVAE.decode``); ``clamp=False`` is the raw
        decoder output (``WanVAE_.decode``). ``chunk_latents`` latent frames are decoded per step
        (None = 1, the official schedule, or ``fast.chunk_latents`` with ``fast``). ``tiling``
        decodes spatial tiles one after another to bound memory; the result equals the untiled
        decode up to round-off (see ``DecodeTiling`` for the cost). ``fast``: ``VAEFastOptions``.
        """
        z = self.config.z_dim
        if latent.dim() != 5 or latent.shape[1] != z or latent.shape[2] < 1:
            raise InputError(f"The VAE decodes latents shaped [batch, {z}, frames, height, width]; got {tuple(latent.shape)}.")
        chunk_latents = self._chunk_latents(chunk_latents, fast)
        param = self._param()
        mean, inv_std = self.latent_stats(param.device)
        x = latent.to(device=param.device, dtype=torch.float32) / inv_std + mean
        if fast is not None and fast.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        b, _, t, h, w = x.shape
        s, sp = self.config.temporal_stride, self.config.spatial_stride
        out = torch.empty(b, 3, 1 + s * (t - 1), h * sp, w * sp, dtype=torch.float32, device=param.device)
        with self._kernel_flags(fast):
            x = self.conv2(x.to(param.dtype))
            if tiling is None:
                self._decode_into(x, out, chunk_latents, fast)
            else:
                self._decode_tiled_into(x, out, chunk_latents, tiling, fast)
        return out.clamp_(-1.0, 1.0) if clamp else out

    def _decode_into(
        self, x: torch.Tensor, out: torch.Tensor, chunk_latents: int, fast: Optional[VAEFastOptions] = None
    ) -> None:
        """Causal decode of conv2 output `x`, `chunk_latents` latent frames per step, into `out`."""
        cache = self._new_cache(fast)
        frame = 0
        for start, stop in _chunks(x.shape[2], 0, chunk_latents):
            y = self.decoder(x[:, :, start:stop], cache)
            out[:, :, frame : frame + y.shape[2]] = y
            frame += y.shape[2]
            del y

    def _decode_tiled_into(
        self, x: torch.Tensor, out: torch.Tensor, chunk_latents: int, tiling: DecodeTiling,
        fast: Optional[VAEFastOptions] = None,
    ) -> None:
        """See ``DecodeTiling``: whole-frame stages first (kept per chunk), then tile by tile with halos."""
        split, factor, halo = self.decoder.tiling_split()
        cache = self._new_cache(fast)
        coarse = [self.decoder(x[:, :, a:b], cache, stop=split) for a, b in _chunks(x.shape[2], 0, chunk_latents)]
        del cache
        height, width = coarse[0].shape[-2:]
        up = self.config.spatial_stride // factor  # output pixels per pixel at the split resolution
        core = DecodeTiling(tiling.tile * factor)
        for top, bottom in core.cores(height):
            in_top, in_bottom = max(0, top - halo), min(height, bottom + halo)
            for left, right in core.cores(width):
                in_left, in_right = max(0, left - halo), min(width, right + halo)
                cache = self._new_cache(fast)
                frame = 0
                for chunk in coarse:
                    y = self.decoder(chunk[..., in_top:in_bottom, in_left:in_right], cache, start=split)
                    y = y[..., (top - in_top) * up : (bottom - in_top) * up, (left - in_left) * up : (right - in_left) * up]
                    out[:, :, frame : frame + y.shape[2], top * up : bottom * up, left * up : right * up] = y
                    frame += y.shape[2]
                    del y
                del cache

    def tiling_overhead(self, tiling: DecodeTiling, latent_height: int, latent_width: int) -> float:
        """Decoded area of the tiled stages over their untiled area for a latent of the given size."""
        _, factor, halo = self.decoder.tiling_split()
        return DecodeTiling(tiling.tile * factor).overhead(latent_height * factor, latent_width * factor, halo)


def _chunks(length: int, first: int, step: int) -> Iterator[tuple[int, int]]:
    """[0, first) (when first > 0), then consecutive [start, start + step) ranges up to `length`."""
    start = 0
    if first:
        yield 0, min(first, length)
        start = first
    while start < length:
        yield start, min(start + step, length)
        start += step


def count_parameters(config: WanVAEConfig) -> int:
    """Number of parameters of a VAE built from `config` (computed on the meta device, no memory)."""
    with torch.device("meta"):
        model = WanVAE(config)
    return sum(math.prod(p.shape) for p in model.parameters())

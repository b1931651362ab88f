"""Sizes and options of the Wan VAE: `WanVAEConfig`, the low-memory `DecodeTiling` and the speed
options `VAEFastOptions`."""
from __future__ import annotations

from dataclasses import dataclass, field

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
    channels at 2x latent resolution, e.g. 192 x 2h x 2w per frame for the release) is kept for the
    whole window. The remaining levels, which hold almost all of the activation memory, then run
    tile by tile through the full causal time pass (each tile with its own cache), and only each
    tile's core is written to the output.

    Memory: peak activations and feature caches of the tiled levels scale with the tile area (core +
    2 halos) instead of the frame area: with the default 32 latent pixels (256 px core, 6 latent
    pixels = 48 px of halo per side) an interior tile holds about 1/7 of a 720x1280 frame's.
    Compute overhead: the tiled levels (most of the decoder's work) recompute the halos; their work
    grows by ``WanVAE.tiling_overhead`` = 1.65x for 720x1280 and 1.69x for 640x640 with ``tile=32``,
    1.30x / 1.32x with ``tile=64``, plus one sequence of kernel launches per tile and chunk.
    (These factors follow from the tile geometry alone.)
    Accuracy: not an approximation; the result equals the untiled decode up to float round-off
    (tests/test_vae_model.py checks it).
    """

    tile: int = 32

    def __post_init__(self) -> None:
        if self.tile < 1:
            raise ValueError("DecodeTiling.tile must be >= 1")

    def cores(self, length: int) -> list[tuple[int, int]]:
        """[start, stop) of the tile cores along an axis of `length` pixels (same units as `tile`)."""
        return [(a, min(a + self.tile, length)) for a in range(0, length, self.tile)]

    def spans(self, length: int, halo: int) -> list[tuple[int, int, int, int]]:
        """(core start, core stop, input start, input stop) of each tile along an axis: the core
        widened by `halo` on each side, clipped to [0, length)."""
        return [(a, b, max(0, a - halo), min(length, b + halo)) for a, b in self.cores(length)]

    def overhead(self, height: int, width: int, halo: int) -> float:
        """Computed area over frame area when tiling a `height` x `width` grid with `halo` pixels (same units)."""
        def covered(length: int) -> int:
            return sum(stop - start for _, _, start, stop in self.spans(length, halo))

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

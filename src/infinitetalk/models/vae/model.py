"""`WanVAE`: the encoder and decoder stacks and the chunked, optionally tiled encode / decode."""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator, Optional

import torch
from torch import nn

from ...errors import InternalError
from .blocks import (
    AttentionBlock, CausalCache, CausalConv3d, FusedNormAct, OutputHead, Resample, ResidualBlock, layout_of, norm_act_inplace,
)
from .config import DecodeTiling, VAEFastOptions, WanVAEConfig

log = logging.getLogger(__name__)


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
            raise InternalError(f"The VAE encodes videos shaped [batch, 3, frames, height, width]; got {tuple(video.shape)}.")
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
            raise InternalError(f"The VAE decodes latents shaped [batch, {z}, frames, height, width]; got {tuple(latent.shape)}.")
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
        for top, bottom, in_top, in_bottom in core.spans(height, halo):
            for left, right, in_left, in_right in core.spans(width, halo):
                cache = self._new_cache(fast)
                frame = 0
                for chunk in coarse:
                    # a dense copy of the tile: every tile then has the strides of a whole tensor of its size
                    # (a view's strides are the frame's, which a compiled norm kernel guards on: one graph more)
                    part = chunk[..., in_top:in_bottom, in_left:in_right].contiguous(memory_format=layout_of(chunk))
                    y = self.decoder(part, cache, start=split)
                    del part
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

"""The layers of the Wan VAE: the causal convolution and its per-pass `CausalCache`, the channel
RMS norm and its norm + SiLU kernels, residual, attention and resampling blocks (official names)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


NormActFn = Callable[[torch.Tensor, "RMSNorm", torch.Tensor], torch.Tensor]
"""(x [B, C, T, H, W], norm, prev [B, C, ctx, H, W]) -> cat([prev, silu(norm(x))], time)."""


def norm_act_inplace(x: torch.Tensor, norm: "RMSNorm", prev: torch.Tensor) -> torch.Tensor:
    """The reference norm + SiLU arithmetic, written into a fresh time-padded buffer after `prev`
    (keeps x's memory format; equal to ``cat([prev, silu(norm(x))])`` element for element)."""
    b, c, t, h, w = x.shape
    ctx = prev.shape[2]
    padded = torch.empty((b, c, ctx + t, h, w), dtype=x.dtype, device=x.device, memory_format=layout_of(x))
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
        fmt = layout_of(x)
        return out if out.is_contiguous(memory_format=fmt) else out.contiguous(memory_format=fmt)


def layout_of(x: torch.Tensor) -> torch.memory_format:
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
            prev = torch.empty((b, c, ctx, h, w), dtype=x.dtype, device=x.device, memory_format=layout_of(x)).zero_()
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
        out = torch.empty((b, c, lead + 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=layout_of(y))
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

"""The layers of the DiT: norms, the self- and cross-attention modules, the transformer block,
the output head and the CLIP image projection (official parameter names)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionFn, RoutingMapFn, apply_rope_3d, reference_attention_map
from ..audio_adapter import AudioCrossAttention, speaker_positions
from .config import CLIP_TOKENS, WanDiTConfig


# small building blocks


class WanRMSNorm(nn.Module):
    """RMS norm over the last dimension with a weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, returned in the input dtype (affine optional)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def linear_f32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear evaluated in float32 whatever the weight dtype (the official autocast regions)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[len(t), dim] float64 embedding: cos of t x 10000^(-i/half) then sin (cosines first)."""
    half = dim // 2
    pos = t.to(torch.float64)
    angles = torch.outer(pos, torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


# --------------------------------------------------------------------------------------------
# attention modules


class _QKVOAttention(nn.Module):
    """The q/k/v/o projections and q/k RMS norms shared by the self- and cross-attention."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()


class WanSelfAttention(_QKVOAttention):
    """Self-attention with q/k RMS norm and 3-D RoPE; optionally returns the reference map."""

    def forward(
        self,
        x: torch.Tensor,
        rope_table: torch.Tensor,
        attention: AttentionFn,
        ref_masks: torch.Tensor | None = None,
        tokens_per_frame: int = 0,
        routing_map: RoutingMapFn = reference_attention_map,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, L, dim] -> (out [B, L, dim], reference map [B, 3, L] when ref_masks is given)."""
        b, length, _ = x.shape
        n, d = self.num_heads, self.head_dim
        q_lin, k_lin = self.q(x), self.k(x)
        bounds = self.qk_bounds(q_lin, k_lin) if getattr(attention, "takes_qk_bounds", False) else None
        q = self.norm_q(q_lin).view(b, length, n, d)
        k = self.norm_k(k_lin).view(b, length, n, d)
        del q_lin, k_lin
        v = self.v(x).view(b, length, n, d)
        # RoPE in float32, then q and k in v's dtype, as the official code hands them to flash-attn:
        # every attention (and the routing map) reads the same rounded values. (A compiled block
        # still writes the float32 RoPE output: inductor realises the inlined norm + RoPE before
        # the cast, benchmarks/NOTES.md v12.)
        q = apply_rope_3d(q, rope_table).to(v.dtype)
        k = apply_rope_3d(k, rope_table).to(v.dtype)
        ref_map = None
        if ref_masks is not None:
            with torch.no_grad():
                ref_map = routing_map(q, k, tokens_per_frame, ref_masks)
        # q, k and v are not used after this call, so an attention that is opaque to torch.compile
        # (the cuDNN fp8 graph) does not keep them alive across it
        out = attention(q, k, v) if bounds is None else attention(q, k, v, qk_bounds=bounds)
        return self.o(out.type_as(x).flatten(2)), ref_map

    def qk_bounds(self, q_lin: torch.Tensor, k_lin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Bounds of |q| and |k| after the norms and RoPE (0-dim float32), from the projections.

        For a token x the RMS norm gives |q_i| = |x_i w_i| / rms(x), and RoPE rotates channel
        pairs, so a rotated element is at most sqrt(2) times the larger of its pair. The row
        maximum of |x_i w_i| reduces over the same channels as the norm's mean of squares, so
        a compiled block computes both in one pass over the projection, and fp8 attention can
        scale q and k without reading them again (within 2x of max|q|; e4m3 rounds relatively).
        The 2% margin covers the bf16 roundings of the norm, the weight product and the cast.
        None without q/k norms.
        """
        if not isinstance(self.norm_q, WanRMSNorm) or not isinstance(self.norm_k, WanRMSNorm):
            return None
        return _rope_bound(q_lin, self.norm_q), _rope_bound(k_lin, self.norm_k)


def _rope_bound(lin: torch.Tensor, norm: WanRMSNorm) -> torch.Tensor:
    xf = lin.float()
    rows = (xf * norm.weight.float()).abs().amax(dim=-1) * torch.rsqrt(xf.pow(2).mean(dim=-1) + norm.eps)
    return rows.amax() * (math.sqrt(2.0) * 1.02)


class WanI2VCrossAttention(_QKVOAttention):
    """Cross-attention to the CLIP image tokens and the text tokens (separate softmaxes, summed)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """context [B, 257 + text_len, dim] (image tokens first) -> (k, v, k_img, v_img) [B, Lc, H, D].

        They depend on the prompt and the reference image only, so a window computes them once.
        """
        b = context.shape[0]
        n, d = self.num_heads, self.head_dim
        img, text = context[:, :CLIP_TOKENS], context[:, CLIP_TOKENS:]
        k = self.norm_k(self.k(text)).view(b, -1, n, d)
        v = self.v(text).view(b, -1, n, d)
        k_img = self.norm_k_img(self.k_img(img)).view(b, -1, n, d)
        v_img = self.v_img(img).view(b, -1, n, d)
        return k, v, k_img, v_img

    def forward(self, x: torch.Tensor, context_kv: tuple[torch.Tensor, ...], attention: AttentionFn) -> torch.Tensor:
        """x [B, L, dim], context_kv from `context_kv` -> [B, L, dim]."""
        b = x.shape[0]
        n, d = self.num_heads, self.head_dim
        k, v, k_img, v_img = context_kv
        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        img_out = attention(q, k_img, v_img).type_as(x).flatten(2)
        text_out = attention(q, k, v).type_as(x).flatten(2)
        return self.o(text_out + img_out)


# --------------------------------------------------------------------------------------------
# transformer block, head, image projection


class WanAttentionBlock(nn.Module):
    """Self-attn (modulated, gated) -> text/image cross-attn -> audio cross-attn -> FFN (gated)."""

    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = WanLayerNorm(dim, cfg.eps)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = WanLayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanI2VCrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = WanLayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.audio_cross_attn = AudioCrossAttention(dim, cfg.output_dim, cfg.num_heads)
        self.norm_x = WanLayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.norm_input_visual else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        rope_table: torch.Tensor,
        context_kv: tuple[torch.Tensor, ...],
        audio_kv: tuple[torch.Tensor, torch.Tensor],
        grid: tuple[int, int, int],
        attention: AttentionFn,
        ref_masks: torch.Tensor | None = None,
        routing_map: RoutingMapFn = reference_attention_map,
        self_attention: AttentionFn | None = None,
        ffn_chunks: int = 1,
    ) -> torch.Tensor:
        """x [B, L, dim]; e0 [B or 1, 6, dim] float32; context_kv from `cross_attn.context_kv`,
        audio_kv from `audio_cross_attn.audio_kv`; ref_masks [B or 1, 3, h*w] only for two speakers.
        `self_attention` (default: `attention`) runs the video self-attention only.
        `ffn_chunks` > 1 runs the FFN tail on that many token chunks (same result: the FFN is
        per token), so its [L, ffn_dim] hidden activations exist for one chunk at a time.
        """
        dtype = x.dtype
        mod = (self.modulation.float() + e0).chunk(6, dim=1)
        frames, rows, cols = grid

        h = (self.norm1(x).float() * (1 + mod[1]) + mod[0]).to(dtype)
        y, ref_map = self.self_attn(h, rope_table, self_attention or attention, ref_masks, rows * cols, routing_map)
        x = (x.float() + y.float() * mod[2]).to(dtype)

        x = x + self.cross_attn(self.norm3(x), context_kv, attention)

        # a routing map may bring its own positions rule (sequence parallel: global min/max)
        positions = getattr(routing_map, "speaker_positions", speaker_positions)(ref_map) if ref_map is not None else None
        x = x + self.audio_cross_attn(self.norm_x(x), audio_kv, frames, attention, positions)

        if ffn_chunks > 1:
            return torch.cat([self._ffn_tail(part, mod) for part in x.chunk(ffn_chunks, dim=1)], dim=1)
        return self._ffn_tail(x, mod)

    def _ffn_tail(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The modulated FFN and its gated residual (per token)."""
        y = self.ffn((self.norm2(x).float() * (1 + mod[4]) + mod[3]).to(x.dtype))
        return (x.float() + y.float() * mod[5]).to(x.dtype)


class Head(nn.Module):
    """Output head: modulated LayerNorm then Linear(dim, prod(patch) * out_dim), in float32."""

    def __init__(self, dim: int, out_dim: int, patch_size: Sequence[int], eps: float = 1e-6):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        mod = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        h = self.norm(x).float() * (1 + mod[1]) + mod[0]
        return linear_f32(self.head, h)


class MLPProj(nn.Module):
    """CLIP features -> image context tokens: LayerNorm, Linear, GELU, Linear, LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim)
        )

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        return self.proj(clip_fea)

"""The InfiniteTalk DiT: the Wan2.1-I2V-14B transformer with the InfiniteTalk audio adapter.

`InfiniteTalkDiT` has the parameter names and shapes of the official checkpoint (the Wan2.1-I2V
shards plus `infinitetalk.safetensors`), so the official files load strictly. Every size comes
from `WanDiTConfig`: `WanDiTConfig.infinitetalk_14b()` is the released model (18,882,046,784
parameters), `WanDiTConfig.tiny()` a small model of the same code for tests.

Numerics follow the official `WanModel` (wan/modules/multitalk_model.py): float32 is the parity
contract; in bfloat16 the time embedding, modulation, gated residuals, LayerNorms and the output
head run in float32 as the official autocast regions do, and the output is float32.

Faster kernels are explicit options of the model (constructor keywords, or the same attributes
set by `infinitetalk.runtime.fast.make_fast`): `attention`, `rope_table`, `routing_map` and
`sdpa_backends`. What stays fixed within a window (text/CLIP keys and values, audio keys and
values of every block) can be computed once with `precompute_conditions` and passed to
`forward(..., conditions=...)` at every step.
"""
from __future__ import annotations

import json
import logging
import math
import os
import contextlib
import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .attention import (
    AttentionFn,
    PreferredSdpa,
    RopeTableFn,
    RoutingMapFn,
    apply_rope_3d,
    reference_attention_map,
    rope_table_3d,
    sdpa_attention,
)
from .audio_adapter import AudioCrossAttention, AudioProjModel, select_audio_windows, speaker_positions

log = logging.getLogger(__name__)

CLIP_TOKENS = 257  # CLIP ViT-H/14 at 224 px: class token + 16x16 patches


@dataclass(frozen=True)
class WanDiTConfig:
    """Every size of the DiT. Defaults are the official WanModel defaults used by InfiniteTalk.

    Audio adapter: proj1 reads audio_window * audio_layers * audio_channels values (one video
    frame's window), proj1_vf reads (audio_window + vae_scale - 1) * audio_layers * audio_channels
    (the positions picked for the later latent frames; 8 * 12 * 768 for the release). audio_layers
    and audio_channels are the wav2vec2 layer count and width; clip_dim the CLIP feature width
    (img_emb input). These three are fixed in the official code and configurable here so a tiny
    model can pair with a tiny wav2vec2 and a tiny CLIP.
    """

    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 36
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    audio_window: int = 5
    intermediate_dim: int = 512
    context_tokens: int = 32
    output_dim: int = 768
    vae_scale: int = 4
    norm_input_visual: bool = True
    norm_output_audio: bool = True
    audio_layers: int = 12
    audio_channels: int = 768
    clip_dim: int = 1280

    def __post_init__(self):
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even width")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def infinitetalk_14b(cls) -> "WanDiTConfig":
        """The released InfiniteTalk model (Wan2.1-I2V-14B + audio adapter)."""
        return cls()

    @classmethod
    def tiny(cls, **overrides: Any) -> "WanDiTConfig":
        """A small model of the same architecture for tests and `--model tiny`.

        dim 128, 4 heads (head_dim 32, RoPE parts 6/5/5), 2 layers, ffn 256, text_dim 64 /
        text_len 16 (the tiny umT5 has width 64), audio_layers 2 x audio_channels 32 (the tiny
        wav2vec2: 2 layers of width 32), clip_dim 64, context_tokens 4 audio tokens of width 64
        per speaker and latent frame. Any field can be overridden.
        """
        base = dict(
            dim=128, ffn_dim=256, freq_dim=256, text_dim=64, text_len=16, num_heads=4, num_layers=2,
            intermediate_dim=16, context_tokens=4, output_dim=64, audio_layers=2, audio_channels=32,
            clip_dim=64,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_official_json(cls, source: str | os.PathLike | Mapping[str, Any]) -> "WanDiTConfig":
        """Read a Wan config.json (path or dict). Keys starting with '_' and `model_type` are not
        sizes; absent keys (e.g. the audio-adapter sizes in the official file) keep their defaults.
        Unknown keys are logged and ignored. Raises ValueError for a non-i2v model or an
        unsupported attention window.
        """
        if isinstance(source, Mapping):
            data = dict(source)
        else:
            with open(source, encoding="utf-8") as fh:
                data = json.load(fh)
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key.startswith("_") or key in ("weight_init",):
                continue
            if key == "model_type":
                if value != "i2v":
                    raise ValueError(f"model_type is {value!r}; InfiniteTalk needs the i2v model")
                continue
            if key == "window_size":
                if tuple(value) != (-1, -1):
                    raise ValueError(f"window_size {value} is not supported (only full attention)")
                continue
            if key not in known:
                log.warning("config key %r is not a WanDiTConfig field; ignored", key)
                continue
            kwargs[key] = tuple(value) if key == "patch_size" else value
        return cls(**kwargs)

    def to_json_dict(self) -> dict[str, Any]:
        """A config.json dict in the official layout plus this config's extra fields."""
        out: dict[str, Any] = {"_class_name": "WanModel", "model_type": "i2v"}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> "WanDiTConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------
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


def _linear_f32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
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
        return _linear_f32(self.head, h)


class MLPProj(nn.Module):
    """CLIP features -> image context tokens: LayerNorm, Linear, GELU, Linear, LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim)
        )

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        return self.proj(clip_fea)


# --------------------------------------------------------------------------------------------
# the model


@dataclass
class DiTConditions:
    """Per-window inputs of every block, computed once by `InfiniteTalkDiT.precompute_conditions`.

    context_kv[i]: block i's text/CLIP (k, v, k_img, v_img), each [B, Lc, H, D];
    audio_kv[i]: block i's audio (k, v), each [B*T, speakers*context_tokens, H, D] (keys already
    rotated for two speakers), or None: then `audio_tokens` [B, T, speakers*context_tokens,
    audio_dim] are kept (about 1 MB) and each forward computes the audio keys and values
    (~0.4 TFLOP, against 0.55 GB per sample held for the window).
    They depend on the prompt, the CLIP features and the audio only, never on the noisy latent
    or the timestep, so all sampling steps of a window share them.
    """

    batch: int
    speakers: int
    frames: int
    context_kv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    audio_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    audio_tokens: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every cached tensor (keys, values, audio tokens)."""
        tensors = [t for kv in (*self.context_kv, *(self.audio_kv or ())) for t in kv]
        if self.audio_tokens is not None:
            tensors.append(self.audio_tokens)
        return tensors

    def nbytes(self) -> int:
        """Device memory held by the cached tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


class InfiniteTalkDiT(nn.Module):
    """Wan2.1-I2V DiT with the InfiniteTalk audio adapter (official parameter names).

    Kernel options (explicit, so faster kernels are chosen without patching; defaults are the
    reference path that matches the official model):
    * `attention` (q, k, v [B, L, H, D] -> out), default `sdpa_attention`;
    * `self_attention`: the video self-attention only (None: `attention`), e.g. the fp8
      `runtime.fp8_attention.CudnnFp8Attention` while the small cross-attentions stay bf16;
    * `rope_table` ((f, h, w), head_dim, device -> table), default the float64 complex
      `rope_table_3d`; `attention.RopeCache()` gives cached float32 (cos, sin) tables;
    * `routing_map` (two speakers), default `reference_attention_map`; `sdpa_attention_map`
      is the fused equivalent;
    * `sdpa_backends` (a `PreferredSdpa` or None): the SDPA backend priority applied around
      the whole forward (outside any compiled region).
    * `ffn_chunks` (int, default 1): run each block's FFN on that many token chunks (exact;
      lowers the peak memory of a forward by the FFN's hidden activations).
    """

    def __init__(
        self,
        config: WanDiTConfig,
        *,
        attention: AttentionFn = sdpa_attention,
        rope_table: RopeTableFn = rope_table_3d,
        routing_map: RoutingMapFn = reference_attention_map,
        sdpa_backends: PreferredSdpa | None = None,
        self_attention: AttentionFn | None = None,
    ):
        super().__init__()
        cfg = config
        self.config = cfg
        self.attention = attention
        self.self_attention = self_attention
        self.ffn_chunks = 1
        self.rope_table = rope_table
        self.routing_map = routing_map
        self.sdpa_backends = sdpa_backends
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([WanAttentionBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(dim, cfg.out_dim, cfg.patch_size, cfg.eps)
        self.img_emb = MLPProj(cfg.clip_dim, dim)
        self.audio_proj = AudioProjModel(
            audio_window=cfg.audio_window,
            vae_scale=cfg.vae_scale,
            audio_layers=cfg.audio_layers,
            audio_channels=cfg.audio_channels,
            intermediate_dim=cfg.intermediate_dim,
            output_dim=cfg.output_dim,
            context_tokens=cfg.context_tokens,
            norm_output_audio=cfg.norm_output_audio,
        )

    # ---- input preparation -----------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def _time_embedding(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] -> e [B, dim] and e0 [B, 6, dim], both float32."""
        sin = sinusoidal_embedding(self.config.freq_dim, t.to(self.device)).float()
        l1, l2 = self.time_embedding[0], self.time_embedding[2]
        e = _linear_f32(l2, F.silu(_linear_f32(l1, sin)))
        e0 = _linear_f32(self.time_projection[1], F.silu(e))
        return e, e0.unflatten(1, (6, self.config.dim))

    def _text_context(self, context: torch.Tensor | Sequence[torch.Tensor], batch: int) -> torch.Tensor:
        """Zero-pad each prompt embedding to text_len rows, then embed: [B, text_len, dim]."""
        cfg = self.config
        items = list(context.unbind(0)) if isinstance(context, torch.Tensor) else list(context)
        if len(items) != batch:
            raise InputError(f"context holds {len(items)} prompt embeddings but the batch has {batch} samples.")
        padded = []
        for u in items:
            if u.dim() != 2 or u.shape[1] != cfg.text_dim:
                raise InputError(f"Each prompt embedding must be [length, {cfg.text_dim}]; got {tuple(u.shape)}.")
            if u.shape[0] > cfg.text_len:
                raise InputError(
                    f"A prompt embedding has {u.shape[0]} tokens but the model takes at most {cfg.text_len}."
                )
            u = u.to(device=self.device, dtype=self.dtype)
            padded.append(torch.cat([u, u.new_zeros(cfg.text_len - u.shape[0], u.shape[1])]))
        return self.text_embedding(torch.stack(padded))

    def _audio_tokens(self, audio: torch.Tensor, batch: int, frames: int) -> tuple[torch.Tensor, int]:
        """audio [B, N, 1 + vae_scale (T-1), window, layers, channels] -> ([B, T, N*tokens, width], N)."""
        cfg = self.config
        want = (cfg.audio_window, cfg.audio_layers, cfg.audio_channels)
        video_frames = 1 + cfg.vae_scale * (frames - 1)
        if audio.dim() != 6 or tuple(audio.shape[3:]) != want or audio.shape[2] != video_frames or audio.shape[0] != batch:
            raise InputError(
                f"audio must be [{batch}, speakers, {video_frames}, {want[0]}, {want[1]}, {want[2]}] for "
                f"{frames} latent frames; got {tuple(audio.shape)}."
            )
        speakers = audio.shape[1]
        if speakers not in (1, 2):
            raise InputError(f"InfiniteTalk takes one or two speakers; audio has {speakers}.")
        audio = audio.to(device=self.device, dtype=self.dtype).flatten(0, 1)
        first, later = select_audio_windows(audio, cfg.audio_window, cfg.vae_scale)
        tokens = self.audio_proj(first, later)  # [B*N, T, ctx, width]
        tokens = tokens.unflatten(0, (batch, speakers)).transpose(1, 2).flatten(2, 3)
        return tokens.to(self.dtype), speakers

    def _token_masks(self, masks: torch.Tensor, batch: int, rows: int, cols: int) -> torch.Tensor:
        """[3, H, W] or [B, 3, H, W] region masks -> token-level 0/1 masks [B or 1, 3, rows*cols]."""
        if masks.dim() == 3:
            masks = masks.unsqueeze(0)
        if masks.dim() != 4 or masks.shape[0] not in (1, batch):
            raise InputError(f"ref_target_masks must be [3, H, W] or [{batch}, 3, H, W]; got {tuple(masks.shape)}.")
        small = F.interpolate(masks.to(device=self.device, dtype=torch.float32), size=(rows, cols), mode="nearest")
        return (small > 0).flatten(2).to(self.dtype)

    def _context_tokens(self, context: torch.Tensor | Sequence[torch.Tensor], clip_fea: torch.Tensor, batch: int) -> torch.Tensor:
        """CLIP image tokens then text tokens, embedded: [B, 257 + text_len, dim]."""
        cfg = self.config
        if clip_fea.dim() != 3 or clip_fea.shape[1:] != (CLIP_TOKENS, cfg.clip_dim) or clip_fea.shape[0] not in (1, batch):
            raise InputError(f"clip_fea must be [{batch}, {CLIP_TOKENS}, {cfg.clip_dim}]; got {tuple(clip_fea.shape)}.")
        img = self.img_emb(clip_fea.to(device=self.device, dtype=self.dtype)).expand(batch, -1, -1)
        return torch.cat([img, self._text_context(context, batch)], dim=1).to(self.dtype)

    def _batch_of(self, context: torch.Tensor | Sequence[torch.Tensor]) -> int:
        return context.shape[0] if isinstance(context, torch.Tensor) else len(context)

    @torch.no_grad()
    def precompute_conditions(
        self,
        context: torch.Tensor | Sequence[torch.Tensor],
        clip_fea: torch.Tensor,
        audio: torch.Tensor,
        *,
        audio_kv: bool = True,
        reuse_context_kv: DiTConditions | None = None,
    ) -> DiTConditions:
        """Every block's text/CLIP and audio keys and values for a batch of B condition sets.

        Inputs as in `forward` (B = len(context)). The result replaces context, clip_fea and
        audio in `forward(x, t, y=y, conditions=...)` for every step of the window. It holds
        (257 + text_len) * 2 * dim values per block and sample for text/CLIP (0.63 GB per sample
        for the 14B model in bf16) plus, with `audio_kv`, T * speakers * context_tokens * 2 * dim
        for the audio (0.55 GB per speaker); without `audio_kv` only the audio tokens are kept and
        every forward computes the audio keys and values. `reuse_context_kv`: conditions made
        from the same prompt and CLIP features, whose text/CLIP keys and values are shared
        (not copied) instead of computed again.
        """
        batch = self._batch_of(context)
        if audio.dim() < 3:
            raise InputError(f"audio must be [B, speakers, frames, ...]; got {tuple(audio.shape)}.")
        frames = (audio.shape[2] - 1) // self.config.vae_scale + 1
        with self._kernel_context():
            if reuse_context_kv is not None:
                if reuse_context_kv.batch != batch:
                    raise InputError(f"reuse_context_kv holds {reuse_context_kv.batch} samples, not {batch}.")
                context_kv = reuse_context_kv.context_kv
            else:
                context_tokens = self._context_tokens(context, clip_fea, batch)
                context_kv = [block.cross_attn.context_kv(context_tokens) for block in self.blocks]
            audio_tokens, speakers = self._audio_tokens(audio, batch, frames)
            if not audio_kv:
                return DiTConditions(batch, speakers, frames, context_kv, None, audio_tokens)
            kv = [block.audio_cross_attn.audio_kv(audio_tokens, speakers == 2) for block in self.blocks]
        return DiTConditions(batch, speakers, frames, context_kv, kv)

    def _kernel_context(self):
        return self.sdpa_backends.context() if self.sdpa_backends is not None else contextlib.nullcontext()

    # ---- forward ---------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | Sequence[torch.Tensor] | None = None,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        ref_target_masks: torch.Tensor | None = None,
        *,
        conditions: DiTConditions | None = None,
        block_cache: Any = None,
    ) -> torch.Tensor:
        """Predict the flow for a batch of latent windows; returns float32 [B, out_dim, T, H, W].

        x [B, 16, T, H, W] noisy latents; t [B] or [1] timesteps; context: B prompt embeddings
        [L_i, text_dim] (list) or [B, L, text_dim]; clip_fea [B or 1, 257, clip_dim]; y
        [B, in_dim - 16, T, H, W] mask + image-latent conditioning; audio
        [B, N, 1 + 4(T-1), audio_window, audio_layers, audio_channels] with N = 1 or 2 speakers;
        ref_target_masks [3, H, W] (or [B, 3, H, W]) person-1 / person-2 / background masks,
        needed only when N == 2 (it is ignored for one speaker).
        `conditions` (from `precompute_conditions`) replaces context, clip_fea and audio.
        `block_cache` (TeaCache): an object with attributes `reuse` (bool) and `residual`
        (tensor or None). When `reuse` is true the transformer blocks are skipped and the
        embedded tokens plus `residual` go to the head; otherwise the blocks run and
        `residual` is set to (tokens after the blocks - tokens before them). The caller owns
        the object (one per guidance branch), so no state is kept on the model.
        """
        with self._kernel_context():
            return self._forward(x, t, context, clip_fea, y, audio, ref_target_masks, conditions, block_cache)

    def time_modulation(self, t: torch.Tensor) -> torch.Tensor:
        """e0 [B, 6, dim] float32 for timesteps t: the signal TeaCache compares between steps."""
        return self._time_embedding(torch.as_tensor(t, device=self.device).reshape(-1))[1]

    def _forward(self, x, t, context, clip_fea, y, audio, ref_target_masks, conditions, block_cache=None) -> torch.Tensor:
        cfg = self.config
        if y is None:
            raise InputError("y (mask + image-latent conditioning) is required.")
        if x.dim() != 5 or y.dim() != 5 or x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[2:]:
            raise InputError(f"x and y must be [B, C, T, H, W] with equal B, T, H, W; got {tuple(x.shape)} and {tuple(y.shape)}.")
        if x.shape[1] + y.shape[1] != cfg.in_dim:
            raise InputError(f"x and y together must have {cfg.in_dim} channels; got {x.shape[1]} + {y.shape[1]}.")
        batch, _, frames, height, width = x.shape
        pt, ph, pw = cfg.patch_size
        if frames % pt or height % ph or width % pw:
            raise InputError(f"Latent size {frames}x{height}x{width} is not divisible by the patch size {cfg.patch_size}.")
        grid = (frames // pt, height // ph, width // pw)

        # embeddings
        inp = torch.cat([x, y], dim=1).to(device=self.device, dtype=self.dtype)
        # [B, L, dim], made contiguous: the transposed view of the convolution output would make
        # every block's residual stream channel-major (element-wise ops keep their input's layout),
        # so each norm and gated residual would read across rows
        tokens = self.patch_embedding(inp).flatten(2).transpose(1, 2).contiguous()

        t = torch.as_tensor(t, device=self.device).reshape(-1)
        if t.numel() not in (1, batch):
            raise InputError(f"t must hold 1 or {batch} timesteps; got {t.numel()}.")
        e, e0 = self._time_embedding(t)

        if conditions is None:
            if context is None or clip_fea is None or audio is None:
                raise InputError("forward needs context, clip_fea and audio, or precomputed conditions.")
            context_tokens = self._context_tokens(context, clip_fea, batch)
            audio_tokens, speakers = self._audio_tokens(audio, batch, grid[0])
        else:
            if conditions.batch != batch or conditions.frames != grid[0]:
                raise InputError(
                    f"The precomputed conditions are for {conditions.batch} samples of {conditions.frames} latent "
                    f"frames; x has {batch} samples of {grid[0]}."
                )
            speakers = conditions.speakers

        # the two-speaker routing map is needed (and computed) only with two speakers
        ref_masks = None
        if speakers == 2:
            if ref_target_masks is None:
                raise InputError("Two speakers need ref_target_masks [3, H, W] (person 1, person 2, background).")
            ref_masks = self._token_masks(ref_target_masks, batch, grid[1], grid[2])

        if block_cache is not None and block_cache.reuse:
            residual = block_cache.residual
            if residual is None or residual.shape != tokens.shape:
                raise InputError("TeaCache asked to reuse a residual that was never computed for this input shape.")
            out = self.head(tokens + residual, e)
            return self.unpatchify(out, grid)

        before = tokens if block_cache is not None else None  # only TeaCache needs the block input
        rope = self.rope_table(grid, cfg.head_dim, self.device)
        for i, block in enumerate(self.blocks):
            if conditions is None:  # one block's keys/values at a time, as the reference does
                context_kv = block.cross_attn.context_kv(context_tokens)
                audio_kv = block.audio_cross_attn.audio_kv(audio_tokens, speakers == 2)
            else:
                context_kv = conditions.context_kv[i]
                if conditions.audio_kv is not None:
                    audio_kv = conditions.audio_kv[i]
                else:
                    audio_kv = block.audio_cross_attn.audio_kv(conditions.audio_tokens, speakers == 2)
            tokens = block(
                tokens, e0, rope, context_kv, audio_kv, grid, self.attention, ref_masks, self.routing_map,
                self.self_attention, self.ffn_chunks,
            )

        if block_cache is not None:
            block_cache.residual = tokens - before
        out = self.head(tokens, e)  # [B, L, prod(patch) * out_dim], float32
        return self.unpatchify(out, grid)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, f*h*w, prod(patch)*C] -> [B, C, f*pt, h*ph, w*pw] (channel fastest inside a token)."""
        c = self.config.out_dim
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        u = tokens.reshape(tokens.shape[0], f, h, w, pt, ph, pw, c)
        u = torch.einsum("bfhwpqrc->bcfphqwr", u)
        return u.reshape(tokens.shape[0], c, f * pt, h * ph, w * pw).float()


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())

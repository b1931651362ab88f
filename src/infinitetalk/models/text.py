"""umT5 text encoder (the encoder half of umT5-XXL, as the Wan / InfiniteTalk pipeline runs it).

What it computes (official `wan/modules/t5.py`, `T5Encoder` in eval mode):
  ids [B, L] -> token embedding -> N blocks -> RMS norm -> [B, L, dim]
  block:  x + attn(rms1(x), mask, relative position bias of this block)
          x + fc2(fc1(rms2(x)) * gelu_tanh(gate(rms2(x))))
Attention has no 1/sqrt(d) scaling; masked keys get the most negative finite value added
before the softmax (computed in float32); the relative position bias is bidirectional
(half the buckets per direction, exact below num_buckets/4, logarithmic up to max_dist).
umT5 has a separate bias table in every block (`shared_pos=False`); classic T5
(`shared_pos=True`, one table at the top) is supported as well.

Why our own module and not transformers' `UMT5EncoderModel`: the official file uses its own
key layout (`blocks.N.attn.q`, `blocks.N.ffn.gate.0`, `blocks.N.pos_embedding.embedding`,
`token_embedding`, `norm`), so with HF every one of the 5.7B parameters would go through a
renaming table and HF's own init/tie logic; with a small module carrying the official names
the file loads strictly, tensor by tensor, onto a meta-built model, and the numerics (float32
RMS statistics, float32 softmax, the bucket formula) are visibly the official ones.

`TextEncoder` pairs a tokenizer with the model: `encode(prompts) -> [Tensor[L_i, dim]]`, each
cut to its token count (</s> included), which is what the DiT receives as `context`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Mapping, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UMT5Config:
    """Sizes of the encoder; field names follow the official constructor (`umt5_xxl(...)`).

    Defaults: umT5-XXL encoder of the Wan2.1-14B release (5.7B parameters).
    `text_len` is the tokenizer's padding/truncation length (512 in the release).
    """

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False
    max_dist: int = 128
    norm_eps: float = 1e-6
    text_len: int = 512

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ValueError(f"umT5 dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")

    @classmethod
    def umt5_xxl(cls) -> "UMT5Config":
        return cls()

    @classmethod
    def tiny(cls) -> "UMT5Config":
        """A small encoder with the same structure, for tests and `--model tiny`.

        vocab 259 = pad 0, </s> 1, unk 2 and the 256 byte values (see the byte tokenizer).
        """
        return cls(vocab_size=259, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2, num_buckets=32, text_len=512)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> "UMT5Config":
        """Build from an official-style config mapping (e.g. the parity `t5/config.json`).

        Accepts `encoder_layers` for `num_layers`; `dropout` and `decoder_layers` are ignored
        (inference only, encoder only). Any other unknown key is an error.
        """
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in data.items():
            if key in ("dropout", "decoder_layers"):
                continue
            key = "num_layers" if key == "encoder_layers" else key
            if key not in known:
                raise ValueError(f"unknown umT5 config key '{key}'")
            values[key] = value
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def relative_position_bucket(rel_pos: torch.Tensor, num_buckets: int, max_dist: int) -> torch.Tensor:
    """Bidirectional T5 buckets of `key index - query index` (official formula, float32 log)."""
    half = num_buckets // 2
    buckets = (rel_pos > 0).long() * half
    dist = rel_pos.abs()
    max_exact = half // 2
    safe = dist.clamp(min=max_exact)  # the log branch is only used for dist >= max_exact
    large = max_exact + (torch.log(safe.float() / max_exact) / math.log(max_dist / max_exact) * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(dist < max_exact, dist, large)


class RelativePositionBias(nn.Module):
    """Learned bias per (bucket, head): `forward(lq, lk) -> [1, heads, lq, lk]`."""

    def __init__(self, num_buckets: int, num_heads: int, max_dist: int = 128):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_dist = max_dist
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, lq: int, lk: int) -> torch.Tensor:
        device = self.embedding.weight.device
        rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]
        bias = self.embedding(relative_position_bucket(rel, self.num_buckets, self.max_dist))
        return bias.permute(2, 0, 1).unsqueeze(0).contiguous()


class RMSNorm(nn.Module):
    """T5 LayerNorm: x / rms(x) (statistics in float32, no mean subtraction) times weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class Attention(nn.Module):
    """Unscaled multi-head attention with an additive bias (position bias + key mask)."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        logits = torch.matmul(q, k.transpose(-1, -2)) + bias
        attn = F.softmax(logits.float(), dim=-1).type_as(logits)
        out = torch.matmul(attn, v)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """Gated GELU(tanh) feed-forward: fc2(fc1(x) * gelu(gate(x))); `gate.0` is the official key."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    """The official guard against float16 overflow (a no-op in other dtypes)."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        x = x.clamp(min=-limit, max=limit)
    return x


class EncoderBlock(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = None if cfg.shared_pos else RelativePositionBias(cfg.num_buckets, cfg.num_heads, cfg.max_dist)

    def forward(self, x: torch.Tensor, key_mask_bias: torch.Tensor, shared_bias: Optional[torch.Tensor]) -> torch.Tensor:
        pos = shared_bias if self.pos_embedding is None else self.pos_embedding(x.shape[1], x.shape[1])
        bias = (pos.to(x.dtype) + key_mask_bias) if pos is not None else key_mask_bias
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """The umT5 encoder. `forward(ids [B, L], mask [B, L] or None) -> [B, L, dim]`.

    Parameter names are those of `models_t5_umt5-xxl-enc-bf16.pth`: `token_embedding.weight`,
    `blocks.N.{norm1,attn.{q,k,v,o},norm2,ffn.{gate.0,fc1,fc2},pos_embedding.embedding}.weight`,
    `norm.weight` (plus `pos_embedding.embedding.weight` at the top when `shared_pos`).
    """

    def __init__(self, cfg: UMT5Config = UMT5Config()):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads, cfg.max_dist) if cfg.shared_pos else None
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.token_embedding(ids)
        b, s = ids.shape
        key_mask_bias = x.new_zeros(b, 1, 1, s)
        if mask is not None:
            key_mask_bias = key_mask_bias.masked_fill(mask.view(b, 1, 1, s) == 0, torch.finfo(x.dtype).min)
        shared = self.pos_embedding(s, s) if self.pos_embedding is not None else None
        for block in self.blocks:
            x = block(x, key_mask_bias, shared)
        return self.norm(x)


class Tokenizer(Protocol):
    """What `TextEncoder` needs from a tokenizer: prompts -> (ids [B, L], mask [B, L]) int64."""

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


class TextEncoder:
    """Tokenizer + umT5 encoder: `encode(prompts) -> list of [L_i, dim]` (official `T5EncoderModel.__call__`)."""

    def __init__(self, tokenizer: Tokenizer, model: UMT5Encoder):
        self.tokenizer = tokenizer
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str] | str) -> list[torch.Tensor]:
        """Each prompt -> its hidden states, trimmed to its token count (at most text_len)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids, mask = self.tokenizer(list(prompts))
        ids, mask = ids.to(self.device), mask.to(self.device)
        lengths = mask.gt(0).sum(dim=1).tolist()
        out = self.model(ids, mask)
        return [u[:n] for u, n in zip(out, lengths)]

    __call__ = encode

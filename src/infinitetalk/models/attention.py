"""Attention and rotary-position functions of the InfiniteTalk DiT.

Everything here is a plain function of tensors (no parameters, no state) so that a faster path
can replace one piece through an explicit option of the model, never by patching:

* `sdpa_attention(q, k, v)`: the one attention kernel, layout [B, L, heads, head_dim].
* `rope_table_3d(grid, head_dim, device)`: the 3-D rotary table of the video tokens; the reference
  computes it in float64 complex arithmetic as the official code does (a GPU fast path may pass a
  float32 variant with the same signature).
* `apply_rope_3d(x, table)`: rotates adjacent channel pairs of q or k by the table.
* `rope_1d(x, positions)`: the 1-D rotary embedding of the two-speaker audio attention (float32,
  fractional positions).
* `reference_attention_map(q, k, tokens_per_frame, token_masks)`: how much each video token
  attends to each reference-frame region (speaker 1, speaker 2, background); the two-speaker
  routing uses it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""q [B, Lq, H, D], k [B, Lk, H, D], v [B, Lk, H, D] -> [B, Lq, H, D], softmax scale 1/sqrt(D)."""

RopeTableFn = Callable[[tuple[int, int, int], int, torch.device], torch.Tensor]
"""(grid (frames, rows, cols), head_dim, device) -> complex table [frames*rows*cols, 1, head_dim/2]."""

ROPE_THETA = 10000.0


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) attention through torch's scaled_dot_product_attention.

    All tensors use the [B, L, heads, head_dim] layout of the official code; q and k are cast to
    v's dtype (the official path hands bf16 to flash-attn after a float32 RoPE).
    """
    q = q.to(v.dtype).transpose(1, 2)
    k = k.to(v.dtype).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2))
    return out.transpose(1, 2)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channel-pair counts of the frame, row and column parts of the 3-D RoPE (sum = head_dim/2)."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    half = head_dim // 2
    return half - 2 * (half // 3), half // 3, half // 3


def _rope_angles_1axis(length: int, pairs: int, device: torch.device) -> torch.Tensor:
    """Angles [length, pairs] in float64: position x theta^(-2j / (2 pairs))."""
    dim = 2 * pairs
    inv = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    pos = torch.arange(length, dtype=torch.float64, device=device)
    return torch.outer(pos, inv)


def rope_table_3d(grid: tuple[int, int, int], head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The reference 3-D rotary table: complex128 [f*h*w, 1, head_dim/2] for a (f, h, w) token grid.

    Tokens are ordered frame-major, then row, then column; each channel pair uses its part's
    frequency times the token's integer frame, row or column index.
    """
    f, h, w = (int(v) for v in grid)
    device = torch.device(device)
    pf, ph, pw = rope_split(head_dim)
    parts = []
    for length, pairs, shape in ((f, pf, (f, 1, 1)), (h, ph, (1, h, 1)), (w, pw, (1, 1, w))):
        ang = _rope_angles_1axis(length, pairs, device)
        parts.append(ang.view(*shape, pairs).expand(f, h, w, pairs))
    angles = torch.cat(parts, dim=-1).reshape(f * h * w, 1, head_dim // 2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope_3d(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by a complex table [L, 1, D/2]; returns float32 like the official code.

    The arithmetic runs in the table's precision (float64 for the reference table).
    """
    b, length, heads, dim = x.shape
    if table.shape[0] != length:
        raise ValueError(f"RoPE table has {table.shape[0]} rows but the sequence has {length} tokens")
    real = torch.float64 if table.dtype == torch.complex128 else torch.float32
    xc = torch.view_as_complex(x.to(real).reshape(b, length, heads, dim // 2, 2))
    return torch.view_as_real(xc * table).flatten(3).float()


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1) -> (-x1, x0) for every adjacent channel pair."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rope_1d(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """1-D rotary embedding of x [B, L, H, D] at (fractional) positions [L] or [B, L].

    Frequencies and angles are float32 (as the official RotaryPositionalEmbedding1D); adjacent
    channel pairs rotate: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin). Returns x's dtype.
    """
    dim = x.shape[-1]
    inv = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, dim, 2, device=x.device)[: dim // 2].float() / dim)
    angles = positions.to(device=x.device, dtype=torch.float32).unsqueeze(-1) * inv
    angles = angles.repeat_interleave(2, dim=-1)  # [..., L, D]
    if angles.dim() == 2:
        angles = angles.unsqueeze(0)
    angles = angles.unsqueeze(2)  # [B or 1, L, 1, D]
    xf = x.float()
    out = xf * angles.cos() + _rotate_pairs(xf) * angles.sin()
    return out.to(x.dtype)


def reference_attention_map(
    q: torch.Tensor,
    k: torch.Tensor,
    tokens_per_frame: int,
    token_masks: torch.Tensor,
    query_chunk: int = 4096,
) -> torch.Tensor:
    """Attention of every token to the reference-frame regions: [B, n_masks, L].

    q, k [B, L, H, D] are the self-attention q and k after the 3-D RoPE; the keys are the first
    `tokens_per_frame` tokens (latent frame 0). token_masks [n_masks, K] or [B, n_masks, K] (0/1).
    The heads are split into two halves (an odd last head is ignored, as in the official code);
    per half, softmax(q k^T / sqrt(D)) is averaged over each mask's keys and over the half's
    heads; the result is the mean of the two halves. Queries are processed in chunks to bound
    memory (the softmax is per query row, so chunking does not change the result).
    """
    b, length, heads, dim = q.shape
    scale = 1.0 / dim**0.5
    masks = token_masks.to(device=q.device, dtype=q.dtype)
    if masks.dim() == 2:
        masks = masks.unsqueeze(0).expand(b, -1, -1)
    mask_sums = masks.sum(-1)  # [B, n_masks]
    keys = k[:, :tokens_per_frame].to(q.dtype)
    split = heads // 2
    total = torch.zeros(b, masks.shape[1], length, dtype=q.dtype, device=q.device)
    for half in range(2):
        sl = slice(half * split, (half + 1) * split)
        kh = keys[:, :, sl].transpose(1, 2)  # [B, h, K, D]
        for start in range(0, length, query_chunk):
            qh = (q[:, start:start + query_chunk, sl] * scale).transpose(1, 2)  # [B, h, c, D]
            probs = (qh @ kh.transpose(-2, -1)).softmax(-1)  # [B, h, c, K]
            per_mask = probs @ masks.transpose(1, 2).unsqueeze(1)  # [B, h, c, n_masks]
            per_mask = per_mask / mask_sums[:, None, None, :]
            total[:, :, start:start + query_chunk] += per_mask.mean(1).transpose(1, 2)
    return total / 2

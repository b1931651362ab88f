"""Attention and rotary-position functions of the InfiniteTalk DiT.

Everything here is a plain function of tensors (no parameters, no state) so that a faster path
can replace one piece through an explicit option of the model, never by patching:

* `sdpa_attention(q, k, v)`: the one attention kernel, layout [B, L, heads, head_dim].
* `sdpa_attention_bhld(q, k, v)`: the same function, handing the kernel contiguous
  [B, heads, L, head_dim] copies (the layout cuDNN's SDPA is fastest on; the copy of q and k
  fuses with the RoPE/cast when compiled). An `AttentionFn` a fast path may choose.
* `rope_table_3d(grid, head_dim, device)`: the 3-D rotary table of the video tokens; the reference
  computes it in float64 complex arithmetic as the official code does (a GPU fast path may pass a
  float32 variant with the same signature).
* `apply_rope_3d(x, table)`: rotates adjacent channel pairs of q or k by the table.
* `RopeCache` / `rope_table_3d_f32(grid, head_dim, device)`: the fast-path table, real float32
  [L, 1, head_dim/2, 2] (cos, sin) computed once per shape from float64 angles on the CPU and
  kept on the device, so no float64 or complex arithmetic runs on the GPU hot path.
* `PreferredSdpa(backends)`: the SDPA kernel with an explicit backend priority (cuDNN first on
  Hopper, then flash), through `torch.nn.attention.sdpa_kernel`.
* `rope_1d(x, positions)`: the 1-D rotary embedding of the two-speaker audio attention (float32,
  fractional positions).
* `reference_attention_map(q, k, tokens_per_frame, token_masks)`: how much each video token
  attends to each reference-frame region (speaker 1, speaker 2, background); the two-speaker
  routing uses it. `sdpa_attention_map` computes the same map as one fused attention call
  (the masks are the values), without materialising the [L, K] probabilities.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""q [B, Lq, H, D], k [B, Lk, H, D], v [B, Lk, H, D] -> [B, Lq, H, D], softmax scale 1/sqrt(D)."""

RopeTableFn = Callable[[tuple[int, int, int], int, torch.device], torch.Tensor]
"""(grid (frames, rows, cols), head_dim, device) -> complex table [frames*rows*cols, 1, head_dim/2]."""

RoutingMapFn = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor]
"""(q, k [B, L, H, D] after RoPE, tokens_per_frame, token masks [B or 1, 3, K]) -> map [B, 3, L]."""

ROPE_THETA = 10000.0

SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) attention through torch's scaled_dot_product_attention.

    All tensors use the [B, L, heads, head_dim] layout of the official code; q and k are cast to
    v's dtype (the official path hands bf16 to flash-attn after a float32 RoPE).
    """
    q = q.to(v.dtype).transpose(1, 2)
    k = k.to(v.dtype).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2))
    return out.transpose(1, 2)


def sdpa_attention_bhld(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`sdpa_attention` with q, k, v laid out as contiguous [B, heads, L, head_dim] for the kernel.

    Same inputs, outputs and arithmetic as `sdpa_attention`; only the memory layout handed to
    SDPA differs (cuDNN's kernel is faster on contiguous [B, H, L, D] inputs than on
    [B, L, H, D] views, benchmarks/NOTES.md); the cast of q and k to v's dtype writes the new layout in the same pass, v and the output cost
    one copy each. Returns a [B, L, H, D] view of the [B, H, L, D] result.
    """
    q = q.transpose(1, 2).to(v.dtype, memory_format=torch.contiguous_format)
    k = k.transpose(1, 2).to(v.dtype, memory_format=torch.contiguous_format)
    v = v.transpose(1, 2).contiguous()
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


class PreferredSdpa:
    """`sdpa_attention` run under an explicit SDPA backend priority (an `AttentionFn`).

    `backends` are names from SDPA_BACKENDS, highest priority first, e.g. ("cudnn", "flash",
    "efficient", "math"): torch picks the first one that accepts the inputs (dtype, head size,
    device), so the same option works on Hopper (cuDNN), other GPUs (flash) and the CPU (math).
    """

    def __init__(self, backends: Sequence[str] = ("cudnn", "flash", "efficient", "math")):
        unknown = [b for b in backends if b not in SDPA_BACKENDS]
        if unknown or not backends:
            raise ValueError(f"unknown SDPA backends {unknown}; choose from {sorted(SDPA_BACKENDS)}")
        self.names = tuple(backends)
        self.backends = [SDPA_BACKENDS[b] for b in backends]

    def context(self):
        """The `sdpa_kernel` context that applies this priority (usable around compiled code)."""
        return sdpa_kernel(self.backends, set_priority=True)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with self.context():
            return sdpa_attention(q, k, v)

    def __repr__(self) -> str:
        return f"PreferredSdpa({self.names})"


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


def rope_table_3d_f32(grid: tuple[int, int, int], head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fast-path 3-D rotary table: float32 [f*h*w, 1, head_dim/2, 2] holding (cos, sin).

    Angles, cosines and sines are computed in float64 on the CPU (the reference table's
    values, rounded once to float32), then moved to `device`: the GPU never sees float64.
    """
    ref = rope_table_3d(grid, head_dim, "cpu")
    table = torch.stack([ref.real, ref.imag], dim=-1).to(torch.float32)
    return table.to(device)


class RopeCache:
    """A `RopeTableFn` that builds `rope_table_3d_f32` once per (grid, head_dim, device) and reuses it.

    The cache belongs to the object (one per model or pipeline), not to the module; `clear()`
    drops the tables.
    """

    def __init__(self, table_fn: RopeTableFn = rope_table_3d_f32):
        self.table_fn = table_fn
        self._tables: dict[tuple, torch.Tensor] = {}

    def __call__(self, grid: tuple[int, int, int], head_dim: int, device: torch.device | str) -> torch.Tensor:
        key = (tuple(int(g) for g in grid), int(head_dim), str(torch.device(device)))
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = self.table_fn(grid, head_dim, device)
        return table

    def clear(self) -> None:
        self._tables.clear()

    def __repr__(self) -> str:
        return f"RopeCache({getattr(self.table_fn, '__name__', self.table_fn)}, {len(self._tables)} shapes)"


def apply_rope_3d(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by a table; returns float32 like the official code.

    `table` is either the reference complex table [L, 1, D/2] (the arithmetic runs in its
    precision, float64 for `rope_table_3d`) or a real float32 (cos, sin) table [L, 1, D/2, 2]
    from `rope_table_3d_f32` (float32 arithmetic, no complex numbers, fusable by the compiler).
    """
    b, length, heads, dim = x.shape
    if table.shape[0] != length:
        raise ValueError(f"RoPE table has {table.shape[0]} rows but the sequence has {length} tokens")
    if not table.is_complex():
        # the same float32 products and sums as the complex product, element-wise only
        return _rotate_pairs_by(x.float(), table)
    real = torch.float64 if table.dtype == torch.complex128 else torch.float32
    xc = torch.view_as_complex(x.to(real).reshape(b, length, heads, dim // 2, 2))
    return torch.view_as_real(xc * table).flatten(3).float()


def _rotate_pairs_by(xf: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate the adjacent channel pairs of xf [..., D] by a (cos, sin) table [..., D/2, 2].

    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), written as pairs * (cos, cos) + swapped pairs
    * (-sin, sin): the products and sums of the complex product, element-wise only (no stack),
    so a compiled block fuses the rotation into what reads its result.
    """
    pairs = xf.unflatten(-1, (xf.shape[-1] // 2, 2))
    cos, sin = table[..., :1], table[..., 1:]
    return (pairs * cos + pairs.flip(-1) * torch.cat((-sin, sin), dim=-1)).flatten(-2)


@torch.library.custom_op("infinitetalk::rope_1d_table", mutates_args=())
def rope_1d_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """cos and sin of the 1-D RoPE angles: positions [..., L] -> float32 [..., L, dim/2, 2].

    Frequencies theta^(-2i/dim) and angles positions x frequency in float32, as the official
    RotaryPositionalEmbedding1D. A custom op (opaque to torch.compile) so that a compiled block
    writes this small table once instead of evaluating cos and sin for every head and channel
    of q (the compiler would inline them into the rotation: 40x the transcendental work).
    """
    inv = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, dim, 2, device=positions.device)[: dim // 2].float() / dim)
    angles = positions.float().unsqueeze(-1) * inv
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


@rope_1d_table.register_fake
def _(positions: torch.Tensor, dim: int) -> torch.Tensor:
    return positions.new_empty((*positions.shape, dim // 2, 2), dtype=torch.float32)


def rope_1d(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """1-D rotary embedding of x [B, L, H, D] at (fractional) positions [L] or [B, L].

    Frequencies and angles are float32 (as the official RotaryPositionalEmbedding1D); adjacent
    channel pairs rotate: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin). Returns x's dtype.
    """
    dim = x.shape[-1]
    table = rope_1d_table(positions.to(device=x.device), dim)  # [B or 1 or -, L, D/2, 2]
    if table.dim() == 3:
        table = table.unsqueeze(0)
    table = table.unsqueeze(2)  # [B or 1, L, 1, D/2, 2]
    return _rotate_pairs_by(x.float(), table).to(x.dtype)


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


def _attention_any_value_width(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`sdpa_attention` where v's head size may differ from q's (softmax scale 1/sqrt(q's D))."""
    out = F.scaled_dot_product_attention(q.to(v.dtype).transpose(1, 2), k.to(v.dtype).transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def narrow_attention_map(
    q: torch.Tensor, k: torch.Tensor, tokens_per_frame: int, token_masks: torch.Tensor
) -> torch.Tensor:
    """`sdpa_attention_map` with the values padded to 16 channels (a `RoutingMapFn`)."""
    return sdpa_attention_map(q, k, tokens_per_frame, token_masks, value_width=16)


def sdpa_attention_map(
    q: torch.Tensor,
    k: torch.Tensor,
    tokens_per_frame: int,
    token_masks: torch.Tensor,
    value_width: int | None = None,
) -> torch.Tensor:
    """`reference_attention_map` as one fused attention call (same math, far fewer bytes).

    softmax(q k^T / sqrt(D)) averaged over a mask's keys is attention whose values are the
    masks: out[q, m] = sum_k p[q, k] mask[m, k]. So the map is SDPA(q, k_frame0, V) with
    V[k] = (mask_1[k], mask_2[k], mask_3[k], 0, ...) padded to the head size (the fused
    kernels need equal q/k/v head sizes), divided by the mask sizes and averaged over the
    heads of the two halves (equal halves, so the mean of the halves is the mean over the
    first 2*(H//2) heads; an odd last head is ignored, as in the reference).
    `value_width` pads the values to that many channels instead of the head size: the same map
    (the padding is zeros), with half the FLOPs and 1/8 of the output at 16 channels, for
    kernels that take a value head size other than the q/k one (cuDNN on Hopper; flash refuses
    it, and the efficient kernel is slower with it).
    The map is returned in float32 whatever q's dtype: the speaker positions derived from it
    (min-max rescaled to [0, 4] and [20, 24], then RoPE angles) lose up to 1/8 of a position
    when kept in bf16, which visibly moves a two-speaker bf16 output.
    """
    b, length, heads, dim = q.shape
    used = 2 * (heads // 2)
    masks = token_masks.to(device=q.device, dtype=torch.float32)
    if masks.dim() == 2:
        masks = masks.unsqueeze(0)
    masks = masks.expand(b, -1, -1)
    n_masks = masks.shape[1]
    width = dim if value_width is None else int(value_width)
    if n_masks > width:
        raise ValueError(f"{n_masks} masks do not fit in {width} value channels")
    mask_sums = masks.sum(-1)  # [B, n_masks]
    values = F.pad(masks.transpose(1, 2), (0, width - n_masks))  # [B, K, width]
    values = values[:, :, None, :].expand(b, tokens_per_frame, used, width).to(q.dtype)
    out = _attention_any_value_width(q[:, :, :used], k[:, :tokens_per_frame, :used].to(q.dtype), values.contiguous())
    per_mask = out[..., :n_masks].float().mean(2)  # [B, L, n_masks]
    return (per_mask / mask_sums[:, None, :]).transpose(1, 2)

"""GGUF (ggml) block formats dequantised with torch ops, on any device.

A quantised ggml tensor is a run of fixed-size blocks (`GGML_BLOCKS[type] = (values per block,
bytes per block)`), kept here as a uint8 tensor. `dequantize(raw, qtype, shape)` unpacks it in
float32 with exactly the operations, in the order, of gguf-py's numpy reference
(`gguf.quants.dequantize`, 0.19): every fp16 scale x small integer product is exact in float32
and the final `- min` / `+ m` rounds once, so the float32 result is bit-identical to it; a
lower `dtype` is a cast of that result.

Types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (the ggml
type ids of `gguf.GGMLQuantizationType`). No file I/O: the readers in `infinitetalk.weights`
hand the raw blocks over.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

QK_K = 256

# ggml type id -> name, (values per block, bytes per block); ids as in ggml.h / gguf-py constants
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16",
}
GGML_TYPE_IDS = {name: tid for tid, name in GGML_TYPES.items()}
GGML_BLOCKS = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (QK_K, 84), "Q3_K": (QK_K, 110), "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210),
}
FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = tuple(name for name in GGML_BLOCKS if name not in FLOAT_TYPES)
# bits per weight, for sizes and for ranking files by precision
BITS_PER_WEIGHT = {name: 8.0 * size / n for name, (n, size) in GGML_BLOCKS.items()}


def type_name(qtype: int | str) -> str:
    """The ggml type name of an id or name; ValueError for a type not supported here."""
    if isinstance(qtype, str):
        if qtype not in GGML_BLOCKS:
            raise ValueError(f"unsupported ggml type {qtype!r}")
        return qtype
    name = getattr(qtype, "name", None)
    if name in GGML_BLOCKS:
        return name
    try:
        return GGML_TYPES[int(qtype)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"unsupported ggml type {qtype!r}") from None


def raw_nbytes(qtype: int | str, numel: int) -> int:
    """Bytes of `numel` values stored as `qtype` (numel must be a whole number of blocks)."""
    n, size = GGML_BLOCKS[type_name(qtype)]
    if numel % n:
        raise ValueError(f"{numel} values are not a whole number of {type_name(qtype)} blocks of {n}")
    return numel // n * size


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> [..., 1] float32 (the little-endian fp16 the bytes hold)."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """[nb, groups*width] bytes -> [nb, groups*2*width]: low nibbles of a group, then its high ones."""
    nb = qs.shape[0]
    q = qs.reshape(nb, groups, 1, width)
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).reshape(1, 1, 2, 1)
    return ((q >> shifts) & 0x0F).reshape(nb, groups * 2 * width)


def _bits(b: torch.Tensor, count: int) -> torch.Tensor:
    """[nb, count/8] bytes read as one little-endian bit field -> [nb, count] of 0/1 (uint8)."""
    nb = b.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 1, 8)
    return ((b.reshape(nb, -1, 1) >> shifts) & 1).reshape(nb, count)


def _q4_0(blocks):
    d, qs = _f16(blocks[:, :2]), blocks[:, 2:]
    q = _nibbles(qs, 1, 16).to(torch.int8) - 8
    return d * q.to(torch.float32)


def _q4_1(blocks):
    d, m, qs = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), blocks[:, 4:]
    return d * _nibbles(qs, 1, 16).to(torch.float32) + m


def _q5_low_high(qh, qs):
    return _nibbles(qs, 1, 16) | (_bits(qh, 32) << 4)


def _q5_0(blocks):
    d = _f16(blocks[:, :2])
    q = _q5_low_high(blocks[:, 2:6], blocks[:, 6:]).to(torch.int8) - 16
    return d * q.to(torch.float32)


def _q5_1(blocks):
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = _q5_low_high(blocks[:, 4:8], blocks[:, 8:])
    return d * q.to(torch.float32) + m


def _q8_0(blocks):
    d = _f16(blocks[:, :2])
    x = blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return x * d


def _q2_k(blocks):
    nb = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (scales & 0xF).to(torch.float32)).reshape(nb, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(nb, 16, 1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).reshape(1, 1, 4, 1)
    q = ((qs.reshape(nb, -1, 1, 32) >> shifts) & 3).reshape(nb, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(nb, QK_K)


def _q3_k(blocks):
    nb = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks[:, 108:110])
    dev = blocks.device
    low = (scales[:, :8].reshape(nb, 1, 8) >> torch.tensor([0, 4], dtype=torch.uint8, device=dev).reshape(1, 2, 1)).reshape(nb, 16)
    high = (scales[:, 8:].reshape(nb, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=dev).reshape(1, 4, 1)).reshape(nb, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * sc.to(torch.float32)).reshape(nb, 16, 1)
    ql = (qs.reshape(nb, -1, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=dev).reshape(1, 1, 4, 1))
    qh = (hmask.reshape(nb, -1, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=dev).reshape(1, 1, 8, 1))
    ql = ql.reshape(nb, 16, 16) & 3
    qh = (qh.reshape(nb, 16, 16) & 1) ^ 1  # a set mask bit means no -4 offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).reshape(nb, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (Q4_K / Q5_K)."""
    nb = scales.shape[0]
    s = scales.reshape(nb, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(blocks):
    nb = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(nb, -1, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(nb, -1, 1)
    q = _nibbles(blocks[:, 16:], 4, 32).reshape(nb, -1, 32).to(torch.float32)
    return (d * q - dm).reshape(nb, QK_K)


def _q5_k(blocks):
    nb = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    qh, qs = blocks[:, 16:48], blocks[:, 48:]
    d = (d * sc.to(torch.float32)).reshape(nb, -1, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(nb, -1, 1)
    ql = _nibbles(qs, 4, 32).reshape(nb, -1, 32)
    high = (qh.reshape(nb, -1, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=blocks.device).reshape(1, 1, 8, 1))
    high = (high & 1).reshape(nb, -1, 32)
    q = (ql | (high << 4)).to(torch.float32)
    return (d * q - dm).reshape(nb, QK_K)


def _q6_k(blocks):
    nb = blocks.shape[0]
    ql, qh, scales = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208]
    d = _f16(blocks[:, 208:210])
    d = (d * scales.contiguous().view(torch.int8).to(torch.float32)).reshape(nb, 16, 1)
    low = _nibbles(ql, 2, 64).reshape(nb, -1, 32)
    high = (qh.reshape(nb, -1, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).reshape(1, 1, 4, 1))
    high = (high & 3).reshape(nb, -1, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(nb, 16, -1).to(torch.float32)
    return (d * q).reshape(nb, QK_K)


def _f32(blocks):
    return blocks.contiguous().view(torch.float32)


def _f16_values(blocks):
    return blocks.contiguous().view(torch.float16).to(torch.float32)


def _bf16(blocks):
    return blocks.contiguous().view(torch.bfloat16).to(torch.float32)


_DEQUANT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": _f32, "F16": _f16_values, "BF16": _bf16,
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def dequantize(raw: torch.Tensor, qtype: int | str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of `raw` (uint8 blocks of `qtype`, any shape, on any device) as a `shape` tensor.

    Float32 math, bit-identical to `gguf.quants.dequantize`; then cast to `dtype`.
    """
    name = type_name(qtype)
    n, size = GGML_BLOCKS[name]
    if raw.dtype != torch.uint8:
        raw = raw.contiguous().view(torch.uint8)
    numel = 1
    for s in shape:
        numel *= int(s)
    if raw.numel() != raw_nbytes(name, numel):
        raise ValueError(f"{raw.numel()} bytes do not hold {numel} {name} values ({raw_nbytes(name, numel)} bytes)")
    blocks = raw.reshape(-1, size)
    values = _DEQUANT[name](blocks).reshape(tuple(int(s) for s in shape))
    return values if dtype == torch.float32 else values.to(dtype)

"""Pack float weights into GGUF blocks with torch ops (Q8_0 and Q4_K), on any device.

For converting weights (e.g. `benchmarks/convert_gguf.py`) and tests; files made with
llama.cpp's `llama-quantize` are read the same way. The blocks have exactly the bit layout
`gguf.quants.dequantize` (and `quant.gguf_dequant`) reads:
* Q8_0: 32 values -> fp16 d = max|x| / 127 and int8 round(x / d) (gguf-py's rule);
* Q4_K: 256 values in 8 sub-blocks of 32 -> fp16 d, dmin, 6-bit scale and min per sub-block
  (packed in 12 bytes) and 4-bit q, value = d*sc*q - dmin*m; the sub-block range is taken from
  its min/max (simpler than llama.cpp's search, same format).
"""
from __future__ import annotations

import torch

from .gguf_dequant import GGML_BLOCKS, QK_K


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).reshape(-1, 1).contiguous().view(torch.uint8)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """[..., n] float (n % 32 == 0) -> flat uint8 Q8_0 blocks."""
    x = weight.detach().to(torch.float32).reshape(-1, 32)
    d = x.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _round_away(x * inv).clamp_(-127, 127).to(torch.int8)
    return torch.cat([_fp16_bytes(d), q.view(torch.uint8)], dim=1).reshape(-1)


def quantize_q4_k(weight: torch.Tensor) -> torch.Tensor:
    """[..., n] float (n % 256 == 0) -> flat uint8 Q4_K blocks."""
    x = weight.detach().to(torch.float32).reshape(-1, 8, 32)
    nb = x.shape[0]
    lo = x.amin(dim=2).clamp(max=0)
    hi = x.amax(dim=2)
    scale = (hi - lo) / 15
    mins = -lo
    d = (scale.amax(dim=1, keepdim=True) / 63).to(torch.float16).to(torch.float32)
    dmin = (mins.amax(dim=1, keepdim=True) / 63).to(torch.float16).to(torch.float32)
    sc = torch.where(d > 0, torch.round(scale / torch.where(d > 0, d, 1)), 0).clamp(0, 63)
    mn = torch.where(dmin > 0, torch.round(mins / torch.where(dmin > 0, dmin, 1)), 0).clamp(0, 63)
    step = (d * sc).unsqueeze(-1)
    offset = (dmin * mn).unsqueeze(-1)
    q = torch.where(step > 0, torch.round((x + offset) / torch.where(step > 0, step, 1)), 0).clamp(0, 15).to(torch.uint8)
    sc8, mn8 = sc.to(torch.uint8), mn.to(torch.uint8)
    scales = torch.cat([
        sc8[:, :4] | ((sc8[:, 4:] >> 4) << 6),
        mn8[:, :4] | ((mn8[:, 4:] >> 4) << 6),
        (sc8[:, 4:] & 0x0F) | ((mn8[:, 4:] & 0x0F) << 4),
    ], dim=1)
    q = q.reshape(nb, 4, 2, 32)  # group g holds sub-blocks 2g (low nibbles) and 2g+1 (high)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)
    out = torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), scales, qs], dim=1)
    assert out.shape[1] == GGML_BLOCKS["Q4_K"][1]
    return out.reshape(-1)


QUANTIZERS = {"Q8_0": quantize_q8_0, "Q4_K": quantize_q4_k}
BLOCK_VALUES = {"Q8_0": 32, "Q4_K": QK_K}

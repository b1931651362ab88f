"""The FFN of an fp8 block with its GELU and the row-wise fp8 quantisation in one pass.

In an fp8 block the FFN is `Fp8Linear -> GELU(tanh) -> Fp8Linear`, and the second layer
quantises its input per row (scale = max|row| / 448). Compiled, that is one reduction kernel
that reads the [tokens, 13824] bf16 hidden activations twice (once for the row maximum, once to
quantise) and evaluates the GELU twice, the largest element-wise kernel of the forward. A row
of 13,824 values fits in one Triton program's registers, so `gelu_quantize_rowwise` reads it
once, evaluates the GELU once, and writes the e4m3 row and its scale (timings:
benchmarks/bench_fp8_gelu.py and benchmarks/results).

* `gelu_quantize_rowwise(h)`: h [M, N] -> (e4m3 [M, N], float32 scales [M, 1]); a custom op,
  so a compiled block calls it as one kernel. The Triton kernel runs on CUDA when Triton is
  installed; elsewhere (CPU tests, no Triton) the same math runs in torch.
* `Fp8GeluFfn`: the block's `ffn` (an `nn.Sequential` of the same three children, so state
  dicts are unchanged) whose forward hands the quantised activations straight to the second
  layer (`Fp8Linear.forward_quantized`). `make_fast` puts it in place of the FFN of fp8 blocks.

GELU(tanh)(h) = h * sigmoid(2u), u = sqrt(2/pi) (h + 0.044715 h^3), the same function as
`0.5 h (1 + tanh(u))` (torch's `approximate="tanh"`) evaluated without the cancellation of
1 + tanh near -1; computed in float32 from the bf16 input, and quantised from float32 (the
unfused path rounds the GELU to bf16 first, a 2^-9 relative step below the e4m3 one of 2^-4).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..quant.fp8 import MIN_ACT_SCALE, FP8_DTYPE, FP8_MAX, Fp8Linear, quantize_activation_rowwise

_TWO_SQRT_2_OVER_PI = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


def gelu_tanh_float32(h: torch.Tensor) -> torch.Tensor:
    """GELU(tanh) in float32 as the kernel computes it: h * sigmoid(2u)."""
    hf = h.float()
    u2 = _TWO_SQRT_2_OVER_PI * (hf + _GELU_CUBIC * hf * hf * hf)
    return hf / (1.0 + torch.exp(-u2))


def gelu_quantize_reference(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel computes, in torch: GELU in float32, then row-wise e4m3 quantisation."""
    return quantize_activation_rowwise(gelu_tanh_float32(h))


try:  # Triton comes with CUDA builds of torch; CPU-only installs run the torch version
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:

    @triton.jit
    def _gelu_quantize_rows(h_ptr, q_ptr, scale_ptr, n_cols, h_stride, q_stride,
                            BLOCK: tl.constexpr, TWO_C: tl.constexpr, CUBIC: tl.constexpr,
                            QMAX: tl.constexpr, MIN_SCALE: tl.constexpr):
        """One row per program: load it once, GELU, row maximum, scale, e4m3 store."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        h = tl.load(h_ptr + row * h_stride + cols, mask=mask, other=0.0).to(tl.float32)
        u2 = TWO_C * (h + CUBIC * h * h * h)
        g = h / (1.0 + tl.exp(-u2))
        scale = tl.maximum(tl.max(tl.abs(g), axis=0) / QMAX, MIN_SCALE)
        q = tl.minimum(tl.maximum(g / scale, -QMAX), QMAX)
        tl.store(q_ptr + row * q_stride + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)


def _launch(h: torch.Tensor, num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = h.shape
    q = torch.empty((m, n), dtype=FP8_DTYPE, device=h.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=h.device)
    if m:
        _gelu_quantize_rows[(m,)](
            h, q, scale, n, h.stride(0), q.stride(0),
            BLOCK=triton.next_power_of_2(n), TWO_C=_TWO_SQRT_2_OVER_PI, CUBIC=_GELU_CUBIC,
            QMAX=FP8_MAX, MIN_SCALE=MIN_ACT_SCALE, num_warps=num_warps,
        )
    return q, scale


def kernel_runs_on(h: torch.Tensor) -> bool:
    """True when `gelu_quantize_rowwise` uses the Triton kernel for this input."""
    return (
        h.is_cuda and h.dim() == 2 and h.stride(-1) == 1 and h.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and 0 < h.shape[1] <= 32768 and triton is not None
    )


@torch.library.custom_op("infinitetalk::gelu_quantize_rowwise", mutates_args=())
def gelu_quantize_rowwise(h: torch.Tensor, num_warps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """h [M, N] -> (GELU(tanh)(h) quantised to e4m3 per row [M, N], float32 scales [M, 1]).

    `num_warps` sets the Triton program size (one row per program; ignored in torch;
    benchmarks/bench_fp8_gelu.py compares the choices).
    """
    if kernel_runs_on(h):
        return _launch(h, num_warps)
    return gelu_quantize_reference(h)


@gelu_quantize_rowwise.register_fake
def _(h: torch.Tensor, num_warps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return h.new_empty(h.shape, dtype=FP8_DTYPE), h.new_empty((h.shape[0], 1), dtype=torch.float32)


class Fp8GeluFfn(nn.Sequential):
    """`Fp8Linear -> GELU(tanh) -> Fp8Linear` with the GELU and the second layer's quantisation fused.

    Holds the same three children as the block's `ffn` (`0`, `1`, `2`), so parameter names and
    state dicts do not change. Build it with `Fp8GeluFfn.from_ffn(ffn)`.
    """

    @classmethod
    def from_ffn(cls, ffn: nn.Sequential) -> "Fp8GeluFfn":
        if not cls.fusable(ffn):
            raise ValueError("Fp8GeluFfn needs an nn.Sequential(Fp8Linear, GELU(approximate='tanh'), Fp8Linear)")
        return cls(*ffn)

    @staticmethod
    def fusable(ffn: nn.Module) -> bool:
        return (
            isinstance(ffn, nn.Sequential) and len(ffn) == 3
            and isinstance(ffn[0], Fp8Linear) and isinstance(ffn[2], Fp8Linear)
            and isinstance(ffn[1], nn.GELU) and ffn[1].approximate == "tanh"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self[0](x)
        lead = hidden.shape[:-1]
        h_q, h_scale = gelu_quantize_rowwise(hidden.reshape(-1, hidden.shape[-1]))
        out = self[2].forward_quantized(h_q, h_scale, out_dtype=x.dtype)
        return out.reshape(*lead, out.shape[-1])

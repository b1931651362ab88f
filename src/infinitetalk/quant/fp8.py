"""fp8 (e4m3) linear layers: per-output-channel weight scales, per-token activation scales.

`Fp8Linear` stores its weight as `torch.float8_e4m3fn` with one float32 scale per output
channel (`weight_scale`, shape [out]) and keeps its bias in high precision. On a CUDA device
that supports `torch._scaled_mm` (compute capability >= 8.9: Ada, Hopper, Blackwell) the
product runs as one fp8 GEMM with row-wise scaling: each token (row of the input) is quantised
on the fly with its own scale `max|x_row| / 448`, and the kernel computes
`(x_q @ w_q^T) * scale_x[M,1] * scale_w[1,N] + bias` with float32 accumulation, writing bf16.

`torch._scaled_mm` row-wise requirements (torch 2.13, ATen ScaledBlas.cpp): both operands
float8, the first row-major [M, K], the second column-major [K, N] (our [N, K] row-major
weight transposed), K and N multiples of 16, `scale_a` float32 [M, 1] contiguous, `scale_b`
float32 [1, N] contiguous, bias bf16 for a bf16 output, device capability >= 8.9.

Other cases:
- not on CUDA (CPU tests): an emulation that computes exactly what the kernel computes
  (fp8 activations and weights, exact fp8 products summed in float32, then scaled), so the
  fp8 error measured on the CPU is the error the GPU path makes;
- CUDA without fp8 support (e.g. A100) or a shape the kernel refuses: weight-only fp8 (the
  weight is dequantised to the input dtype and multiplied with `F.linear`), which keeps the
  memory saving.

Models get fp8 layers by explicit module replacement (`quantize_module`), never by patching
classes; `quantize_dit` is the one place that decides which DiT layers run in fp8 (the loader,
the tiny model and the benchmarks all call it). No file I/O here: fp8 checkpoints are written
and read by `infinitetalk.weights.fp8_checkpoint`.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0
# Smallest activation scale: a row of zeros gets this scale and quantises to zeros.
MIN_ACT_SCALE = 1e-12

# DiT layers that run in fp8: the big linears of every block (self-attention q/k/v/o, text and
# image cross-attention, FFN, audio cross-attention). Embeddings, the time projection,
# `modulation`, norms, `img_emb`, `audio_proj` and the output head stay in high precision:
# they are a tiny share of the FLOPs and the most sensitive to rounding.
_DIT_FP8_LAYER = re.compile(
    r"blocks\.\d+\.("
    r"self_attn\.(q|k|v|o)"
    r"|cross_attn\.(q|k|v|o|k_img|v_img)"
    r"|ffn\.(0|2)"
    r"|audio_cross_attn\.(q_linear|kv_linear|proj)"
    r")"
)


def is_dit_fp8_layer(name: str) -> bool:
    """True for the DiT linear layers that `quantize_module` should turn into fp8."""
    return _DIT_FP8_LAYER.fullmatch(name) is not None


def quantize_weight_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a [out, in] weight to e4m3 with one float32 scale per output channel.

    scale = max|w_row| / 448 (rows of zeros get scale 1); returns (w_q, scale[out]) with
    w ~= w_q.float() * scale[:, None]. Math in float32, so the result does not depend on the
    weight's dtype or device.
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_activation_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a [M, K] activation to e4m3 with one float32 scale per row -> (x_q, scale[M, 1])."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_(min=MIN_ACT_SCALE)
    q = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_weight(weight_q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w_q [out, in] (fp8) and scale [out] -> the weight in `dtype` (computed in float32)."""
    return (weight_q.float() * scale.float().reshape(-1, 1)).to(dtype)


def scaled_mm_supported(device: torch.device | str) -> bool:
    """True when `torch._scaled_mm` can run fp8 GEMMs on `device` (CUDA, capability >= 8.9)."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _keep_dtype(fn: Callable[[torch.Tensor], torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
    """Apply a Module._apply function but refuse dtype changes (a device move is still done)."""
    out = fn(tensor)
    if out.dtype != tensor.dtype:
        out = tensor.to(device=out.device)
    return out


class Fp8Linear(nn.Module):
    """A linear layer with an e4m3 weight and per-output-channel float32 scales.

    State: `weight` [out, in] float8_e4m3fn, `weight_scale` [out] float32 (persistent buffer),
    `bias` [out] (any float dtype, typically the model's) or None. Build it empty (on meta, to
    be filled by `materialize`) or from an `nn.Linear` with `from_linear`. The weight and its
    scales never change dtype: `model.to(torch.bfloat16)` moves them but keeps fp8/float32.
    `use_fast_accum` passes the fast-accumulation flag of `torch._scaled_mm` (faster on Hopper,
    slightly less accurate); it has no effect on the other paths.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: Optional[torch.device | str] = None,
        bias_dtype: torch.dtype = torch.float32,
        use_fast_accum: bool = False,
    ):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.use_fast_accum = bool(use_fast_accum)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, use_fast_accum: bool = False) -> "Fp8Linear":
        """Quantise an `nn.Linear` (on meta: an empty Fp8Linear on meta, to be materialised)."""
        has_bias = linear.bias is not None
        bias_dtype = linear.bias.dtype if has_bias else torch.float32
        layer = cls(
            linear.in_features,
            linear.out_features,
            has_bias,
            device=linear.weight.device,
            bias_dtype=bias_dtype,
            use_fast_accum=use_fast_accum,
        )
        if linear.weight.is_meta:
            return layer
        q, scale = quantize_weight_rowwise(linear.weight)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = scale
        if has_bias:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as `dtype` (w_q * scale), e.g. to compare with the original."""
        return dequantize_weight(self.weight, self.weight_scale, dtype)

    def _apply(self, fn, recurse=True):
        # nn.Module._apply would cast the fp8 weight (a floating dtype) and the float32 scales
        # when the model is moved with a dtype (model.to(torch.bfloat16)), silently turning
        # w_q into unscaled values. Move them to the new device but keep their dtypes.
        weight = self._parameters.pop("weight")
        scale = self._buffers.pop("weight_scale")
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight
            self._buffers["weight_scale"] = scale
        self._parameters["weight"] = nn.Parameter(_keep_dtype(fn, weight.detach()), requires_grad=False)
        self._buffers["weight_scale"] = _keep_dtype(fn, scale)
        return self

    def _kernel_ok(self, x2: torch.Tensor) -> bool:
        return (
            self.in_features % 16 == 0
            and self.out_features % 16 == 0
            and scaled_mm_supported(x2.device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != FP8_DTYPE or self.weight_scale.dtype != torch.float32:
            # e.g. loaded with a dtype cast: the values would be unscaled fp8 codes
            raise TypeError(
                f"Fp8Linear holds a {self.weight.dtype} weight and {self.weight_scale.dtype} scales; expected "
                "float8_e4m3fn and float32. Load fp8 layers without casting them (materialize with dtype=None, "
                "or keep float8 tensors and *.weight_scale in float32)."
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.is_cuda:
            if self._kernel_ok(x2):
                y = self._forward_scaled_mm(x2)
            else:
                y = self._forward_weight_only(x2)
        else:
            y = self._forward_emulated(x2)
        return y.reshape(*lead, self.out_features)

    def _forward_scaled_mm(self, x2: torch.Tensor) -> torch.Tensor:
        x_q, x_scale = quantize_activation_rowwise(x2)
        return self._scaled_mm(x_q, x_scale, x2.dtype)

    def _scaled_mm(self, x_q: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        kernel_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        bias = self.bias.to(kernel_dtype) if self.bias is not None else None
        y = torch._scaled_mm(
            x_q,
            self.weight.t(),
            scale_a=x_scale,
            scale_b=self.weight_scale.reshape(1, -1),
            bias=bias,
            out_dtype=kernel_dtype,
            use_fast_accum=self.use_fast_accum,
        )
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def forward_quantized(self, x_q: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The layer on an input already quantised per row: x_q [M, in] e4m3, x_scale [M, 1] float32.

        For producers that quantise in the same pass as they compute (`runtime.fp8_gelu`). Same
        kernel as `forward` (or its emulation off CUDA), output [M, out] in `out_dtype`.
        """
        if x_q.dtype != FP8_DTYPE or x_q.dim() != 2 or x_q.shape[1] != self.in_features:
            raise ValueError(f"forward_quantized needs a [M, {self.in_features}] float8_e4m3fn input, got "
                             f"{x_q.dtype} {tuple(x_q.shape)}")
        if x_q.is_cuda and self._kernel_ok(x_q):
            return self._scaled_mm(x_q, x_scale, out_dtype)
        return self._emulate(x_q, x_scale, out_dtype)

    def _emulate(self, x_q: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        y = (x_q.float() @ self.weight.float().t()) * x_scale * self.weight_scale.reshape(1, -1)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(out_dtype)

    def _forward_emulated(self, x2: torch.Tensor) -> torch.Tensor:
        # What the kernel computes: exact fp8 x fp8 products summed in float32, then the
        # per-row and per-column scales, then the bias, rounded once to the output dtype.
        x_q, x_scale = quantize_activation_rowwise(x2)
        return self._emulate(x_q, x_scale, x2.dtype)

    def _forward_weight_only(self, x2: torch.Tensor) -> torch.Tensor:
        w = dequantize_weight(self.weight, self.weight_scale, x2.dtype)
        bias = self.bias.to(x2.dtype) if self.bias is not None else None
        return F.linear(x2, w, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, fp8=e4m3fn/rowwise, fast_accum={self.use_fast_accum}"
        )


def quantize_module(
    model: nn.Module,
    predicate: Optional[Callable[[str, nn.Linear], bool]] = None,
    *,
    use_fast_accum: bool = False,
) -> nn.Module:
    """Replace the eligible `nn.Linear` layers of `model` by `Fp8Linear`; returns `model`.

    Eligible: exactly `nn.Linear` (not subclasses), in and out features multiples of 16 (what
    the fp8 kernel needs), and `predicate(name, module)` true (default: every such layer; for
    the DiT pass `lambda name, m: is_dit_fp8_layer(name)`). Works on meta-built models (the
    new layers are empty, to be filled by `materialize`) and on loaded ones (weights are
    quantised now).
    """
    targets = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if module.in_features % 16 or module.out_features % 16:
            continue
        if predicate is not None and not predicate(name, module):
            continue
        targets.append(name)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        setattr(parent, child, Fp8Linear.from_linear(old, use_fast_accum=use_fast_accum))
        del old
    logger.debug("quantize_module: %d linear layers now fp8", len(targets))
    return model


def quantize_dit(model: nn.Module, *, use_fast_accum: bool = False, only: Optional[set] = None) -> nn.Module:
    """Turn the DiT's block linear layers (`is_dit_fp8_layer`) into `Fp8Linear`; returns `model`.

    On a meta-built model the layers are empty (the loader fills them in fp8); on a loaded one
    the weights are quantised now. `only` limits it to these layer names (a file's stored fp8 layers).
    """
    return quantize_module(model, lambda name, _m: is_dit_fp8_layer(name) and (only is None or name in only),
                           use_fast_accum=use_fast_accum)


def fp8_layer_names(model: nn.Module) -> set[str]:
    """Names of the `Fp8Linear` modules of `model` (what a weight source must deliver in fp8)."""
    return {name for name, m in model.named_modules() if isinstance(m, Fp8Linear)}

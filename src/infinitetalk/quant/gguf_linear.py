"""A linear layer whose weight stays in a GGUF block format on the device.

`GGUFLinear` holds the stored blocks (`weight`, a flat uint8 buffer) and the ggml type; each
forward dequantises the weight with torch ops (`quant.gguf_dequant`) into the input dtype and
runs `F.linear`, so a Q4_K weight takes 4.5 bits per value in memory and in transfers (block
streaming under a VRAM budget moves the raw blocks, and a LoRA `weight_delta`, both registered
buffers). The bias stays a normal float parameter.

LoRAs on top of a quantised weight (the blocks cannot be re-quantised without loss):
* `add_lora(down, up, factor)`: a low-rank side path, y += factor * (x @ down^T) @ up^T;
* `add_delta(delta)`: a full-weight delta added to the dequantised weight at each forward
  (LoRAs that ship `.diff` tensors), "merge at dequant".

`replace_with_gguf(model, layers)` swaps named `nn.Linear` modules of a model (built on the meta
device) for empty `GGUFLinear`s of the given types, to be filled by `weights.materialize`.
No file I/O here; the readers in `infinitetalk.weights.formats` provide the blocks.
"""
from __future__ import annotations

import logging
from typing import Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .gguf_dequant import FLOAT_TYPES, dequantize, raw_nbytes, type_name

logger = logging.getLogger(__name__)


class GGUFLinear(nn.Module):
    """y = x @ dequant(weight)^T + bias, with `weight` kept as raw ggml blocks of `qtype`."""

    def __init__(self, in_features: int, out_features: int, qtype: int | str, bias: bool = True, *,
                 device: Optional[torch.device | str] = None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.qtype = type_name(qtype)
        nbytes = raw_nbytes(self.qtype, self.in_features * self.out_features)
        self.register_buffer("weight", torch.empty(nbytes, dtype=torch.uint8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.lora_down = nn.ParameterList()
        self.lora_up = nn.ParameterList()
        self.lora_factors: list[float] = []
        # a non-persistent buffer (None until `add_delta`): it moves and streams with the layer's block,
        # and is no key of the checkpoint
        self.register_buffer("weight_delta", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype: int | str) -> "GGUFLinear":
        """An empty layer (on the linear's device, usually meta) with the linear's sizes."""
        has_bias = linear.bias is not None
        return cls(linear.in_features, linear.out_features, qtype, has_bias, device=linear.weight.device,
                   bias_dtype=linear.bias.dtype if has_bias else torch.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as `dtype` (float32: bit-identical to gguf-py), LoRA deltas not included."""
        return dequantize(self.weight, self.qtype, self.shape, dtype)

    def add_lora(self, down: torch.Tensor, up: torch.Tensor, factor: float) -> None:
        """Add a low-rank path: down [r, in], up [out, r]; y += factor * up(down(x))."""
        if down.dim() != 2 or up.dim() != 2 or down.shape[1] != self.in_features or up.shape[0] != self.out_features \
                or up.shape[1] != down.shape[0]:
            raise ValueError(f"LoRA shapes {tuple(down.shape)} / {tuple(up.shape)} do not fit a {self.shape} layer")
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        self.lora_down.append(nn.Parameter(down.to(device=self.weight.device, dtype=dtype), requires_grad=False))
        self.lora_up.append(nn.Parameter(up.to(device=self.weight.device, dtype=dtype), requires_grad=False))
        self.lora_factors.append(float(factor))

    def add_delta(self, delta: torch.Tensor) -> None:
        """Add a full [out, in] delta to the weight, applied when it is dequantised."""
        if tuple(delta.shape) != self.shape:
            raise ValueError(f"weight delta of shape {tuple(delta.shape)} does not fit a {self.shape} layer")
        delta = delta.to(device=self.weight.device, dtype=torch.float32)
        self.weight_delta = delta if self.weight_delta is None else self.weight_delta + delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize(self.weight, self.qtype, self.shape, torch.float32 if self.weight_delta is not None else x.dtype)
        if self.weight_delta is not None:
            w = (w + self.weight_delta).to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        y = F.linear(x, w, bias)
        for down, up, factor in zip(self.lora_down, self.lora_up, self.lora_factors):
            y = y + factor * F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))
        return y

    def _apply(self, fn, recurse=True):
        # a dtype cast of the model (model.to(torch.bfloat16)) must not touch the raw blocks, and the
        # LoRA delta stays float32: both follow the device of `fn` only
        raw, delta = self._buffers.pop("weight"), self._buffers.pop("weight_delta")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["weight"], self._buffers["weight_delta"] = raw, delta
        moved = fn(raw)
        self._buffers["weight"] = moved if moved.dtype == torch.uint8 else raw.to(device=moved.device)
        if delta is not None:
            moved = fn(delta)
            self._buffers["weight_delta"] = moved.to(device=moved.device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"gguf={self.qtype}, loras={len(self.lora_factors)}")


def replace_with_gguf(model: nn.Module, layers: Mapping[str, int | str]) -> list[str]:
    """Replace the `nn.Linear` modules named in `layers` (name -> ggml type) by empty GGUFLinears.

    Float types (F32/F16/BF16) are skipped: those weights load as ordinary tensors. Returns the
    names replaced."""
    done = []
    for name, qtype in layers.items():
        if type_name(qtype) in FLOAT_TYPES:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if type(old) is not nn.Linear:
            raise TypeError(f"{name} is a {type(old).__name__}, not an nn.Linear")
        setattr(parent, child, GGUFLinear.from_linear(old, qtype))
        done.append(name)
    logger.debug("replace_with_gguf: %d linear layers keep GGUF blocks", len(done))
    return done


def gguf_layer_names(model: nn.Module) -> set[str]:
    """Names of the GGUFLinear modules of `model`."""
    return {name for name, m in model.named_modules() if isinstance(m, GGUFLinear)}

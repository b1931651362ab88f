"""The DiT fast path: an explicit set of options applied to a built model.

`FastOptions` names every speed choice; `make_fast(model, options)` applies them to an
`InfiniteTalkDiT` through its documented kernel options and by replacing modules (fp8), never
by patching classes or functions:

* `sdpa_backends`: SDPA backend priority (cuDNN first: the fastest attention on Hopper; flash
  next; the efficient and math kernels as fallbacks for float32, CPUs and odd shapes), applied
  with `torch.nn.attention.sdpa_kernel` around the whole forward.
* `rope="float32"`: the 3-D RoPE as a cached float32 (cos, sin) table per token grid (computed
  once from float64 angles on the CPU), instead of a float64 complex table rebuilt and
  applied in float64 every forward.
* `routing_map="fused"`: the two-speaker reference-attention map as one SDPA call whose values
  are the region masks, instead of materialising the softmax over the first frame. With cuDNN
  first on a Hopper or newer GPU the values are 16 channels wide, not the head size
  (`narrow_attention_map`, the same map with less work).
* `fp8_fast_accum`: the fast-accumulation flag of the model's `Fp8Linear` layers (made by
  `infinitetalk.quant.fp8.quantize_dit`, at load or before `make_fast`; e4m3 weights,
  per-channel scales, `torch._scaled_mm` with per-token scales).
* `fp8_fused_gelu`: with fp8 layers, each FFN computes its GELU and quantises it for the second
  layer in one pass over the hidden activations (`runtime.fp8_gelu.Fp8GeluFfn`, a Triton
  kernel on CUDA), instead of a compiled reduction that reads them twice.
* `fp8_attention`: the video self-attention in fp8 through cuDNN's fp8 SDPA
  (`runtime.fp8_attention.CudnnFp8Attention`; Hopper or later with the cuDNN frontend
  installed, else bf16 with a warning); faster, less exact than bf16 (see
  benchmarks/results for the speed and error).
* `compile_blocks`: regional `torch.compile` of each transformer block (`nn.Module.compile`,
  static shapes); the 40 blocks share one compiled graph per input shape, which fuses the
  float32 modulation / gated-residual / norm / RoPE element-wise work around the GEMMs.

`cache_conditions` and `batch_guidance` are read by `generation.guided_dit.GuidedDiT`, the
per-window denoiser.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from ..models.attention import (
    PreferredSdpa,
    RopeCache,
    narrow_attention_map,
    reference_attention_map,
    rope_table_3d,
    sdpa_attention,
    sdpa_attention_map,
)
from ..generation.guided_dit import CACHE_MODES
from ..models.dit import InfiniteTalkDiT

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class FastOptions:
    """Every speed option of the DiT fast path (defaults: the fast bf16 path on a GPU).

    sdpa_backends: SDPA backend names, highest priority first (None: torch's default choice).
    rope: "float32" (cached cos/sin table) or "reference" (float64 complex, official).
    routing_map: "fused" (one SDPA call) or "reference" (explicit softmax, chunked).
    fp8_fast_accum: the fast-accumulation flag of the fp8 GEMM (faster, less accurate).
    fp8_attention: the video self-attention in fp8 (cuDNN graph; bf16 where unavailable).
    fp8_fused_gelu: with fp8, the FFN's GELU and the second layer's fp8 quantisation in one
        pass (`runtime.fp8_gelu`, a Triton kernel on CUDA); where the fp8 GEMM runs.
    ffn_chunks: run each block's FFN on this many token chunks (exact; less peak memory).
    compile_blocks: torch.compile each transformer block (regional compilation).
    compile_mode: torch.compile mode (None = default; "max-autotune-no-cudagraphs" tunes longer).
    cache_conditions: which keys and values GuidedDiT computes once per window: "context" (text
        and CLIP, shared by the branches with the same prompt; audio ones in every forward),
        "all" (also the audio ones: more memory per branch, a little less compute), "none".
    batch_guidance: run the guidance branches of a step as one batched forward (GuidedDiT).
    """

    sdpa_backends: Optional[tuple[str, ...]] = ("cudnn", "flash", "efficient", "math")
    rope: str = "float32"
    routing_map: str = "fused"
    fp8_fast_accum: bool = False
    fp8_attention: bool = False
    fp8_fused_gelu: bool = True
    ffn_chunks: int = 1
    compile_blocks: bool = True
    compile_mode: Optional[str] = None
    cache_conditions: str = "context"
    batch_guidance: bool = False  # off: a batched forward saves no time on a large GPU and holds more memory

    def __post_init__(self):
        if self.rope not in ("float32", "reference"):
            raise ValueError(f"rope must be 'float32' or 'reference', got {self.rope!r}")
        if self.routing_map not in ("fused", "reference"):
            raise ValueError(f"routing_map must be 'fused' or 'reference', got {self.routing_map!r}")
        if self.cache_conditions not in CACHE_MODES:
            raise ValueError(f"cache_conditions must be one of {CACHE_MODES}, got {self.cache_conditions!r}")
        if int(self.ffn_chunks) < 1:
            raise ValueError(f"ffn_chunks must be >= 1, got {self.ffn_chunks!r}")
        if self.sdpa_backends is not None:
            object.__setattr__(self, "sdpa_backends", tuple(self.sdpa_backends))
            PreferredSdpa(self.sdpa_backends)  # validates the names

    @classmethod
    def reference(cls) -> "FastOptions":
        """The official-like path: float64 RoPE, reference map, default SDPA, eager, per-branch calls."""
        return cls(
            sdpa_backends=None, rope="reference", routing_map="reference", compile_blocks=False,
            cache_conditions="none", batch_guidance=False,
        )

    @classmethod
    def for_device(cls, device: torch.device | str, **overrides) -> "FastOptions":
        """Defaults suited to `device`: no compilation on the CPU (slow to build, little gain)."""
        base = {"compile_blocks": torch.device(device).type == "cuda"}
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> "FastOptions":
        return dataclasses.replace(self, **changes)


def make_fast(model: InfiniteTalkDiT, options: FastOptions = FastOptions()) -> InfiniteTalkDiT:
    """Apply `options` to `model` in place and return it.

    Sets the model's kernel options (attention backends, RoPE table, routing map) and the fp8
    layers' GEMM flags, fuses the fp8 FFNs when asked, then compiles each block.
    Calling it again with other options re-applies them (compiled blocks recompile on their
    next call as the guards see the change); compilation itself is never undone.
    """
    if not isinstance(model, InfiniteTalkDiT):
        raise TypeError(f"make_fast needs an InfiniteTalkDiT, got {type(model).__name__}")
    model.attention = sdpa_attention
    model.self_attention = None
    if options.fp8_attention:
        from .fp8_attention import CudnnFp8Attention, fp8_attention_supported

        if fp8_attention_supported(model.device):
            model.self_attention = CudnnFp8Attention(fallback=sdpa_attention)
        else:
            log.warning(
                "fp8 attention needs a CUDA GPU of compute capability >= 9.0 and the cuDNN frontend "
                "(pip install 'infinitetalk[fp8]'); the self-attention stays in %s.", model.dtype
            )
    model.sdpa_backends = PreferredSdpa(options.sdpa_backends) if options.sdpa_backends else None
    model.rope_table = RopeCache() if options.rope == "float32" else rope_table_3d
    model.routing_map = reference_attention_map
    if options.routing_map == "fused":
        model.routing_map = narrow_attention_map if _cudnn_takes_narrow_values(model.device, options) else sdpa_attention_map
    from ..quant.fp8 import Fp8Linear, scaled_mm_supported
    from .fp8_gelu import Fp8GeluFfn

    for module in model.modules():
        if isinstance(module, Fp8Linear):  # made by `quant.fp8.quantize_dit` (at load, or before this call)
            module.use_fast_accum = options.fp8_fast_accum
    # the fused FFN where the fp8 GEMM runs (or is emulated exactly, on the CPU); on GPUs without
    # fp8 GEMMs the layers dequantise their weights, and the plain FFN keeps that path
    fuse_gelu = options.fp8_fused_gelu and (model.device.type == "cpu" or scaled_mm_supported(model.device))
    for block in model.blocks:
        if fuse_gelu and not isinstance(block.ffn, Fp8GeluFfn) and Fp8GeluFfn.fusable(block.ffn):
            block.ffn = Fp8GeluFfn.from_ffn(block.ffn)
        elif not fuse_gelu and isinstance(block.ffn, Fp8GeluFfn):
            block.ffn = torch.nn.Sequential(*block.ffn)
    model.ffn_chunks = int(options.ffn_chunks)
    if options.compile_blocks:
        for block in model.blocks:
            if getattr(block, "_compiled_call_impl", None) is None:
                block.compile(mode=options.compile_mode, dynamic=False)
    log.info("DiT fast path: %s", options)
    return model


def _cudnn_takes_narrow_values(device: torch.device, options: FastOptions) -> bool:
    """cuDNN's SDPA runs values narrower than q and k on Hopper and later; flash does not."""
    backends = options.sdpa_backends or ()
    return (
        bool(backends) and backends[0] == "cudnn" and device.type == "cuda"
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )

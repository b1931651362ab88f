"""The DiT fast path: an explicit set of options applied to a built model, and batched guidance.

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
  (`narrow_attention_map`, same map, 1.62 ms against 2.14 ms per block at 480p on an H100).
* `fp8`: the big linear layers of every block as `Fp8Linear` (e4m3 weights, per-channel
  scales, `torch._scaled_mm` with per-token scales), see `infinitetalk.runtime.fp8`.
* `fp8_fused_gelu`: with `fp8`, each FFN computes its GELU and quantises it for the second
  layer in one pass over the hidden activations (`runtime.fp8_gelu.Fp8GeluFfn`, a Triton
  kernel on CUDA), instead of a compiled reduction that reads them twice.
* `fp8_attention`: the video self-attention in fp8 through cuDNN's fp8 SDPA
  (`runtime.fp8_attention.CudnnFp8Attention`; Hopper or later with the cuDNN frontend
  installed, else bf16 with a warning). On an H100 at 480p: 27.8 ms for the kernel against
  40.5 ms in bf16, at ~6% relative L2 error per attention call on random inputs.
* `compile_blocks`: regional `torch.compile` of each transformer block (`nn.Module.compile`,
  static shapes); the 40 blocks share one compiled graph per input shape, which fuses the
  float32 modulation / gated-residual / norm / RoPE element-wise work around the GEMMs.

Per window (see `GuidedDiT`): the text/CLIP and audio keys and values of every block are
computed once (`InfiniteTalkDiT.precompute_conditions`) and reused at every step, and the
guidance branches of a step run as one batched forward where they share the audio layout
(one speaker: all branches; two speakers: the branches with audio, then those without, since a
dropped audio is a one-speaker input with another token count).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from ..errors import InternalError
from ..models.attention import (
    PreferredSdpa,
    RopeCache,
    narrow_attention_map,
    reference_attention_map,
    rope_table_3d,
    sdpa_attention,
    sdpa_attention_map,
)
from ..models.dit import DiTConditions, InfiniteTalkDiT

log = logging.getLogger(__name__)

# Branch names as in `infinitetalk.generation.guidance`.
NULL_TEXT_BRANCHES = frozenset({"drop_text", "uncond"})
NULL_AUDIO_BRANCHES = frozenset({"uncond", "drop_audio"})
KNOWN_BRANCHES = frozenset({"cond", "drop_text", "uncond", "drop_audio"})
CACHE_MODES = ("context", "all", "none")


@dataclass(frozen=True)
class FastOptions:
    """Every speed option of the DiT fast path (defaults: the fast bf16 path on a GPU).

    sdpa_backends: SDPA backend names, highest priority first (None: torch's default choice).
    rope: "float32" (cached cos/sin table) or "reference" (float64 complex, official).
    routing_map: "fused" (one SDPA call) or "reference" (explicit softmax, chunked).
    fp8: replace the blocks' big linear layers by fp8 ones (quantised now from the weights).
    fp8_fast_accum: the fast-accumulation flag of the fp8 GEMM (faster, less accurate).
    fp8_attention: the video self-attention in fp8 (cuDNN graph; bf16 where unavailable).
    fp8_fused_gelu: with fp8, the FFN's GELU and the second layer's fp8 quantisation in one
        pass (`runtime.fp8_gelu`, a Triton kernel on CUDA); where the fp8 GEMM runs.
    ffn_chunks: run each block's FFN on this many token chunks (exact; less peak memory).
    compile_blocks: torch.compile each transformer block (regional compilation).
    compile_mode: torch.compile mode (None = default; "max-autotune-no-cudagraphs" tunes longer).
    cache_conditions: which keys and values GuidedDiT computes once per window: "context" (text
        and CLIP, shared by the branches with the same prompt; audio ones in every forward),
        "all" (also the audio ones: 0.55 GB more per branch for ~1% speed), "none".
    batch_guidance: run the guidance branches of a step as one batched forward (GuidedDiT).
    """

    sdpa_backends: Optional[tuple[str, ...]] = ("cudnn", "flash", "efficient", "math")
    rope: str = "float32"
    routing_map: str = "fused"
    fp8: bool = False
    fp8_fast_accum: bool = False
    fp8_attention: bool = False
    fp8_fused_gelu: bool = True
    ffn_chunks: int = 1
    compile_blocks: bool = True
    compile_mode: Optional[str] = None
    cache_conditions: str = "context"  # H100 480p: "all" 3.33 s / +4.27 GB, "none" 3.37 s / +3.06 GB
    batch_guidance: bool = False  # measured on an H100 at 480p: B=3 took 3.01x one forward, +7 GB

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
            sdpa_backends=None, rope="reference", routing_map="reference", fp8=False, compile_blocks=False,
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

    Sets the model's kernel options (attention backends, RoPE table, routing map), replaces the
    blocks' big linear layers by fp8 ones when asked (before compiling), then compiles each block.
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
    if options.fp8:
        from .fp8 import is_dit_fp8_layer, quantize_module

        quantize_module(model, lambda name, _m: is_dit_fp8_layer(name), use_fast_accum=options.fp8_fast_accum)
    from .fp8 import Fp8Linear, scaled_mm_supported
    from .fp8_gelu import Fp8GeluFfn

    for module in model.modules():
        if isinstance(module, Fp8Linear):  # also the layers loaded in fp8
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


def branch_groups(branches: Sequence[str], speakers: int, batch: bool = True) -> list[tuple[str, ...]]:
    """Split guidance branches into groups that one batched forward can evaluate exactly.

    Branches with the audio (cond, drop_text) have `speakers` audio streams; branches without
    it (uncond, drop_audio) get the official dropped audio zeros_like(audio)[-1:], a single
    stream. One forward needs one stream count, so with one speaker every branch fits in one
    group and with two speakers there are two groups. Order follows `branches`.
    """
    unknown = [b for b in branches if b not in KNOWN_BRANCHES]
    if unknown:
        raise ValueError(f"unknown guidance branches {unknown}")
    if not batch:
        return [(b,) for b in branches]
    if speakers == 1:
        return [tuple(branches)]
    with_audio = tuple(b for b in branches if b not in NULL_AUDIO_BRANCHES)
    without = tuple(b for b in branches if b in NULL_AUDIO_BRANCHES)
    return [g for g in (with_audio, without) if g]


def _branch_inputs(branch: str, context, context_null, audio: torch.Tensor):
    ctx = context_null if branch in NULL_TEXT_BRANCHES else context
    aud = torch.zeros_like(audio)[-1:] if branch in NULL_AUDIO_BRANCHES else audio
    return ctx, aud


class GuidedDiT:
    """One window's denoiser over several guidance branches, with the fast-path reuse.

    Built once per window from the window's conditions (one sample, official shapes):
    context / context_null [L, text_dim]; clip_fea [1, 257, clip_dim]; y [in_dim - 16, T, H, W];
    audio [N, 1 + 4(T-1), window, layers, channels]; ref_target_masks [3, H, W] (two speakers).
    `predict(latent [16, T, H, W], t [1]) -> {branch: prediction [16, T, H, W] float32}` runs
    the branches as `branch_groups` says (one batched forward per group). `cache_conditions`
    (see `FastOptions`): "context" precomputes the text/CLIP keys and values once per distinct
    prompt (cond and drop_audio share theirs) and keeps only the audio tokens; "all" also
    precomputes the audio keys and values per branch; "none" passes the raw inputs.
    True and False mean "all" and "none".
    """

    def __init__(
        self,
        model: InfiniteTalkDiT,
        branches: Sequence[str],
        *,
        context: torch.Tensor,
        context_null: torch.Tensor,
        clip_fea: torch.Tensor,
        y: torch.Tensor,
        audio: torch.Tensor,
        ref_target_masks: Optional[torch.Tensor] = None,
        cache_conditions: str | bool = "context",
        batch_guidance: bool = False,
    ):
        if audio.dim() != 5:
            raise InternalError(f"audio must be [speakers, frames, window, layers, channels]; got {tuple(audio.shape)}.")
        self.model = model
        self.branches = tuple(branches)
        self.y = y
        self.ref_target_masks = ref_target_masks
        mode = {True: "all", False: "none"}.get(cache_conditions, cache_conditions)
        if mode not in CACHE_MODES:
            raise ValueError(f"cache_conditions must be one of {CACHE_MODES}, got {cache_conditions!r}")
        self.groups = branch_groups(self.branches, audio.shape[0], batch_guidance)
        self._inputs: list[tuple[tuple[str, ...], dict]] = []
        shared: dict[tuple[int, ...], DiTConditions] = {}  # by the identity of the group's prompts
        for group in self.groups:
            contexts, audios = zip(*(_branch_inputs(b, context, context_null, audio) for b in group))
            audio_batch = torch.stack(audios)
            clip = clip_fea.expand(len(group), -1, -1)
            if mode == "none":
                inputs = {"context": list(contexts), "clip_fea": clip, "audio": audio_batch}
            else:
                key = tuple(id(c) for c in contexts)
                cond = model.precompute_conditions(
                    list(contexts), clip, audio_batch, audio_kv=(mode == "all"), reuse_context_kv=shared.get(key)
                )
                shared.setdefault(key, cond)
                inputs = {"conditions": cond}
            self._inputs.append((group, inputs))

    @torch.no_grad()
    def predict_branch(self, latent: torch.Tensor, t: torch.Tensor, branch: str, block_cache=None) -> torch.Tensor:
        """One branch's prediction [16, T, H, W] (the sampler's `denoise_fn`). `block_cache` is the
        branch's TeaCache slot; TeaCache decides per branch, so it needs unbatched branches."""
        for group, inputs in self._inputs:
            if branch not in group:
                continue
            if len(group) > 1:
                if block_cache is not None:
                    raise InternalError("TeaCache skips branches one at a time; turn off batched guidance to use it.")
                return self.predict(latent, t)[branch]
            out = self.model(latent.unsqueeze(0), t, y=self.y.unsqueeze(0), ref_target_masks=self.ref_target_masks,
                             block_cache=block_cache, **inputs)
            return out[0]
        raise InternalError(f"Guidance branch {branch!r} was not prepared for this window.")

    def conditions_nbytes(self) -> int:
        """Device memory held by the precomputed keys and values (0 without caching; shared ones once)."""
        seen: set[int] = set()
        total = 0
        for _, inputs in self._inputs:
            cond = inputs.get("conditions")
            if cond is None:
                continue
            for t in cond.tensors():
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total

    @torch.no_grad()
    def predict(self, latent: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        preds: dict[str, torch.Tensor] = {}
        for group, inputs in self._inputs:
            n = len(group)
            x = latent.unsqueeze(0).expand(n, *latent.shape)
            y = self.y.unsqueeze(0).expand(n, *self.y.shape)
            out = self.model(x, t, y=y, ref_target_masks=self.ref_target_masks, **inputs)
            for i, branch in enumerate(group):
                preds[branch] = out[i]
        return preds


def predictions_close(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Largest relative max-abs difference between two {branch: prediction} dicts (diagnostics)."""
    worst = 0.0
    for key in a:
        diff = (a[key].double() - b[key].double().to(a[key].device)).abs().max().item()
        scale = b[key].double().abs().max().item() or 1.0
        worst = max(worst, diff / scale)
    return worst

"""LoRA files for the Wan2.1 DiT (FusionX, lightx2v, ...) merged into the weights at load.

Key formats read (all mapped to the official parameter names, e.g.
`blocks.0.self_attn.q.weight`):
- kijai / ComfyUI / official `wan_lora.py`: `diffusion_model.<module>.lora_down.weight`,
  `.lora_up.weight`, optional `.alpha`; full-tensor deltas `<module>.diff` (-> `.weight`),
  `<module>.diff_b` (-> `.bias`) and `<module>.diff_m` (-> `.modulation`, lightx2v rank 64).
- kohya / musubi-tuner: `lora_unet_blocks_0_self_attn_q.lora_down.weight` (dots written as
  underscores; decoded with the Wan module vocabulary), also the `lycoris_` prefix.
- diffusers / peft: `<module>.lora_A.weight` (down) and `.lora_B.weight` (up), `.lora_B.bias`
  (a bias delta), with or without the prefixes `transformer.`, `diffusion_model.`,
  `base_model.model.`; module names either official (`blocks.0.self_attn.q`) or the diffusers
  Wan names (`blocks.0.attn1.to_q`, `attn2.add_k_proj`, `ffn.net.0.proj`, `proj_out`, ...).

Merge rule: W' = W + scale * (alpha / rank) * (up @ down) for a low-rank pair (rank =
down.shape[0]; alpha defaults to rank, i.e. factor 1), W' = W + scale * diff for a full delta,
computed in float32. Several LoRAs add up. The official `wan_lora.py` ignores `.alpha` (and
merges in bf16); pass `use_alpha=False` to `load_lora` to reproduce that for files whose alpha
is not equal to their rank.

Errors: keys of an unknown form (LoCon mid weights, LoHa, LoKr, garbage) raise CheckpointError
naming them, since silently dropping part of a LoRA changes the result. Targets that the model
does not have are logged as a warning when some of the LoRA still applies (e.g. a LoRA with an
extra layer), and raise CheckpointError when none of it applies (a LoRA for another model).
Shape mismatches always raise.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from ..errors import CheckpointError
from ..quant.fp8 import FP8_DTYPE, dequantize_weight
from .materialize import LazyStateDict, open_weights

logger = logging.getLogger(__name__)

_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
_KOHYA_PREFIXES = ("lora_unet_", "lycoris_")

# Multi-word names in Wan (official and diffusers) modules, for decoding kohya names where
# every '.' became '_'. Longest first so that e.g. norm_k_img wins over norm_k.
_KOHYA_WORDS = sorted(
    [
        "self_attn", "cross_attn", "audio_cross_attn", "k_img", "v_img", "norm_k_img", "norm_q", "norm_k",
        "q_linear", "kv_linear", "norm_x", "time_embedding", "time_projection", "text_embedding", "img_emb",
        "patch_embedding", "audio_proj", "proj1_vf",
        "to_q", "to_k", "to_v", "to_out", "add_k_proj", "add_v_proj", "norm_added_k", "norm_added_q",
        "proj_out", "condition_embedder", "time_embedder", "text_embedder", "image_embedder", "time_proj",
        "linear_1", "linear_2", "scale_shift_table",
    ],
    key=lambda w: -w.count("_"),
)

# diffusers WanTransformer3DModel module names -> official Wan names.
_DIFFUSERS_NAMES = [
    (re.compile(r"^blocks\.(\d+)\.attn1\.to_q$"), r"blocks.\1.self_attn.q"),
    (re.compile(r"^blocks\.(\d+)\.attn1\.to_k$"), r"blocks.\1.self_attn.k"),
    (re.compile(r"^blocks\.(\d+)\.attn1\.to_v$"), r"blocks.\1.self_attn.v"),
    (re.compile(r"^blocks\.(\d+)\.attn1\.to_out\.0$"), r"blocks.\1.self_attn.o"),
    (re.compile(r"^blocks\.(\d+)\.attn1\.norm_q$"), r"blocks.\1.self_attn.norm_q"),
    (re.compile(r"^blocks\.(\d+)\.attn1\.norm_k$"), r"blocks.\1.self_attn.norm_k"),
    (re.compile(r"^blocks\.(\d+)\.attn2\.to_q$"), r"blocks.\1.cross_attn.q"),
    (re.compile(r"^blocks\.(\d+)\.attn2\.to_k$"), r"blocks.\1.cross_attn.k"),
    (re.compile(r"^blocks\.(\d+)\.attn2\.to_v$"), r"blocks.\1.cross_attn.v"),
    (re.compile(r"^blocks\.(\d+)\.attn2\.to_out\.0$"), r"blocks.\1.cross_attn.o"),
    (re.compile(r"^blocks\.(\d+)\.attn2\.add_k_proj$"), r"blocks.\1.cross_attn.k_img"),
    (re.compile(r"^blocks\.(\d+)\.attn2\.add_v_proj$"), r"blocks.\1.cross_attn.v_img"),
    (re.compile(r"^blocks\.(\d+)\.attn2\.norm_q$"), r"blocks.\1.cross_attn.norm_q"),
    (re.compile(r"^blocks\.(\d+)\.attn2\.norm_k$"), r"blocks.\1.cross_attn.norm_k"),
    (re.compile(r"^blocks\.(\d+)\.attn2\.norm_added_k$"), r"blocks.\1.cross_attn.norm_k_img"),
    (re.compile(r"^blocks\.(\d+)\.ffn\.net\.0\.proj$"), r"blocks.\1.ffn.0"),
    (re.compile(r"^blocks\.(\d+)\.ffn\.net\.2$"), r"blocks.\1.ffn.2"),
    (re.compile(r"^blocks\.(\d+)\.norm2$"), r"blocks.\1.norm3"),  # the official norm2 has no parameters
    (re.compile(r"^blocks\.(\d+)\.scale_shift_table$"), r"blocks.\1.modulation"),
    (re.compile(r"^condition_embedder\.time_embedder\.linear_1$"), "time_embedding.0"),
    (re.compile(r"^condition_embedder\.time_embedder\.linear_2$"), "time_embedding.2"),
    (re.compile(r"^condition_embedder\.time_proj$"), "time_projection.1"),
    (re.compile(r"^condition_embedder\.text_embedder\.linear_1$"), "text_embedding.0"),
    (re.compile(r"^condition_embedder\.text_embedder\.linear_2$"), "text_embedding.2"),
    (re.compile(r"^condition_embedder\.image_embedder\.norm1$"), "img_emb.proj.0"),
    (re.compile(r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj$"), "img_emb.proj.1"),
    (re.compile(r"^condition_embedder\.image_embedder\.ff\.net\.2$"), "img_emb.proj.3"),
    (re.compile(r"^condition_embedder\.image_embedder\.norm2$"), "img_emb.proj.4"),
    (re.compile(r"^proj_out$"), "head.head"),
]

# suffix -> (role, parameter the delta applies to)
_SUFFIXES = [
    (".lora_down.weight", "down", "weight"),
    (".lora_up.weight", "up", "weight"),
    (".lora_A.weight", "down", "weight"),
    (".lora_B.weight", "up", "weight"),
    (".lora_B.bias", "diff", "bias"),
    (".alpha", "alpha", "weight"),
    (".diff_b", "diff", "bias"),
    (".diff_m", "diff", "modulation"),
    (".diff", "diff", "weight"),
]


def kohya_to_module(name: str) -> str:
    """Decode a kohya module name (`blocks_0_cross_attn_k_img`) to `blocks.0.cross_attn.k_img`."""
    tokens = name.split("_")
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        for word in _KOHYA_WORDS:
            n = word.count("_") + 1
            if tokens[i : i + n] == word.split("_"):
                parts.append(word)
                i += n
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def _official_module(module: str) -> str:
    for pattern, repl in _DIFFUSERS_NAMES:
        if pattern.match(module):
            return pattern.sub(repl, module)
    return module


def _split_key(key: str) -> Optional[tuple[str, str, str]]:
    """File key -> (official module name, role, parameter leaf), or None when not a LoRA key."""
    body = key
    kohya = False
    for prefix in _KOHYA_PREFIXES:
        if body.startswith(prefix):
            body, kohya = body[len(prefix) :], True
            break
    else:
        for prefix in _PREFIXES:
            if body.startswith(prefix):
                body = body[len(prefix) :]
                break
    for suffix, role, leaf in _SUFFIXES:
        if body.endswith(suffix) and len(body) > len(suffix):
            module = body[: -len(suffix)]
            if kohya:
                module = kohya_to_module(module)
            return _official_module(module), role, leaf
    return None


@dataclass
class _Pair:
    down: Optional[str] = None
    up: Optional[str] = None
    alpha: Optional[str] = None


@dataclass
class LoraWeights:
    """One LoRA file, indexed by the official parameter names it changes.

    `lowrank[target] = (down_key, up_key, alpha_key or None)`, `diffs[target] = [file keys]`;
    tensors are read lazily from `source` when a delta is asked for.
    """

    path: Path
    source: LazyStateDict
    lowrank: dict[str, tuple[str, str, Optional[str]]] = field(default_factory=dict)
    diffs: dict[str, list[str]] = field(default_factory=dict)
    use_alpha: bool = True

    @property
    def name(self) -> str:
        return self.path.name

    def targets(self) -> list[str]:
        """Official parameter names this LoRA changes."""
        return sorted(set(self.lowrank) | set(self.diffs))

    def __len__(self) -> int:
        return len(self.targets())

    def delta_shape(self, target: str) -> tuple[int, ...]:
        """Shape of the delta for `target` as stored (low-rank: [out, prod(in dims)])."""
        if target in self.lowrank:
            down, up, _ = self.lowrank[target]
            d, u = self.source.shape(down), self.source.shape(up)
            return (u[0], _numel(d[1:]))
        return tuple(self.source.shape(self.diffs[target][0]))

    def delta(self, target: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The float32 change of `target` at scale 1 (alpha/rank applied), not yet reshaped."""
        total: Optional[torch.Tensor] = None
        if target in self.lowrank:
            down_key, up_key, alpha_key = self.lowrank[target]
            down = self.source[down_key].to(device=device, dtype=torch.float32)
            up = self.source[up_key].to(device=device, dtype=torch.float32)
            rank = down.shape[0]
            if up.shape[1] != rank:
                raise CheckpointError(
                    f"LoRA {self.path}: '{up_key}' has shape {tuple(up.shape)} but '{down_key}' has rank {rank}; "
                    "the file is damaged."
                )
            total = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
            if self.use_alpha and alpha_key is not None:
                alpha = float(self.source[alpha_key].float().reshape(-1)[0])
                total = total * (alpha / rank)
        for key in self.diffs.get(target, []):
            diff = self.source[key].to(device=device, dtype=torch.float32)
            total = diff if total is None else total + diff.reshape(total.shape)
        assert total is not None
        return total


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def load_lora(path: os.PathLike | str, *, use_alpha: bool = True) -> LoraWeights:
    """Read a LoRA file's keys and map them to official DiT parameter names (tensors stay lazy).

    Raises CheckpointError for keys of an unknown form and for incomplete low-rank pairs.
    `use_alpha=False` ignores `.alpha` like the official `wan_lora.py` does.
    """
    path = Path(path)
    source = open_weights([path])
    pairs: dict[str, _Pair] = {}
    diffs: dict[str, list[str]] = {}
    unknown: list[str] = []
    for key in source.keys():
        parsed = _split_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        module, role, leaf = parsed
        if role == "diff":
            target = f"{module}.{leaf}" if module else leaf
            diffs.setdefault(target, []).append(key)
            continue
        pair = pairs.setdefault(f"{module}.{leaf}", _Pair())
        if getattr(pair, role) is not None:
            raise CheckpointError(
                f"LoRA {path}: keys '{getattr(pair, role)}' and '{key}' both give the {role} matrix of '{module}'; "
                "the file mixes two LoRA layouts and cannot be merged unambiguously."
            )
        setattr(pair, role, key)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise CheckpointError(
            f"LoRA {path} has keys infinitetalk does not understand: {shown}. Supported: lora_down/lora_up "
            "(kijai, ComfyUI, kohya), lora_A/lora_B (diffusers, peft), .alpha, .diff, .diff_b, .diff_m."
        )
    lowrank: dict[str, tuple[str, str, Optional[str]]] = {}
    for target, pair in pairs.items():
        if pair.down is None or pair.up is None:
            if pair.down is None and pair.up is None:
                continue  # only an alpha, e.g. for a layer whose LoRA was pruned
            present = pair.down or pair.up
            raise CheckpointError(
                f"LoRA {path}: '{present}' has no matching {'up' if pair.up is None else 'down'} matrix; "
                "the file is incomplete."
            )
        lowrank[target] = (pair.down, pair.up, pair.alpha)
    if not lowrank and not diffs:
        raise CheckpointError(f"LoRA {path} holds no LoRA weights.")
    logger.info("LoRA %s: %d low-rank layers, %d full deltas", path.name, len(lowrank), len(diffs))
    return LoraWeights(path=path, source=source, lowrank=lowrank, diffs=diffs, use_alpha=use_alpha)


class LoraMergedSource:
    """A weight source that returns base + sum(scale * delta) for the tensors LoRAs change.

    Same interface as `LazyStateDict`; untouched keys pass through unchanged (no copy). Merged
    tensors are float32 (math in float32 on `device`, returned on the CPU unless `device`
    says otherwise); `materialize` casts them to the model dtype. A base weight stored in fp8
    with `X.weight_scale` (our fp8 layout or a converted quanto file) is dequantised, merged,
    and returned in float32 while `X.weight_scale` is hidden; `Fp8Source` re-quantises it
    when the layer runs in fp8.
    """

    def __init__(
        self,
        source,
        loras: Sequence[tuple[LoraWeights, float]],
        *,
        device: torch.device | str = "cpu",
    ):
        self._src = source
        self.loras = [(lora, float(scale)) for lora, scale in loras]
        self.device = torch.device(device)
        self.files = list(source.files) + [lora.path for lora, _ in self.loras]
        self._patches: dict[str, list[tuple[LoraWeights, float]]] = {}
        for lora, scale in self.loras:
            present = [t for t in lora.targets() if t in source]
            absent = [t for t in lora.targets() if t not in source]
            if not present:
                raise CheckpointError(
                    f"LoRA {lora.path} changes none of the model's weights (e.g. '{absent[0]}' is not a weight of "
                    "the model): it was made for another model."
                )
            if absent:
                logger.warning(
                    "LoRA %s: %d of its %d targets are not in the model and are skipped (%s%s)",
                    lora.name,
                    len(absent),
                    len(absent) + len(present),
                    ", ".join(absent[:3]),
                    ", ..." if len(absent) > 3 else "",
                )
            for target in present:
                base_shape = tuple(source.shape(target))
                got = lora.delta_shape(target)
                if _numel(got) != _numel(base_shape) or got[0] != base_shape[0]:
                    raise CheckpointError(
                        f"LoRA {lora.path} changes '{target}' with shape {got}, but the model's weight has shape "
                        f"{base_shape}: the LoRA is for another model size."
                    )
                if scale != 0.0:
                    self._patches.setdefault(target, []).append((lora, scale))
        self._hidden = {
            t[: -len(".weight")] + ".weight_scale"
            for t in self._patches
            if t.endswith(".weight") and t[: -len(".weight")] + ".weight_scale" in source
        }

    def patched(self) -> list[str]:
        """Names of the parameters that at least one LoRA changes."""
        return sorted(self._patches)

    def keys(self) -> list[str]:
        return [k for k in self._src.keys() if k not in self._hidden]

    def __contains__(self, key: str) -> bool:
        return key in self._src and key not in self._hidden

    def __len__(self) -> int:
        return len(self._src) - len(self._hidden)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.keys():
            yield key, self[key]

    def origin(self, key: str) -> str:
        return self._src.origin(key)

    def is_mapped(self, key: str) -> bool:
        return False if key in self._patches else self._src.is_mapped(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._src.shape(key)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._hidden:
            raise KeyError(key)
        if key not in self._patches:
            return self._src[key]
        base = self._src[key]
        scale_key = key[: -len(".weight")] + ".weight_scale" if key.endswith(".weight") else None
        if base.dtype == FP8_DTYPE and scale_key is not None and scale_key in self._src:
            merged = dequantize_weight(base.to(self.device), self._src[scale_key].to(self.device), torch.float32)
        else:
            merged = base.to(device=self.device, dtype=torch.float32, copy=True)
        del base
        for lora, scale in self._patches[key]:
            merged += scale * lora.delta(key, self.device).reshape(merged.shape)
        return merged

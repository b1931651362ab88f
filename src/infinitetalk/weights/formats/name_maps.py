"""Key names of other projects -> the official names (umT5, CLIP vision; the DiT needs none).

* Hugging Face T5 (`encoder.block.N.layer.0.SelfAttention.q.weight`, ComfyUI's umt5 files) and
  llama.cpp `t5encoder` GGUF (`enc.blk.N.attn_q.weight`, city96's umt5 GGUFs, names of gguf-py
  `MODEL_ARCH.T5ENCODER`) -> the Wan `T5Encoder` names (`blocks.N.attn.q.weight`); 1:1 renames
  that keep any trailing scale/marker leaf (`.scale_weight`, `.weight_scale`, ...).
* Hugging Face `CLIPVisionModelWithProjection` (ComfyUI `clip_vision_h.safetensors`) -> the
  official open-clip visual names: q/k/v projections concatenated in that order into `to_qkv`,
  class / position embeddings reshaped, `visual_projection` transposed into `visual.head`.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import torch

from .sources import Entry

_LEAF = r"(weight|bias|scale_weight|weight_scale|scale_input|input_scale|comfy_quant)"

HF_T5_RULES = [
    (re.compile(r"^shared\.weight$"), "token_embedding.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v|o)\." + _LEAF + "$"), r"blocks.\1.attn.\2.\3"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$"),
     r"blocks.\1.pos_embedding.embedding.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$"), r"blocks.\1.norm1.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$"), r"blocks.\1.norm2.weight"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\." + _LEAF + "$"), r"blocks.\1.ffn.gate.0.\2"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\." + _LEAF + "$"), r"blocks.\1.ffn.fc1.\2"),
    (re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\." + _LEAF + "$"), r"blocks.\1.ffn.fc2.\2"),
    (re.compile(r"^encoder\.final_layer_norm\.weight$"), "norm.weight"),
]

GGUF_T5_RULES = [
    (re.compile(r"^token_embd\.weight$"), "token_embedding.weight"),
    (re.compile(r"^enc\.blk\.(\d+)\.attn_(q|k|v|o)\.weight$"), r"blocks.\1.attn.\2.weight"),
    (re.compile(r"^enc\.blk\.(\d+)\.attn_rel_b\.weight$"), r"blocks.\1.pos_embedding.embedding.weight"),
    (re.compile(r"^enc\.blk\.(\d+)\.attn_norm\.weight$"), r"blocks.\1.norm1.weight"),
    (re.compile(r"^enc\.blk\.(\d+)\.ffn_norm\.weight$"), r"blocks.\1.norm2.weight"),
    (re.compile(r"^enc\.blk\.(\d+)\.ffn_gate\.weight$"), r"blocks.\1.ffn.gate.0.weight"),
    (re.compile(r"^enc\.blk\.(\d+)\.ffn_up\.weight$"), r"blocks.\1.ffn.fc1.weight"),
    (re.compile(r"^enc\.blk\.(\d+)\.ffn_down\.weight$"), r"blocks.\1.ffn.fc2.weight"),
    (re.compile(r"^enc\.output_norm\.weight$"), "norm.weight"),
]
# HF T5 keeps a tied copy of the embedding; it is the same tensor as shared.weight
HF_T5_DUPLICATES = ("encoder.embed_tokens.weight",)


def rename_by_rules(rules) -> Callable[[str], Optional[str]]:
    """A key renamer from (pattern, replacement) rules; keys no rule matches are returned as they are."""

    def rename(key: str) -> Optional[str]:
        for pattern, repl in rules:
            if pattern.match(key):
                return pattern.sub(repl, key)
        return key

    return rename


# ---- CLIP vision (HF) -------------------------------------------------------------------------
HF_CLIP_PREFIX = "vision_model."
_HF_CLIP_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_HF_CLIP_LAYER_PARTS = {
    "layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2",
}
_HF_CLIP_TOP = {
    "vision_model.embeddings.patch_embedding.weight": "visual.patch_embedding.weight",
    "vision_model.pre_layrnorm.weight": "visual.pre_norm.weight",
    "vision_model.pre_layrnorm.bias": "visual.pre_norm.bias",
    "vision_model.post_layernorm.weight": "visual.post_norm.weight",
    "vision_model.post_layernorm.bias": "visual.post_norm.bias",
}
HF_CLIP_IGNORED = ("vision_model.embeddings.position_ids",)


def _cat_rows(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts, dim=0)


def hf_clip_entries(keys, shape_of) -> tuple[dict[str, Entry], list[str]]:
    """Official CLIP-visual entries for the keys of an HF CLIPVisionModelWithProjection file.

    Returns (entries, unknown keys). `shape_of(key)` gives a raw shape without reading data."""
    keys = list(keys)
    present = set(keys)
    entries: dict[str, Entry] = {}
    unknown: list[str] = []
    used: set[str] = set()
    for key in keys:
        if key in HF_CLIP_IGNORED:
            used.add(key)
            continue
        if key in _HF_CLIP_TOP:
            entries[_HF_CLIP_TOP[key]] = Entry((key,), tuple(shape_of(key)))
        elif key == "vision_model.embeddings.class_embedding":
            (w,) = shape_of(key)
            entries["visual.cls_embedding"] = Entry((key,), (1, 1, w), lambda t: t.reshape(1, 1, -1))
        elif key == "vision_model.embeddings.position_embedding.weight":
            n, w = shape_of(key)
            entries["visual.pos_embedding"] = Entry((key,), (1, n, w), lambda t: t.reshape(1, *t.shape))
        elif key == "visual_projection.weight":
            e, w = shape_of(key)
            entries["visual.head"] = Entry((key,), (w, e), lambda t: t.t().contiguous())
        elif (m := _HF_CLIP_LAYER.match(key)) is not None:
            n, rest = m.group(1), m.group(2)
            qkv = re.fullmatch(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest)
            if qkv:
                leaf = qkv.group(2)
                parts = tuple(f"vision_model.encoder.layers.{n}.self_attn.{p}_proj.{leaf}" for p in "qkv")
                if all(p in present for p in parts):
                    shapes = [tuple(shape_of(p)) for p in parts]
                    fused = (sum(s[0] for s in shapes),) + shapes[0][1:]
                    entries[f"visual.transformer.{n}.attn.to_qkv.{leaf}"] = Entry(parts, fused, _cat_rows)
                    used.update(parts)
                    continue
                unknown.append(key)
                continue
            module, _, leaf = rest.rpartition(".")
            if module in _HF_CLIP_LAYER_PARTS:
                entries[f"visual.transformer.{n}.{_HF_CLIP_LAYER_PARTS[module]}.{leaf}"] = Entry((key,), tuple(shape_of(key)))
            else:
                unknown.append(key)
        elif key not in used:
            unknown.append(key)
    return entries, [k for k in unknown if k not in used]

"""Keep the quantised layers of a weight file quantised in the model, and LoRAs on top of them.

* GGUF: the linears for which `predicate(name)` holds and whose file weight is a quantised
  ggml type become `quant.GGUFLinear` (raw blocks on the device, dequantised per forward);
  every other tensor of the file is dequantised once at load.
* fp8-scaled files (Kijai / ComfyUI): the linears stored in float8_e4m3fn with a scale become
  `quant.fp8.Fp8Linear` with the stored bytes and scales (the existing fp8 path).
* LoRAs: merged into float weights as before (`LoraMergedSource`); for GGUF layers they become a
  low-rank side path (or a full delta added at dequant time), since re-quantising would lose them.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import CheckpointError
from ..quant.gguf_dequant import FLOAT_TYPES
from ..quant.gguf_linear import GGUFLinear, replace_with_gguf
from .formats import GGUFRawSource

log = logging.getLogger(__name__)


def gguf_quantized_layers(model: nn.Module, source, predicate: Callable[[str], bool]) -> dict[str, str]:
    """Linear layers of `model` (name -> ggml type) that can keep their GGUF blocks."""
    if not hasattr(source, "ggml_type"):
        return {}
    layers = {}
    for name, module in model.named_modules():
        key = name + ".weight"
        if type(module) is nn.Linear and predicate(name) and key in source:
            qtype = source.ggml_type(key)
            if qtype is not None and qtype not in FLOAT_TYPES:
                layers[name] = qtype
    return layers


def keep_gguf_layers(model: nn.Module, source, predicate: Callable[[str], bool]):
    """Swap the GGUF-quantised linears of `model` (on meta) for GGUFLinear; returns the source to load from."""
    layers = gguf_quantized_layers(model, source, predicate)
    if not layers:
        return source, set()
    replace_with_gguf(model, layers)
    counts: dict[str, int] = {}
    for qtype in layers.values():
        counts[qtype] = counts.get(qtype, 0) + 1
    log.info("keeping %d linear layers in GGUF blocks (%s)", len(layers), ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return GGUFRawSource(source, layers), set(layers)


def stored_fp8_layers(source) -> set[str]:
    """Module names whose weight the source holds in float8_e4m3fn with an `X.weight_scale`."""
    return {k[: -len(".weight_scale")] for k in source.keys() if k.endswith(".weight_scale") and k[: -len(".weight_scale")] + ".weight" in source}


def split_loras(loras: Sequence[tuple[object, float]], gguf_layers: set[str]):
    """(LoRAs for the float weights, {gguf layer: [(lora, scale)]}): the part of each LoRA that
    changes a GGUF layer's weight is taken out of the merge and kept for a side path."""
    merged, side = [], {}
    for lora, scale in loras:
        keep_low = {t: v for t, v in lora.lowrank.items() if t[: -len(".weight")] not in gguf_layers or not t.endswith(".weight")}
        keep_diff = {t: v for t, v in lora.diffs.items() if t[: -len(".weight")] not in gguf_layers or not t.endswith(".weight")}
        for target in set(lora.targets()) - set(keep_low) - set(keep_diff):
            side.setdefault(target[: -len(".weight")], []).append((lora, scale))
        if keep_low or keep_diff:
            merged.append((dataclasses.replace(lora, lowrank=keep_low, diffs=keep_diff), scale))
    return merged, side


def attach_gguf_loras(model: nn.Module, side: dict[str, list[tuple[object, float]]], device) -> int:
    """Give each GGUF layer its LoRA side paths; returns the number attached."""
    count = 0
    for name, entries in side.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, GGUFLinear):
            raise CheckpointError(f"{name} is not a GGUF layer; this is a bug in infinitetalk, please report it.")
        target = name + ".weight"
        for lora, scale in entries:
            if scale == 0.0:
                continue
            if target in lora.lowrank:
                down_key, up_key, alpha_key = lora.lowrank[target]
                down = lora.source[down_key].to(device=device, dtype=torch.float32)
                up = lora.source[up_key].to(device=device, dtype=torch.float32)
                rank = down.shape[0]
                down, up = down.reshape(rank, -1), up.reshape(up.shape[0], -1)
                if down.shape[1] != layer.in_features or up.shape[0] != layer.out_features or up.shape[1] != rank:
                    raise CheckpointError(
                        f"LoRA {lora.path} changes '{target}' with rank-{rank} factors {tuple(up.shape)} x {tuple(down.shape)}, "
                        f"but the layer is {layer.shape}: the LoRA is for another model size.")
                factor = scale
                if lora.use_alpha and alpha_key is not None:
                    factor *= float(lora.source[alpha_key].float().reshape(-1)[0]) / rank
                layer.add_lora(down, up, factor)
                count += 1
            for key in lora.diffs.get(target, []):
                delta = lora.source[key].to(device=device, dtype=torch.float32)
                if delta.numel() != layer.in_features * layer.out_features:
                    raise CheckpointError(f"LoRA {lora.path}: '{key}' has shape {tuple(delta.shape)}, the layer is {layer.shape}.")
                layer.add_delta(scale * delta.reshape(layer.shape))
                count += 1
    if count:
        log.info("LoRA: %d side paths on GGUF layers", count)
    return count

"""Readers for the weight files people already have, each giving the official key names.

    source = open_component("wan2.1-i2v-14b-480p-Q4_K_M.gguf", "dit")   # lazy, official names
    state = read_state_dict(path, "t5")                                  # dequantised tensors

One reader per file family: `gguf_file` (GGUF, memory-mapped through the `gguf` package),
`single_file` (safetensors / .pth: official, ComfyUI, Kijai, HF-named encoders, fp8-scaled).
The format is found from the content (the GGUF magic, marker tensors, key prefixes), never from
the file name. `inspect_file` says what a file holds without reading its tensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ...errors import CheckpointError, MissingWeightsError
from .detect import COMPONENTS, DESCRIPTIONS, OPTIONS, Detected, classify
from .gguf_file import GGUFRawSource, GGUFSource, is_gguf
from .single_file import open_single_file
from .sources import MappedSource, MergedSource, renamed

__all__ = [
    "COMPONENTS", "DESCRIPTIONS", "OPTIONS", "Detected", "FileInfo", "GGUFRawSource", "GGUFSource", "MappedSource",
    "MergedSource", "classify", "float_weights", "inspect_file", "open_component", "read_state_dict", "renamed",
]


def open_component(path: str | os.PathLike, component: str):
    """A lazy source in official key names for `component` ('dit', 'adapter', 't5', 'wav2vec2', 'vae', 'clip').

    Raises MissingWeightsError when the file is absent, CheckpointError (one sentence naming the
    file) when it is damaged, of another model or of an unsupported quantisation."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; one of {COMPONENTS}")
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"Weight file not found: {path}.", missing=[str(path)])
    if is_gguf(path):
        return GGUFSource(path, component)
    return open_single_file(path, component)


def float_weights(source):
    """`source` with fp8 weights dequantised (weight.float() * scale) and the scales hidden; GGUF
    sources already dequantise. For models that keep no quantised layers (umT5, CLIP, VAE, wav2vec2)."""
    from ..quant import Fp8Source

    if any(k.endswith(".weight_scale") for k in source.keys()):
        return Fp8Source(source, set())
    return source


def read_state_dict(path: str | os.PathLike, component: str) -> dict[str, torch.Tensor]:
    """Every tensor of the file in official names and shapes, quantised ones dequantised.

    GGUF types -> float32 (bit-identical to gguf-py), fp8 -> float32 `weight * scale`, float
    tensors in their stored dtype. For tests, conversions and inspection; models load lazily."""
    source = float_weights(open_component(path, component))
    return {key: source[key] for key in source.keys()}


@dataclass(frozen=True)
class FileInfo:
    """What one weight file holds: component ('dit', 'dit+adapter', ...), container, quantisation."""

    path: Path
    detected: Optional[Detected]
    container: str  # gguf | safetensors | pickle
    quant: str  # e.g. 'bf16', 'fp16', 'fp8-scaled', 'gguf Q4_K', 'unknown'
    bits: float  # bits per weight of the bulk of the file (ranks candidates by precision)
    arch: Optional[str] = None
    error: Optional[str] = None

    @property
    def component(self) -> Optional[str]:
        return self.detected.component if self.detected else None


_DTYPE_BITS = {torch.float32: 32.0, torch.bfloat16: 16.0, torch.float16: 16.0}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def inspect_file(path: str | os.PathLike) -> FileInfo:
    """Identify a weight file from its header (no tensor data is read). Never raises for bad files:
    `error` holds the reason and `detected` is None."""
    path = Path(path)
    try:
        if is_gguf(path):
            return _inspect_gguf(path)
        return _inspect_single(path)
    except (CheckpointError, MissingWeightsError, OSError) as exc:
        return FileInfo(path, None, "gguf" if is_gguf(path) else "safetensors", "unknown", 0.0, error=str(exc))


def _inspect_gguf(path: Path) -> FileInfo:
    from ...quant.gguf_dequant import BITS_PER_WEIGHT
    from .gguf_file import _field, _gguf_reader

    reader = _gguf_reader(path)
    arch = _field(reader, "general.architecture")
    from .name_maps import GGUF_T5_RULES, rename_by_rules

    rename = rename_by_rules(GGUF_T5_RULES) if arch in ("t5encoder", "t5") else (lambda k: k)
    detected = classify(rename(t.name) for t in reader.tensors)
    weights: dict[str, int] = {}
    for t in reader.tensors:
        name = getattr(t.tensor_type, "name", str(t.tensor_type))
        weights[name] = weights.get(name, 0) + int(t.n_elements)
    main = max(weights, key=weights.get) if weights else "unknown"
    total = sum(weights.values()) or 1
    bits = sum(BITS_PER_WEIGHT.get(k, 16.0) * v for k, v in weights.items()) / total
    if detected is not None and arch not in ("wan", "t5encoder", "t5"):
        detected = None
    return FileInfo(path, detected, "gguf", f"gguf {main}", bits, arch=str(arch))


def _inspect_single(path: Path) -> FileInfo:
    from ..materialize import container_of, open_weights
    from .single_file import _Header

    raw = open_weights([path])
    detected = classify(raw.keys())
    header = _Header(path, raw)
    sizes: dict[torch.dtype, int] = {}
    for key in raw.keys():
        n = 1
        for s in raw.shape(key):
            n *= int(s)
        dtype = header.dtype(key)
        sizes[dtype] = sizes.get(dtype, 0) + n
    total = sum(sizes.values()) or 1
    fp8 = sum(n for d, n in sizes.items() if d in (torch.float8_e4m3fn, torch.float8_e5m2))
    bits = sum((8.0 if d in (torch.float8_e4m3fn, torch.float8_e5m2) else _DTYPE_BITS.get(d, 16.0)) * n for d, n in sizes.items()) / total
    scaled = "scaled_fp8" in raw.keys() or any(k.endswith((".scale_weight", ".weight_scale")) for k in raw.keys())
    if fp8:
        quant = "fp8-scaled" if scaled else "fp8"
    else:
        main = max(sizes, key=sizes.get) if sizes else torch.float32
        quant = _DTYPE_NAMES.get(main, str(main).replace("torch.", ""))
    container = "safetensors" if container_of(path) == "safetensors" else "pickle"
    return FileInfo(path, detected, container, quant, bits)

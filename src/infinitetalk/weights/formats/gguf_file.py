"""GGUF files (city96 / QuantStack DiTs, Kijai's InfiniteTalk adapter, city96's umT5) read with
the `gguf` package's memory-mapped `GGUFReader` (the `gguf` extra).

Conventions (ComfyUI-GGUF `loader.py`, `tools/convert.py`): `general.architecture` names the
model (`wan` for the DiT and adapter, `t5encoder` for umT5); tensor names are the official Wan
keys (a `model.diffusion_model.` prefix is stripped when present) or llama.cpp's T5 names;
the torch shape is the reverse of the ggml `ne` order unless the metadata
`comfy.gguf.orig_shape.<name>` gives it; the 5-D patch embedding and the small / modulation
tensors are plain F32. Quantised tensors stay raw (uint8 blocks) until asked for:
`source[key]` dequantises to float32 (bit-identical to `gguf.quants.dequantize`), `raw(key)`
gives the blocks for a `quant.GGUFLinear` that keeps them quantised on the device.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ...errors import CheckpointError
from ...quant.gguf_dequant import FLOAT_TYPES, GGML_BLOCKS, GGML_TYPES, dequantize, raw_nbytes
from .detect import PREFIXES, Detected, classify, wrong_component_message
from .name_maps import GGUF_T5_RULES, rename_by_rules

log = logging.getLogger(__name__)

ORIG_SHAPE = "comfy.gguf.orig_shape."
# general.architecture values each component may carry
ARCHS = {"dit": ("wan",), "adapter": ("wan",), "t5": ("t5encoder", "t5")}
_NATIVE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _gguf_reader(path: Path):
    try:
        import gguf
    except ImportError as exc:
        raise CheckpointError(
            f"{path} is a GGUF file, which needs the 'gguf' package: pip install 'infinitetalk[gguf]'."
        ) from exc
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors on bad files
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); it is truncated or damaged, download it again."
        ) from exc


def _field(reader, name: str):
    field = reader.fields.get(name)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:
        return None


def is_gguf(path: str | os.PathLike) -> bool:
    """True when the file starts with the GGUF magic."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


class GGUFSource:
    """A GGUF file as a lazy official-key source (interface of `LazyStateDict`, plus `raw`/`ggml_type`)."""

    def __init__(self, path: str | os.PathLike, component: str):
        self.path = Path(path)
        self.files = [self.path]
        reader = _gguf_reader(self.path)
        self.arch = _field(reader, "general.architecture")
        size = self.path.stat().st_size
        names = [t.name for t in reader.tensors]
        prefix = next((p for p in PREFIXES if any(n.startswith(p) for n in names)), "")
        if prefix:
            names = [n for n in names if n.startswith(prefix)]
        rename = rename_by_rules(GGUF_T5_RULES) if self.arch in ("t5encoder", "t5") else (lambda k: k)
        self._tensors: dict[str, tuple] = {}
        for tensor in reader.tensors:
            if prefix and not tensor.name.startswith(prefix):
                continue
            try:
                qtype = GGML_TYPES[int(tensor.tensor_type)]
            except KeyError:
                raise CheckpointError(
                    f"{self.path} stores '{tensor.name}' as ggml type {getattr(tensor.tensor_type, 'name', tensor.tensor_type)}, "
                    f"which infinitetalk cannot dequantise (supported: {', '.join(GGML_BLOCKS)})."
                ) from None
            stripped = tensor.name[len(prefix):]
            orig = _field(reader, ORIG_SHAPE + tensor.name)
            shape = tuple(int(s) for s in orig) if orig is not None else tuple(int(s) for s in reversed(tensor.shape.tolist()))
            numel = int(np.prod(shape)) if shape else 1
            nbytes = int(tensor.n_bytes)
            if int(tensor.data_offset) + nbytes > size or raw_nbytes(qtype, numel) != nbytes:
                raise CheckpointError(
                    f"{self.path} is truncated or damaged: tensor '{tensor.name}' ({qtype}, {shape}) does not fit the "
                    f"{size}-byte file; download it again.")
            self._tensors[rename(stripped)] = (tensor, qtype, shape)
        detected = classify(self._tensors)
        if self.arch not in ARCHS.get(component, ()) or detected is None or not detected.provides(component):
            raise CheckpointError(self._wrong(component, detected))
        self.detected = Detected(detected.component, "gguf", prefix)
        self.extras = {"detected": self.detected, "container": "gguf", "arch": self.arch, "quant": self.type_counts()}
        self._reader = reader

    def _wrong(self, component: str, detected: Optional[Detected]) -> str:
        allowed = ARCHS.get(component)
        if not allowed:
            return f"{self.path} is a GGUF file ('{self.arch}'), but the {component} is not read from GGUF; use its safetensors file."
        if self.arch not in allowed:
            return (f"{self.path} is a GGUF of a '{self.arch}' model (general.architecture), not of "
                    f"{'Wan2.1 (wan)' if 'wan' in allowed else 'umT5 (t5encoder)'}, so it cannot be used as the {component}.")
        return wrong_component_message(self.path, detected, component)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, qtype, _ in self._tensors.values():
            counts[qtype] = counts.get(qtype, 0) + 1
        return counts

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._tensors:
            yield key, self[key]

    def origin(self, key: str) -> str:
        return str(self.path)

    def is_mapped(self, key: str) -> bool:
        return False  # every read copies out of the memory map

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key][2]

    def ggml_type(self, key: str) -> str:
        return self._tensors[key][1]

    def raw(self, key: str) -> torch.Tensor:
        """The stored bytes of `key` (a flat uint8 tensor, copied out of the memory map)."""
        tensor = self._tensors[key][0]
        data = np.asarray(tensor.data)
        return torch.from_numpy(np.array(data.reshape(-1).view(np.uint8)))

    def __getitem__(self, key: str) -> torch.Tensor:
        _, qtype, shape = self._tensors[key]
        raw = self.raw(key)
        if qtype in FLOAT_TYPES:
            return raw.view(_NATIVE[qtype]).reshape(shape)
        return dequantize(raw, qtype, shape)


class GGUFRawSource:
    """`source` with the weights of `layers` (module names) delivered raw for `quant.GGUFLinear`."""

    def __init__(self, source, layers):
        self._src = source
        self.layers = set(layers)
        self.files = list(source.files)

    def _is_raw(self, key: str) -> bool:
        return key.endswith(".weight") and key[: -len(".weight")] in self.layers

    def keys(self) -> list[str]:
        return self._src.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._src

    def __len__(self) -> int:
        return len(self._src)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.keys():
            yield key, self[key]

    def origin(self, key: str) -> str:
        return self._src.origin(key)

    def is_mapped(self, key: str) -> bool:
        return False if self._is_raw(key) else self._src.is_mapped(key)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._is_raw(key):
            numel = int(np.prod(self._src.shape(key)))
            return (raw_nbytes(self._src.ggml_type(key), numel),)
        return self._src.shape(key)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._src.raw(key) if self._is_raw(key) else self._src[key]

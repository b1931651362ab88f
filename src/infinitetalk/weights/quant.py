"""Quantised weight sources: the official optimum-quanto fp8 DiT, and fp8 layout at load.

Official format (MeiGen-AI/InfiniteTalk `quant_models/infinitetalk_single_fp8.safetensors` +
`infinitetalk_single_fp8.json`, read by `wan/multitalk.py` with
`optimum.quanto.requantize(model, state_dict, quantization_map)`):
- the safetensors file is the full state dict of the merged model (Wan DiT + audio adapter) in
  which every quantised linear `X` is stored the optimum-quanto way: `X.weight._data`
  (float8_e4m3fn [out, in] for qfloat8, int8 for qint8), `X.weight._scale` (the dequantisation
  multiplier, absmax/qmax per output channel, shape [out, 1], in the dtype of the weight it
  was made from), `X.bias`, and the placeholders `X.input_scale` / `X.output_scale` (scalars,
  unused when activations are not quantised). Every other tensor is stored as it is.
- the json file is quanto's quantization map: `{"X": {"weights": "qfloat8_e4m3fn" | "qfloat8"
  | "qint8" | ..., "activations": "none" | ...}}`, one entry per quantised module; by default
  it sits beside the safetensors file with the extension `.json`.

`open_quanto_checkpoint` presents such a file as a lazy key -> tensor source in our layout:
fp8 weights stay fp8 (`X.weight` + `X.weight_scale` [out] float32, the layout of
`Fp8Linear`), int8 and e5m2 weights are dequantised to float32 (our fp8 kernels use e4m3
only), the activation placeholders are dropped. 4-bit/2-bit quanto weights (packed, grouped,
with shifts) are refused with a clear error; the official release ships none.

`Fp8Source` then gives any source (bf16 files, the quanto file, a LoRA-merged source) the
exact layout a model expects: the layers that are `Fp8Linear` in the model get fp8 weights
(quantised now, or passed through when already fp8), all other layers get float weights
(dequantised when the file has them in fp8). The official code ignores LoRAs on a quantised
model; here a LoRA is merged in float32 before `Fp8Source` (re)quantises, so it always applies.

Sources share the interface of `infinitetalk.weights.materialize.LazyStateDict`
(keys, __contains__, __len__, __getitem__, items, origin, is_mapped, shape, files).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from ..errors import CheckpointError, MissingWeightsError
from ..quant.fp8 import FP8_DTYPE, dequantize_weight, quantize_weight_rowwise
from .materialize import LazyStateDict, open_weights

logger = logging.getLogger(__name__)

_DATA = ".weight._data"
_SCALE = ".weight._scale"
_SCALE_KEY = ".weight_scale"
_ACT_SCALES = (".input_scale", ".output_scale")

# quanto qtype name -> storage dtype of `_data` that we can read.
_FP8_QTYPES = {"qfloat8", "qfloat8_e4m3fn"}
_DEQUANT_QTYPES = {"qint8": torch.int8, "qfloat8_e5m2": torch.float8_e5m2}


def _qtype_of_dtype(dtype: torch.dtype) -> Optional[str]:
    if dtype == FP8_DTYPE:
        return "qfloat8_e4m3fn"
    if dtype == torch.int8:
        return "qint8"
    if dtype == torch.float8_e5m2:
        return "qfloat8_e5m2"
    return None


class QuantoSource:
    """An optimum-quanto quantised state dict (weights `_data`/`_scale`) in our key layout.

    Built by `open_quanto_checkpoint`. fp8 e4m3 modules yield `X.weight` (fp8, as stored) and
    `X.weight_scale` (float32 [out]); int8/e5m2 modules yield a float32 `X.weight`
    (data * scale) and no scale key; `X.input_scale`/`X.output_scale` are dropped.
    """

    def __init__(self, raw: LazyStateDict, qtypes: dict[str, str]):
        self._raw = raw
        self.qtypes = dict(qtypes)  # module name -> quanto qtype name
        self.files = list(raw.files)
        self._keys: dict[str, tuple[str, str]] = {}  # our key -> (kind, raw key)
        for key in raw.keys():
            if key.endswith(_DATA):
                self._keys[key[: -len(_DATA)] + ".weight"] = ("data", key)
            elif key.endswith(_SCALE):
                stem = key[: -len(_SCALE)]
                if self.qtypes.get(stem) in _FP8_QTYPES:
                    self._keys[stem + _SCALE_KEY] = ("scale", key)
            elif key.endswith(_ACT_SCALES) and key.rsplit(".", 1)[0] in self.qtypes:
                continue
            else:
                self._keys[key] = ("plain", key)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._keys:
            yield key, self[key]

    def origin(self, key: str) -> str:
        return self._raw.origin(self._keys[key][1])

    def is_mapped(self, key: str) -> bool:
        kind, raw = self._keys[key]
        return self._raw.is_mapped(raw) if kind != "scale" else False

    def shape(self, key: str) -> tuple[int, ...]:
        kind, raw = self._keys[key]
        if kind == "scale":
            return (self._raw.shape(raw.replace(_SCALE, _DATA))[0],)
        return self._raw.shape(raw)

    def __getitem__(self, key: str) -> torch.Tensor:
        kind, raw = self._keys[key]
        if kind == "plain":
            return self._raw[raw]
        stem = raw[: -len(_DATA)] if kind == "data" else raw[: -len(_SCALE)]
        qtype = self.qtypes[stem]
        data_key, scale_key = stem + _DATA, stem + _SCALE
        if kind == "scale":
            return self._scale(stem, scale_key, self._raw.shape(data_key)[0])
        data = self._raw[data_key]
        if qtype in _FP8_QTYPES:
            if data.dtype != FP8_DTYPE:
                raise CheckpointError(
                    f"'{data_key}' in {self._raw.origin(data_key)} is {data.dtype}, but the quantization map says "
                    f"{qtype} (float8_e4m3fn): the file and its map do not belong together."
                )
            return data
        expected = _DEQUANT_QTYPES[qtype]
        if data.dtype != expected:
            raise CheckpointError(
                f"'{data_key}' in {self._raw.origin(data_key)} is {data.dtype}, but the quantization map says "
                f"{qtype}: the file and its map do not belong together."
            )
        scale = self._scale(stem, scale_key, data.shape[0])
        return dequantize_weight(data, scale, torch.float32)

    def _scale(self, stem: str, scale_key: str, out_features: int) -> torch.Tensor:
        if scale_key not in self._raw:
            raise CheckpointError(
                f"'{scale_key}' is missing from {self.files[0]}: module '{stem}' has quantised data but no scale. "
                "The file is incomplete; download it again."
            )
        scale = self._raw[scale_key].float()
        if scale.numel() == 1:  # per-tensor scale
            return scale.reshape(1).expand(out_features).contiguous()
        if scale.numel() != out_features:
            raise CheckpointError(
                f"'{scale_key}' in {self._raw.origin(scale_key)} has shape {tuple(scale.shape)}; a per-output-channel "
                f"scale of {out_features} values was expected. Only axis-0 (per output channel) or per-tensor "
                "quanto scales are supported."
            )
        return scale.reshape(out_features)


def open_quanto_checkpoint(path: os.PathLike | str, map_path: Optional[os.PathLike | str] = None) -> QuantoSource:
    """Open an optimum-quanto quantised checkpoint (e.g. the official `infinitetalk_single_fp8`).

    `map_path` defaults to the file name with `.json` instead of `.safetensors`. Without a map
    file the quantised modules are found from their `_data` keys and dtypes. A map is checked
    against the file: modules listed but absent, and unsupported qtypes, raise CheckpointError.
    """
    path = Path(path)
    raw = open_weights([path])
    found = {k[: -len(_DATA)]: k for k in raw.keys() if k.endswith(_DATA)}

    if map_path is None:
        candidate = path.with_suffix(".json")
        map_path = candidate if candidate.exists() else None
    elif not Path(map_path).exists():
        raise MissingWeightsError(f"Quantization map not found: {map_path}.", missing=[str(map_path)])

    qtypes: dict[str, str] = {}
    if map_path is not None:
        try:
            qmap = json.loads(Path(map_path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{map_path} is not a readable quantization map (JSON): {exc}.") from exc
        if not isinstance(qmap, dict):
            raise CheckpointError(f"{map_path} is not a quanto quantization map (expected a JSON object).")
        activations = set()
        for name, spec in qmap.items():
            weights = spec.get("weights", "none") if isinstance(spec, dict) else None
            if weights is None:
                raise CheckpointError(f"{map_path}: entry '{name}' is not of the form {{'weights': ..., 'activations': ...}}.")
            if spec.get("activations", "none") not in (None, "none"):
                activations.add(spec["activations"])
            if weights == "none":
                continue
            if name not in found:
                raise CheckpointError(
                    f"{map_path} lists '{name}' as quantised ({weights}) but {path} has no '{name}{_DATA}': "
                    "the file is incomplete or the map belongs to another file."
                )
            qtypes[name] = weights
        if activations:
            logger.warning(
                "%s quantises activations statically (%s); the stored activation scales are ignored and "
                "activations are quantised per token at run time instead.",
                map_path,
                ", ".join(sorted(activations)),
            )
    for name, data_key in found.items():
        if name not in qtypes:
            inferred = _qtype_of_dtype(_dtype_of(raw, data_key))
            if inferred is None:
                raise CheckpointError(
                    f"'{data_key}' in {path} is stored as {_dtype_of(raw, data_key)}, a packed quanto format "
                    "(4-bit or 2-bit weights) that infinitetalk cannot read; use the fp8 or bf16 weights."
                )
            qtypes[name] = inferred
    unsupported = {q for q in qtypes.values() if q not in _FP8_QTYPES and q not in _DEQUANT_QTYPES}
    if unsupported:
        raise CheckpointError(
            f"{path} uses quanto weight types {sorted(unsupported)}, which infinitetalk cannot read "
            "(supported: qfloat8/qfloat8_e4m3fn, qfloat8_e5m2, qint8); use the fp8 or bf16 weights."
        )
    logger.info("opened quanto checkpoint %s: %d quantised modules", path, len(qtypes))
    return QuantoSource(raw, qtypes)


def _dtype_of(raw: LazyStateDict, key: str) -> torch.dtype:
    """Storage dtype of a key, from the safetensors header when possible (no tensor read)."""
    path = Path(raw.origin(key))
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            if key in handle.keys():
                return _SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype(), torch.uint8)
    return raw[key].dtype


_SAFETENSORS_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
}


class Fp8Source:
    """A weight source in the exact layout of a model with some `Fp8Linear` layers.

    `fp8_layers`: module names that are `Fp8Linear` in the model (`quant.fp8.fp8_layer_names`).
    For X in it: `X.weight` is float8_e4m3fn and `X.weight_scale` float32 [out]; float weights
    are quantised on read (on `device`), fp8 ones with a stored scale pass through unchanged.
    For every other X with an fp8 weight in `source`, `X.weight` is dequantised to float32 and
    `X.weight_scale` is hidden. Everything else passes through.
    """

    def __init__(self, source, fp8_layers: Iterable[str], *, device: torch.device | str = "cpu"):
        self._src = source
        self.fp8_layers = set(fp8_layers)
        self.device = torch.device(device)
        self.files = list(source.files)
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        keys: dict[str, None] = {}
        for key in source.keys():
            if key.endswith(_SCALE_KEY):
                stem = key[: -len(_SCALE_KEY)]
                if stem not in self.fp8_layers:
                    continue  # folded into a dequantised weight
            keys[key] = None
        for stem in sorted(self.fp8_layers):
            if stem + ".weight" in source:
                keys[stem + _SCALE_KEY] = None
        self._keys = list(keys)
        self._key_set = set(keys)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._key_set

    def __len__(self) -> int:
        return len(self._keys)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._keys:
            yield key, self[key]

    def origin(self, key: str) -> str:
        if key.endswith(_SCALE_KEY) and key not in self._src:
            return self._src.origin(key[: -len(_SCALE_KEY)] + ".weight")
        return self._src.origin(key)

    def is_mapped(self, key: str) -> bool:
        if key in self._src and not self._transformed(key):
            return self._src.is_mapped(key)
        return False

    def shape(self, key: str) -> tuple[int, ...]:
        if key.endswith(_SCALE_KEY):
            return (self._src.shape(key[: -len(_SCALE_KEY)] + ".weight")[0],)
        return self._src.shape(key)

    def _stored_fp8(self, stem: str) -> bool:
        """True when the source holds X.weight in fp8 together with X.weight_scale."""
        return stem + _SCALE_KEY in self._src

    def _transformed(self, key: str) -> bool:
        if key.endswith(".weight"):
            stem = key[: -len(".weight")]
            return (stem in self.fp8_layers) != self._stored_fp8(stem)
        return key.endswith(_SCALE_KEY) and key not in self._src

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        if key.endswith(_SCALE_KEY):
            stem = key[: -len(_SCALE_KEY)]
            if self._stored_fp8(stem):
                return self._src[key].float().reshape(-1)
            return self._quantized(stem)[1]
        if key.endswith(".weight"):
            stem = key[: -len(".weight")]
            if stem in self.fp8_layers:
                if self._stored_fp8(stem):
                    weight = self._src[key]
                    if weight.dtype != FP8_DTYPE:
                        raise CheckpointError(
                            f"'{key}' in {self._src.origin(key)} has a weight_scale but is stored as {weight.dtype}, "
                            "not float8_e4m3fn: the file is damaged or of an unknown fp8 layout."
                        )
                    return weight
                return self._quantized(stem)[0]
            if self._stored_fp8(stem):
                return dequantize_weight(self._src[key], self._src[stem + _SCALE_KEY], torch.float32)
        return self._src[key]

    def _quantized(self, stem: str) -> tuple[torch.Tensor, torch.Tensor]:
        # The weight and its scale come from one quantisation; the first read computes both
        # and keeps the other half until it is read (materialize reads them one after another).
        if stem in self._pending:
            return self._pending.pop(stem)
        weight = self._src[stem + ".weight"]
        if weight.dim() != 2:
            raise CheckpointError(
                f"'{stem}.weight' in {self._src.origin(stem + '.weight')} has shape {tuple(weight.shape)}; "
                "fp8 quantisation needs a 2-D linear weight."
            )
        q, scale = quantize_weight_rowwise(weight.to(self.device))
        self._pending[stem] = (q, scale)
        return q, scale

"""One safetensors / .pth file of any supported layout -> a source in the official names.

Handled (see ../shared/formats/README.md for the sources of these conventions):
* prefixes `model.diffusion_model.` / `model.` / ... (ComfyUI, Kijai), stripped; a marker
  tensor outside the prefix (`scaled_fp8`) is consumed, other unprefixed tensors are ignored;
* HF-named umT5 (`encoder.block.N...`) and HF CLIP vision (`vision_model...`), renamed;
* fp8 files: Kijai / old ComfyUI `scaled_fp8` marker + `X.scale_weight`, ComfyUI's new format
  (`X.weight_scale`, `X.input_scale`, `X.comfy_quant` tensors and/or the header's
  `_quantization_metadata`). float8_e4m3fn weights come out in the project's fp8 layout,
  `X.weight` (fp8 as stored) + `X.weight_scale` (float32 [out]), which `weights.quant.Fp8Source`
  either keeps (fp8 layers) or dequantises (weight.float() * scale). float8_e5m2 weights are
  dequantised here. An fp8 weight without a scale in a file that marks itself scaled is an
  error; an unmarked fp8 file (a plain cast, e.g. `*_fp8_e4m3fn.safetensors`) gets scale 1.
* activation scales (`input_scale`, `scale_input`), `comfy_quant`, `log_scale` (Kijai's CLIP),
  `position_ids` (HF CLIP) are consumed: they are not weights of the model.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from ...errors import CheckpointError
from ..materialize import FLOAT8_DTYPES, LazyStateDict, container_of, open_weights
from .detect import Detected, classify, wrong_component_message
from .name_maps import HF_T5_DUPLICATES, HF_T5_RULES, hf_clip_entries, rename_by_rules
from .sources import Entry, MappedSource

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
_SCALE_LEAVES = (".scale_weight", ".weight_scale")
_CONSUMED_LEAVES = (".scale_input", ".input_scale", ".comfy_quant")
_CONSUMED_KEYS = ("scaled_fp8", "log_scale")
_SAFETENSORS_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16, "F16": torch.float16,
    "F32": torch.float32, "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}
SUPPORTED_COMFY_FORMATS = ("float8_e4m3fn", "float8_e5m2")


class _Header:
    """dtypes and metadata of a file without reading tensor data."""

    def __init__(self, path: Path, raw: LazyStateDict):
        self.path = path
        self.raw = raw
        self.metadata: dict = {}
        self._handle = None
        if container_of(path) == "safetensors":  # by content, whatever the name
            from safetensors import safe_open

            self._handle = safe_open(str(path), framework="pt", device="cpu")
            self.metadata = dict(self._handle.metadata() or {})

    def dtype(self, key: str) -> torch.dtype:
        if self._handle is not None:
            return _SAFETENSORS_DTYPES.get(self._handle.get_slice(key).get_dtype(), torch.uint8)
        return self.raw[key].dtype


def _strip(keys: list[str], prefix: str) -> dict[str, str]:
    """stripped key -> file key, for the keys under `prefix` (all keys when the prefix is empty)."""
    if not prefix:
        return {k: k for k in keys}
    return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}


def _comfy_layers(header: _Header, prefix: str, raw: LazyStateDict, keys: dict[str, str]) -> dict[str, str]:
    """Layer (stripped name) -> ComfyUI quant format, from the header and from `.comfy_quant` tensors."""
    formats: dict[str, str] = {}
    text = header.metadata.get("_quantization_metadata")
    if text:
        try:
            layers = json.loads(text).get("layers", {})
        except (ValueError, AttributeError) as exc:
            raise CheckpointError(f"{header.path} has a header '_quantization_metadata' that is not valid JSON ({exc}); download it again.") from exc
        for name, spec in layers.items():
            stem = name[len(prefix):] if prefix and name.startswith(prefix) else name
            formats[stem] = (spec or {}).get("format", "") if isinstance(spec, dict) else str(spec)
    for key, file_key in keys.items():
        if key.endswith(".comfy_quant"):
            try:
                spec = json.loads(bytes(raw[file_key].to(torch.uint8).tolist()).decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"'{file_key}' in {header.path} is not the JSON of a ComfyUI quant format ({exc}); the file is damaged.") from exc
            formats[key[: -len(".comfy_quant")]] = spec.get("format", "") if isinstance(spec, dict) else ""
    return formats


def _scale_maker(out: int):
    def make(scale: torch.Tensor) -> torch.Tensor:
        s = scale.to(torch.float32)
        return s.reshape(1).expand(out).contiguous() if s.numel() == 1 else s.reshape(out).contiguous()

    return make


def _ones_maker(out: int):
    return lambda _w: torch.ones(out, dtype=torch.float32)


def _e5m2_maker(per_tensor: bool):
    def make(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        s = scale.to(torch.float32)
        return weight.to(torch.float32) * (s.reshape(()) if per_tensor else s.reshape(-1, *([1] * (weight.dim() - 1))))

    return make


def open_single_file(path: str | Path, component: str) -> MappedSource:
    """Open a safetensors / .pth weight file as `component` ('dit', 'adapter', 't5', ...).

    Raises CheckpointError (one sentence naming the file) when the file is damaged, holds another
    model, or is an fp8 file whose scales are missing."""
    path = Path(path)
    raw = open_weights([path])
    all_keys = raw.keys()
    detected = classify(all_keys)
    if detected is None or not detected.provides(component):
        raise CheckpointError(wrong_component_message(path, detected, component))
    header = _Header(path, raw)
    keys = _strip(all_keys, detected.prefix)
    outside = [k for k in all_keys if detected.prefix and not k.startswith(detected.prefix) and k not in _CONSUMED_KEYS]
    if outside:
        log.info("%s: %d tensors outside '%s' are not part of the %s and are ignored (e.g. %s)",
                 path.name, len(outside), detected.prefix, component, outside[0])
    marked = "scaled_fp8" in all_keys or bool(header.metadata.get("_quantization_metadata"))
    comfy = _comfy_layers(header, detected.prefix, raw, keys)
    bad = {stem: fmt for stem, fmt in comfy.items() if fmt not in SUPPORTED_COMFY_FORMATS}
    if bad:
        stem, fmt = next(iter(bad.items()))
        raise CheckpointError(
            f"{path} stores '{stem}' in the ComfyUI quant format '{fmt}', which infinitetalk cannot read "
            f"(supported: {', '.join(SUPPORTED_COMFY_FORMATS)}); use an fp8, fp16/bf16 or GGUF file.")
    rename = _renamer(detected)
    entries: dict[str, Entry] = {}
    scales: dict[str, str] = {}
    for key, file_key in keys.items():
        if key.endswith(_SCALE_LEAVES):
            stem = key.rsplit(".", 1)[0]
            scales[stem] = file_key
    fp8_seen = 0
    if detected.layout == "hf-clip":
        clip_keys = [k for k in keys if not (k in _CONSUMED_KEYS or k.endswith(_CONSUMED_LEAVES + _SCALE_LEAVES))]
        mapped, unknown = hf_clip_entries(clip_keys, lambda k: raw.shape(keys[k]))
        if unknown:
            raise CheckpointError(f"{path} looks like an HF CLIP vision file but has keys infinitetalk does not know, e.g. '{unknown[0]}'.")
        entries = {name: Entry(tuple(keys[k] for k in e.raw_keys), e.shape, e.make) for name, e in mapped.items()}
    for key, file_key in keys.items():
        if detected.layout == "hf-clip":
            break
        if key in _CONSUMED_KEYS or key.endswith(_CONSUMED_LEAVES + _SCALE_LEAVES):
            continue
        if key in HF_T5_DUPLICATES and "shared.weight" in keys:
            continue
        name = rename(key)
        shape = tuple(raw.shape(file_key))
        dtype = header.dtype(file_key)
        stem = key[: -len(".weight")] if key.endswith(".weight") else None
        if dtype not in FLOAT8_DTYPES:
            if stem is not None and stem in comfy:
                raise CheckpointError(f"{path} marks '{stem}' as {comfy[stem]} but stores its weight as {dtype}: the file is damaged.")
            entries[name] = Entry((file_key,), shape)
            continue
        fp8_seen += 1
        scale_key = scales.get(stem) if stem is not None else None
        if scale_key is None and (marked or stem in comfy or scales):
            raise CheckpointError(
                f"{path} is an fp8-scaled file but the fp8 weight '{file_key}' has no scale "
                f"('{stem}.scale_weight' or '{stem}.weight_scale'); the file is incomplete or damaged, download it again.")
        if scale_key is not None:
            nscale = 1
            for s in raw.shape(scale_key):
                nscale *= int(s)
            if len(shape) != 2 or nscale not in (1, shape[0]):
                raise CheckpointError(
                    f"'{scale_key}' in {path} has shape {tuple(raw.shape(scale_key))} for a weight of shape {shape}: only "
                    "per-tensor or per-output-row fp8 scales are supported.")
        name_stem = name[: -len(".weight")]
        if dtype == E4M3 and len(shape) == 2:
            entries[name] = Entry((file_key,), shape)
            if scale_key is not None:
                entries[name_stem + ".weight_scale"] = Entry((scale_key,), (shape[0],), _scale_maker(shape[0]))
            else:
                entries[name_stem + ".weight_scale"] = Entry((file_key,), (shape[0],), _ones_maker(shape[0]))
        elif scale_key is not None:
            per_tensor = len(raw.shape(scale_key)) == 0 or shape[0] == 1 or nscale == 1
            entries[name] = Entry((file_key, scale_key), shape, _e5m2_maker(per_tensor))
        else:
            entries[name] = Entry((file_key,), shape, lambda w: w.to(torch.float32))
    if fp8_seen and not scales:
        log.info("%s holds fp8 weights without scales (a plain fp8 cast); they are read with scale 1", path.name)
    quant = "fp8-scaled" if scales else ("fp8" if fp8_seen else None)
    return MappedSource(raw, entries, files=[path], extras={"detected": detected, "quant": quant, "container": "safetensors"})


def _renamer(detected: Detected):
    if detected.layout == "hf-t5":
        return rename_by_rules(HF_T5_RULES)
    if detected.component == "wav2vec2":
        return _wav2vec2_name
    return lambda key: key


_W2V_ENCODER_PARTS = ("feature_extractor.", "feature_projection.", "encoder.", "masked_spec_embed", "adapter.")


def _wav2vec2_name(key: str) -> Optional[str]:
    """A bare Wav2Vec2Model key gets the `wav2vec2.` prefix of the pre-training checkpoint."""
    return "wav2vec2." + key if key.startswith(_W2V_ENCODER_PARTS) else key

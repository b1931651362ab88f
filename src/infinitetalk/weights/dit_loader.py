"""Load the InfiniteTalk DiT from the official files.

The release ships the DiT in two parts: a Wan2.1-I2V-14B directory (`config.json` plus
`diffusion_pytorch_model*.safetensors`, sharded through `diffusion_pytorch_model.safetensors.index.json`)
and the InfiniteTalk audio adapter (`single/infinitetalk.safetensors` or
`multi/infinitetalk.safetensors`, keys `audio_proj.*`, `blocks.N.audio_cross_attn.*`,
`blocks.N.norm_x.*`). As the official pipeline does, every file is merged into one key space
(a later file wins) and loaded strictly; here the model is built on the meta device and filled
tensor by tensor, so a 14B model never exists twice in host memory.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..devices import resolve_device
from ..errors import CheckpointError, MissingWeightsError
from ..models.dit import InfiniteTalkDiT, WanDiTConfig
from .materialize import SAFETENSORS_EXT, materialize, open_weights

log = logging.getLogger(__name__)

DIT_PREFIX = "diffusion_pytorch_model"
ADAPTER_NAME = "infinitetalk.safetensors"
ADAPTER_KEY_PREFIXES = ("audio_proj.",)


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"The {what} {path} cannot be read as JSON ({exc}); download it again.") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"The {what} {path} does not hold a JSON object; download it again.")
    return data


def find_dit_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of a Wan DiT directory, in load order.

    Uses `*.index.json` when present (every shard it names must exist), else a single
    `diffusion_pytorch_model.safetensors`, else the `diffusion_pytorch_model*.safetensors` files
    sorted by name. Raises MissingWeightsError naming what is absent.
    """
    root = Path(directory)
    if not root.is_dir():
        raise MissingWeightsError(f"DiT checkpoint directory not found: {root}.", missing=[str(root)])
    indexes = sorted(root.glob(f"{DIT_PREFIX}*.index.json")) or sorted(root.glob("*.safetensors.index.json"))
    if indexes:
        if len(indexes) > 1:
            log.warning("several shard indexes in %s; using %s", root, indexes[0].name)
        index_path = indexes[0]
        index = _read_json(index_path, "shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"The shard index {index_path} has no 'weight_map'; download it again.")
        shards = sorted(set(weight_map.values()))
        files = [root / name for name in shards]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise MissingWeightsError(
                f"The shard index {index_path.name} lists {', '.join(Path(m).name for m in missing)}, "
                f"which is missing from {root}. Download the complete checkpoint (infinitetalk download).",
                missing=missing,
            )
        return files
    single = root / f"{DIT_PREFIX}.safetensors"
    if single.is_file():
        return [single]
    found = sorted(root.glob(f"{DIT_PREFIX}*.safetensors"))
    if found:
        return found
    raise MissingWeightsError(
        f"No DiT weights in {root}: expected {DIT_PREFIX}.safetensors or shards with "
        f"{DIT_PREFIX}.safetensors.index.json. Download the Wan2.1-I2V-14B checkpoint (infinitetalk download).",
        missing=[str(single)],
    )


def _adapter_file(adapter: str | os.PathLike) -> Path:
    path = Path(adapter)
    if path.is_dir():
        path = path / ADAPTER_NAME
    if not path.is_file():
        raise MissingWeightsError(
            f"InfiniteTalk adapter file not found: {path}. Download single/{ADAPTER_NAME} or "
            f"multi/{ADAPTER_NAME} of the InfiniteTalk release (infinitetalk download).",
            missing=[str(path)],
        )
    return path


def resolve_dit_files(
    checkpoint: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    config: WanDiTConfig | None = None,
) -> tuple[list[Path], WanDiTConfig]:
    """The ordered weight files and the config for `load_dit` (no tensors are read)."""
    path = Path(checkpoint)
    if path.is_dir():
        files = find_dit_files(path)
        if config is None:
            cfg_path = path / "config.json"
            if not cfg_path.is_file():
                raise MissingWeightsError(
                    f"config.json is missing from the DiT checkpoint {path}; download it with the weights "
                    "(infinitetalk download).",
                    missing=[str(cfg_path)],
                )
            try:
                config = WanDiTConfig.from_official_json(_read_json(cfg_path, "DiT config"))
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"{cfg_path} is not a usable Wan2.1-I2V config: {exc}.") from exc
    elif path.is_file():
        files = [path]  # any single file: official, ComfyUI / Kijai, fp8-scaled or GGUF (read by content)
    else:
        raise MissingWeightsError(f"DiT checkpoint not found: {path}.", missing=[str(path)])
    if adapter is not None:
        files.append(_adapter_file(adapter))
    return files, config


def load_dit(
    checkpoint: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: Optional[WanDiTConfig] = None,
    *,
    loras: Sequence[tuple[str | os.PathLike, float]] = (),
    fp8: bool = False,
) -> InfiniteTalkDiT:
    """Build the InfiniteTalk DiT from official files, strictly, straight into device/dtype.

    checkpoint: a Wan2.1-I2V DiT directory (config.json + sharded or single safetensors) or one
    weight file (then `config`, or the 14B sizes). adapter: the InfiniteTalk
    `infinitetalk.safetensors` (or its folder), merged over the base keys (later file wins);
    it may be omitted only when `checkpoint` already contains the adapter keys.
    Every tensor, including modulation tables, is cast to `dtype` as the official pipeline does.
    loras: (LoRA file, scale) pairs merged into the weights at load, in float32, tensor by
    tensor (FusionX, lightx2v; kijai/ComfyUI, kohya and diffusers/peft key formats).
    fp8: the block linear layers become `Fp8Linear` (e4m3 weights, per-output-channel scales),
    quantised at load after the LoRA merge, so LoRAs also work with fp8.
    Errors: MissingWeightsError (a file is absent), CheckpointError (unreadable file, missing,
    unexpected or mis-shaped key; the message names the key and the file).
    """
    device = resolve_device(device)
    files, cfg = resolve_dit_files(checkpoint, adapter, config)
    single = Path(checkpoint).is_file()
    source = _open_dit_source(files, single, adapter is not None)
    if cfg is None:
        cfg = infer_dit_config(source)
        log.info("sizes of %s read from its tensors: dim %d, %d layers, %d heads", checkpoint, cfg.dim, cfg.num_layers, cfg.num_heads)
    if adapter is None and not any(k.startswith(ADAPTER_KEY_PREFIXES) for k in source.keys()):
        raise CheckpointError(
            f"{checkpoint} holds no InfiniteTalk audio-adapter weights (audio_proj.*): pass "
            f"adapter=<path to single/{ADAPTER_NAME} or multi/{ADAPTER_NAME}>."
        )
    from ..quant.fp8 import is_dit_fp8_layer
    from .quantized_layers import attach_gguf_loras, keep_gguf_layers, split_loras, stored_fp8_layers

    with torch.device("meta"):
        model = InfiniteTalkDiT(cfg)
    # GGUF block linears keep their blocks (GGUFLinear); every other GGUF tensor is dequantised
    source, gguf_layers = keep_gguf_layers(model, source, is_dit_fp8_layer)
    side_loras = {}
    if loras:
        from .lora import LoraMergedSource, load_lora

        opened = [(load_lora(path), float(scale)) for path, scale in loras]
        merged, side_loras = split_loras(opened, gguf_layers)
        if merged:
            source = LoraMergedSource(source, merged, device=device)
    stored_fp8 = stored_fp8_layers(source)
    keep_float32 = None
    if fp8 or stored_fp8:
        from ..quant.fp8 import fp8_layer_names, quantize_dit
        from .quant import Fp8Source

        # fp8-scaled files keep their fp8 block linears as stored; --fp8 quantises the others too
        quantize_dit(model, only=None if fp8 else set(stored_fp8))
        source = Fp8Source(source, fp8_layer_names(model), device=device)
        keep_float32 = _is_fp8_scale
    log.info("loading the DiT from %d file(s) into %s %s%s", len(source.files), device, dtype, " (fp8 layers)" if fp8 else "")
    materialize(model, source, device=device, dtype=dtype, keep_float32=keep_float32, what="InfiniteTalk DiT")
    if side_loras:
        attach_gguf_loras(model, side_loras, device)
    return model


def _open_dit_source(files: list[Path], single: bool, with_adapter: bool):
    """Official shards (and adapter) through `open_weights`; any other single file through the
    content-detecting readers of `weights.formats` (GGUF, ComfyUI / Kijai, fp8-scaled)."""
    from .formats import MergedSource, open_component

    base_files = files[:-1] if with_adapter else files
    adapter_file = files[-1] if with_adapter else None
    base = open_component(base_files[0], "dit") if single else open_weights(base_files)
    if adapter_file is None:
        return base
    if not single and adapter_file.name.lower().endswith(SAFETENSORS_EXT) and _official_adapter(adapter_file):
        return open_weights(base_files + [adapter_file])
    return MergedSource([base, open_component(adapter_file, "adapter")])


def _official_adapter(path: Path) -> bool:
    """True for an adapter file in the official layout (plain float tensors, no prefix, no quantisation)."""
    from .formats import inspect_file

    info = inspect_file(path)
    return info.detected is not None and info.detected.prefix == "" and info.quant in ("fp32", "bf16", "fp16")


def infer_dit_config(source, base: Optional[WanDiTConfig] = None) -> WanDiTConfig:
    """The DiT sizes of a single file, read from its tensor shapes; head width 128 as in every
    released Wan2.1 model (pass `config` for other head counts). Sizes a file lacks stay at `base`."""
    import dataclasses
    import re

    base = base or WanDiTConfig.infinitetalk_14b()
    changes: dict = {}
    shape = source.shape
    if "patch_embedding.weight" in source:
        dim, in_dim, *patch = shape("patch_embedding.weight")
        changes.update(dim=dim, in_dim=in_dim, num_heads=max(1, dim // 128), patch_size=tuple(patch))
        if "head.head.weight" in source:
            changes["out_dim"] = shape("head.head.weight")[0] // max(1, patch[0] * patch[1] * patch[2])
    blocks = {int(m.group(1)) for k in source.keys() if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        changes["num_layers"] = max(blocks) + 1
    for key, field, axis in (("blocks.0.ffn.0.weight", "ffn_dim", 0), ("text_embedding.0.weight", "text_dim", 1),
                             ("time_embedding.0.weight", "freq_dim", 1), ("img_emb.proj.0.weight", "clip_dim", 0),
                             ("audio_proj.proj1.weight", "intermediate_dim", 0), ("audio_proj.norm.weight", "output_dim", 0)):
        if key in source:
            changes[field] = shape(key)[axis]
    if "audio_proj.proj3.weight" in source and "output_dim" in changes:
        changes["context_tokens"] = shape("audio_proj.proj3.weight")[0] // changes["output_dim"]
    return dataclasses.replace(base, **changes)


def _is_fp8_scale(name: str) -> bool:
    return name.endswith(".weight_scale")

"""fp8 checkpoints: the state dict of a (partly) fp8 model as one safetensors file, so a model is
quantised once.

fp8 layers (`infinitetalk.quant.fp8.Fp8Linear`) are stored as `X.weight` (F8_E4M3) and
`X.weight_scale` (F32), everything else as it is in the model; the header metadata names the
format and the fp8 layers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..quant.fp8 import fp8_layer_names, quantize_module
from .materialize import materialize, open_weights

CHECKPOINT_FORMAT = "infinitetalk-fp8-e4m3fn-rowwise-v1"


def save_fp8_checkpoint(model: nn.Module, path: os.PathLike | str) -> Path:
    """Write the state dict of a (partly) fp8 model to one safetensors file.

    fp8 layers are stored as `X.weight` (F8_E4M3) and `X.weight_scale` (F32); everything else
    as it is in the model. The header metadata names the format and the fp8 layers.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": "pt",
        "infinitetalk_format": CHECKPOINT_FORMAT,
        "fp8_layers": json.dumps(sorted(fp8_layer_names(model))),
    }
    save_file(state, str(path), metadata=metadata)
    return path


def fp8_layers_in(source) -> set[str]:
    """Module names X for which a weight source holds an fp8 `X.weight` and an `X.weight_scale`."""
    names = set()
    for key in source.keys():
        if key.endswith(".weight_scale"):
            stem = key[: -len(".weight_scale")]
            if stem + ".weight" in source:
                names.add(stem)
    return names


def load_fp8_checkpoint(
    module: nn.Module,
    path: os.PathLike | str,
    device: torch.device | str = "cpu",
    *,
    what: str = "fp8 model",
) -> nn.Module:
    """Fill a meta-built model from a file written by `save_fp8_checkpoint`; returns it.

    The layers stored in fp8 are turned into `Fp8Linear` first (`quantize_module` restricted to
    them), then every tensor is loaded strictly with its stored dtype.
    """
    source = open_weights([path])
    names = fp8_layers_in(source)
    quantize_module(module, lambda name, _m: name in names)
    missing = names - fp8_layer_names(module)
    if missing:
        raise CheckpointError(
            f"{path} stores fp8 weights for {sorted(missing)[0]}, which is not an fp8-capable linear layer "
            f"of the {what} ({len(missing)} such layers): the file is for another model."
        )
    return materialize(module, source, device=device, dtype=None, what=what)

"""Load the Wan VAE from the official ``Wan2.1_VAE.pth`` (or a file with the same keys).

The file is read lazily (memory-mapped ``torch.load(weights_only=True)`` or safetensors) and the
meta-built ``WanVAE`` is filled tensor by tensor in the requested device and dtype, strictly: a
missing or unexpected key, a wrong shape, an absent or damaged file raise an
``infinitetalk.errors`` type whose message names the file (and the key).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from ..errors import MissingWeightsError
from ..models.vae import WanVAE, WanVAEConfig
from .materialize import LazyStateDict, container_of, materialize, open_weights

log = logging.getLogger(__name__)

#: File name of the VAE in the official Wan2.1 / InfiniteTalk release directories.
VAE_FILENAME = "Wan2.1_VAE.pth"


def load_vae(
    path: os.PathLike | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: Optional[WanVAEConfig] = None,
) -> WanVAE:
    """Build the Wan VAE from `path` (the .pth/.safetensors file, or a directory holding ``Wan2.1_VAE.pth``).

    `config` defaults to the release configuration with the base width and the number of residual
    blocks read from the file's shapes (so the tiny test VAE loads without naming its config).
    Parameters end up on `device` in `dtype` (float32 or bfloat16); the model is in eval mode with
    gradients off.
    """
    file = Path(path)
    if file.is_dir():
        file = file / VAE_FILENAME
    if not file.exists():
        raise MissingWeightsError(
            f"The Wan VAE weight file {file} does not exist. Download the model (infinitetalk download) "
            f"or pass the path of {VAE_FILENAME}.",
            missing=[str(file)],
        )
    if container_of(file) == "torch":  # the official Wan2.1_VAE.pth (found by content)
        source = open_weights([file])
    else:  # Kijai / ComfyUI single files (bf16 / fp16, optional `model.` prefix), found by content
        from .formats import float_weights, open_component

        source = float_weights(open_component(file, "vae"))
    if config is None:
        config = infer_vae_config(source)
    with torch.device("meta"):
        model = WanVAE(config)
    materialize(model, source, device=device, dtype=dtype, what="Wan VAE")
    log.info("loaded the Wan VAE from %s (dim %d, %s)", file, config.dim, dtype)
    return model.requires_grad_(False)


def infer_vae_config(source: LazyStateDict, base: WanVAEConfig = WanVAEConfig()) -> WanVAEConfig:
    """`base` with ``dim`` and ``num_res_blocks`` taken from the checkpoint's shapes where present.

    Anything the file lacks is left at `base`; the strict load then reports the exact key."""
    changes = {}
    if "encoder.conv1.weight" in source:
        changes["dim"] = int(source.shape("encoder.conv1.weight")[0])
    level0 = set()
    pattern = re.compile(r"encoder\.downsamples\.(\d+)\.residual\.")
    resample = re.compile(r"encoder\.downsamples\.(\d+)\.resample\.")
    first_resample = min((int(m.group(1)) for k in source.keys() if (m := resample.match(k))), default=None)
    for key in source.keys():
        m = pattern.match(key)
        if m and (first_resample is None or int(m.group(1)) < first_resample):
            level0.add(int(m.group(1)))
    if level0 and first_resample is not None and level0 == set(range(first_resample)):
        changes["num_res_blocks"] = first_resample
    return replace(base, **changes) if changes else base

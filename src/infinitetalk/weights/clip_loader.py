"""Load the CLIP image encoder from the official `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`.

The file holds the whole XLM-RoBERTa CLIP (`visual.*`, `textual.*`, `log_scale`). Only the visual
tower is read: every other key is dropped when the file is opened (never loaded), and the
visual keys the pipeline never runs (the last block, `post_norm`, `head`) are skipped. The model
is built on the meta device and filled tensor by tensor (`materialize`), so the 2.5 GB of the
visual tower are read once, straight into the requested device and dtype.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Optional

import torch

from ..errors import CheckpointError
from ..models.image import CLIPVisionConfig, CLIPVisionEncoder
from .materialize import LazyStateDict, container_of, materialize, open_weights

log = logging.getLogger(__name__)

VISUAL_PREFIX = "visual."
_BLOCK = re.compile(r"transformer\.(\d+)\.")


def _visual_only(key: str) -> Optional[str]:
    """File key -> module key: strip `visual.`, drop the text tower and `log_scale`."""
    return key[len(VISUAL_PREFIX):] if key.startswith(VISUAL_PREFIX) else None


def _unused_by_pipeline(cfg: CLIPVisionConfig):
    """Keys present in the official file that the pipeline never uses (not built, not loaded)."""

    def unused(key: str) -> bool:
        if key == "head" or key.startswith("post_norm."):
            return True
        m = _BLOCK.match(key)
        return bool(m) and cfg.num_used_layers <= int(m.group(1)) < cfg.num_layers

    return unused


def open_clip_weights(path: os.PathLike | str) -> LazyStateDict:
    """Open a CLIP file lazily, exposing only its visual tower (keys without `visual.`).

    The official .pth is read as it is; other files (Kijai's visual-only safetensors, ComfyUI's
    HF-named `clip_vision_h.safetensors`) through `weights.formats`, which maps them to the
    official names."""
    from pathlib import Path

    from .formats import float_weights, open_component, renamed

    if not Path(path).is_file():
        return open_weights([path], rename=_visual_only)  # the not-found error
    if container_of(path) == "torch":  # the official .pth (found by content): read as it is
        source = open_weights([path], rename=_visual_only)
    else:  # Kijai's visual-only file, ComfyUI's HF-named clip_vision_h, fp16 / fp8 (found by content)
        source = renamed(float_weights(open_component(path, "clip")), _visual_only)
    if len(source) == 0:
        raise CheckpointError(
            f"{path} has no 'visual.*' keys, so it is not the CLIP checkpoint "
            "(models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth). Check the file name or download it again."
        )
    return source


def infer_clip_config(source: LazyStateDict) -> CLIPVisionConfig:
    """ViT-H/14 (the release) when the file's `pos_embedding` has its width and token count, else
    `CLIPVisionConfig.from_shapes` (heads at the ViT-H head width 80, all blocks but the last used).
    The release's sizes are kept for its own files since a visual-only copy may lack the last
    block; a file without the keys keeps them too (the strict load then names what is absent)."""
    base = CLIPVisionConfig()
    if "pos_embedding" not in source or tuple(source.shape("pos_embedding"))[1:] == (base.num_tokens, base.dim):
        return base
    try:
        return CLIPVisionConfig.from_shapes({k: source.shape(k) for k in source.keys()})
    except ValueError:
        return base


def load_clip_vision(
    path: os.PathLike | str,
    config: Optional[CLIPVisionConfig] = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CLIPVisionEncoder:
    """Build the CLIP visual tower from the official file, on `device` in `dtype`.

    `config` defaults to ViT-H/14 with 31 of 32 blocks used (the 14B release), or, for a file
    whose width or token count differ from it, the sizes read from its shapes (`infer_clip_config`).
    Raises MissingWeightsError when the file is absent and CheckpointError (naming the file and
    key) when it is damaged, incomplete or of another model.
    """
    source = open_clip_weights(path)
    cfg = config or infer_clip_config(source)
    with torch.device("meta"):
        model = CLIPVisionEncoder(cfg)
    log.info("loading CLIP visual tower from %s (%d of %d blocks)", path, cfg.num_used_layers, cfg.num_layers)
    materialize(model, source, device=device, dtype=dtype, ignore_unexpected=_unused_by_pipeline(cfg), what="CLIP image encoder")
    return model.requires_grad_(False)

"""What a pipeline is made of and the settings that decide a job's video.

`Components` holds the loaded models; `tiny_components` / `official_components` build them (the
tiny random models, or the official / ComfyUI / single files through `weights/`), `offload_for`
the VRAM plan's offloader. `config_for` gives a model's generation settings and `job_settings` /
`runtime_settings` the resume key's content (the job service builds it the same way).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from .. import __version__
from ..config import GenerationConfig
from ..errors import InputError
from .inputs import PreparedInputs, features_checksum, input_checksums, prompt_hash_material

if TYPE_CHECKING:
    from ..weights.locate import ComponentFiles

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
MODEL_NAMES = ("infinitetalk-14b", "tiny")
CUSTOM_MODEL = "custom"  # components given in memory (`InfiniteTalk.from_components`)


def model_defaults(model: str) -> dict:
    """GenerationConfig fields a model changes from the official defaults (tiny: 128 px buckets;
    it keeps the official 40 steps)."""
    if model == "tiny":
        from ..runtime.tiny_models import TINY_LONGEST_SIDE

        return {"bucket_longest_side": TINY_LONGEST_SIDE}
    if model == CUSTOM_MODEL:
        return {}
    if model not in MODEL_NAMES:
        raise InputError(f"Unknown model {model!r}; choose one of: {', '.join(MODEL_NAMES)}.")
    return {}


def config_for(model: str, config: Optional[GenerationConfig] = None, **settings) -> GenerationConfig:
    """The settings for `model`: `config` (or the model's defaults) with `settings` on top.

    A tiny model always uses its 128 px buckets unless `bucket_longest_side` is set explicitly.
    """
    defaults = model_defaults(model)
    if config is None:
        return GenerationConfig().with_(**{**defaults, **settings})
    cfg = config.with_(**settings) if settings else config
    if "bucket_longest_side" in defaults and cfg.bucket_longest_side is None:
        cfg = cfg.with_(bucket_longest_side=defaults["bucket_longest_side"])
    return cfg


def job_settings(
    inputs: PreparedInputs,
    cfg: GenerationConfig,
    model: str,
    variant: str,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    runtime: Optional[dict] = None,
) -> dict:
    """Everything that decides a job's video (the resume settings hash covers this).

    Input files enter by checksum, so renaming them does not matter but changing them does.
    """
    dev = torch.device(device) if device is not None else default_device()
    dt = dtype if dtype is not None else default_dtype(dev)
    return {
        "package": __version__,
        "model": model,
        "variant": variant,
        "device": dev.type,
        "dtype": str(dt),
        "config": dataclasses.asdict(cfg),
        "request": prompt_hash_material(inputs.request),
        "target_hw": list(inputs.target_hw),
        "inputs": list(input_checksums(inputs.request).values()),
        "features": features_checksum(inputs.request.features) if inputs.request.features is not None else None,
        "runtime": runtime or runtime_settings(False, ()),
    }


def runtime_settings(fp8: bool, loras: Sequence[tuple[PathLike, float]], fp8_attention: bool = False,
                     *, fast: bool = False) -> dict:
    """The model options that change the video (for the resume settings hash): fp8 layers, fp8
    attention, the merged LoRAs (by file name and scale) and the fast path (VAE dtype, kernels)."""
    return {"fp8": bool(fp8), "fp8_attention": bool(fp8_attention), "fast": bool(fast),
            "loras": [[Path(p).name, float(scale)] for p, scale in loras]}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs (official param dtype), float16 on GPUs without bf16 arithmetic (compute
    capability below 8.0, e.g. Colab's T4), float32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.bfloat16 if torch.cuda.get_device_capability(index) >= (8, 0) else torch.float16


@dataclass
class Components:
    """The loaded models. `random` marks the tiny random models (outputs are not faces)."""

    dit: torch.nn.Module
    text_encoder: object
    clip: torch.nn.Module
    vae: torch.nn.Module
    audio_encoder: torch.nn.Module
    name: str
    variant: str
    random: bool
    vae_chunk_latents: Optional[int] = 1
    vae_fast: Optional[object] = None  # models.vae.VAEFastOptions on the fast GPU path
    dit_fast: Optional[object] = None  # runtime.fast.FastOptions applied to the DiT (None: reference path)
    runtime: dict = dataclasses.field(default_factory=dict)  # speed/weight options that change results
    offload: Optional[object] = None  # runtime.offload.Offloader under a VRAM budget (None: all on the device)

    def placed(self, module):
        """Context: `module` on the GPU while the code inside runs (a no-op without offloading or module)."""
        if self.offload is None or module is None:
            return contextlib.nullcontext(module)
        return self.offload.placed(module)
    parallel: Optional[object] = None  # runtime.parallel.ParallelContext when several ranks share the job


def offload_for(model: str, device: torch.device, dtype: torch.dtype, fp8: bool, vram_budget, vram_size: int,
                dit: Optional[torch.nn.Module] = None, parallel: Optional[object] = None):
    """The `runtime.offload.Offloader` for `vram_budget`, or None (every model resident on `device`).

    Called twice by `from_pretrained`. Before loading (`dit` None) the DiT is sized from its config
    (`dtype` / fp8): None when everything fits on the GPU (load straight onto it), else an Offloader
    whose plan only says "load on the host"; for the 14B model an estimate over the budget is no
    error yet, as a GGUF / fp8-scaled file may hold a smaller DiT. With the loaded `dit` the plan is
    made again from the bytes its blocks really hold: that plan runs (or raises DeviceOutOfMemoryError).

    `parallel` (a `runtime.parallel.ParallelContext` of W > 1 ranks): every rank plans with the
    smallest budget of the ranks (one all-reduce, so all make the same plan), and when a whole DiT
    does not fit one rank but W divides the attention heads, the plan may shard the DiT blocks over
    the W ranks (`OffloadPlan.shards`; see `runtime.offload_plan`)."""
    from ..errors import DeviceOutOfMemoryError
    from ..runtime.offload import Offloader, host_ram_available, resolve_budget
    from ..runtime.offload_plan import OffloadModels, OffloadPlan, min_budget, plan_offload

    if isinstance(vram_budget, OffloadPlan):  # a plan made (or adjusted) by the caller
        return Offloader(vram_budget, device, parallel=parallel)
    budget = resolve_budget(vram_budget, device)
    if budget is None:
        return None
    world = parallel.world if parallel is not None else 1
    if world > 1:
        budget = parallel.agree_min(budget)
    models = OffloadModels.tiny(dtype, fp8) if model == "tiny" else OffloadModels.infinitetalk_14b(dtype, fp8)
    if dit is not None:
        models = models.with_dit(dit)
    shards = world if world > 1 and models.dit_config.num_heads % world == 0 else 1
    # two speakers and three passes: the most memory a job of that size can need
    plan_args = dict(size=vram_size, speakers=2, passes=3, host_ram_bytes=host_ram_available(), shards=shards)
    try:
        plan = plan_offload(models, budget, **plan_args)
    except DeviceOutOfMemoryError:
        if dit is not None or model == "tiny":
            raise
        plan = plan_offload(models, max(budget, min_budget(models, size=vram_size, speakers=2, passes=3)), **plan_args)
    if dit is None and not plan.offloads and device.type == "cuda":
        return None  # everything fits: load straight onto the GPU
    return Offloader(plan, device, parallel=parallel)

def tiny_components(seed: int, device: torch.device, dtype: torch.dtype, variant: str, fp8: bool = False,
                    encoders: bool = True) -> Components:
    """The tiny random models; `encoders=False` (the other ranks of a parallel job) leaves out
    umT5, CLIP and wav2vec2, as `official_components` does."""
    from ..runtime.tiny_models import build_tiny_models

    log.info("model 'tiny': every component has RANDOM weights; the video shows noise, not a face")
    tiny = build_tiny_models(seed, device, dtype)
    if fp8:
        from ..quant.fp8 import quantize_dit

        quantize_dit(tiny.dit)
    return Components(
        tiny.dit, tiny.text_encoder if encoders else None, tiny.clip if encoders else None, tiny.vae,
        tiny.audio_encoder if encoders else None, name="tiny", variant=variant, random=True, vae_chunk_latents=8,
    )

def official_components(
    root: Optional[PathLike],
    device: torch.device,
    dtype: torch.dtype,
    variant: str,
    fp8: bool = False,
    loras: Sequence[tuple[Path, float]] = (),
    fast: bool = False,
    files: Optional["ComponentFiles"] = None,
    place: Optional[torch.device] = None,
    encoders: bool = True,
) -> Components:
    from ..weights.audio_loader import load_audio_encoder
    from ..weights.clip_loader import load_clip_vision
    from ..weights.dit_loader import load_dit
    from ..weights.hub import is_hub_id, resolve_weights
    from ..weights.locate import locate_components
    from ..weights.t5_loader import load_text_encoder
    from ..weights.vae_loader import load_vae

    if files is None and root is not None and is_hub_id(root):  # "MeiGen-AI/InfiniteTalk": fetched first
        root = resolve_weights(root, variant).root
    layout = (files or locate_components(root, variant)).require().fetch_extras()
    place = device if place is None else place  # the host when offloading (runtime.offload moves them)
    clip_dtype = torch.float16 if device.type == "cuda" else torch.float32  # official clip dtype
    log.info("loading the models from %s onto %s (%s)", layout.root, device, dtype)
    missing = [str(p) for p, _ in loras if not p.is_file()]
    if missing:
        from ..errors import MissingWeightsError

        raise MissingWeightsError(f"LoRA file not found: {', '.join(missing)}.", missing=missing)
    dit = load_dit(layout.dit, layout.adapter, device=place, dtype=dtype, loras=loras, fp8=fp8).eval()
    text = load_text_encoder(layout.t5, layout.t5_tokenizer, device=place, dtype=dtype) if encoders else None
    clip = load_clip_vision(layout.clip, device=place, dtype=clip_dtype).eval() if encoders else None
    vae_fast = None
    if fast and device.type == "cuda" and default_dtype(device) == torch.bfloat16:
        from ..models.vae import VAEFastOptions

        vae_fast = VAEFastOptions()  # with the VAE in bf16 (GPUs with bf16 arithmetic; else the float32 VAE)
    vae_dtype = torch.bfloat16 if vae_fast is not None else torch.float32
    vae = load_vae(layout.vae, device=place, dtype=vae_dtype).eval()
    audio = (load_audio_encoder(layout.wav2vec2, device=place, dtype=torch.float32, config_dir=layout.audio_config)
             .eval() if encoders else None)
    return Components(
        dit, text, clip, vae, audio, name="infinitetalk-14b", variant=variant, random=False,
        vae_chunk_latents=None if vae_fast is not None else 1, vae_fast=vae_fast,
    )

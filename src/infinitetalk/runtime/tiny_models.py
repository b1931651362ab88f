"""Tiny random models of every component, for tests and `infinitetalk generate --model tiny`.

The tiny model runs the whole pipeline (same code paths, same shapes except the widths) in
seconds on a CPU, so the CLI, the writer, resume and the memory behaviour can be tested without
the 80 GB of official weights. Its output is NOT a talking face: the weights are random.

Every component is built from the same config code as the real one (`.tiny()` configs) and
filled deterministically from one seed, so two processes with the same seed build bit-identical
models (needed by the resume test, which compares a killed-and-resumed run to a straight one):

* DiT: `WanDiTConfig.tiny()` (dim 128, 2 layers, text_dim 64 / text_len 16, CLIP width 64,
  wav2vec2 2 layers x 32);
* umT5: `UMT5Config.tiny()` with `text_len` = the DiT's (16), byte tokenizer (offline);
* CLIP: ViT structure at 224 px / patch 14 (the DiT needs 257 image tokens), width = the DiT's
  `clip_dim`, 2 of 3 blocks used;
* VAE: `WanVAEConfig.tiny()` (same strides 4x8x8 and 16 latent channels);
* wav2vec2: `tiny_audio_encoder` (2 layers x 32, the parity size).

Weights follow the parity fixtures' generator rule (`parity/genweights.py`): 1-D norm weights
and `gamma` = 1, biases U(-0.02, 0.02), everything else U(-b, b) with b = 1/sqrt(fan_in), all
drawn in parameter order from one CPU generator. No global RNG is touched.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..models.audio import AudioEncoder, AudioEncoderConfig
from ..models.dit import InfiniteTalkDiT, WanDiTConfig
from ..models.image import CLIPVisionConfig, CLIPVisionEncoder
from ..models.text import TextEncoder, UMT5Config, UMT5Encoder
from ..models.tokenizer import ByteTokenizer
from ..models.vae import WanVAE, WanVAEConfig

TINY_LONGEST_SIDE = 128
"""The tiny model's size buckets are the official ones scaled so the longest side is 128 px."""


@dataclass(frozen=True)
class TinyConfigs:
    """The configs of the tiny components (paired: widths of one feed the next)."""

    dit: WanDiTConfig
    text: UMT5Config
    clip: CLIPVisionConfig
    vae: WanVAEConfig

    @classmethod
    def default(cls) -> "TinyConfigs":
        dit = WanDiTConfig.tiny()
        audio = tiny_audio_encoder_config()
        if (audio.num_hidden_layers, audio.hidden_size) != (dit.audio_layers, dit.audio_channels):
            dit = dit.replace(audio_layers=audio.num_hidden_layers, audio_channels=audio.hidden_size)
        text = dataclasses.replace(UMT5Config.tiny(), text_len=dit.text_len)
        if text.dim != dit.text_dim:
            dit = dit.replace(text_dim=text.dim)
        base_clip = CLIPVisionConfig.tiny()
        clip = dataclasses.replace(base_clip, image_size=224, patch_size=14, dim=dit.clip_dim)
        return cls(dit=dit, text=text, clip=clip, vae=WanVAEConfig.tiny())


def tiny_audio_encoder_config(**overrides) -> AudioEncoderConfig:
    """The tiny configuration (parity-fixture sizes) used by tests and `--model tiny`."""
    return dataclasses.replace(AudioEncoderConfig.tiny(), **overrides)


def tiny_audio_encoder(
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: Optional[AudioEncoderConfig] = None,
) -> AudioEncoder:
    """A randomly initialised encoder (deterministic for a seed; the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AudioEncoder(config or tiny_audio_encoder_config())
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _kind(name: str, shape: torch.Size) -> str:
    if name.endswith("gamma") or (name.endswith("weight") and len(shape) == 1):
        return "ones"
    if name.endswith("bias"):
        return "bias"
    return "uniform"


@torch.no_grad()
def random_init_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Fill every parameter and buffer of `module` in place with the genweights rule (see module doc)."""
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    for name, tensor in tensors:
        if not tensor.is_floating_point():
            continue
        kind = _kind(name, tensor.shape)
        if kind == "ones":
            tensor.fill_(1.0)
            continue
        bound = 0.02 if kind == "bias" else 1.0 / math.sqrt(max(1, math.prod(tensor.shape[1:])))
        u = torch.rand(tensor.shape, generator=generator, dtype=torch.float32)
        tensor.copy_((u * 2.0 - 1.0) * bound)
    return module


def _build(cls, cfg, generator: torch.Generator, device, dtype) -> nn.Module:
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device="cpu")
    random_init_(model, generator)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


@dataclass
class TinyModels:
    """The five tiny components (same types as the loaded real ones)."""

    dit: InfiniteTalkDiT
    text_encoder: TextEncoder
    clip: CLIPVisionEncoder
    vae: WanVAE
    audio_encoder: nn.Module
    configs: TinyConfigs


def build_tiny_models(
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    configs: Optional[TinyConfigs] = None,
) -> TinyModels:
    """Build every tiny component with random weights determined by `seed`.

    The DiT, text encoder and CLIP run in `dtype`; the VAE and wav2vec2 in float32 (as the
    real pipeline runs them).
    """
    cfgs = configs or TinyConfigs.default()
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    dit = _build(InfiniteTalkDiT, cfgs.dit, gen, device, dtype)
    t5 = _build(UMT5Encoder, cfgs.text, gen, device, dtype)
    clip = _build(CLIPVisionEncoder, cfgs.clip, gen, device, dtype)
    vae = _build(WanVAE, cfgs.vae, gen, device, torch.float32)
    audio = tiny_audio_encoder(seed=int(seed) + 1, device=device, dtype=torch.float32)
    tokenizer = ByteTokenizer(text_len=cfgs.text.text_len, vocab_size=cfgs.text.vocab_size)
    return TinyModels(dit, TextEncoder(tokenizer, t5), clip, vae, audio, cfgs)

"""`WanDiTConfig`: every size of the InfiniteTalk DiT (the 14B release and the tiny test model)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

log = logging.getLogger(__name__)

CLIP_TOKENS = 257  # CLIP ViT-H/14 at 224 px: class token + 16x16 patches


@dataclass(frozen=True)
class WanDiTConfig:
    """Every size of the DiT. Defaults are the official WanModel defaults used by InfiniteTalk.

    Audio adapter: proj1 reads audio_window * audio_layers * audio_channels values (one video
    frame's window), proj1_vf reads (audio_window + vae_scale - 1) * audio_layers * audio_channels
    (the positions picked for the later latent frames; 8 * 12 * 768 for the release). audio_layers
    and audio_channels are the wav2vec2 layer count and width; clip_dim the CLIP feature width
    (img_emb input). These three are fixed in the official code and configurable here so a tiny
    model can pair with a tiny wav2vec2 and a tiny CLIP.
    """

    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 36
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    audio_window: int = 5
    intermediate_dim: int = 512
    context_tokens: int = 32
    output_dim: int = 768
    vae_scale: int = 4
    norm_input_visual: bool = True
    norm_output_audio: bool = True
    audio_layers: int = 12
    audio_channels: int = 768
    clip_dim: int = 1280

    def __post_init__(self):
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even width")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def infinitetalk_14b(cls) -> "WanDiTConfig":
        """The released InfiniteTalk model (Wan2.1-I2V-14B + audio adapter)."""
        return cls()

    @classmethod
    def tiny(cls, **overrides: Any) -> "WanDiTConfig":
        """A small model of the same architecture for tests and `--model tiny`.

        dim 128, 4 heads (head_dim 32, RoPE parts 6/5/5), 2 layers, ffn 256, text_dim 64 /
        text_len 16 (the tiny umT5 has width 64), audio_layers 2 x audio_channels 32 (the tiny
        wav2vec2: 2 layers of width 32), clip_dim 64, context_tokens 4 audio tokens of width 64
        per speaker and latent frame. Any field can be overridden.
        """
        base = dict(
            dim=128, ffn_dim=256, freq_dim=256, text_dim=64, text_len=16, num_heads=4, num_layers=2,
            intermediate_dim=16, context_tokens=4, output_dim=64, audio_layers=2, audio_channels=32,
            clip_dim=64,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_official_json(cls, source: str | os.PathLike | Mapping[str, Any]) -> "WanDiTConfig":
        """Read a Wan config.json (path or dict). Keys starting with '_' and `model_type` are not
        sizes; absent keys (e.g. the audio-adapter sizes in the official file) keep their defaults.
        Unknown keys are logged and ignored. Raises ValueError for a non-i2v model or an
        unsupported attention window.
        """
        if isinstance(source, Mapping):
            data = dict(source)
        else:
            with open(source, encoding="utf-8") as fh:
                data = json.load(fh)
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key.startswith("_") or key in ("weight_init",):
                continue
            if key == "model_type":
                if value != "i2v":
                    raise ValueError(f"model_type is {value!r}; InfiniteTalk needs the i2v model")
                continue
            if key == "window_size":
                if tuple(value) != (-1, -1):
                    raise ValueError(f"window_size {value} is not supported (only full attention)")
                continue
            if key not in known:
                log.warning("config key %r is not a WanDiTConfig field; ignored", key)
                continue
            kwargs[key] = tuple(value) if key == "patch_size" else value
        return cls(**kwargs)

    def to_json_dict(self) -> dict[str, Any]:
        """A config.json dict in the official layout plus this config's extra fields."""
        out: dict[str, Any] = {"_class_name": "WanModel", "model_type": "i2v"}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> "WanDiTConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

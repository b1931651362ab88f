"""wav2vec2 audio features per video frame, as the official `get_embedding` computes them.

The official pipeline (src/audio_analysis/wav2vec2.py + generate_infinitetalk.get_embedding):
  1. feature-extractor normalisation of the whole clip: (x - mean) / sqrt(var + 1e-7), float32;
  2. the convolutional feature encoder -> [1, n, C] (50 frames per second);
  3. linear interpolation (align_corners=True) along time to exactly `int(seconds * 25)` frames,
     BEFORE the feature projection (so the transformer runs at the video frame rate);
  4. feature projection, positional convolution, transformer; hidden_states[1:] (the output of
     every layer) stacked -> [frames, layers, hidden].

`AudioEncoder` wraps `transformers.Wav2Vec2Model` under the attribute `wav2vec2`, so its state
dict keys are exactly those of chinese-wav2vec2-base / wav2vec2-base-960h checkpoints
(`wav2vec2.feature_extractor...`). It calls the submodules itself to inject step 3 (works with
transformers 4.x and 5.x; no output_attentions, SDPA or eager attention).

Any length with bounded memory (`AudioEncoder.encode`):
  * up to `whole_conv_max_s` (30 s) the conv encoder runs over the clip at once (the official
    ops); above, it runs in chunks aligned to its 320-sample stride with the 400-sample receptive
    field, and the first layer's GroupNorm uses statistics accumulated over the whole clip, so
    the features are the same up to float32 rounding (~1e-6 relative);
  * up to `whole_attention_max_s` (60 s) the transformer sees the whole clip at once, exactly as
    the official code (which at 40 s, its default 1000-frame cap, is what users run);
  * above, the transformer runs over overlapping windows of `whole_attention_max_s` seconds and
    keeps each window's centre: every kept frame has at least `context_s` (10 s) of real
    context on both sides (except at the clip ends). Memory then depends on the window size,
    not on the clip length (apart from the [frames, layers, hidden] output itself).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VIDEO_FPS = 25
SAMPLE_RATE = 16000
WHOLE_CONV_MAX_S = 30.0
WHOLE_ATTENTION_MAX_S = 60.0
CONTEXT_S = 10.0
CONV_CHUNK_S = 10.0
NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm


@dataclass(frozen=True)
class AudioEncoderConfig:
    """Sizes of a wav2vec2 encoder (Hugging Face `Wav2Vec2Config` names), plus preprocessing."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    hidden_act: str = "gelu"
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    layer_norm_eps: float = 1e-5
    do_normalize: bool = True
    sampling_rate: int = SAMPLE_RATE
    attn_implementation: str = "sdpa"
    extra: Mapping[str, Any] = field(default_factory=dict)  # other Wav2Vec2Config fields, passed through

    @classmethod
    def base(cls) -> "AudioEncoderConfig":
        """wav2vec2-base (chinese-wav2vec2-base, facebook/wav2vec2-base-960h): 12 x 768."""
        return cls()

    @classmethod
    def tiny(cls) -> "AudioEncoderConfig":
        """The parity fixture's size: wav2vec2-base conv layout with 32 channels, 2 layers x 32."""
        return cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(32,) * 7)

    @classmethod
    def from_hf_dict(cls, config: Mapping[str, Any], preprocessor: Optional[Mapping[str, Any]] = None) -> "AudioEncoderConfig":
        """Build from a Hugging Face config.json dict (and preprocessor_config.json dict)."""
        names = {f for f in cls.__dataclass_fields__ if f not in ("extra", "do_normalize", "sampling_rate", "attn_implementation")}
        kwargs: dict[str, Any] = {}
        for name in names:
            if name in config:
                value = config[name]
                kwargs[name] = tuple(value) if isinstance(value, list) else value
        passthrough = ("num_feat_extract_layers",)
        kwargs["extra"] = {k: config[k] for k in passthrough if k in config}
        if preprocessor:
            kwargs["do_normalize"] = bool(preprocessor.get("do_normalize", True))
            kwargs["sampling_rate"] = int(preprocessor.get("sampling_rate", SAMPLE_RATE))
        return cls(**kwargs)

    def to_hf(self):
        """The `transformers.Wav2Vec2Config` for this encoder (inference only: no masking, no dropout)."""
        from transformers import Wav2Vec2Config

        values = asdict(self)
        for key in ("extra", "do_normalize", "sampling_rate", "attn_implementation"):
            values.pop(key)
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        values.update({k: v for k, v in self.extra.items() if k != "num_feat_extract_layers"})
        values["num_feat_extract_layers"] = len(self.conv_dim)
        cfg = Wav2Vec2Config(
            **values,
            mask_time_prob=0.0,
            mask_feature_prob=0.0,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            feat_proj_dropout=0.0,
            layerdrop=0.0,
            add_adapter=False,
        )
        cfg._attn_implementation = self.attn_implementation
        return cfg

    @property
    def total_stride(self) -> int:
        return int(np.prod(self.conv_stride))

    @property
    def receptive_field(self) -> int:
        rf = 1
        for k, s in zip(reversed(self.conv_kernel), reversed(self.conv_stride)):
            rf = (rf - 1) * s + k
        return rf


def num_video_frames(samples: int, sample_rate: int = SAMPLE_RATE, fps: int = VIDEO_FPS) -> int:
    """Official frame count: int(samples / sr * 25)."""
    return int(samples / sample_rate * fps)


def normalize_waveform(wave: np.ndarray) -> np.ndarray:
    """Wav2Vec2FeatureExtractor's zero-mean unit-variance normalisation of one clip (float32).

    Same numpy operations as transformers; the denominator is formed in float64 and rounded to
    float32, which is what numpy < 2 (used by the reference) does for `float32 scalar + 1e-7`.
    """
    x = np.asarray(wave, dtype=np.float32)
    mean = x.mean()
    var = x.var()
    denom = np.float32(np.sqrt(np.float64(var) + NORM_EPS))
    return (x - mean) / denom


class AudioEncoder(nn.Module):
    """wav2vec2 feature encoder producing `[frames, layers, hidden]` per 25 fps video frame."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        from transformers import Wav2Vec2Model

        self.config = config
        self.wav2vec2 = Wav2Vec2Model(config.to_hf())

    # ----------------------------------------------------------------- pieces of the official forward
    @property
    def _dtype(self) -> torch.dtype:
        return self.wav2vec2.feature_projection.projection.weight.dtype

    @property
    def _device(self) -> torch.device:
        return self.wav2vec2.feature_projection.projection.weight.device

    def conv_features(self, input_values: torch.Tensor) -> torch.Tensor:
        """[B, samples] normalised audio -> conv features [B, n, C] (official order, one pass)."""
        return self.wav2vec2.feature_extractor(input_values).transpose(1, 2)

    @staticmethod
    def interpolate(features: torch.Tensor, num_frames: int) -> torch.Tensor:
        """[B, n, C] -> [B, num_frames, C], linear, align_corners=True (official linear_interpolation)."""
        out = F.interpolate(features.transpose(1, 2), size=num_frames, align_corners=True, mode="linear")
        return out.transpose(1, 2)

    def transformer_layers(self, features: torch.Tensor) -> torch.Tensor:
        """Interpolated conv features [B, T, C] -> hidden_states[1:] stacked as [B, T, layers, hidden]."""
        model = self.wav2vec2
        hidden, _ = model.feature_projection(features)
        encoder = model.encoder
        hidden = hidden + encoder.pos_conv_embed(hidden)
        if not self.config.do_stable_layer_norm:
            hidden = encoder.layer_norm(hidden)
        outputs = []
        for layer in encoder.layers:
            result = layer(hidden, attention_mask=None)
            hidden = result[0] if isinstance(result, tuple) else result
            outputs.append(hidden)
        if self.config.do_stable_layer_norm:
            outputs[-1] = encoder.layer_norm(outputs[-1])
        return torch.stack(outputs, dim=2)

    def forward(self, input_values: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The official computation on normalised audio [B, samples] -> [B, num_frames, layers, hidden]."""
        features = self.interpolate(self.conv_features(input_values), num_frames)
        return self.transformer_layers(features)

    # ----------------------------------------------------------------- bounded-memory pieces
    def _conv_features_chunked(self, wave: np.ndarray, mean: float, inv_std: float, chunk_s: float) -> torch.Tensor:
        """Conv features [n, C] computed in stride-aligned chunks (GroupNorm stats over the whole clip)."""
        cfg = self.config
        layers = self.wav2vec2.feature_extractor.conv_layers
        stride, field_ = cfg.total_stride, cfg.receptive_field
        n = wave.shape[0]
        n_out = (n - field_) // stride + 1
        if n_out < 1:
            raise ValueError(f"audio of {n} samples is shorter than the encoder's receptive field ({field_})")
        device, dtype = self._device, self._dtype

        def piece(lo: int, hi: int) -> torch.Tensor:
            x = (wave[lo:hi].astype(np.float64) - mean) * inv_std
            return torch.from_numpy(x.astype(np.float32)).to(device=device, dtype=dtype)[None, None]

        group = cfg.feat_extract_norm == "group"
        first = layers[0]
        if group:  # pass 1: per-channel mean/var of the first conv's output over the whole clip
            k0, s0 = cfg.conv_kernel[0], cfg.conv_stride[0]
            n0 = (n - k0) // s0 + 1
            step0 = max(1, int(chunk_s * cfg.sampling_rate) // s0)
            total = torch.zeros(cfg.conv_dim[0], dtype=torch.float64, device=device)
            total_sq = torch.zeros_like(total)
            for a in range(0, n0, step0):
                b = min(n0, a + step0)
                y = first.conv(piece(a * s0, (b - 1) * s0 + k0))[0].double()
                total += y.sum(dim=1)
                total_sq += (y * y).sum(dim=1)
            gmean = total / n0
            gvar = (total_sq / n0 - gmean * gmean).clamp_min(0)
            norm = first.layer_norm
            scale = (norm.weight.double() / torch.sqrt(gvar + norm.eps)).to(dtype)[None, :, None]
            shift = (norm.bias.double() - gmean * norm.weight.double() / torch.sqrt(gvar + norm.eps)).to(dtype)[None, :, None]

        step = max(1, int(chunk_s * cfg.sampling_rate) // stride)
        out = torch.empty(n_out, cfg.conv_dim[-1], dtype=torch.float32)
        for j0 in range(0, n_out, step):
            j1 = min(n_out, j0 + step)
            h = piece(j0 * stride, (j1 - 1) * stride + field_)
            if group:
                h = first.activation(first.conv(h) * scale + shift)
                rest = layers[1:]
            else:
                rest = layers
            for layer in rest:
                h = layer(h)
            out[j0:j1] = h[0].transpose(0, 1).float().cpu()
        return out

    @torch.no_grad()
    def encode(
        self,
        waveform: Union[np.ndarray, torch.Tensor],
        num_frames: Optional[int] = None,
        *,
        whole_conv_max_s: float = WHOLE_CONV_MAX_S,
        whole_attention_max_s: float = WHOLE_ATTENTION_MAX_S,
        context_s: float = CONTEXT_S,
        conv_chunk_s: float = CONV_CHUNK_S,
    ) -> torch.Tensor:
        """16 kHz mono waveform -> float32 CPU tensor [frames, layers, hidden], frames = int(s * 25).

        Equal to the official `get_embedding` up to `whole_attention_max_s` seconds (60 s); longer
        clips are encoded in overlapping windows (see the module doc). `num_frames` overrides the
        frame count (default: the official `int(samples / 16000 * 25)`).
        """
        cfg = self.config
        if isinstance(waveform, torch.Tensor):
            waveform = waveform.detach().float().cpu().numpy()
        wave = np.asarray(waveform, dtype=np.float32).reshape(-1)
        n = wave.shape[0]
        frames = num_video_frames(n, cfg.sampling_rate) if num_frames is None else int(num_frames)
        if frames < 1 or n < cfg.receptive_field:
            raise ValueError(f"audio of {n} samples is shorter than one video frame; nothing to encode")
        seconds = n / cfg.sampling_rate
        device, dtype = self._device, self._dtype

        if seconds <= whole_conv_max_s:
            x = normalize_waveform(wave) if cfg.do_normalize else wave
            conv = self.conv_features(torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype)[None])[0]
            del x
        else:
            if cfg.do_normalize:
                mean, var = _mean_var(wave)
                inv_std = 1.0 / math.sqrt(var + NORM_EPS)
            else:
                mean, inv_std = 0.0, 1.0
            conv = self._conv_features_chunked(wave, mean, inv_std, conv_chunk_s)
        features = self.interpolate(conv[None].to(device=device, dtype=dtype), frames)[0]
        del conv

        window = max(1, int(round(whole_attention_max_s * VIDEO_FPS)))
        if frames <= window:
            return self.transformer_layers(features[None])[0].float().cpu()

        context = min(int(round(context_s * VIDEO_FPS)), (window - 1) // 2)
        hop = window - 2 * context
        out = torch.empty(frames, cfg.num_hidden_layers, cfg.hidden_size, dtype=torch.float32)
        kept = 0
        start = 0
        while kept < frames:
            start = min(start, frames - window)
            seg = self.transformer_layers(features[None, start:start + window])[0]
            stop = frames if start + window >= frames else start + window - context
            out[kept:stop] = seg[kept - start:stop - start].float().cpu()
            kept = stop
            start += hop
        return out


def _mean_var(wave: np.ndarray, chunk: int = 1 << 22) -> tuple[float, float]:
    """Mean and (biased) variance of a long float32 signal in float64, without full-size temporaries."""
    n = wave.shape[0]
    total = 0.0
    for i in range(0, n, chunk):
        total += float(np.sum(wave[i:i + chunk], dtype=np.float64))
    mean = total / n
    sq = 0.0
    for i in range(0, n, chunk):
        d = wave[i:i + chunk].astype(np.float64) - mean
        sq += float(np.dot(d, d))
    return mean, sq / n

"""The InfiniteTalk audio adapter: audio projection to tokens and the audio cross-attention.

Parameter names follow the official release (`audio_proj.proj1`, `proj1_vf`, `proj2`, `proj3`,
`norm`; `blocks.N.audio_cross_attn.q_linear`, `kv_linear`, `proj`) so `infinitetalk.safetensors`
loads strictly.

Audio arrives per video frame as a window of wav2vec2 frames:
[N speakers, 1 + vae_scale*(T-1) video frames, audio_window, audio_layers, audio_channels].
Latent frame 0 uses video frame 0 with its whole window; every later latent frame covers
vae_scale video frames and uses the first half of its first frame's window (up to the centre),
the centre of its middle frames and the second half of its last frame's window
(audio_window + vae_scale - 1 window positions in total).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionFn, rope_1d

# Two-speaker L-RoPE ranges of the official SingleStreamMutiAttention (class_range 24,
# class_interval 4): speaker 1 in [0, 4], speaker 2 in [20, 24], background at 12.
SPEAKER1_RANGE = (0.0, 4.0)
SPEAKER2_RANGE = (20.0, 24.0)
BACKGROUND_POSITION = 12.0


def select_audio_windows(audio: torch.Tensor, audio_window: int, vae_scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-video-frame audio windows into the first latent frame's and the later ones'.

    audio [S, F, w, layers, channels] with F = 1 + vae_scale*(T-1) ->
    first [S, 1, w, layers, channels], later [S, T-1, w + vae_scale - 1, layers, channels].
    """
    s, frames = audio.shape[:2]
    first = audio[:, :1]
    later = audio[:, 1:].unflatten(1, ((frames - 1) // vae_scale, vae_scale))  # [S, T-1, vae_scale, w, ...]
    mid = audio_window // 2
    head = later[:, :, :1, : mid + 1].flatten(2, 3)
    middle = later[:, :, 1:-1, mid : mid + 1].flatten(2, 3)
    tail = later[:, :, -1:, mid:].flatten(2, 3)
    return first, torch.cat([head, middle, tail], dim=2)


class AudioProjModel(nn.Module):
    """Audio windows -> context_tokens audio tokens of width output_dim per latent frame."""

    def __init__(
        self,
        audio_window: int,
        vae_scale: int,
        audio_layers: int,
        audio_channels: int,
        intermediate_dim: int,
        output_dim: int,
        context_tokens: int,
        norm_output_audio: bool = True,
    ):
        super().__init__()
        self.context_tokens = context_tokens
        self.output_dim = output_dim
        per_position = audio_layers * audio_channels
        self.proj1 = nn.Linear(audio_window * per_position, intermediate_dim)
        self.proj1_vf = nn.Linear((audio_window + vae_scale - 1) * per_position, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim) if norm_output_audio else nn.Identity()

    def forward(self, first: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
        """first [S, 1, ...], later [S, T-1, ...] -> tokens [S, T, context_tokens, output_dim]."""
        s = first.shape[0]
        a = torch.relu(self.proj1(first.flatten(2)))  # [S, 1, I]
        b = torch.relu(self.proj1_vf(later.flatten(2)))  # [S, T-1, I]
        h = torch.relu(self.proj2(torch.cat([a, b], dim=1)))
        tokens = self.proj3(h).unflatten(-1, (self.context_tokens, self.output_dim))
        if isinstance(self.norm, nn.LayerNorm):  # float32 like the official autocast region
            tokens = F.layer_norm(
                tokens.float(), self.norm.normalized_shape, self.norm.weight.float(), self.norm.bias.float(), self.norm.eps
            )
        return tokens.reshape(s, -1, self.context_tokens, self.output_dim)


def speaker_positions(
    ref_map: torch.Tensor, extremes: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """1-D RoPE positions [B, L] of the video tokens from a reference map [B, 3, L].

    Rows 0 and 1 (speaker 1, speaker 2) are min-max rescaled to their ranges; the background is
    constant; each token takes the value of the row where its raw map value is largest (first
    row wins ties). `extremes` (min, max), each [B, 2, 1], replaces the rows' own minimum and
    maximum (a map of part of the tokens rescaled with the extremes over all of them).
    """
    def rescale(row: torch.Tensor, lo_hi: tuple[float, float], index: int) -> torch.Tensor:
        if extremes is None:
            lo = row.min(-1, keepdim=True).values
            hi = row.max(-1, keepdim=True).values
        else:
            lo, hi = extremes[0][:, index], extremes[1][:, index]
        return (row - lo) / (hi - lo + 1e-8) * (lo_hi[1] - lo_hi[0]) + lo_hi[0]

    s1 = rescale(ref_map[:, 0], SPEAKER1_RANGE, 0)
    s2 = rescale(ref_map[:, 1], SPEAKER2_RANGE, 1)
    back = torch.full_like(s1, BACKGROUND_POSITION)
    choices = torch.stack([s1, s2, back], dim=-1)  # [B, L, 3]
    winner = ref_map.argmax(dim=1, keepdim=True).transpose(1, 2)  # [B, L, 1]
    return choices.gather(-1, winner).squeeze(-1)


def speaker_key_positions(tokens_per_frame: int, frames: int, device, dtype) -> torch.Tensor:
    """Positions of the audio keys [frames * tokens_per_frame]: speaker 1 half, then speaker 2 half."""
    per_frame = torch.empty(tokens_per_frame, dtype=dtype, device=device)
    per_frame[: tokens_per_frame // 2] = sum(SPEAKER1_RANGE) / 2
    per_frame[tokens_per_frame // 2 :] = sum(SPEAKER2_RANGE) / 2
    return per_frame.repeat(frames)


class AudioCrossAttention(nn.Module):
    """Per-latent-frame cross-attention of video tokens to that frame's audio tokens (no gate)."""

    def __init__(self, dim: int, audio_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(audio_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def audio_kv(self, audio_tokens: torch.Tensor, two_speakers: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """audio_tokens [B, T, M, audio_dim] -> (k, v), each [B*T, M, H, D].

        With two speakers the keys are rotated by their speaker's centre position (1-D RoPE).
        They depend on the audio only, so a window computes them once.
        """
        b, frames = audio_tokens.shape[:2]
        n, d = self.num_heads, self.head_dim
        tokens = audio_tokens.flatten(0, 1)  # [B*T, M, audio_dim]
        m = tokens.shape[1]
        k, v = self.kv_linear(tokens).view(b * frames, m, 2, n, d).unbind(2)
        if two_speakers:
            k_pos = speaker_key_positions(m, frames, k.device, k.dtype)
            k = rope_1d(k.reshape(b, frames * m, n, d), k_pos).reshape(b * frames, m, n, d)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        audio_kv: tuple[torch.Tensor, torch.Tensor],
        frames: int,
        attention: AttentionFn,
        query_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T*S, dim], audio_kv from `audio_kv` -> [B, T*S, dim].

        query_positions [B, T*S] (two speakers only; the keys must then come from
        `audio_kv(..., two_speakers=True)`) switches on the 1-D RoPE routing: queries rotate by
        their speaker position, keys by their speaker's centre position.
        """
        b, length, dim = x.shape
        n, d = self.num_heads, self.head_dim
        per_frame = length // frames
        q = self.q_linear(x).view(b, length, n, d)
        k, v = audio_kv
        if query_positions is not None:
            q = rope_1d(q, query_positions)
        q = q.reshape(b * frames, per_frame, n, d)
        out = attention(q, k, v).reshape(b, length, dim)
        return self.proj(out)

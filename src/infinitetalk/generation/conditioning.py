"""Per-window conditioning of the DiT and the per-branch model call used by the sampler.

Follows SPEC.md "One window" (official `generate_infinitetalk`):
* `first_frame_mask`: 4 mask channels, 1 on the first latent frame only;
* `image_condition`: y = concat(mask, VAE latent of [cond frame, frame_num - 1 zero frames]);
* `BranchDenoiser`: one DiT call per guidance branch with the official argument sets
  (cond: prompt + audio; drop_text: negative prompt + audio; uncond: negative prompt + dropped
  audio; drop_audio: prompt + dropped audio), the dropped audio being `zeros_like(audio)[-1:]`,
  one all-zero speaker.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import InputError
from .guidance import Branch
from .sampler import BlockCache

NULL_TEXT = frozenset({"drop_text", "uncond"})
NULL_AUDIO = frozenset({"uncond", "drop_audio"})


def first_frame_mask(latent_frames: int, lat_h: int, lat_w: int, device=None) -> torch.Tensor:
    """[4, T, h, w] float32: ones in latent frame 0, zeros elsewhere (official first-clip mask)."""
    mask = torch.zeros(4, latent_frames, lat_h, lat_w, device=device)
    mask[:, 0] = 1.0
    return mask


@torch.no_grad()
def image_condition(vae, cond: torch.Tensor, frame_num: int, chunk_latents: int = 1) -> torch.Tensor:
    """y [20, T, h, w] float32 for the conditioning frame `cond` [3, 1, H, W] in [-1, 1]."""
    if cond.dim() != 4 or cond.shape[:2] != (3, 1):
        raise ValueError(f"cond must be [3, 1, H, W], got {tuple(cond.shape)}")
    device = next(vae.parameters()).device
    _, _, height, width = cond.shape
    video = torch.zeros(1, 3, frame_num, height, width, device=device)
    video[0, :, :1] = cond.to(device)
    latent = vae.encode(video, chunk_latents=chunk_latents)[0]  # [16, T, h, w]
    mask = first_frame_mask(latent.shape[1], latent.shape[2], latent.shape[3], device=latent.device)
    return torch.cat([mask, latent.float()], dim=0)


@torch.no_grad()
def motion_latent(vae, frames: torch.Tensor, chunk_latents: int = 1) -> torch.Tensor:
    """Clean motion latents [16, 1 + (n-1)//4, h, w] of pixel frames [3, n, H, W] in [-1, 1]."""
    device = next(vae.parameters()).device
    return vae.encode(frames[None].to(device), chunk_latents=chunk_latents)[0].float()


class BranchDenoiser:
    """`denoise_fn(latent, t, branch, cache)` for `sample_window`, for one window.

    context / context_null: prompt and negative-prompt embeddings [L, text_dim];
    clip_fea [1, 257, clip_dim]; y [20, T, h, w]; audio [speakers, frames, 5, layers, C];
    masks [3, h, w] (speaker routing, used with two speakers).
    With a TeaCache slot (`cache` not None) the model must offer the block-cache hook; the
    pipeline checks that before sampling.
    """

    def __init__(self, model, context, context_null, clip_fea, y, audio, masks: Optional[torch.Tensor] = None):
        if audio.dim() != 5:
            raise InputError(f"audio must be [speakers, frames, window, layers, channels]; got {tuple(audio.shape)}.")
        self.model = model
        self.context = context
        self.context_null = context_null
        self.clip_fea = clip_fea
        self.y = y[None]
        self.audio = audio[None]
        self.audio_null = torch.zeros_like(audio)[-1:][None]
        self.masks = masks

    @torch.no_grad()
    def __call__(self, latent: torch.Tensor, t: torch.Tensor, branch: Branch, cache: Optional[BlockCache]) -> torch.Tensor:
        context = self.context_null if branch in NULL_TEXT else self.context
        audio = self.audio_null if branch in NULL_AUDIO else self.audio
        kwargs = {"block_cache": cache} if cache is not None else {}
        out = self.model(
            latent[None], t, context=[context], clip_fea=self.clip_fea, y=self.y, audio=audio,
            ref_target_masks=self.masks, **kwargs,
        )
        return out[0].float()

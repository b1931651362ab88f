"""Per-window conditioning of the DiT: the first-frame mask, `y` and the motion latents.

Follows SPEC.md "One window" (official `generate_infinitetalk`):
* `first_frame_mask`: 4 mask channels, 1 on the first latent frame only;
* `image_condition`: y = concat(mask, VAE latent of [cond frame, frame_num - 1 zero frames]);
* `motion_latent`: the clean latents of the motion frames.

The per-branch DiT calls (cond: prompt + audio; drop_text: negative prompt + audio; uncond:
negative prompt + dropped audio; drop_audio: prompt + dropped audio, the dropped audio being
`zeros_like(audio)[-1:]`) are made by `generation.guided_dit.GuidedDiT`, which also computes the
text/CLIP/audio keys and values once per window.
"""
from __future__ import annotations

import torch


def first_frame_mask(latent_frames: int, lat_h: int, lat_w: int, device=None) -> torch.Tensor:
    """[4, T, h, w] float32: ones in latent frame 0, zeros elsewhere (official first-clip mask)."""
    mask = torch.zeros(4, latent_frames, lat_h, lat_w, device=device)
    mask[:, 0] = 1.0
    return mask


@torch.no_grad()
def image_condition(vae, cond: torch.Tensor, frame_num: int, chunk_latents: int = 1, fast=None) -> torch.Tensor:
    """y [20, T, h, w] float32 for the conditioning frame `cond` [3, 1, H, W] in [-1, 1]."""
    if cond.dim() != 4 or cond.shape[:2] != (3, 1):
        raise ValueError(f"cond must be [3, 1, H, W], got {tuple(cond.shape)}")
    device = next(vae.parameters()).device
    _, _, height, width = cond.shape
    video = torch.zeros(1, 3, frame_num, height, width, device=device)
    video[0, :, :1] = cond.to(device)
    video = video.to(next(vae.parameters()).dtype)
    latent = vae.encode(video, chunk_latents=chunk_latents, fast=fast)[0]  # [16, T, h, w]
    mask = first_frame_mask(latent.shape[1], latent.shape[2], latent.shape[3], device=latent.device)
    return torch.cat([mask, latent.float()], dim=0)


@torch.no_grad()
def motion_latent(vae, frames: torch.Tensor, chunk_latents: int = 1, fast=None) -> torch.Tensor:
    """Clean motion latents [16, 1 + (n-1)//4, h, w] of pixel frames [3, n, H, W] in [-1, 1]."""
    param = next(vae.parameters())
    return vae.encode(frames[None].to(param.device, param.dtype), chunk_latents=chunk_latents, fast=fast)[0].float()

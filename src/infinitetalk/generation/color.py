"""Colour correction of a decoded window towards the reference frame (official option, default 1.0).

Official `match_and_blend_colors` (wan/utils/multitalk_utils.py), reproduced without
scikit-image: both images are mapped from [-1, 1] to [0, 1] and clipped; per frame and per
CIE-Lab channel the frame is shifted/scaled to the reference's mean and (population) standard
deviation (a flat channel is set to the reference mean); back to RGB (clipped to [0, 1]);
blended `(1 - strength) * frame + strength * corrected`; back to [-1, 1].
The sRGB <-> Lab conversion is scikit-image's (sRGB with D65 white, 2 degree observer), computed
here in float64 with torch, a few frames at a time so memory stays small.
"""
from __future__ import annotations

import torch

_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def _matrices(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xyz_from_rgb = torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64, device=device)
    return xyz_from_rgb, torch.linalg.inv(xyz_from_rgb), torch.tensor(_WHITE_D65, dtype=torch.float64, device=device)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], channels last [..., 3] -> CIE-Lab [..., 3] (float64)."""
    xyz_from_rgb, _, white = _matrices(rgb.device)
    rgb = rgb.double()
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = (linear @ xyz_from_rgb.T) / white
    f = torch.where(xyz > 0.008856, torch.pow(xyz.clamp_min(0), 1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE-Lab [..., 3] -> sRGB clipped to [0, 1] [..., 3] (float64)."""
    _, rgb_from_xyz, white = _matrices(lab.device)
    lab = lab.double()
    L, a, b = lab.unbind(-1)
    fy = (L + 16.0) / 116.0
    fx = a / 500.0 + fy
    fz = (fy - b / 200.0).clamp_min(0.0)  # scikit-image sets negative z to 0
    f = torch.stack([fx, fy, fz], dim=-1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787) * white
    linear = xyz @ rgb_from_xyz.T
    rgb = torch.where(linear > 0.0031308, 1.055 * torch.pow(linear.clamp_min(0), 1 / 2.4) - 0.055, linear * 12.92)
    return rgb.clamp(0.0, 1.0)


def match_and_blend_colors(
    video: torch.Tensor, reference: torch.Tensor, strength: float, chunk_frames: int = 1
) -> torch.Tensor:
    """Colour-correct `video` [3, T, H, W] in [-1, 1] towards `reference` [3, H', W'] or [3, 1, H', W'].

    Returns a tensor of the same shape, dtype and device. strength 0 returns `video` unchanged.
    The statistics are per frame, so `chunk_frames` (frames converted at once, in float64) changes
    nothing in the result; one at a time holds the least memory and, on the CPU, ran fastest.
    """
    if strength == 0.0:
        return video
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"colour correction strength must be in [0, 1], got {strength}")
    if reference.dim() == 4:
        reference = reference[:, 0]
    if video.dim() != 4 or video.shape[0] != 3 or reference.dim() != 3 or reference.shape[0] != 3:
        raise ValueError(f"expected video [3, T, H, W] and reference [3, H, W], got {tuple(video.shape)} and "
                         f"{tuple(reference.shape)}")
    ref_lab = rgb_to_lab(((reference.double().permute(1, 2, 0) + 1.0) / 2.0).clamp(0.0, 1.0))
    ref_mean = ref_lab.mean(dim=(0, 1))
    ref_std = ref_lab.std(dim=(0, 1), correction=0)
    out = torch.empty_like(video)
    for s in range(0, video.shape[1], chunk_frames):
        src = ((video[:, s : s + chunk_frames].double().permute(1, 2, 3, 0) + 1.0) / 2.0).clamp(0.0, 1.0)
        lab = rgb_to_lab(src)  # [t, H, W, 3]
        mean = lab.mean(dim=(1, 2), keepdim=True)
        std = lab.std(dim=(1, 2), keepdim=True, correction=0)
        matched = (lab - mean) * (ref_std / std) + ref_mean
        matched = torch.where(std == 0, ref_mean.expand_as(lab), matched)
        corrected = lab_to_rgb(matched)
        blended = (1 - strength) * src + strength * corrected
        out[:, s : s + chunk_frames] = (blended * 2.0 - 1.0).permute(3, 0, 1, 2).to(video.dtype)
    return out

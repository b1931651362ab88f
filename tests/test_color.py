"""Colour correction: sRGB<->Lab against textbook values, Lab statistics matched, strength blend."""
import pytest
import torch

from infinitetalk.generation.color import lab_to_rgb, match_and_blend_colors, rgb_to_lab


def test_lab_reference_values():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    lab = rgb_to_lab(rgb)
    # sRGB primaries in CIE-Lab (D65, 2 degrees), as given by scikit-image / colour references
    expected = torch.tensor([[100.0, 0.0, 0.0], [53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793],
                             [32.2970, 79.1875, -107.8602], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(lab, expected, atol=1e-2), lab  # (scikit-image matrix: white a,b ~ 5e-3)


def test_round_trip():
    rgb = torch.rand(50, 40, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lab_to_rgb(rgb_to_lab(rgb)), rgb.double(), atol=1e-6)


def _video(seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, 1, 24, 32, generator=g) * 0.6 - 0.3
    return (base + 0.1 * torch.randn(3, 5, 24, 32, generator=g)).clamp(-1, 1)


def test_full_strength_matches_reference_statistics():
    video = _video(0) * 0.5 + torch.tensor([0.3, -0.2, 0.1])[:, None, None, None]  # colour cast
    reference = _video(1)[:, 0]
    out = match_and_blend_colors(video, reference, 1.0)
    assert out.shape == video.shape and out.dtype == video.dtype
    ref_lab = rgb_to_lab(((reference.permute(1, 2, 0) + 1) / 2))
    for t in range(video.shape[1]):
        lab = rgb_to_lab(((out[:, t].permute(1, 2, 0) + 1) / 2))
        assert torch.allclose(lab.mean(dim=(0, 1)), ref_lab.mean(dim=(0, 1)), atol=0.05)
        assert torch.allclose(lab.std(dim=(0, 1), correction=0), ref_lab.std(dim=(0, 1), correction=0), atol=0.05)
    before = rgb_to_lab(((video[:, 0].permute(1, 2, 0) + 1) / 2)).mean(dim=(0, 1))
    assert (before - ref_lab.mean(dim=(0, 1))).abs().max() > 1.0  # it did have to move


def test_strength_blend_and_zero():
    video, reference = _video(2), _video(3)[:, 0]
    assert match_and_blend_colors(video, reference, 0.0) is video
    full = match_and_blend_colors(video, reference, 1.0)
    half = match_and_blend_colors(video, reference[:, None], 0.5)
    assert torch.allclose(half, (video.clamp(-1, 1) + full) / 2, atol=1e-6)
    with pytest.raises(ValueError):
        match_and_blend_colors(video, reference, 1.5)


def test_flat_channel_takes_reference_mean():
    video = torch.zeros(3, 2, 8, 8)  # flat grey: every Lab channel constant
    reference = _video(4)[:, 0]
    out = match_and_blend_colors(video, reference, 1.0)
    ref_mean = rgb_to_lab(((reference.permute(1, 2, 0) + 1) / 2)).mean(dim=(0, 1))
    got = rgb_to_lab(((out[:, 0].permute(1, 2, 0) + 1) / 2))
    assert torch.allclose(got[0, 0], ref_mean, atol=1e-3)
    assert torch.allclose(got.std(dim=(0, 1)), torch.zeros(3, dtype=torch.float64), atol=1e-6)


def test_frames_at_a_time_give_the_same_video():
    video, reference = _video(5), _video(6)[:, 0]
    one = match_and_blend_colors(video, reference, 0.7)
    for chunk in (2, 4, 16):
        assert torch.equal(match_and_blend_colors(video, reference, 0.7, chunk_frames=chunk), one)

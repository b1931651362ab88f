"""The one-window sampler with small deterministic fake denoisers (the real DiT is wired later)."""
import numpy as np
import pytest
import torch

from infinitetalk.config import GenerationConfig
from infinitetalk.generation.guidance import cfg_three_pass
from infinitetalk.generation.sampler import (
    TEACACHE_COEFFICIENTS, draw_window_noise, sample_window,
)
from infinitetalk.generation.schedule import sampling_timesteps
from infinitetalk.progress import ProgressTracker

SHAPE = (16, 6, 4, 6)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


@pytest.mark.parametrize("text_scale", [1.0, 5.0])
def test_velocity_denoiser_lands_on_x0(text_scale):
    x0, noise = _data()
    cfg = GenerationConfig(sample_steps=12, text_guide_scale=text_scale, audio_guide_scale=4.0)
    calls = []

    def denoise(latent, t, branch, cache):
        calls.append(branch)
        return noise - x0  # exact flow-matching velocity, identical for every branch

    out = sample_window(denoise, noise, x0[:, :1], 1, cfg, torch.Generator().manual_seed(0), None, first_window=True)
    assert torch.allclose(out, x0, atol=2e-5), (out - x0).abs().max()
    assert torch.equal(out[:, :1], x0[:, :1])
    assert len(calls) == 12 * (2 if text_scale == 1.0 else 3)
    assert set(calls) == ({"cond", "drop_audio"} if text_scale == 1.0 else {"cond", "drop_text", "uncond"})


def test_motion_latents_overwritten_and_noise_untouched():
    x0, noise = _data(1)
    motion = torch.full((16, 3, 4, 6), 0.5)
    keep = noise.clone()
    seen = []

    def denoise(latent, t, branch, cache):
        seen.append(latent[:, :3].clone())
        return latent * 0.3 + t / 1000  # depends on the latent

    out = sample_window(denoise, noise, motion, 3, GenerationConfig(sample_steps=5), None, None, first_window=False)
    assert torch.equal(noise, keep)
    assert all(torch.equal(s, motion) for s in seen)
    assert torch.equal(out[:, :3], motion)
    assert not torch.equal(out[:, 3:], noise[:, 3:])


def _official_loop(denoise, noise, motion, steps, shift, t_scale, a_scale, first):
    """Written-out official loop (wan/multitalk.py) with the global RNG, incl. the re-noising."""
    ts = [torch.tensor([t]) for t in list(np.linspace(1000, 1, steps, dtype=np.float32)) + [0.0]]
    ts = [shift * (t / 1000) / (1 + (shift - 1) * (t / 1000)) * 1000 for t in ts]
    latent = noise
    n = motion.shape[1]

    def add_noise(x, eps, t):
        t = t.float() / 1000
        return (1 - t) * x + t * eps

    if not first:
        latent[:, :n] = add_noise(motion, torch.randn_like(motion).contiguous(), ts[0])
    for i in range(steps):
        latent[:, :n] = motion
        c = denoise(latent, ts[i], "cond", None)
        dt_ = denoise(latent, ts[i], "drop_text", None)
        u = denoise(latent, ts[i], "uncond", None)
        pred = -(u + t_scale * (c - dt_) + a_scale * (dt_ - u))
        dt = (ts[i] - ts[i + 1]) / 1000
        latent = latent + pred * dt[:, None, None, None]
        if not first:
            latent[:, :n] = add_noise(motion, torch.randn_like(motion).contiguous(), ts[i + 1])
        latent[:, :n] = motion
    return latent


@pytest.mark.parametrize("first", [True, False])
def test_rng_consumption_matches_official_order(first):
    seed = 1234
    motion = torch.randn(16, 1 if first else 3, 4, 6, generator=torch.Generator().manual_seed(7))
    weights = {"cond": 0.9, "drop_text": 0.7, "uncond": 0.4}

    def denoise(latent, t, branch, cache):
        return torch.tanh(latent) * weights[branch] + t / 1000

    # official: global RNG, noise drawn per window, then the loop
    torch.manual_seed(seed)
    torch.randn(SHAPE)  # an earlier window's noise
    ref_noise = torch.randn(SHAPE, dtype=torch.float32)
    ref = _official_loop(denoise, ref_noise.clone(), motion, 6, 7.0, 5.0, 4.0, first)
    ref_next = torch.randn(5)

    gen = torch.Generator().manual_seed(seed)
    draw_window_noise(SHAPE, gen)
    noise = draw_window_noise(SHAPE, gen)
    assert torch.equal(noise, ref_noise)
    cfg = GenerationConfig(sample_steps=6, shift=7.0)
    out = sample_window(denoise, noise, motion, motion.shape[1], cfg, gen, None, first_window=first)
    assert torch.equal(out, ref)
    assert torch.equal(torch.randn(5, generator=gen), ref_next)  # same number of draws consumed


def test_first_window_draws_nothing():
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    x0, noise = _data()
    sample_window(lambda l, t, b, c: l, noise, x0[:, :1], 1, GenerationConfig(sample_steps=3), gen, None,
                  first_window=True)
    assert torch.equal(gen.get_state(), state)


class _CachedModel:
    """Fake DiT honouring the BlockCache contract: tokens = latent, blocks add a branch-specific
    residual depending on the latent and t, head = identity."""

    def __init__(self):
        self.block_runs = {}

    def __call__(self, latent, t, branch, cache):
        x = latent.clone()
        if cache is not None and cache.reuse:
            return x + cache.residual
        self.block_runs[branch] = self.block_runs.get(branch, 0) + 1
        out = x + (1.0 if branch == "cond" else -1.0) * torch.sin(x) * (t / 1000)
        if cache is not None:
            cache.residual = out - x
        return out


def _modulation(rel_step):
    """e0 whose relative L1 change between consecutive steps is exactly `rel_step`."""
    ts = {}

    def fn(t):
        k = ts.setdefault(float(t.item()), len(ts))
        return torch.full((1, 6, 8), (1 + rel_step) ** k, dtype=torch.float64)

    return fn


@pytest.mark.parametrize("text_scale", [1.0, 5.0])
def test_teacache_pattern_per_branch(text_scale):
    steps, thresh, rel = 14, 0.2, 1e-3
    cfg = GenerationConfig(sample_steps=steps, text_guide_scale=text_scale, use_teacache=True, teacache_thresh=thresh)
    # expected pattern from the official rule (ret steps 5, accumulate polyval, reset on compute) + last step
    inc = float(np.polyval(TEACACHE_COEFFICIENTS[480], rel))
    expected, acc = [], 0.0
    for i in range(steps):
        if i < 5 or i == steps - 1:
            expected.append(True); acc = 0.0
            continue
        acc += inc
        compute = acc >= thresh
        acc = 0.0 if compute else acc
        expected.append(compute)
    assert not all(expected) and all(expected[:5]) and expected[-1]
    x0, noise = _data(3)
    model = _CachedModel()
    log = {}
    out = sample_window(model, noise, x0[:, :1], 1, cfg, None, None, first_window=True,
                        timestep_modulation=_modulation(rel), teacache_log=log)
    branches = ("cond", "drop_audio") if text_scale == 1.0 else ("cond", "drop_text", "uncond")
    assert set(log) == set(branches)
    for b in branches:
        assert log[b] == expected, (b, log[b])
        assert model.block_runs[b] == sum(expected)
    # with TeaCache off every step runs and the result differs only by the skips
    plain = sample_window(_CachedModel(), noise, x0[:, :1], 1, cfg.with_(use_teacache=False), None, None,
                          first_window=True)
    assert out.shape == plain.shape and torch.isfinite(out).all()
    assert (out - plain).abs().max() < 0.5 * plain.abs().max()


def test_teacache_reuses_own_branch_residual():
    """On a skipped step each branch adds its own cached residual (no mixing between branches)."""
    cfg = GenerationConfig(sample_steps=8, text_guide_scale=5.0, use_teacache=True, teacache_thresh=1e9)
    x0, noise = _data(4)
    seen = []

    def model(latent, t, branch, cache):
        if cache.reuse:
            seen.append((branch, cache.residual[0, 0, 0, 0].item()))
            return latent + cache.residual
        cache.residual = torch.full_like(latent, {"cond": 1.0, "drop_text": 2.0, "uncond": 3.0}[branch])
        return latent + cache.residual

    sample_window(model, noise, x0[:, :1], 1, cfg, None, None, first_window=True, timestep_modulation=_modulation(0.01))
    assert seen and all(v == {"cond": 1.0, "drop_text": 2.0, "uncond": 3.0}[b] for b, v in seen)
    assert len(seen) == 3 * (8 - 5 - 1)  # steps 5, 6 skipped; 0-4 and the last computed


def test_progress_and_errors():
    events = []
    x0, noise = _data()
    sample_window(lambda l, t, b, c: l, noise, x0[:, :1], 1, GenerationConfig(sample_steps=4), None,
                  ProgressTracker(events.append), first_window=True)
    assert [(e.kind, e.step, e.steps) for e in events] == [("step_finished", i, 4) for i in range(1, 5)]
    with pytest.raises(ValueError):
        sample_window(lambda l, t, b, c: l, noise, x0[:, :2], 1, GenerationConfig(sample_steps=2), None, None,
                      first_window=True)
    with pytest.raises(ValueError):
        sample_window(lambda l, t, b, c: l, noise, x0[:, :1], 1, GenerationConfig(use_teacache=True), None, None,
                      first_window=True)


def test_three_pass_combination_used():
    """One step from t=1000 to t=0 with constant branch outputs gives noise - cfg(...)."""
    x0, noise = _data(5)
    preds = {"cond": torch.full(SHAPE, 1.0), "drop_text": torch.full(SHAPE, 0.25), "uncond": torch.full(SHAPE, -0.5)}
    out = sample_window(lambda l, t, b, c: preds[b], noise, x0[:, :1], 1, GenerationConfig(sample_steps=1), None,
                        None, first_window=True)
    t = sampling_timesteps(1, 7.0)
    assert t.tolist() == [1000.0, 0.0]
    expected = noise - cfg_three_pass(preds["cond"], preds["drop_text"], preds["uncond"], 5.0, 4.0)
    assert torch.allclose(out[:, 1:], expected[:, 1:])

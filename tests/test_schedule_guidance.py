"""Timesteps (official float32 recipe, fixture t values) and the CFG / APG formulas."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from infinitetalk.generation.guidance import (
    Guidance, MomentumBuffer, adaptive_projected_guidance, branches_for, cfg_three_pass, cfg_two_pass,
)
from infinitetalk.generation.schedule import sampling_timesteps, step_size


def _official_timesteps(steps, shift):
    """Written-out official recipe: list of [1] float32 tensors, transformed one by one."""
    ts = list(np.linspace(1000, 1, steps, dtype=np.float32)) + [0.0]
    out = []
    for t in ts:
        t = torch.tensor([t]) / 1000
        t = shift * t / (1 + (shift - 1) * t)
        out.append(t * 1000)
    return torch.cat(out)


@pytest.mark.parametrize("steps,shift", [(40, 7), (40, 11.0), (8, 2.0), (1, 5.0), (4, 1.0)])
def test_timesteps_bitwise(steps, shift):
    t = sampling_timesteps(steps, shift)
    assert t.dtype == torch.float32 and t.shape == (steps + 1,)
    assert torch.equal(t, _official_timesteps(steps, shift))
    assert t[0].item() == 1000.0 and t[-1].item() == 0.0
    assert torch.all(t[:-1] > t[1:])
    assert step_size(t, 0).shape == (1,)


def test_fixture_timesteps(parity_dir):
    """The DiT fixtures took t from the shifted schedule; the json gives the recipe."""
    for case in sorted((parity_dir / "dit" / "cases").glob("*.json")):
        info = json.loads(case.read_text())
        recipe = info["t_recipe"]
        got = sampling_timesteps(recipe["steps"], recipe["shift"])[recipe["index"]]
        expected = load_file(str(case.with_suffix(".safetensors")))["t"]
        print(f"[parity] {case.stem} t: got {got.item()!r} expected {expected.item()!r}")
        assert got.item() == expected.item()


def test_cfg_formulas():
    g = torch.Generator().manual_seed(0)
    c, dt, u, da = (torch.randn(4, 3, 2, 2, generator=g) for _ in range(4))
    assert torch.equal(cfg_two_pass(c, da, 4.0), da + 4.0 * (c - da))
    assert torch.equal(cfg_three_pass(c, dt, u, 5.0, 4.0), u + 5.0 * (c - dt) + 4.0 * (dt - u))
    assert branches_for(1.0) == ("cond", "drop_audio")
    assert branches_for(5.0) == ("cond", "drop_text", "uncond")
    # Scale 1 of everything returns the conditional prediction.
    assert torch.allclose(Guidance(1.0, 1.0).combine({"cond": c, "drop_audio": da}), c)
    assert torch.allclose(Guidance(1.0001, 1.0).combine({"cond": c, "drop_text": dt, "uncond": u}), c, atol=1e-3)
    g3 = Guidance(5.0, 4.0).combine({"cond": c, "drop_text": dt, "uncond": u})
    assert torch.equal(g3, cfg_three_pass(c, dt, u, 5.0, 4.0))


def test_apg_projection_and_cap():
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(16, 3, 4, 4, generator=g)
    diff = torch.randn(16, 3, 4, 4, generator=g) * 100
    out = adaptive_projected_guidance(diff, cond, None, norm_threshold=55.0)
    # orthogonal to cond, and the norm capped at 55 before projection
    assert abs(torch.sum(out.double() * cond.double()).item()) < 1e-6 * out.norm().item() * cond.norm().item()
    assert out.norm().item() <= 55.0 + 1e-3
    small = diff / 1000
    out_small = adaptive_projected_guidance(small, cond, None, norm_threshold=55.0)
    par = (small.double() * cond.double()).sum() / cond.double().norm() ** 2 * cond.double()
    assert torch.allclose(out_small.double(), small.double() - par, atol=1e-6)


def test_apg_momentum_and_guidance_formula():
    g = torch.Generator().manual_seed(2)
    cond, dt, u = (torch.randn(16, 2, 4, 4, generator=g) for _ in range(3))
    buf = MomentumBuffer(-0.75)
    buf.update(cond)
    buf.update(dt)
    assert torch.allclose(buf.running_average, dt - 0.75 * cond)
    guid = Guidance(5.0, 4.0, use_apg=True, apg_momentum=-0.75, apg_norm_threshold=55.0)
    tb, ab = MomentumBuffer(-0.75), MomentumBuffer(-0.75)
    for _ in range(2):  # the buffers carry over between steps
        got = guid.combine({"cond": cond, "drop_text": dt, "uncond": u})
        ref = (cond + 4.0 * adaptive_projected_guidance(cond - dt, cond, tb, norm_threshold=55.0)
               + 3.0 * adaptive_projected_guidance(dt - u, cond, ab, norm_threshold=55.0))
        assert torch.equal(got, ref)
    two = Guidance(1.0, 4.0, use_apg=True)
    ab2 = MomentumBuffer(-0.75)
    got = two.combine({"cond": cond, "drop_audio": u})
    assert torch.equal(got, cond + 3.0 * adaptive_projected_guidance(cond - u, cond, ab2, norm_threshold=55.0))


def test_generation_config_defaults_and_presets():
    from infinitetalk.config import DEFAULT_NEGATIVE_PROMPT, PRESETS, GenerationConfig
    from infinitetalk.errors import InputError

    cfg = GenerationConfig()
    assert (cfg.frame_num, cfg.motion_frame, cfg.sample_steps) == (81, 9, 40)
    assert (cfg.text_guide_scale, cfg.audio_guide_scale, cfg.color_correction_strength) == (5.0, 4.0, 1.0)
    assert cfg.resolved_shift == 7.0 and GenerationConfig(size=720).resolved_shift == 11.0
    assert cfg.with_(shift=3).resolved_shift == 3.0
    assert cfg.latent_frames == 21 and cfg.motion_latent_frames == 3 and not cfg.two_pass_guidance
    assert cfg.negative_prompt == DEFAULT_NEGATIVE_PROMPT and DEFAULT_NEGATIVE_PROMPT.startswith("bright tones")
    for name in PRESETS:
        GenerationConfig.from_preset(name)
    lora = GenerationConfig.from_preset("fusionx", seed=7)
    assert lora.sample_steps == 8 and lora.two_pass_guidance and lora.seed == 7
    fast = GenerationConfig.from_preset("fast")
    assert (fast.sample_steps, fast.resolved_shift, fast.text_guide_scale, fast.audio_guide_scale) == (4, 2.0, 1.0, 2.0)
    for bad in [dict(size=540), dict(mode="loop"), dict(frame_num=80), dict(motion_frame=81),
                dict(color_correction_strength=2.0), dict(sample_steps=0), dict(max_frames=0)]:
        with pytest.raises(InputError):
            GenerationConfig(**bad)
    with pytest.raises(InputError):
        cfg.with_(nonsense=1)
    with pytest.raises(InputError):
        GenerationConfig.from_preset("warp")

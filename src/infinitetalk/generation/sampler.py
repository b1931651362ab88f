"""Denoise one window: flow-matching Euler loop with guidance, motion latents and TeaCache.

The DiT is injected as `denoise_fn(latent, t, branch, cache) -> prediction`, so this loop is
model-independent (see `DenoiseFn`). What it reproduces from the official `generate_infinitetalk`:

* timesteps and Euler update (`schedule.py`): latent <- latent + (-pred) * (t_i - t_{i+1}) / 1000;
* before every model call the first `n_motion_latent_frames` latent frames are overwritten
  with the clean motion latents, and again after the last step;
* random numbers: in every window but the first, the official loop draws
  `randn_like(motion_latent)` once before the loop and once after every step (it re-noises the
  motion frames and then overwrites them, so only the RNG consumption matters). We draw the
  same tensors from `generator` so a seed gives the official noise in every later window.
  The window's initial noise is drawn by the caller (`draw_window_noise`) before this.
* TeaCache (official `multitalk_model.py`, ret-steps variant): per branch, accumulate the
  polynomial-rescaled relative L1 change of the timestep modulation e0; skip the transformer
  blocks (reuse the branch's cached block residual) while it stays under the threshold.
  Unlike the official code, whose call counter assumes three passes per step, each branch has
  its own accumulator, so two-pass guidance is handled correctly. The first 5 steps and the
  last step are always computed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import numpy as np
import torch

from infinitetalk.generation.guidance import Branch, Guidance
from infinitetalk.generation.schedule import sampling_timesteps, step_size
from infinitetalk.progress import ProgressTracker

log = logging.getLogger(__name__)

TEACACHE_COEFFICIENTS: dict[int, tuple[float, ...]] = {
    480: (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    720: (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
}
"""Official TeaCache polynomial (highest power first) per size, for the e0 ("ret steps") variant."""

TEACACHE_WARMUP_STEPS = 5
"""Steps always computed at the start of a window (official ret_steps = 5 steps)."""


@dataclass
class BlockCache:
    """Per-branch TeaCache slot handed to `denoise_fn`.

    Contract for the model side: when `reuse` is True, skip the transformer blocks and use
    `x = embedded_tokens + residual`; otherwise run the blocks and store
    `residual = tokens_after_blocks - tokens_before_blocks`. Head and unpatchify run always.
    """

    reuse: bool = False
    residual: Optional[torch.Tensor] = None


class DenoiseFn(Protocol):
    """The model side of the sampler: one DiT evaluation for one guidance branch.

    `latent` [16, T, h, w] float32; `t` the timestep, float32 tensor of shape [1];
    `branch` one of "cond", "drop_text", "uncond", "drop_audio" (which context/audio to use);
    `cache` None when TeaCache is off, else the branch's BlockCache (see its contract).
    Returns the velocity prediction with the shape of `latent`.
    """

    def __call__(
        self, latent: torch.Tensor, t: torch.Tensor, branch: Branch, cache: Optional[BlockCache]
    ) -> torch.Tensor: ...


class StepFn(Protocol):
    """Every guidance branch of one step at once: (latent, t, {branch: BlockCache or None}) ->
    {branch: prediction}. The caches' `reuse` flags are already decided for the step."""

    def __call__(
        self, latent: torch.Tensor, t: torch.Tensor, caches: dict[str, Optional[BlockCache]]
    ) -> dict[str, torch.Tensor]: ...


@dataclass
class TeaCacheState:
    """Skip decisions of one window (fresh per window)."""

    coefficients: tuple[float, ...]
    threshold: float
    steps: int
    accumulated: dict = field(default_factory=dict)
    previous: dict = field(default_factory=dict)
    slots: dict = field(default_factory=dict)
    computed: dict = field(default_factory=dict)

    def slot(self, branch: str, step: int, modulation: torch.Tensor) -> BlockCache:
        """Decide for `branch` at `step` whether the blocks run; return its BlockCache."""
        slot = self.slots.setdefault(branch, BlockCache())
        prev = self.previous.get(branch)
        if step < TEACACHE_WARMUP_STEPS or step == self.steps - 1 or prev is None or slot.residual is None:
            compute = True
            self.accumulated[branch] = 0.0
        else:
            rel = ((modulation - prev).abs().mean() / prev.abs().mean()).item()
            self.accumulated[branch] = self.accumulated.get(branch, 0.0) + float(np.polyval(self.coefficients, rel))
            compute = self.accumulated[branch] >= self.threshold
            if compute:
                self.accumulated[branch] = 0.0
        self.previous[branch] = modulation.clone()
        slot.reuse = not compute
        self.computed.setdefault(branch, []).append(compute)
        return slot


def draw_window_noise(
    shape: tuple[int, ...], generator: Optional[torch.Generator], device: Optional[torch.device | str] = None
) -> torch.Tensor:
    """The window's initial noise, float32 (official: torch.randn(16, T, h, w) once per window)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=device)


def teacache_coefficients(size: int) -> tuple[float, ...]:
    """Official coefficients of the 480 or 720 bucket set."""
    if size not in TEACACHE_COEFFICIENTS:
        raise ValueError(f"TeaCache has coefficients for sizes 480 and 720 only, got {size}")
    return TEACACHE_COEFFICIENTS[size]


def sample_window(
    denoise_fn: DenoiseFn,
    noise: torch.Tensor,
    motion_latent: torch.Tensor,
    n_motion_latent_frames: int,
    cfg,
    generator: Optional[torch.Generator] = None,
    progress: Optional[ProgressTracker] = None,
    *,
    first_window: bool,
    timestep_modulation: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    teacache_log: Optional[dict] = None,
    step_fn: Optional[StepFn] = None,
) -> torch.Tensor:
    """Denoise one window and return its clean latent [16, T, h, w] (float32).

    `noise`: the window's initial noise (not modified). `motion_latent`: [16, n, h, w] clean
    latents of the motion frames, n = `n_motion_latent_frames`. `cfg`: a GenerationConfig
    (sample_steps, resolved_shift, guidance scales, APG and TeaCache fields, size).
    `generator`: the job's RNG (None = torch's global RNG); consumed only when
    `first_window` is False (1 + steps motion-shaped draws). `timestep_modulation(t)` returns
    the DiT's e0 for timestep t; required when cfg.use_teacache. `teacache_log`, if given, is
    filled with {branch: [computed? per step]}. `step_fn(latent, t, caches)`, if given, makes
    every branch's prediction of a step in one call (after every TeaCache decision of the step),
    e.g. the branches on different ranks (`runtime.parallel`); `denoise_fn` is then unused.
    """
    if motion_latent.shape[1] != n_motion_latent_frames:
        raise ValueError(
            f"motion_latent has {motion_latent.shape[1]} latent frames, expected {n_motion_latent_frames}"
        )
    if cfg.use_teacache and timestep_modulation is None:
        raise ValueError("TeaCache needs timestep_modulation (the DiT's e0 for a timestep)")
    steps = cfg.sample_steps
    timesteps = sampling_timesteps(steps, cfg.resolved_shift, cfg.num_train_timesteps, device=noise.device)
    guidance = Guidance.from_config(cfg)
    teacache = (
        TeaCacheState(teacache_coefficients(cfg.size), cfg.teacache_thresh, steps) if cfg.use_teacache else None
    )
    latent = noise.clone()
    motion = motion_latent.to(device=latent.device, dtype=latent.dtype)
    n = n_motion_latent_frames

    def consume_motion_noise() -> None:
        # Official: randn_like(motion) re-noises the motion frames, then they are overwritten.
        torch.randn(motion.shape, generator=generator, dtype=motion.dtype, device=motion.device)

    if not first_window:
        consume_motion_noise()
    for i in range(steps):
        t = timesteps[i : i + 1]
        latent[:, :n] = motion
        modulation = timestep_modulation(t) if teacache is not None else None
        preds = {}
        if step_fn is not None:
            caches = {b: teacache.slot(b, i, modulation) if teacache is not None else None for b in guidance.branches}
            preds = step_fn(latent, t, caches)
        for branch in () if step_fn is not None else guidance.branches:
            cache = teacache.slot(branch, i, modulation) if teacache is not None else None
            preds[branch] = denoise_fn(latent, t, branch, cache)
        pred = -guidance.combine(preds)
        latent = latent + pred * step_size(timesteps, i, cfg.num_train_timesteps)
        if not first_window:
            consume_motion_noise()
        latent[:, :n] = motion
        if progress is not None:
            progress.step(i + 1, steps)
    if teacache is not None:
        skipped = sum(not c for v in teacache.computed.values() for c in v)
        log.debug("TeaCache skipped %d of %d model evaluations", skipped, steps * len(guidance.branches))
        if teacache_log is not None:
            teacache_log.update(teacache.computed)
    return latent

"""Sampling timesteps of the flow-matching Euler sampler (official float32 recipe).

Official (`wan/multitalk.py`): `np.linspace(1000, 1, steps, dtype=float32)` plus a final 0,
each value as a float32 tensor, then `timestep_transform`: t/1000, t' = shift*t/(1+(shift-1)*t),
times 1000, all in float32 torch arithmetic in that order. The Euler step uses
dt = (t_i - t_{i+1}) / 1000 (float32).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def shift_timesteps(t: torch.Tensor, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Apply the flow shift t' = shift*t/(1+(shift-1)*t) on the 0..1 scale (float32, official order)."""
    t = t / num_train_timesteps
    t = shift * t / (1 + (shift - 1) * t)
    return t * num_train_timesteps


def sampling_timesteps(
    steps: int,
    shift: float,
    num_train_timesteps: int = 1000,
    device: Optional[torch.device | str] = None,
) -> torch.Tensor:
    """The `steps + 1` shifted timesteps, float32, from 1000 down to exactly 0.

    Step i evaluates the model at `t[i]` (pass `t[i:i+1]`, shape [1]) and moves the latent by
    `-pred * (t[i] - t[i+1]) / num_train_timesteps`.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    base = np.linspace(num_train_timesteps, 1, steps, dtype=np.float32)
    t = torch.from_numpy(np.concatenate([base, np.zeros(1, dtype=np.float32)]))
    t = shift_timesteps(t, shift, num_train_timesteps)
    return t.to(device) if device is not None else t


def step_size(timesteps: torch.Tensor, i: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """dt of step i as a [1] float32 tensor: (t[i] - t[i+1]) / num_train_timesteps."""
    return (timesteps[i : i + 1] - timesteps[i + 1 : i + 2]) / num_train_timesteps

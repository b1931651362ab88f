"""Classifier-free guidance of InfiniteTalk: 2-pass / 3-pass CFG and APG.

Branches (the model calls of one step, official argument sets):
  "cond"       prompt + audio
  "drop_text"  negative prompt + audio
  "uncond"     negative prompt + no audio (zeros_like(audio)[-1:])
  "drop_audio" prompt + no audio
With text scale 1 the official loop makes two passes (cond, drop_audio), else three
(cond, drop_text, uncond). Formulas and evaluation order follow `wan/multitalk.py`; APG
(adaptive projected guidance, arXiv 2410.02416) follows `wan/utils/multitalk_utils.py`:
momentum running average, L2 norm cap over the whole tensor, and the component orthogonal to
the conditional prediction (projection in float64).
"""
from __future__ import annotations

import math
from typing import Literal, Mapping, Optional, Union

import torch

Branch = Literal["cond", "drop_text", "uncond", "drop_audio"]
BRANCHES: tuple[Branch, ...] = ("cond", "drop_text", "uncond", "drop_audio")
NULL_TEXT_BRANCHES: frozenset[Branch] = frozenset({"drop_text", "uncond"})  # the negative prompt
NULL_AUDIO_BRANCHES: frozenset[Branch] = frozenset({"uncond", "drop_audio"})  # zeros_like(audio)[-1:]
TWO_PASS: tuple[Branch, ...] = ("cond", "drop_audio")
THREE_PASS: tuple[Branch, ...] = ("cond", "drop_text", "uncond")


def branches_for(text_guide_scale: float) -> tuple[Branch, ...]:
    """The model passes of one step: two when text guidance is 1 (official `math.isclose`), else three."""
    return TWO_PASS if math.isclose(text_guide_scale, 1.0) else THREE_PASS


def cfg_two_pass(cond: torch.Tensor, drop_audio: torch.Tensor, audio_scale: float) -> torch.Tensor:
    """drop_audio + a * (cond - drop_audio)."""
    return drop_audio + audio_scale * (cond - drop_audio)


def cfg_three_pass(
    cond: torch.Tensor, drop_text: torch.Tensor, uncond: torch.Tensor, text_scale: float, audio_scale: float
) -> torch.Tensor:
    """uncond + t * (cond - drop_text) + a * (drop_text - uncond)."""
    return uncond + text_scale * (cond - drop_text) + audio_scale * (drop_text - uncond)


class MomentumBuffer:
    """Running average r <- update + momentum * r (r starts at 0), as the official APG buffer."""

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.running_average: Union[torch.Tensor, float] = 0

    def update(self, value: torch.Tensor) -> None:
        self.running_average = value + self.momentum * self.running_average


def _all_but_batch(x: torch.Tensor) -> list[int]:
    return [-1, -2, -3, -4][: min(4, x.dim())]


def project(v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split v0 into its components parallel and orthogonal to v1 (float64 math, v0's dtype out)."""
    dims = _all_but_batch(v0)
    dtype = v0.dtype
    v0, v1 = v0.double(), v1.double()
    v1 = torch.nn.functional.normalize(v1, dim=dims)
    parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
    orthogonal = v0 - parallel
    return parallel.to(dtype), orthogonal.to(dtype)


def adaptive_projected_guidance(
    diff: torch.Tensor,
    pred_cond: torch.Tensor,
    momentum_buffer: Optional[MomentumBuffer] = None,
    eta: float = 0.0,
    norm_threshold: float = 55.0,
) -> torch.Tensor:
    """APG update for one guidance difference: momentum, norm cap, orthogonal projection."""
    if momentum_buffer is not None:
        momentum_buffer.update(diff)
        diff = momentum_buffer.running_average
    if norm_threshold > 0:
        ones = torch.ones_like(diff)
        norm = diff.norm(p=2, dim=_all_but_batch(diff), keepdim=True)
        diff = diff * torch.minimum(ones, norm_threshold / norm)
    parallel, orthogonal = project(diff, pred_cond)
    return orthogonal + eta * parallel


class Guidance:
    """Combines the branch predictions of one step into the velocity used by the Euler step.

    Create one per window: APG momentum buffers start fresh each window, as officially.
    """

    def __init__(
        self,
        text_guide_scale: float,
        audio_guide_scale: float,
        use_apg: bool = False,
        apg_momentum: float = -0.75,
        apg_norm_threshold: float = 55.0,
    ):
        self.text_scale = text_guide_scale
        self.audio_scale = audio_guide_scale
        self.use_apg = use_apg
        self.norm_threshold = apg_norm_threshold
        self.branches = branches_for(text_guide_scale)
        self._text_buffer = MomentumBuffer(apg_momentum) if use_apg else None
        self._audio_buffer = MomentumBuffer(apg_momentum) if use_apg else None

    @classmethod
    def from_config(cls, cfg) -> "Guidance":
        """From a GenerationConfig (or anything with the same field names)."""
        return cls(cfg.text_guide_scale, cfg.audio_guide_scale, cfg.use_apg, cfg.apg_momentum, cfg.apg_norm_threshold)

    @property
    def two_pass(self) -> bool:
        return self.branches == TWO_PASS

    def combine(self, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Guided prediction from {branch: prediction} (the keys of `self.branches`)."""
        cond = preds["cond"]
        if self.two_pass:
            if self.use_apg:
                update = adaptive_projected_guidance(
                    cond - preds["drop_audio"], cond, self._audio_buffer, norm_threshold=self.norm_threshold
                )
                return cond + (self.audio_scale - 1) * update
            return cfg_two_pass(cond, preds["drop_audio"], self.audio_scale)
        drop_text, uncond = preds["drop_text"], preds["uncond"]
        if self.use_apg:
            text_update = adaptive_projected_guidance(
                cond - drop_text, cond, self._text_buffer, norm_threshold=self.norm_threshold
            )
            audio_update = adaptive_projected_guidance(
                drop_text - uncond, cond, self._audio_buffer, norm_threshold=self.norm_threshold
            )
            return cond + (self.text_scale - 1) * text_update + (self.audio_scale - 1) * audio_update
        return cfg_three_pass(cond, drop_text, uncond, self.text_scale, self.audio_scale)

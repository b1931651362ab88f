"""`GuidedDiT`: one window's denoiser over the guidance branches of `generation.guidance`.

Per window the text/CLIP and audio keys and values of every block are computed once
(`InfiniteTalkDiT.precompute_conditions`) and reused at every step, and, when asked, the
guidance branches of a step run as one batched forward where they share the audio layout (one
speaker: all branches; two speakers: the branches with audio, then those without, since a
dropped audio is a one-speaker input with another token count).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import InternalError
from ..models.dit import DiTConditions, InfiniteTalkDiT
from .guidance import BRANCHES, NULL_AUDIO_BRANCHES, NULL_TEXT_BRANCHES

CACHE_MODES = ("context", "all", "none")
"""What `GuidedDiT` precomputes per window (see its docstring)."""


def branch_groups(branches: Sequence[str], speakers: int, batch: bool = True) -> list[tuple[str, ...]]:
    """Split guidance branches into groups that one batched forward can evaluate exactly.

    Branches with the audio (cond, drop_text) have `speakers` audio streams; branches without
    it (uncond, drop_audio) get the official dropped audio zeros_like(audio)[-1:], a single
    stream. One forward needs one stream count, so with one speaker every branch fits in one
    group and with two speakers there are two groups. Order follows `branches`.
    """
    unknown = [b for b in branches if b not in BRANCHES]
    if unknown:
        raise ValueError(f"unknown guidance branches {unknown}")
    if not batch:
        return [(b,) for b in branches]
    if speakers == 1:
        return [tuple(branches)]
    with_audio = tuple(b for b in branches if b not in NULL_AUDIO_BRANCHES)
    without = tuple(b for b in branches if b in NULL_AUDIO_BRANCHES)
    return [g for g in (with_audio, without) if g]


def _branch_inputs(branch: str, context, context_null, audio: torch.Tensor):
    ctx = context_null if branch in NULL_TEXT_BRANCHES else context
    aud = torch.zeros_like(audio)[-1:] if branch in NULL_AUDIO_BRANCHES else audio
    return ctx, aud


class GuidedDiT:
    """One window's denoiser over several guidance branches, with the fast-path reuse.

    Built once per window from the window's conditions (one sample, official shapes):
    context / context_null [L, text_dim]; clip_fea [1, 257, clip_dim]; y [in_dim - 16, T, H, W];
    audio [N, 1 + 4(T-1), window, layers, channels]; ref_target_masks [3, H, W] (two speakers).
    `predict(latent [16, T, H, W], t [1]) -> {branch: prediction [16, T, H, W] float32}` runs
    the branches as `branch_groups` says (one batched forward per group). `cache_conditions`
    (see `FastOptions`): "context" precomputes the text/CLIP keys and values once per distinct
    prompt (cond and drop_audio share theirs) and keeps only the audio tokens; "all" also
    precomputes the audio keys and values per branch; "none" passes the raw inputs.
    True and False mean "all" and "none".
    """

    def __init__(
        self,
        model: InfiniteTalkDiT,
        branches: Sequence[str],
        *,
        context: torch.Tensor,
        context_null: torch.Tensor,
        clip_fea: torch.Tensor,
        y: torch.Tensor,
        audio: torch.Tensor,
        ref_target_masks: Optional[torch.Tensor] = None,
        cache_conditions: str | bool = "context",
        batch_guidance: bool = False,
    ):
        if audio.dim() != 5:
            raise InternalError(f"audio must be [speakers, frames, window, layers, channels]; got {tuple(audio.shape)}.")
        self.model = model
        self.branches = tuple(branches)
        self.y = y
        self.ref_target_masks = ref_target_masks
        mode = {True: "all", False: "none"}.get(cache_conditions, cache_conditions)
        if mode not in CACHE_MODES:
            raise ValueError(f"cache_conditions must be one of {CACHE_MODES}, got {cache_conditions!r}")
        self.groups = branch_groups(self.branches, audio.shape[0], batch_guidance)
        self._inputs: list[tuple[tuple[str, ...], dict]] = []
        shared: dict[tuple[int, ...], DiTConditions] = {}  # by the identity of the group's prompts
        for group in self.groups:
            contexts, audios = zip(*(_branch_inputs(b, context, context_null, audio) for b in group))
            audio_batch = torch.stack(audios)
            clip = clip_fea.expand(len(group), -1, -1)
            if mode == "none":
                inputs = {"context": list(contexts), "clip_fea": clip, "audio": audio_batch}
            else:
                key = tuple(id(c) for c in contexts)
                cond = model.precompute_conditions(
                    list(contexts), clip, audio_batch, audio_kv=(mode == "all"), reuse_context_kv=shared.get(key)
                )
                shared.setdefault(key, cond)
                inputs = {"conditions": cond}
            self._inputs.append((group, inputs))

    @torch.no_grad()
    def predict_branch(self, latent: torch.Tensor, t: torch.Tensor, branch: str, block_cache=None) -> torch.Tensor:
        """One branch's prediction [16, T, H, W] (the sampler's `denoise_fn`). `block_cache` is the
        branch's TeaCache slot; TeaCache decides per branch, so it needs unbatched branches."""
        for group, inputs in self._inputs:
            if branch not in group:
                continue
            if len(group) > 1:
                if block_cache is not None:
                    raise InternalError("TeaCache skips branches one at a time; turn off batched guidance to use it.")
                return self.predict(latent, t)[branch]
            out = self.model(latent.unsqueeze(0), t, y=self.y.unsqueeze(0), ref_target_masks=self.ref_target_masks,
                             block_cache=block_cache, **inputs)
            return out[0]
        raise InternalError(f"Guidance branch {branch!r} was not prepared for this window.")

    def conditions_nbytes(self) -> int:
        """Device memory held by the precomputed keys and values (0 without caching; shared ones once)."""
        seen: set[int] = set()
        total = 0
        for _, inputs in self._inputs:
            cond = inputs.get("conditions")
            if cond is None:
                continue
            for t in cond.tensors():
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total

    @torch.no_grad()
    def predict(self, latent: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        preds: dict[str, torch.Tensor] = {}
        for group, inputs in self._inputs:
            n = len(group)
            x = latent.unsqueeze(0).expand(n, *latent.shape)
            y = self.y.unsqueeze(0).expand(n, *self.y.shape)
            out = self.model(x, t, y=y, ref_target_masks=self.ref_target_masks, **inputs)
            for i, branch in enumerate(group):
                preds[branch] = out[i]
        return preds

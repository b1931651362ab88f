"""Ulysses sequence parallelism for the InfiniteTalk DiT, composed around an unchanged model.

`SequenceParallelDiT(model, group, ranks)` evaluates `InfiniteTalkDiT` with the video tokens split
across the ranks of `group` by whole latent frames: rank i embeds and carries only the frames
`frame_ranges(T, P)[i]` (contiguous, frame 0 on the first rank). Everything in a block is per
token except the self-attention, so a block runs unchanged on a rank's tokens once it gets:

* `UlyssesAttention` as the block's self-attention function: one all-to-all turns q, k, v from
  [B, L_rank, H, D] (this rank's tokens, every head) into [B, L, H/P, D] (every token, this
  rank's heads), the model's own attention runs on that, and a second all-to-all brings the
  output back to [B, L_rank, H, D]. So P must divide the head count (40: P = 1, 2, 4, 5, 8, 10).
* the rows of the global 3-D RoPE table that belong to the rank's tokens (global positions);
* the audio keys and values of its own latent frames (the audio cross-attention attends per
  latent frame, so it stays local);
* `ShardedRoutingMap` (two speakers): the reference-frame keys (latent frame 0, on the first
  rank) are broadcast to the group, each rank computes the map of its own tokens with the
  model's routing function, and the speaker positions use the min and max of the map over all
  tokens (an all-reduce), exactly as one process computes them.

The head output of every rank is gathered in `__call__` (or by the caller, see
`ParallelGuidedDiT`, which gathers every branch and every rank with one collective). With P = 1
no collective runs and the arithmetic is the plain model's. Only public model parts and its
input helpers are used; the model is never modified.

Collectives inside a compiled block: `UlyssesAttention` and `ShardedRoutingMap` are
`torch.compiler.disable`d, so a compiled block splits into the regions before and after the
self-attention (the attention kernel itself already runs outside the fused regions).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from ..errors import InputError, InternalError
from ..models.audio_adapter import speaker_positions
from ..models.dit import DiTConditions, InfiniteTalkDiT


def frame_ranges(frames: int, parts: int) -> list[tuple[int, int]]:
    """Split `frames` latent frames into `parts` contiguous ranges; the first ones get one more."""
    if parts < 1 or frames < parts:
        raise InputError(f"{frames} latent frames cannot be split over {parts} sequence ranks; use at most {frames}.")
    base, extra = divmod(frames, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


class UlyssesAttention:
    """An `AttentionFn` over the tokens of every rank of `group`, heads split across the ranks.

    q, k, v [B, L_rank, H, D] (this rank's tokens) -> [B, L_rank, H, D]. `token_counts[i]` is
    rank i's token count (their sum is the sequence); H must be a multiple of the group size.
    `inner` is the attention that runs on [B, L, H/P, D]; when it takes `qk_bounds` (the fp8
    attention's q/k scales), the bounds are the maxima over all ranks, as one process has them.
    """

    def __init__(self, inner, group, token_counts: Sequence[int], rank: int):
        self.inner = inner
        self.group = group
        self.counts = [int(c) for c in token_counts]
        self.rank = int(rank)
        self.takes_qk_bounds = bool(getattr(inner, "takes_qk_bounds", False))

    @torch.compiler.disable
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_bounds=None) -> torch.Tensor:
        p = len(self.counts)
        b, length, heads, dim = q.shape
        if length != self.counts[self.rank] or heads % p:
            raise ValueError(f"rank {self.rank} holds {length} tokens x {heads} heads; expected "
                             f"{self.counts[self.rank]} tokens and heads divisible by {p}")
        hp = heads // p
        qkv = torch.stack((q.to(v.dtype), k.to(v.dtype), v))  # [3, B, l, H, D]
        send = qkv.view(3, b, length, p, hp, dim).permute(3, 2, 0, 1, 4, 5).reshape(p * length, 3, b, hp, dim)
        recv = send.new_empty((sum(self.counts), 3, b, hp, dim))
        dist.all_to_all_single(recv, send, self.counts, [length] * p, group=self.group)
        q_all, k_all, v_all = recv.permute(1, 2, 0, 3, 4).unbind(0)  # each [B, L, H/P, D]
        del qkv, send
        if qk_bounds is not None and self.takes_qk_bounds:
            bounds = torch.stack([torch.as_tensor(x, dtype=torch.float32, device=q.device) for x in qk_bounds])
            dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=self.group)
            out = self.inner(q_all, k_all, v_all, qk_bounds=(bounds[0], bounds[1]))
        else:
            out = self.inner(q_all, k_all, v_all)
        del recv, q_all, k_all, v_all
        back = out.permute(1, 0, 2, 3).contiguous()  # [L, B, H/P, D]
        mine = back.new_empty((p * length, b, hp, dim))
        dist.all_to_all_single(mine, back, [length] * p, self.counts, group=self.group)
        return mine.view(p, length, b, hp, dim).permute(2, 1, 0, 3, 4).reshape(b, length, heads, dim)


class ShardedRoutingMap:
    """A `RoutingMapFn` for a rank's tokens whose reference-frame keys live on rank `src`.

    The keys of latent frame 0 are broadcast from `src` (the group's first rank, which holds
    frame 0), then `inner` maps this rank's queries. `speaker_positions` (read by the block)
    rescales the map with its minimum and maximum over every rank's tokens.
    """

    def __init__(self, inner, group, src: int, is_src: bool):
        self.inner = inner
        self.group = group
        self.src = int(src)
        self.is_src = bool(is_src)

    @torch.compiler.disable
    def __call__(self, q: torch.Tensor, k: torch.Tensor, tokens_per_frame: int, token_masks: torch.Tensor) -> torch.Tensor:
        if self.is_src:
            keys = k[:, :tokens_per_frame].contiguous()
        else:
            keys = k.new_empty((k.shape[0], tokens_per_frame, *k.shape[2:]))
        dist.broadcast(keys, src=self.src, group=self.group)
        return self.inner(q, keys, tokens_per_frame, token_masks)

    @torch.compiler.disable
    def speaker_positions(self, ref_map: torch.Tensor) -> torch.Tensor:
        rows = ref_map[:, :2]
        both = torch.stack((-rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True)))  # min as max of -x: exact
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        return speaker_positions(ref_map, extremes=(-both[0], both[1]))


def gather_tokens(local: torch.Tensor, counts: Sequence[int], group, dim: int = 1) -> torch.Tensor:
    """Concatenate every rank's `local` along `dim` (rank i holds counts[i] rows there)."""
    longest = max(counts)
    pad = list(local.shape)
    pad[dim] = longest - local.shape[dim]
    padded = torch.cat([local, local.new_zeros(pad)], dim=dim) if pad[dim] else local.contiguous()
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part.narrow(dim, 0, c) for part, c in zip(parts, counts)], dim=dim)


def _frames_of(kv: tuple[torch.Tensor, torch.Tensor], batch: int, frames: int, f0: int, f1: int):
    """Rows of latent frames [f0, f1) of audio keys/values laid out [B*T, M, H, D]."""
    if f0 == 0 and f1 == frames:
        return kv
    return tuple(t.unflatten(0, (batch, frames))[:, f0:f1].flatten(0, 1) for t in kv)


class SequenceParallelDiT:
    """`InfiniteTalkDiT` with the tokens split over the ranks `ranks` (global ranks) of `group`.

    Called like the model (same arguments, see `InfiniteTalkDiT.forward`). With `gather` the
    result is the model's [B, out_dim, T, H, W] float32 on every rank; without, it is this rank's
    head output [B, L_rank, prod(patch) * out_dim] (`local_tokens`), for a caller that gathers
    several forwards at once. `precompute_conditions` and `time_modulation` are the model's.
    """

    def __init__(self, model: InfiniteTalkDiT, group=None, ranks: Sequence[int] = (0,), *, gather: bool = True):
        self.model = model
        self.group = group
        self.ranks = [int(r) for r in ranks]
        self.size = len(self.ranks)
        self.index = self.ranks.index(dist.get_rank()) if self.size > 1 else 0
        self.gather = gather
        heads = model.config.num_heads
        if heads % self.size:
            raise InputError(f"{self.size} sequence ranks cannot split the model's {heads} attention heads; "
                             f"use a count that divides {heads}.")
        self._kernels: dict[tuple, tuple[Any, Any]] = {}

    # the model's own per-window helpers
    def precompute_conditions(self, *args, **kwargs) -> DiTConditions:
        return self.model.precompute_conditions(*args, **kwargs)

    def time_modulation(self, t: torch.Tensor) -> torch.Tensor:
        return self.model.time_modulation(t)

    def frame_range(self, frames: int) -> tuple[int, int]:
        return frame_ranges(frames, self.size)[self.index]

    def token_counts(self, grid: tuple[int, int, int]) -> list[int]:
        return [(b - a) * grid[1] * grid[2] for a, b in frame_ranges(grid[0], self.size)]

    def grid_of(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """Token grid of a latent [..., T, H, W]."""
        pt, ph, pw = self.model.config.patch_size
        frames, height, width = latent_shape[-3:]
        return frames // pt, height // ph, width // pw

    def __call__(self, x, t, context=None, clip_fea=None, y=None, audio=None, ref_target_masks=None, *,
                 conditions: Optional[DiTConditions] = None, block_cache: Any = None) -> torch.Tensor:
        local, grid = self.local_tokens(x, t, context, clip_fea, y, audio, ref_target_masks,
                                        conditions=conditions, block_cache=block_cache)
        if not self.gather:
            return local
        if self.size > 1:
            local = gather_tokens(local, self.token_counts(grid), self.group)
        return self.model.unpatchify(local, grid)

    def _kernels_for(self, grid: tuple[int, int, int]):
        m = self.model
        attention = m.self_attention or m.attention
        if self.size == 1:
            return m.self_attention, m.routing_map
        key = (grid, id(attention), id(m.routing_map))
        found = self._kernels.get(key)
        if found is None:
            ulysses = UlyssesAttention(attention, self.group, self.token_counts(grid), self.index)
            routing = ShardedRoutingMap(m.routing_map, self.group, self.ranks[0], self.index == 0)
            self._kernels.clear()  # one grid per window: keep the current one only
            found = self._kernels[key] = (ulysses, routing)
        return found

    @torch.no_grad()
    def local_tokens(self, x, t, context=None, clip_fea=None, y=None, audio=None, ref_target_masks=None, *,
                     conditions: Optional[DiTConditions] = None, block_cache: Any = None):
        """This rank's head output [B, L_rank, prod(patch) * out_dim] float32 and the global grid."""
        m = self.model
        with m._kernel_context():
            return self._local_tokens(m, x, t, context, clip_fea, y, audio, ref_target_masks, conditions, block_cache)

    def _local_tokens(self, m, x, t, context, clip_fea, y, audio, ref_target_masks, conditions, block_cache):
        cfg = m.config
        if y is None:
            raise InternalError("y (mask + image-latent conditioning) is required.")
        if x.dim() != 5 or y.dim() != 5 or x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[2:]:
            raise InternalError(f"x and y must be [B, C, T, H, W] with equal B, T, H, W; got {tuple(x.shape)} and {tuple(y.shape)}.")
        batch, _, frames, height, width = x.shape
        pt, ph, pw = cfg.patch_size
        if frames % pt or height % ph or width % pw:
            raise InternalError(f"Latent size {frames}x{height}x{width} is not divisible by the patch size {cfg.patch_size}.")
        grid = self.grid_of(x.shape)
        f0, f1 = self.frame_range(grid[0])
        per_frame = grid[1] * grid[2]
        local_grid = (f1 - f0, grid[1], grid[2])

        inp = torch.cat([x[:, :, f0 * pt:f1 * pt], y[:, :, f0 * pt:f1 * pt]], dim=1).to(device=m.device, dtype=m.dtype)
        tokens = m.patch_embedding(inp).flatten(2).transpose(1, 2).contiguous()
        t = torch.as_tensor(t, device=m.device).reshape(-1)
        if t.numel() not in (1, batch):
            raise InternalError(f"t must hold 1 or {batch} timesteps; got {t.numel()}.")
        e, e0 = m._time_embedding(t)

        if conditions is None:
            if context is None or clip_fea is None or audio is None:
                raise InternalError("forward needs context, clip_fea and audio, or precomputed conditions.")
            context_tokens = m._context_tokens(context, clip_fea, batch)
            audio_tokens, speakers = m._audio_tokens(audio, batch, grid[0])
            audio_tokens = audio_tokens[:, f0:f1]
        else:
            if conditions.batch != batch or conditions.frames != grid[0]:
                raise InternalError(
                    f"The precomputed conditions are for {conditions.batch} samples of {conditions.frames} latent "
                    f"frames; x has {batch} samples of {grid[0]}."
                )
            speakers = conditions.speakers
        ref_masks = None
        if speakers == 2:
            if ref_target_masks is None:
                raise InternalError("Two speakers need ref_target_masks [3, H, W] (person 1, person 2, background).")
            ref_masks = m._token_masks(ref_target_masks, batch, grid[1], grid[2])

        if block_cache is not None and block_cache.reuse:
            residual = block_cache.residual
            if residual is None or residual.shape != tokens.shape:
                raise InternalError("TeaCache asked to reuse a residual that was never computed for this input shape.")
            return m.head(tokens + residual, e), grid

        before = tokens if block_cache is not None else None
        rope = m.rope_table(grid, cfg.head_dim, m.device)[f0 * per_frame:f1 * per_frame]
        self_attention, routing = self._kernels_for(grid)
        for i, block in enumerate(m.blocks):
            if conditions is None:
                context_kv = block.cross_attn.context_kv(context_tokens)
                audio_kv = block.audio_cross_attn.audio_kv(audio_tokens, speakers == 2)
            else:
                context_kv = conditions.context_kv[i]
                if conditions.audio_kv is not None:
                    audio_kv = _frames_of(conditions.audio_kv[i], batch, conditions.frames, f0, f1)
                else:
                    audio_kv = block.audio_cross_attn.audio_kv(conditions.audio_tokens[:, f0:f1], speakers == 2)
            tokens = block(
                tokens, e0, rope, context_kv, audio_kv, local_grid, m.attention, ref_masks, routing,
                self_attention, m.ffn_chunks,
            )
        if block_cache is not None:
            block_cache.residual = tokens - before
        return m.head(tokens, e), grid


def heads_divisors(heads: int) -> list[int]:
    """Sequence-rank counts that split `heads` attention heads evenly."""
    return [p for p in range(1, heads + 1) if heads % p == 0]


"""One video on several ranks: guidance branches x Ulysses sequence parallel, on torch.distributed.

Every rank runs the same pipeline loop on the same inputs and the same random numbers; the
ranks share the work of each sampling step and agree on everything through collectives:

* Layout (`plan_layout`): W ranks = G branch groups x S sequence ranks. Group g evaluates the
  guidance branches `assign_branches(branches, G)[g]` (2 or 3 per step); inside a group the
  video tokens of each forward are split by whole latent frames over the S ranks
  (`runtime.sequence_parallel`, Ulysses: S must divide the head count; 40 heads -> S in 1, 2,
  4, 5, 8, 10). Ranks are group-major: group g is ranks g*S .. g*S + S - 1 of the context.
  The automatic choice minimises forwards per step / S and prefers branch groups on ties
  (less communication): 2 branches on 8 ranks -> 2 x 4, 3 branches on 8 ranks -> 1 x 8.
* One collective per step (`ParallelGuidedDiT.predict_step`): every rank's head output of every
  branch it evaluated is all-gathered over all ranks, so every rank assembles every branch's
  prediction and makes the same guidance combination and Euler step.
* TeaCache: the skip decision of each branch is taken by its group's first rank and shared with
  every rank (one small all-reduce), so the ranks of a group always skip together.
* Text encoder, CLIP and wav2vec2 run on the first rank only (`OnLeader`); their results are
  broadcast. The other ranks need not load them.
* The VAE encodes and decodes on the first rank only and the results are broadcast (the
  decoded window, the image and motion latents), so the other ranks hold no VAE activations
  and every rank conditions on the same latents. It is not split: the decoder is causal in
  time (each chunk of frames reads the cache of the previous ones) and attends over whole
  frames, so a split by frames or tiles would change the video; and window k + 1 is
  conditioned on the last decoded frames of window k, so its sampling cannot overlap window
  k's decode. Writing the video (H.264 segments, resume state) happens on the first rank only
  while the others go on to the next window.
* Weights: every rank holds the whole DiT (the 14B model fits one H200; with fp8 half of it).
  fp8 linears, LoRAs (merged at load) and compiled blocks are per-rank properties of the model
  and compose unchanged; the fp8 attention gets the global q/k bounds. When the VRAM budget
  is below a whole DiT per rank, the plan may shard the blocks instead (`offload_plan`,
  `block_store.ShardedSource`): each rank keeps 1/W of every streamed block and the block
  streamer gathers a block into a slot just before it runs. The ranks must then load the same
  blocks in the same order, so the job runs as one branch group (`shard_weights`): every rank
  is a sequence rank of it (W must divide the heads), and `--branch-groups` above 1 is refused.

`ParallelContext(group)` spans the ranks of a process group (default: the whole world), so
several jobs (or tests) can run side by side on disjoint rank sets of one world.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from ..errors import InputError
from ..generation.guided_dit import GuidedDiT
from .sequence_parallel import SequenceParallelDiT, frame_ranges, gather_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """W = branch_groups x sequence ranks."""

    branch_groups: int
    sequence: int

    @property
    def world(self) -> int:
        return self.branch_groups * self.sequence

    def __str__(self) -> str:
        return f"{self.branch_groups} branch group(s) x {self.sequence} sequence rank(s)"


def layout_fits(world: int, g: int, branches: int, heads: int, frames: int) -> bool:
    """Whether `world` ranks can form `g` branch groups for this job."""
    return world % g == 0 and g <= branches and heads % (world // g) == 0 and world // g <= frames


def plan_layout(world: int, branches: int, heads: int, frames: int, branch_groups: Optional[int] = None,
                sharded: bool = False) -> Layout:
    """The layout of `world` ranks for `branches` guidance branches, `heads` heads, `frames` latent frames.

    sharded: the DiT blocks are split over the ranks, which then form one branch group.
    Raises InputError (one sentence, with the rank counts that work) when none fits.
    """
    if world < 1:
        raise InputError(f"The number of GPUs must be at least 1, got {world}.")
    if sharded:
        check_sharded_groups(world, branch_groups)
        if not layout_fits(world, 1, branches, heads, frames):
            raise InputError(
                f"{world} GPUs cannot share this job with the DiT blocks sharded over them: they must all be sequence "
                f"ranks of one branch group, so their number must divide the model's {heads} attention heads and be "
                f"at most the job's {frames} latent frames; use fewer GPUs or a --vram budget that fits the whole "
                f"DiT on each GPU."
            )
        return Layout(1, world)
    options = [g for g in range(1, world + 1) if layout_fits(world, g, branches, heads, frames)]
    if branch_groups is not None:
        if branch_groups not in options:
            raise InputError(
                f"{world} GPUs cannot run {branch_groups} branch group(s): each group needs the same number of "
                f"sequence ranks dividing the {heads} attention heads (and at most {frames} latent frames), with at "
                f"most {branches} groups for {branches} guidance branches; possible here: "
                f"{', '.join(map(str, options)) or 'none'}."
            )
        return Layout(branch_groups, world // branch_groups)
    if not options:
        works = [w for w in range(1, 4 * heads + 1) if any(layout_fits(w, g, branches, heads, frames) for g in range(1, w + 1))]
        raise InputError(
            f"{world} GPUs cannot share this job: the sequence ranks of a branch group must divide the model's "
            f"{heads} attention heads and the {branches} guidance branches form at most {branches} groups; use "
            f"{', '.join(map(str, works[:10]))} GPUs."
        )
    def cost(g: int) -> tuple[float, int]:
        return math.ceil(branches / g) / (world // g), -g

    best = min(options, key=cost)
    return Layout(best, world // best)


def check_sharded_groups(world: int, branch_groups: Optional[int]) -> None:
    """Raise InputError when `branch_groups` was forced above 1 while the DiT blocks are sharded."""
    if branch_groups not in (None, 1):
        raise InputError(
            f"--branch-groups {branch_groups} needs a whole DiT on every GPU, but under this VRAM budget the DiT "
            f"blocks are sharded over the {world} GPUs, which then run as one branch group; leave out "
            f"--branch-groups (or give 1), or give a --vram budget that fits the whole DiT on each GPU."
        )


def model_heads(model: str) -> int:
    """Attention heads of a model name (`--model`), without building it."""
    if model == "tiny":
        from .tiny_models import TinyConfigs

        return TinyConfigs.default().dit.num_heads
    from ..models.dit import WanDiTConfig

    return WanDiTConfig.infinitetalk_14b().num_heads


def assign_branches(branches: Sequence[str], groups: int) -> list[tuple[str, ...]]:
    """Contiguous runs of the branches, one per group (the first groups get one more)."""
    return [tuple(branches[a:b]) for a, b in frame_ranges(len(branches), groups)]


class ParallelContext:
    """The ranks of `group` (default: the world) working on one job; every rank makes one.

    `branch_groups`: force that many branch groups (None: `plan_layout` chooses per job).
    Collectives use the device of the backend: the current CUDA device for NCCL, else the CPU.
    """

    def __init__(self, group=None, *, branch_groups: Optional[int] = None):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; start the ranks with runtime.parallel_launch")
        self.group = group
        self.ranks = list(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
        self.world = len(self.ranks)
        self.rank = dist.get_rank(group)
        self.branch_groups = branch_groups
        backend = dist.get_backend(group)
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._groups: dict[tuple[int, ...], Any] = {}
        self.weights_sharded = False  # the DiT blocks are split over these ranks (`shard_weights`)
        self._shard_group = None

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"ParallelContext(rank {self.rank} of {self.world}, ranks {self.ranks})"

    # ---- groups and layouts ---------------------------------------------------------------
    def subgroup(self, ranks: Sequence[int]):
        """The process group of these global ranks (created once; only members call this)."""
        ranks = tuple(int(r) for r in ranks)
        if ranks == tuple(self.ranks):
            return self.group
        found = self._groups.get(ranks)
        if found is None:
            found = self._groups[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
        return found

    def layout(self, branches: int, heads: int, frames: int) -> Layout:
        return plan_layout(self.world, branches, heads, frames, self.branch_groups, self.weights_sharded)

    def shard_weights(self):
        """Mark the DiT blocks as sharded over every rank of this context and return the process
        group their gathers use (its own communicator, so on NCCL the gathers on the streamer's
        side stream do not queue behind the sequence-parallel all-to-alls). From then on every
        window runs as one branch group; InputError when `branch_groups` forces more."""
        check_sharded_groups(self.world, self.branch_groups)
        self.weights_sharded = True
        if self._shard_group is None:
            self._shard_group = dist.new_group(self.ranks, use_local_synchronization=True)
        return self._shard_group

    def agree_min(self, value: int) -> int:
        """The smallest `value` over the ranks (every rank plans its memory with the same budget)."""
        box = torch.tensor([int(value)], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(box, op=dist.ReduceOp.MIN, group=self.group)
        return int(box.item())

    def guided_dit(self, model, branches: Sequence[str], **kwargs) -> "ParallelGuidedDiT":
        """A `ParallelGuidedDiT` for one window (arguments as `GuidedDiT`)."""
        return ParallelGuidedDiT(self, model, branches, **kwargs)

    # ---- collectives ----------------------------------------------------------------------
    def broadcast_object(self, obj: Any = None) -> Any:
        """The leader's `obj` on every rank (pickled; for small objects such as the job state)."""
        box = [obj if self.is_leader else None]
        dist.broadcast_object_list(box, src=self.ranks[0], group=self.group, device=self.comm_device)
        return box[0]

    def broadcast_tensors(self, tensors: Optional[Sequence[torch.Tensor]], device: torch.device) -> list[torch.Tensor]:
        """The leader's tensors on every rank (shapes and dtypes first, then the data)."""
        meta = self.broadcast_object([(tuple(t.shape), t.dtype, t.device.type) for t in tensors] if self.is_leader else None)
        out = []
        for i, (shape, dtype, kind) in enumerate(meta):
            target = torch.device("cpu") if kind == "cpu" else device
            if self.is_leader:
                buf = tensors[i].detach().to(self.comm_device).contiguous()
            else:
                buf = torch.empty(shape, dtype=dtype, device=self.comm_device)
            dist.broadcast(buf, src=self.ranks[0], group=self.group)
            out.append(tensors[i] if self.is_leader else buf.to(target))
        return out

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return parts

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=self.group)
        return tensor

    # ---- the pipeline's components ---------------------------------------------------------
    def wrap_components(self, components, device: torch.device):
        """Run the text encoder, CLIP, wav2vec2 and the VAE passes on the leader only (results
        broadcast); mark the components parallel. On the other ranks the encoders may be None
        (not loaded); the VAE's weights stay on every rank (its device and dtype are read there)."""
        components.text_encoder = OnLeader(components.text_encoder, self, device)
        components.clip = OnLeader(components.clip, self, device)
        components.audio_encoder = OnLeader(components.audio_encoder, self, device)
        components.vae = OnLeader(components.vae, self, device)
        components.parallel = self
        return components


class OnLeader:
    """`inner` evaluated on the context's first rank, its tensor results broadcast to every rank.

    Works for `inner(...)` and `inner.encode(...)` returning a tensor or a list of tensors; CPU
    results stay on the CPU, device results land on each rank's `device`. Every rank must make
    the same calls in the same order (they all run the same pipeline loop)."""

    def __init__(self, inner, ctx: ParallelContext, device: torch.device):
        if ctx.is_leader and inner is None:
            raise RuntimeError("the leader rank needs the model it runs for the others")
        self.inner = inner
        self.ctx = ctx
        self.device = torch.device(device)

    def __call__(self, *args, **kwargs):
        return self._run(lambda: self.inner(*args, **kwargs))

    def encode(self, *args, **kwargs):
        return self._run(lambda: self.inner.encode(*args, **kwargs))

    def decode(self, *args, **kwargs):
        return self._run(lambda: self.inner.decode(*args, **kwargs))

    def parameters(self, *args, **kwargs):
        """The wrapped model's parameters (device and dtype; the model must exist on every rank)."""
        return self.inner.parameters(*args, **kwargs)

    def _run(self, fn):
        result = fn() if self.ctx.is_leader else None
        single = self.ctx.broadcast_object(isinstance(result, torch.Tensor) if self.ctx.is_leader else None)
        tensors = ([result] if single else list(result)) if self.ctx.is_leader else None
        out = self.ctx.broadcast_tensors(tensors, self.device)
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"OnLeader({type(self.inner).__name__ if self.inner is not None else 'not loaded'})"


class ParallelGuidedDiT:
    """One window's denoiser with the branches and tokens of each step spread over the ranks.

    Arguments as `GuidedDiT` (one sample's conditions). `predict_step(latent, t, caches)` is
    the sampler's `step_fn`: every rank calls it with the same latent and gets every branch's
    prediction [16, T, H, W] float32. The rank's own branches run through a `GuidedDiT`
    (cached conditions as configured) over a `SequenceParallelDiT` of its group.
    """

    def __init__(self, ctx: ParallelContext, model, branches: Sequence[str], **kwargs):
        self.ctx = ctx
        self.model = model
        self.branches = tuple(branches)
        y = kwargs["y"]
        frames = y.shape[1] // model.config.patch_size[0]
        self.layout = ctx.layout(len(self.branches), model.config.num_heads, frames)
        s = self.layout.sequence
        self.groups = assign_branches(self.branches, self.layout.branch_groups)
        self.group_index, self.seq_index = divmod(ctx.rank, s)
        members = ctx.ranks[self.group_index * s:(self.group_index + 1) * s]
        seq_group = ctx.subgroup(members) if s > 1 else None
        self.mine = self.groups[self.group_index]
        self.sp = SequenceParallelDiT(model, seq_group, members, gather=False)
        self.seq_group = seq_group
        self.inner = GuidedDiT(self.sp, self.mine, **kwargs)
        log.debug("rank %d: %s, branches %s, sequence rank %d", ctx.rank, self.layout, self.mine, self.seq_index)

    def _share_reuse(self, caches: dict) -> None:
        """Every branch's TeaCache decision as its group's first rank took it."""
        flags = torch.zeros(len(self.branches), dtype=torch.float32, device=self.ctx.comm_device)
        if self.seq_index == 0:
            for i, b in enumerate(self.branches):
                if b in self.mine and caches[b] is not None and caches[b].reuse:
                    flags[i] = 1.0
        self.ctx.all_reduce_sum(flags)
        for i, b in enumerate(self.branches):
            if caches.get(b) is not None:
                caches[b].reuse = bool(flags[i].item() > 0.5)

    @torch.no_grad()
    def predict_step(self, latent: torch.Tensor, t: torch.Tensor, caches: Optional[dict] = None) -> dict[str, torch.Tensor]:
        caches = caches or {}
        if self.ctx.world > 1 and any(c is not None for c in caches.values()):
            self._share_reuse(caches)
        grid = self.sp.grid_of(latent.shape)
        local = [self.inner.predict_branch(latent, t, b, caches.get(b)) for b in self.mine]  # [L_rank, C] each
        if self.ctx.world == 1:
            tokens = dict(zip(self.mine, local))
        else:
            tokens = self._gather(local, grid)
        return {b: self.model.unpatchify(tokens[b].unsqueeze(0), grid)[0] for b in self.branches}

    def _gather(self, local: list[torch.Tensor], grid) -> dict[str, torch.Tensor]:
        """Every branch's tokens from every rank: one all-gather over the context."""
        counts = self.sp.token_counts(grid)
        s = self.layout.sequence
        slots = max(len(g) for g in self.groups)
        width = local[0].shape[-1]
        stack = torch.zeros(slots, max(counts), width, dtype=local[0].dtype, device=self.ctx.comm_device)
        for j, part in enumerate(local):
            stack[j, : part.shape[0]] = part
        parts = self.ctx.all_gather(stack)
        device = local[0].device
        tokens = {}
        for g, group in enumerate(self.groups):
            for j, b in enumerate(group):
                pieces = [parts[g * s + q][j, : counts[q]] for q in range(s)]
                tokens[b] = torch.cat(pieces).to(device)
        return tokens

    @torch.no_grad()
    def predict_branch(self, latent: torch.Tensor, t: torch.Tensor, branch: str, block_cache=None) -> torch.Tensor:
        """One branch (the sampler's `denoise_fn`); only with one branch group, where every rank has
        every branch. With several groups the sampler must call `predict_step`."""
        if self.layout.branch_groups > 1:
            raise RuntimeError("with several branch groups every step must go through predict_step")
        grid = self.sp.grid_of(latent.shape)
        local = self.inner.predict_branch(latent, t, branch, block_cache)
        if self.layout.sequence > 1:
            local = gather_tokens(local.unsqueeze(0), self.sp.token_counts(grid), self.seq_group)[0]
        return self.model.unpatchify(local.unsqueeze(0), grid)[0]

    def conditions_nbytes(self) -> int:
        return self.inner.conditions_nbytes()

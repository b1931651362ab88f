"""Run the models under a VRAM budget: DiT blocks streamed from host memory, models on the GPU per call.

Composed around the modules with forward pre-hooks, never by changing the model code:

* `BlockStreamer` keeps some blocks of a `ModuleList` on the device and the others packed in a
  source (`runtime.block_store`): host memory (power-of-two pinned arenas, or a memory-mapped
  file when host RAM is short), or 1/W of every block on each of W ranks, gathered into the slot
  by one all-gather (when the budget is below a whole DiT per GPU). Two device slots hold
  streamed blocks: when block i starts, block i's copy is waited for on the compute stream (an
  event, no host sync) and the next streamed block is copied (or gathered) into the other
  slot on a side stream after the work queued so far (another event), so the copy of block i+1
  overlaps the compute of block i. A block's tensors are swapped in by `.data` (parameters) and
  `_buffers` (buffers) to views of the slot, so compiled blocks see the same shapes, dtypes and
  devices every call. The trigger is a pre-hook on the block (run outside torch.compile) plus
  pre-hooks on its submodules for the eager calls that use a block's layers outside its forward
  (`cross_attn.context_kv`, `audio_cross_attn.audio_kv`). On the CPU the same code runs
  without streams or events. The slots are allocated by the first block that needs them and
  freed by `release()` while another model runs (the `Offloader` does that in `placed`).
* `ModulePlacer` moves a model (umT5, CLIP, wav2vec2, VAE) onto the device only inside
  `with placer.on_device():`, keeping its host copy (arenas pinned on CUDA) so nothing is reallocated.
* `Offloader` applies an `OffloadPlan` (see `runtime.offload_plan`) to the pipeline's models.

What streams is every registered parameter and buffer of a block, as the bytes it is (bf16,
fp8 `Fp8Linear` weights with their float32 scales, LoRA-merged weights, and any quantised layer
that keeps its data in registered parameters or buffers); tensors held as plain attributes are
not seen and would stay where they are.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .host_memory import trim_host_heap
from .block_store import ALIGN, Entry, HostSource, ShardedSource, SpillFile, layout, point_to, views
from .offload_plan import PLACER_ARENA_BYTES, GiB, OffloadPlan

__all__ = ["ALIGN", "BlockStreamer", "HostSource", "ModulePlacer", "Offloader", "ShardedSource", "SpillFile",
           "host_ram_available", "resolve_budget", "use_expandable_segments"]

log = logging.getLogger(__name__)

AUTO_MARGIN_FRACTION = 0.05
AUTO_MARGIN_MIN = GiB
"""`vram_budget="auto"`: the free memory of the GPU minus max(5%, 1 GiB)."""


def host_ram_available() -> Optional[int]:
    """Bytes of host memory available now (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def resolve_budget(vram_budget, device: torch.device) -> Optional[int]:
    """`vram_budget` (GB as a number, "auto" or None) -> bytes, or None for no offloading.

    "auto" on a CUDA device: its free memory now minus a margin; on the CPU "auto" and None mean
    no offloading (a number still builds and applies the plan, so the code path runs anywhere).
    """
    from ..errors import InputError

    if vram_budget is None:
        return None
    if isinstance(vram_budget, str):
        text = vram_budget.strip().lower()
        if text == "auto":
            if device.type != "cuda":
                return None
            free, _total = torch.cuda.mem_get_info(device)
            return int(free - max(AUTO_MARGIN_MIN, free * AUTO_MARGIN_FRACTION))
        try:
            vram_budget = float(text)
        except ValueError:
            raise InputError(f"The VRAM budget must be a number of GB or 'auto', got {vram_budget!r}.") from None
    if isinstance(vram_budget, bool) or not isinstance(vram_budget, (int, float)) or not vram_budget > 0:
        raise InputError(f"The VRAM budget must be a positive number of GB or 'auto', got {vram_budget!r}.")
    return int(float(vram_budget) * GiB)


def use_expandable_segments(device: torch.device | str) -> bool:
    """Turn on the CUDA caching allocator's expandable segments for `device`'s process, unless the
    user's `PYTORCH_CUDA_ALLOC_CONF` (or `PYTORCH_ALLOC_CONF`) already says; True when they are on.

    Under a budget the allocator's fixed segments fragment: on an H100 with an 8 GB budget the bf16
    window ran out of memory with 2.11 GiB reserved but unallocated, and fitted in 7.71 GB with
    expandable segments (benchmarks/NOTES.md, v16). The setting is the allocator's and so
    process-wide; it applies to segments allocated after it, so the `Offloader` turns it on before
    any model is loaded. Nothing on the CPU.
    """
    if torch.device(device).type != "cuda":
        return False
    conf = (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF") or "").replace(" ", "")
    if "expandable_segments" in conf:
        return "expandable_segments:true" in conf.lower()
    setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if setter is None:
        log.warning("this torch cannot switch on expandable segments; set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
        return False
    setter("expandable_segments:True")
    return True


def release_cached_memory() -> None:
    """Free what dropped models still hold and give it back: a garbage collection (modules with hooks
    sit in reference cycles), then the CUDA allocator's unused segments and the pinned host blocks
    of PyTorch's host caching allocator.

    Freed pinned arenas (`HostSource`, `ModulePlacer`) stay page-locked in that cache, counted in
    the process's RSS, until this runs: a service that drops one pipeline and loads another with a
    different plan would otherwise hold both stores' host memory. Only the collection without CUDA."""
    gc.collect()
    trim_host_heap()
    if not torch.cuda.is_available():
        return
    torch.cuda.empty_cache()
    accelerator = getattr(torch, "accelerator", None)
    empty_host = getattr(accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty_host is not None:
        empty_host()


# ---- block streaming ------------------------------------------------------------------------


def _normal_tensors():
    """Tensors the models will compute with are made outside inference mode, even when the caller
    runs inside `torch.inference_mode()`: an inference tensor lacks the ADInplaceOrView dispatch
    key, which fails the guards of blocks compiled on ordinary parameters, and the recompiled graph
    costs a compilation and may pick other kernels (other bits) than the resident one."""
    return torch.inference_mode(False)


class BlockStreamer:
    """Streams the blocks `streamed` of `blocks` (an nn.ModuleList) through two device slots.

    The blocks not streamed must already be on `device`. The streamed ones are packed now into
    `source` (`runtime.block_store`; default a `HostSource` of `store`: "pinned", "mmap" into a
    `SpillFile` in `spill_dir`, or "plain" pageable memory; or a `ShardedSource` over the ranks
    of a process group) and their own tensors released. `detach()` removes the hooks and puts
    every streamed block back into ordinary host tensors.
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        device: torch.device | str,
        streamed: Sequence[int],
        store: str = "pinned",
        spill_dir: Optional[os.PathLike] = None,
        source=None,
    ):
        self.blocks = blocks
        self.device = torch.device(device)
        self.order = list(range(len(blocks)))
        self.streamed = sorted(set(int(i) for i in streamed))
        self.source = source if source is not None else HostSource(store, spill_dir)
        self.cuda = self.device.type == "cuda"
        self._layouts: dict[int, list[Entry]] = {}
        layouts = {}
        for i in self.streamed:
            layouts[i] = layout(blocks[i])
            self._layouts[i] = layouts[i][0]
        self.source.pack(layouts)  # a HostSource gives the freed host copies back block by block (host_memory)
        self._slot_size = max((self.source.slot_bytes(i) for i in self.streamed), default=0)
        self._slots: list[torch.Tensor] = []  # allocated by the first block that needs them (`release` frees them)
        self._slot_of: dict[int, int] = {}  # block -> slot holding it
        self._in_slot: list[Optional[int]] = [None, None]
        self._ready: dict[int, object] = {}  # block -> event: its copy is done
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda and self.streamed else None
        self.current: Optional[int] = None
        self.copies = 0
        self._handles = []
        if self.streamed:
            self._install_hooks()

    @property
    def host_bytes(self) -> int:
        return self.source.host_bytes

    @property
    def store_bytes(self) -> int:
        """Bytes the source keeps on the device (this rank's shards; 0 for host memory)."""
        return self.source.device_bytes

    @property
    def slot_bytes(self) -> int:
        """Device bytes of the two slots while they are allocated (0 before the first block and after `release`)."""
        return sum(s.numel() for s in self._slots)

    def _ensure_slots(self) -> None:
        if not self._slots and self.streamed:
            with _normal_tensors():
                self._slots = [torch.empty(self._slot_size, dtype=torch.uint8, device=self.device) for _ in range(2)]

    def release(self) -> None:
        """Free the two slots (another model is about to run); the next block allocates them again.

        A copy still in flight (the prefetch of the next forward's first block) is waited for on
        the compute stream first, so the memory goes back to the allocator after it."""
        if not self._slots:
            return
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            for event in self._ready.values():
                stream.wait_event(event)
        for index in list(self._slot_of):
            self._evict(index)
        self._slots = []
        self.current = None

    @property
    def _host_slab(self) -> dict:
        return getattr(self.source, "slabs", {})

    @property
    def _spill(self):
        return getattr(self.source, "spill", None)

    # -- hooks
    def _install_hooks(self) -> None:
        for i, block in enumerate(self.blocks):
            block_hook = torch.compiler.disable(self._block_hook(i))
            self._handles.append(block.register_forward_pre_hook(block_hook))
            for sub in block.modules():
                if sub is not block and (sub._parameters or sub._buffers):
                    self._handles.append(sub.register_forward_pre_hook(self._eager_hook(i)))

    def _block_hook(self, index: int):
        def hook(_module, _args):
            self.before(index)

        return hook

    def _eager_hook(self, index: int):
        def hook(_module, _args):
            if torch.compiler.is_compiling():  # inside a compiled block: its block hook ran already
                return
            if self.current != index:
                self.before(index)

        return hook

    # -- scheduling
    def _next_streamed(self, index: int) -> Optional[int]:
        later = [i for i in self.streamed if i > index]
        nxt = later[0] if later else self.streamed[0]
        return None if nxt == index and len(self.streamed) == 1 else nxt

    def before(self, index: int) -> None:
        """Make block `index` usable by the work queued next, and start the copy of the next streamed block."""
        if index == self.current:
            return
        self._ensure_slots()
        if self.cuda:
            queued = torch.cuda.Event()
            queued.record(torch.cuda.current_stream(self.device))
        else:
            queued = None
        if index in self._layouts:
            if index not in self._slot_of:
                self._load(index, self._free_slot(keep=None), queued)
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self._ready[index])
        self.current = index
        nxt = self._next_streamed(index)
        if nxt is not None and nxt not in self._slot_of:
            self._load(nxt, self._free_slot(keep=index), queued)

    def _free_slot(self, keep: Optional[int]) -> int:
        for s, occupant in enumerate(self._in_slot):
            if occupant is None:
                return s
        for s, occupant in enumerate(self._in_slot):
            if occupant != keep:
                self._evict(occupant)
                return s
        raise RuntimeError("no free block slot")  # cannot happen with two slots

    def _evict(self, index: int) -> None:
        slot = self._slot_of.pop(index)
        self._in_slot[slot] = None
        self._ready.pop(index, None)
        point_to(self._layouts[index], self.source.resting(index))

    def _load(self, index: int, slot: int, queued) -> None:
        """Fill `slot` with block `index` after the work queued so far (which may still read the slot)."""
        dst = self._slots[slot][: self.source.slot_bytes(index)]
        if self.cuda:
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(queued)
                self.source.load_into(index, dst)
                done = torch.cuda.Event()
                done.record(self._copy_stream)
            self._ready[index] = done
        else:
            self.source.load_into(index, dst)
        self.copies += 1
        self._slot_of[index] = slot
        self._in_slot[slot] = index
        with _normal_tensors():
            point_to(self._layouts[index], views(self._layouts[index], self._slots[slot]))

    def detach(self) -> None:
        """Remove the hooks; streamed blocks end up in ordinary (pageable) host tensors (with a
        `ShardedSource` every rank of its group must call this: the blocks are gathered)."""
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for index in list(self._slot_of):
            self._evict(index)
        with _normal_tensors():
            for index, entries in self._layouts.items():
                point_to(entries, self.source.restore(index))
        self.source.close()
        self._slots = []
        self.current = None


# ---- models on the device per call ----------------------------------------------------------


class ModulePlacer:
    """Keeps `module` in host memory and puts it on `device` only inside `on_device()`.

    The host copy is packed into arena slabs of `PLACER_ARENA_BYTES` (a `HostSource`, pinned on
    CUDA): one pinned slab per model would be rounded up to a power of two by PyTorch's pinned
    allocator (CLIP's 1.14 GiB took 2 GiB). Entering allocates one device buffer, copies the
    arenas into it (one copy per contiguous piece) and points the module's tensors at it; leaving
    points them back and frees the buffer. Nested entries are counted. On a CPU `device` nothing
    moves, unless `pack=True` (tests: the same code path, buffer on the CPU).
    """

    def __init__(self, module: nn.Module, device: torch.device | str, pack: Optional[bool] = None,
                 arena_bytes: int = PLACER_ARENA_BYTES):
        self.module = module
        self.device = torch.device(device)
        self.entries, self.size = layout(module)
        self.moves = self.device.type != "cpu" if pack is None else bool(pack)
        self.depth = 0
        self.source: Optional[HostSource] = None
        if self.moves:
            self.source = HostSource("pinned", arena_bytes=arena_bytes)
            self.source.pack({0: (self.entries, self.size)})

    @property
    def host_bytes(self) -> int:
        """Bytes of the host arenas holding the module (0 when it does not move)."""
        return self.source.host_bytes if self.source is not None else 0

    @contextlib.contextmanager
    def on_device(self) -> Iterator[nn.Module]:
        if not self.moves:
            yield self.module
            return
        self.depth += 1
        try:
            if self.depth == 1:
                with _normal_tensors():
                    buffer = torch.empty(self.size, dtype=torch.uint8, device=self.device)
                    self.source.load_into(0, buffer)
                    point_to(self.entries, views(self.entries, buffer))
                del buffer
            yield self.module
        finally:
            self.depth -= 1
            if self.depth == 0:
                point_to(self.entries, self.source.resting(0))


# ---- the plan applied to the pipeline's models ----------------------------------------------


class Offloader:
    """Carries out an `OffloadPlan` on the pipeline's models (`generation.components.Components`).

    Use: load every model on the host, `prepare_dit(dit)` (non-block parts and resident blocks to
    the device), apply the speed path (`runtime.fast.make_fast`), then `attach(components)` (the
    streamed blocks, the per-call models, the encoder placement). `placed(module)` is the context
    the pipeline wraps around every model call.
    """

    def __init__(self, plan: OffloadPlan, device: torch.device | str, spill_dir: Optional[os.PathLike] = None,
                 parallel=None):
        self.plan = plan
        self.device = torch.device(device)
        self.spill_dir = spill_dir
        self.parallel = parallel  # runtime.parallel.ParallelContext: the ranks a sharded plan splits the blocks over
        if plan.shards > 1 and (parallel is None or parallel.world != plan.shards):
            from ..errors import InputError

            have = 1 if parallel is None else parallel.world
            raise InputError(f"This VRAM plan shards the DiT blocks over {plan.shards} ranks, but the job runs on "
                             f"{have}; plan again for {have} rank(s) or start {plan.shards}.")
        self.streamer: Optional[BlockStreamer] = None
        self._placers: dict[int, ModulePlacer] = {}
        self.expandable_segments = use_expandable_segments(self.device)
        if self.expandable_segments:
            log.info("CUDA allocator: expandable segments (a budget fragments fixed ones)")

    def prepare_dit(self, dit: nn.Module) -> nn.Module:
        """Move the DiT's non-block parts and its resident blocks to the device (streamed ones stay)."""
        for name, child in dit.named_children():
            if name != "blocks":
                child.to(self.device)
        for i, block in enumerate(dit.blocks):
            if i < self.plan.resident_blocks:
                block.to(self.device)
        for name in list(dit._parameters):
            if dit._parameters[name] is not None:
                dit._parameters[name].data = dit._parameters[name].data.to(self.device)
        return dit

    def attach(self, components) -> None:
        """Stream the DiT's other blocks and place the other models as the plan says."""
        plan, dit = self.plan, components.dit
        streamed = range(plan.resident_blocks, len(dit.blocks))
        if len(streamed) and plan.shards > 1:  # every rank of the job keeps 1/W of each block
            source = ShardedSource(self.parallel.shard_weights(), self.device)
            self.streamer = BlockStreamer(dit.blocks, self.device, streamed, source=source)
        elif len(streamed):
            store = {"pinned": "pinned", "mmap": "mmap"}.get(plan.host_store, "plain")
            self.streamer = BlockStreamer(dit.blocks, self.device, streamed, store, self.spill_dir)
        # on the other ranks of a parallel job the encoders are not loaded (None): nothing to place
        text_model = getattr(components.text_encoder, "model", None)
        if text_model is None:
            pass
        elif plan.text_encoder == "resident":
            text_model.to(self.device)
        elif plan.text_encoder == "gpu":
            self._placers[id(text_model)] = ModulePlacer(text_model, self.device)
        for module in (components.clip, components.audio_encoder, components.vae):
            if not isinstance(module, nn.Module):
                continue
            if plan.encoders_resident:
                module.to(self.device)
            else:
                self._placers[id(module)] = ModulePlacer(module, self.device)
        log.info("%s", plan.describe())

    def placed(self, module: nn.Module):
        """Context manager: `module` on the device while the block inside runs (no-op when resident).

        The DiT's block slots are released first (the plan counts them in the sampling phase only);
        not when the blocks are sharded over ranks, where every rank must gather the same blocks in
        the same order and the other ranks run no encoder."""
        if self.streamer is not None and self.plan.shards == 1:
            self.streamer.release()
        placer = self._placers.get(id(module))
        return placer.on_device() if placer is not None else contextlib.nullcontext(module)

    def detach(self) -> None:
        if self.streamer is not None:
            self.streamer.detach()
            self.streamer = None

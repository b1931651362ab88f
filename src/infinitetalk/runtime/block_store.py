"""Where streamed DiT blocks live between their turns in a device slot: the sources of `BlockStreamer`.

A block is packed as one flat uint8 slab: every registered parameter and buffer of the block (each
tensor once) at an `ALIGN`-aligned offset (`layout`). `runtime.offload.BlockStreamer` owns the two
device slots, the hooks and the side stream; a source owns the packed bytes and fills a slot:

* `HostSource`: the blocks back to back in host arena slabs (pinned, pageable, or one
  memory-mapped `SpillFile`); loading is one host-to-device copy per contiguous piece of a block
  (a block spans arenas, a tensor never does: `plan_arenas`). Between its turns a block's tensors
  are views of the arenas. Pinned arenas are powers of two (1 GiB by default) because PyTorch's
  CUDA caching host allocator rounds every pinned allocation up to the next power of two
  (pytorch/pytorch#150517): one pinned slab per 14B bf16 block (under 1 GiB) took 1 GiB. Arenas waste only
  the ends no next tensor fits (filled first with the block's later tensors that fit) and the
  rounding of the last arena; the pageable stores allocate exactly what they hold.
* `ShardedSource`: every rank of a process group keeps 1/W of each block's slab on its own device
  (the slab padded to a multiple of W x `ALIGN`, so the shards are equal); loading is one
  all-gather of the shards into the slot (`torch.distributed`: NCCL on CUDA, gloo on the CPU).
  No rank keeps a whole block, so between its turns a block's tensors are placeholders: the right
  shape, dtype and device over one element of storage (all bits set: NaN for floating dtypes), so
  a use outside the streamer's hooks shows as NaN instead of passing silently. Every rank of the
  group must load the same blocks in the same order (`runtime.parallel`: one branch group).

A source's interface (what the streamer calls): `pack(layouts)` (take the blocks' bytes and point
their tensors at `resting(i)`), `slot_bytes(i)`, `load_into(i, dst)` (fill `dst` on the current
CUDA stream, or synchronously on the CPU), `resting(i)`, `restore(i)` (ordinary host tensors, for
`detach`; a collective for `ShardedSource`), `close()`, and the byte counts `host_bytes` /
`device_bytes` it holds.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .host_memory import trim_host_heap
from .offload_plan import PINNED_ARENA_BYTES

ALIGN = 256
"""Byte alignment of every tensor inside a packed slab (what the kernels and inductor expect)."""


@dataclass(frozen=True)
class Entry:
    owner: nn.Module
    name: str
    is_param: bool
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple


def layout(module: nn.Module) -> tuple[list[Entry], int]:
    """Every parameter and buffer of `module` (each tensor once) at aligned offsets of one slab."""
    entries, seen, offset = [], set(), 0
    for owner in module.modules():
        for is_param, table in ((True, owner._parameters), (False, owner._buffers)):
            for name, tensor in table.items():
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                nbytes = tensor.numel() * tensor.element_size()
                entries.append(Entry(owner, name, is_param, offset, nbytes, tensor.dtype, tuple(tensor.shape)))
                offset += -(-nbytes // ALIGN) * ALIGN
    return entries, offset


def views(entries: Sequence[Entry], slab: torch.Tensor) -> list[torch.Tensor]:
    return [slab[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in entries]


def current(entry: Entry) -> torch.Tensor:
    table = entry.owner._parameters if entry.is_param else entry.owner._buffers
    return table[entry.name]


def point_to(entries: Sequence[Entry], tensors: Sequence[torch.Tensor]) -> None:
    """Make every entry's parameter (same object, new `.data`) or buffer the given tensor."""
    for e, t in zip(entries, tensors):
        if e.is_param:
            e.owner._parameters[e.name].data = t
        else:
            e.owner._buffers[e.name] = t


def pack_into(entries: Sequence[Entry], slab: torch.Tensor) -> list[torch.Tensor]:
    out = views(entries, slab)
    for e, v in zip(entries, out):
        v.copy_(current(e).detach().reshape(e.shape))
    return out


def _no_room(folder: Path, size: int, free: Optional[int]) -> Exception:
    from ..errors import StorageError

    def text(n: int) -> str:
        return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{max(1, round(n / 2**20))} MB"

    have = f" ({text(free)} free)" if free is not None else ""
    return StorageError(
        f"Not enough disk space in {folder} for the memory-mapped store of the streamed DiT blocks: it needs "
        f"{text(size)}{have}; free some space there or set TMPDIR to a folder on a larger disk "
        "(the blocks go to disk because host RAM is too small to hold them)."
    )


def _reserve(fd: int, size: int, folder: Path) -> None:
    """Give the spill file all its disk blocks now: a full disk then fails here with a sentence,
    not later as SIGBUS when a page of the mapping is first written."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:  # Windows, macOS: a sparse file; the up-front free-space check is all there is
        os.ftruncate(fd, size)
        return
    try:
        fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise _no_room(folder, size, None) from None
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate
            os.ftruncate(fd, size)
            return
        raise


class SpillFile:
    """Packed slabs written to one file and memory-mapped back (the host store when RAM is short).

    The file is made in `directory` (default: the system temp folder) and unlinked as soon as it
    is mapped: the mapping keeps its pages, and no file is left behind when the process is
    killed. Where an open file cannot be unlinked (Windows) it is removed on `close`.
    """

    def __init__(self, total_bytes: int, directory: Optional[os.PathLike] = None):
        size = max(1, total_bytes)
        folder = Path(directory) if directory is not None else Path(tempfile.gettempdir())
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        if free is not None and free < size:
            raise _no_room(folder, size, free)
        fd, name = tempfile.mkstemp(prefix="infinitetalk-offload-", suffix=".bin", dir=directory)
        self.path = Path(name)
        try:
            _reserve(fd, size, folder)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise
        os.close(fd)
        storage = torch.UntypedStorage.from_file(str(self.path), True, size)
        self.data = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,))
        self.used = 0
        self.unlinked = False
        with contextlib.suppress(OSError):
            self.path.unlink()
            self.unlinked = True

    def allocate(self, nbytes: int) -> torch.Tensor:
        start = self.used
        self.used += -(-nbytes // ALIGN) * ALIGN
        return self.data[start : start + nbytes]

    def close(self) -> None:
        self.data = None
        if not self.unlinked:
            with contextlib.suppress(OSError):
                self.path.unlink()


Layouts = dict  # block index -> (entries, packed bytes)

ARENA_BYTES = PINNED_ARENA_BYTES
"""Default size of a host arena slab (`HostSource`): a power of two, which the pinned allocator does not
round up (the offload plan counts pinned memory in these)."""


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _pow2(nbytes: int) -> int:
    return 1 << (nbytes - 1).bit_length() if nbytes > 1 else nbytes


@dataclass(frozen=True)
class Piece:
    """`nbytes` bytes of a block's packed slab, from `offset` on, kept from byte `start` of arena `arena`."""
    arena: int
    start: int
    offset: int
    nbytes: int


def plan_arenas(layouts: Layouts, arena_bytes: Optional[int], pow2: bool) -> tuple[dict, list[int]]:
    """Where every tensor of every block lives in a row of arena slabs: (spots, sizes).

    spots[i][k] = (arena, start byte) of entry k of block i; sizes[a] = the bytes of arena a.
    Blocks go in order, back to back, their tensors in layout order, each whole (never split
    over two arenas) at an `ALIGN`-aligned start, so a block is a few contiguous runs (`pieces`).
    An arena holds up to `arena_bytes` (None: no limit, one arena). When the block's next tensor
    does not fit, the arena's end is filled with the block's later tensors that fit (first fit,
    each one more piece) and a new arena opened. A tensor larger than `arena_bytes` opens an
    arena of its next power of two, which the tensors after it fill. An arena is as large as its
    contents, rounded up to a power of two when `pow2` (so a pinned arena is what it costs).
    """
    total = sum(_aligned(e.nbytes) for entries, _n in layouts.values() for e in entries)
    caps: list[int] = []
    used: list[int] = []
    spots = {}
    for i, (entries, _n) in layouts.items():
        size = [_aligned(e.nbytes) for e in entries]
        spot: list = [None] * len(entries)

        def place(k: int) -> None:
            spot[k] = (len(caps) - 1, used[-1])
            used[-1] += size[k]

        pending = list(range(len(entries)))
        while pending:
            k = pending[0]
            if not caps or used[-1] + size[k] > caps[-1]:
                if caps:
                    for j in pending[1:]:
                        if used[-1] + size[j] <= caps[-1]:
                            place(j)
                    pending = [j for j in pending if spot[j] is None]
                caps.append(max(arena_bytes, _pow2(size[k])) if arena_bytes else total)
                used.append(0)
            place(k)
            pending.pop(0)
        spots[i] = spot
    return spots, [_pow2(u) if pow2 else u for u in used]


def pieces(entries: Sequence[Entry], spots: Sequence[tuple]) -> list[Piece]:
    """The contiguous runs of a block's tensors in the arenas: byte ranges of its packed slab and of an arena."""
    out: list[Piece] = []
    for e, (arena, start) in sorted(zip(entries, spots), key=lambda pair: pair[0].offset):
        nbytes = _aligned(e.nbytes)
        if not nbytes:
            continue
        last = out[-1] if out else None
        if last and last.arena == arena and last.offset + last.nbytes == e.offset and last.start + last.nbytes == start:
            out[-1] = Piece(arena, last.start, last.offset, last.nbytes + nbytes)
        else:
            out.append(Piece(arena, start, e.offset, nbytes))
    return out


class HostSource:
    """The streamed blocks packed in host memory: `store` "pinned" (page-locked on CUDA; pageable
    where CUDA is absent), "mmap" (one `SpillFile` in `spill_dir`) or "plain" (pageable). Loading
    a block is one host-to-device `copy_` per contiguous piece (`plan_arenas`, `pieces`).

    The "pinned" and "plain" stores keep the blocks in arena slabs of up to `arena_bytes` (a power
    of two; only a tensor larger than that gets a larger arena), allocated as packing reaches
    them; "pinned" rounds every arena up to a power of two as the CUDA allocator would (module
    docstring), "plain" allocates exactly what an arena holds; "mmap" keeps them in one arena,
    the spill file. `host_bytes` counts the arena bytes allocated, not the blocks' packed bytes.
    """

    def __init__(self, store: str = "pinned", spill_dir: Optional[os.PathLike] = None,
                 arena_bytes: int = ARENA_BYTES):
        if arena_bytes < ALIGN or arena_bytes & (arena_bytes - 1):
            raise ValueError(f"arena_bytes must be a power of two of at least {ALIGN}, got {arena_bytes}")
        self.store = store
        self.spill_dir = spill_dir
        self.arena_bytes = arena_bytes
        self.spill: Optional[SpillFile] = None
        self.arenas: list[torch.Tensor] = []
        self.pieces: dict[int, list[Piece]] = {}
        self._sizes: list[int] = []
        self._bytes: dict[int, int] = {}
        self._views: dict[int, list[torch.Tensor]] = {}
        self._entries: dict[int, list[Entry]] = {}

    def _arena(self, index: int) -> torch.Tensor:
        """Arena `index`, allocated on first use (arenas are first used in order)."""
        while len(self.arenas) <= index:
            size = self._sizes[len(self.arenas)]
            if self.store == "mmap":
                self.spill = SpillFile(size, self.spill_dir)
                arena = self.spill.data[:size]
            else:
                pin = self.store == "pinned" and torch.cuda.is_available()
                arena = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            self.arenas.append(arena)
        return self.arenas[index]

    def pack(self, layouts: Layouts) -> None:
        limit = None if self.store == "mmap" else self.arena_bytes
        spots, self._sizes = plan_arenas(layouts, limit, pow2=self.store == "pinned")
        for i, (entries, nbytes) in layouts.items():  # block by block: the host never holds a block twice for long
            out = []
            for e, (a, start) in zip(entries, spots[i]):
                view = self._arena(a)[start : start + e.nbytes].view(e.dtype).view(e.shape)
                view.copy_(current(e).detach().reshape(e.shape))
                out.append(view)
            self._views[i] = out
            self._entries[i] = entries
            self._bytes[i] = nbytes
            self.pieces[i] = pieces(entries, spots[i])
            point_to(entries, out)
            trim_host_heap()  # the block's old tensors just freed: their heap holes go back now, not after the whole store

    def slot_bytes(self, index: int) -> int:
        return self._bytes[index]

    def load_into(self, index: int, dst: torch.Tensor) -> None:
        non_blocking = dst.device.type == "cuda"
        for p in self.pieces[index]:
            dst[p.offset : p.offset + p.nbytes].copy_(self.arenas[p.arena][p.start : p.start + p.nbytes],
                                                      non_blocking=non_blocking)

    def resting(self, index: int) -> list[torch.Tensor]:
        return self._views[index]

    def restore(self, index: int) -> list[torch.Tensor]:
        return [t.clone() for t in self._views[index]]

    @property
    def slabs(self) -> dict[int, torch.Tensor]:
        """Block -> the arena slab its first piece lies in (where its bytes start)."""
        return {i: self.arenas[p[0].arena] for i, p in self.pieces.items() if p}

    @property
    def host_bytes(self) -> int:
        """Bytes of the arena slabs allocated (>= the packed bytes of the blocks)."""
        return sum(a.numel() for a in self.arenas)

    @property
    def device_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self._views.clear()
        self.pieces.clear()
        self.arenas.clear()
        if self.spill is not None:
            self.spill.close()
            self.spill = None


def _all_gather(out: torch.Tensor, shard: torch.Tensor, group) -> None:
    """`out` = the shards of every rank of `group`, in rank order (one collective)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the name before torch 2.13
    gather(out, shard, group=group)


class ShardedSource:
    """The streamed blocks split over the ranks of `group`: this rank keeps bytes
    [rank * S, (rank + 1) * S) of each block's padded slab (S = padded / W) on `device`; loading a
    block is one all-gather into the slot. Every rank of `group` must call `pack`, `load_into` and
    `restore` for the same blocks in the same order."""

    def __init__(self, group, device: torch.device | str):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = torch.device(device)
        self.shards: dict[int, torch.Tensor] = {}
        self._padded: dict[int, int] = {}
        self._entries: dict[int, list[Entry]] = {}
        self._resting: dict[int, list[torch.Tensor]] = {}
        self._filler = torch.full((16,), 255, dtype=torch.uint8, device=self.device)

    def padded(self, nbytes: int) -> int:
        unit = self.world * ALIGN
        return max(1, -(-nbytes // unit)) * unit

    def _placeholder(self, e: Entry) -> torch.Tensor:
        return self._filler.view(e.dtype)[0].expand(e.shape)

    def pack(self, layouts: Layouts) -> None:
        for i, (entries, nbytes) in layouts.items():
            size = self.padded(nbytes)
            staging = torch.zeros(size, dtype=torch.uint8)  # host staging, one block at a time
            pack_into(entries, staging)
            chunk = size // self.world
            self.shards[i] = staging[self.rank * chunk:(self.rank + 1) * chunk].to(self.device, copy=True)
            del staging
            self._padded[i] = size
            self._entries[i] = entries
            self._resting[i] = [self._placeholder(e) for e in entries]
            point_to(entries, self._resting[i])

    def slot_bytes(self, index: int) -> int:
        return self._padded[index]

    def load_into(self, index: int, dst: torch.Tensor) -> None:
        _all_gather(dst, self.shards[index], self.group)

    def resting(self, index: int) -> list[torch.Tensor]:
        return self._resting[index]

    def restore(self, index: int) -> list[torch.Tensor]:
        full = torch.empty(self._padded[index], dtype=torch.uint8, device=self.device)
        _all_gather(full, self.shards[index], self.group)
        return [t.clone() for t in views(self._entries[index], full.cpu())]

    @property
    def host_bytes(self) -> int:
        return 0

    @property
    def device_bytes(self) -> int:
        return sum(s.numel() for s in self.shards.values())

    def close(self) -> None:
        self.shards.clear()
        self._resting.clear()

"""Where streamed DiT blocks live between their turns in a device slot: the sources of `BlockStreamer`.

A block is packed as one flat uint8 slab: every registered parameter and buffer of the block (each
tensor once) at an `ALIGN`-aligned offset (`layout`). `runtime.offload.BlockStreamer` owns the two
device slots, the hooks and the side stream; a source owns the packed bytes and fills a slot:

* `HostSource`: one host slab per block (pinned, memory-mapped into a `SpillFile`, or pageable);
  loading is a host-to-device copy. Between its turns a block's tensors are views of its host slab.
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
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

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


class SpillFile:
    """Packed slabs written to one file and memory-mapped back (the host store when RAM is short).

    The file lives in `directory` (default: the system temp folder) and is removed on `close`.
    """

    def __init__(self, total_bytes: int, directory: Optional[os.PathLike] = None):
        fd, name = tempfile.mkstemp(prefix="infinitetalk-offload-", suffix=".bin", dir=directory)
        self.path = Path(name)
        os.close(fd)
        with open(self.path, "r+b") as fh:
            fh.truncate(max(1, total_bytes))
        storage = torch.UntypedStorage.from_file(str(self.path), True, max(1, total_bytes))
        self.data = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (max(1, total_bytes),))
        self.used = 0

    def allocate(self, nbytes: int) -> torch.Tensor:
        start = self.used
        self.used += -(-nbytes // ALIGN) * ALIGN
        return self.data[start : start + nbytes]

    def close(self) -> None:
        self.data = None
        with contextlib.suppress(OSError):
            self.path.unlink()


Layouts = dict  # block index -> (entries, packed bytes)


class HostSource:
    """The streamed blocks packed in host memory: `store` "pinned", "mmap" (a `SpillFile` in
    `spill_dir`) or "plain" (pageable). Loading a block is one host-to-device copy."""

    def __init__(self, store: str = "pinned", spill_dir: Optional[os.PathLike] = None):
        self.store = store
        self.spill_dir = spill_dir
        self.spill: Optional[SpillFile] = None
        self.slabs: dict[int, torch.Tensor] = {}
        self._views: dict[int, list[torch.Tensor]] = {}
        self._entries: dict[int, list[Entry]] = {}

    def _slab(self, nbytes: int) -> torch.Tensor:
        if self.store == "mmap":
            return self.spill.allocate(nbytes)
        pin = self.store == "pinned" and torch.cuda.is_available()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)

    def pack(self, layouts: Layouts) -> None:
        if self.store == "mmap" and layouts:
            self.spill = SpillFile(sum(-(-n // ALIGN) * ALIGN for _, n in layouts.values()), self.spill_dir)
        for i, (entries, nbytes) in layouts.items():  # block by block: the host never holds a block twice for long
            slab = self._slab(nbytes)
            self._views[i] = pack_into(entries, slab)
            self.slabs[i] = slab
            self._entries[i] = entries
            point_to(entries, self._views[i])

    def slot_bytes(self, index: int) -> int:
        return self.slabs[index].numel()

    def load_into(self, index: int, dst: torch.Tensor) -> None:
        dst.copy_(self.slabs[index], non_blocking=dst.device.type == "cuda")

    def resting(self, index: int) -> list[torch.Tensor]:
        return self._views[index]

    def restore(self, index: int) -> list[torch.Tensor]:
        return [t.clone() for t in self._views[index]]

    @property
    def host_bytes(self) -> int:
        return sum(s.numel() for s in self.slabs.values())

    @property
    def device_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self._views.clear()
        self.slabs.clear()
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

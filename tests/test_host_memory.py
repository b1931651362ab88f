"""runtime.host_memory: the process's resident memory from /proc, and giving freed C-heap pages back.

Real glibc, real /proc: the tests allocate tensors the way the fp8 loader does (after a larger
block was freed, so glibc serves them from its heap), free some of them in the middle of the
heap and read the process's anonymous memory before and after."""
from __future__ import annotations

import gc
import os

import pytest
import torch
from torch import nn

from infinitetalk.runtime.host_memory import _malloc_trim, process_memory, trim_host_heap
from infinitetalk.runtime.offload import BlockStreamer

MiB = 2**20

glibc = pytest.mark.skipif(
    _malloc_trim() is None or process_memory() is None or "MALLOC_MMAP_THRESHOLD_" in os.environ,
    reason="needs Linux with glibc's malloc_trim and its dynamic mmap threshold",
)


def _raise_mmap_threshold() -> None:
    """Allocate and free a 16 MiB block (glibc then serves requests below 16 MiB from its heap),
    then give the heap's free pages back, so that new allocations show in the process's memory."""
    big = torch.ones(16 * MiB, dtype=torch.uint8)
    del big
    trim_host_heap()  # free chunks left by earlier work would hide new allocations from the measure


def _anon() -> int:
    return process_memory().anon


def test_process_memory_reads_this_process():
    mem = process_memory()
    if mem is None:
        pytest.skip("no /proc here")
    assert mem.anon > 0 and mem.rss >= mem.anon and mem.peak_rss >= mem.rss
    assert mem.held == mem.anon + mem.shmem
    assert process_memory(2**22 + 12345) is None  # no such process


@glibc
def test_trim_host_heap_gives_freed_heap_pages_back():
    _raise_mmap_threshold()
    tensors = [torch.ones(MiB, dtype=torch.uint8) for _ in range(96)]  # 96 MiB, touched
    allocated = _anon()
    del tensors[::2]  # 48 holes of 1 MiB between kept tensors: free cannot give them back
    holes = _anon()
    assert holes > allocated - 8 * MiB, "premise: holes in the middle of glibc's heap stay resident after free"
    assert trim_host_heap()
    assert _anon() < holes - 40 * MiB
    del tensors


@glibc
def test_block_streamer_packing_gives_the_old_host_copies_back():
    """Packing streamed blocks frees their old tensors; the streamer trims the heap, so the process
    ends up holding the packed store, not the store plus the old copies."""
    torch.compiler.disable(lambda: None)  # the streamer's hooks import dynamo: not part of the measure
    _raise_mmap_threshold()
    keep = []
    blocks = nn.ModuleList()
    for _ in range(6):
        block = nn.Sequential()
        for _ in range(8):
            block.append(nn.Linear(512, 512, bias=False))  # 1 MiB of float32 from the heap
            keep.append(torch.ones(64 * 1024, dtype=torch.uint8))  # keeps a used chunk after it
        blocks.append(block)
    packing = _anon()  # measured around the packing alone: earlier tests' heap state cannot shift it
    streamer = BlockStreamer(blocks, "cpu", range(len(blocks)), "plain")
    store = streamer.host_bytes
    assert store >= 48 * MiB
    grew = _anon() - packing
    # without giving the old copies back the process grows by the whole store (the copies stay as holes)
    assert grew < store - 32 * MiB, f"grew {grew / MiB:.0f} MiB while packing {store / MiB:.0f} MiB"
    x = torch.randn(2, 512)
    with torch.no_grad():
        assert torch.isfinite(blocks[5](x)).all()
    streamer.detach()
    del keep


def test_sampler_sees_a_peak_the_process_no_longer_holds():
    import time

    from infinitetalk.runtime.host_memory import HostMemorySampler

    if process_memory() is None:
        pytest.skip("no /proc here")
    gc.collect()  # what the earlier tests left is given back first, not while the block is held
    trim_host_heap()
    before = process_memory().held
    with HostMemorySampler(0.02) as sampler:
        block = torch.ones(256 * MiB, dtype=torch.uint8)  # touched: resident
        time.sleep(0.2)
        del block
        trim_host_heap()
        time.sleep(0.1)
    peaks = sampler.peaks
    assert len(sampler.samples) >= 3
    assert peaks["held"] - before > 200 * MiB  # the 256 MiB block, less whatever else the process gave back meanwhile
    assert sampler.samples[-1][1].held < peaks["held"] - 200 * MiB  # sampled after the free
    assert peaks["peak_rss"] >= peaks["rss"] - MiB


@glibc
def test_packing_gives_each_block_back_before_the_next():
    """The old copies go back block by block while the store fills, so the process never holds
    the whole store and all the old copies at once (the 14B fp8 job peaked 10 GiB higher so)."""
    from infinitetalk.runtime.block_store import HostSource, layout

    class Recording(HostSource):  # notes the process's memory as each new arena is made
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen = []

        def _arena(self, index):
            if index >= len(self.arenas):
                self.seen.append(_anon())
            return super()._arena(index)

    _raise_mmap_threshold()
    keep, blocks = [], []
    for _ in range(6):
        block = nn.Sequential()
        for _ in range(8):
            block.append(nn.Linear(512, 512, bias=False))  # 1 MiB each: an 8 MiB block
            keep.append(torch.ones(64 * 1024, dtype=torch.uint8))
        blocks.append(block)
    source = Recording("plain", arena_bytes=8 * MiB)
    packing = _anon()
    source.pack({i: layout(b) for i, b in enumerate(blocks)})
    assert len(source.arenas) == 6
    worst = max(source.seen) - packing
    # without a trim per block the sixth arena comes while the five blocks before it still sit as holes (40 MiB)
    assert worst < 24 * MiB, f"grew {worst / MiB:.0f} MiB while packing 48 MiB of blocks"
    del keep

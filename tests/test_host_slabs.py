"""Streamed blocks in host arena slabs (`runtime.block_store.HostSource`, `plan_arenas`), on the CPU.

PyTorch's CUDA caching host allocator rounds every pinned allocation up to a power of two, so the
host store packs the blocks back to back into power-of-two arenas (1 GiB by default) instead of
one slab per block. Here the arenas are a few KiB, so every block of the tiny DiT spans several
and some of its tensors are larger than an arena. Checked:

* the streamed forward is bit-identical to the resident model, for the "plain" store and the
  "pinned" store (pageable on a CPU-only host, but with the pinned sizing: power-of-two arenas),
  and `detach` gives the exact weights back;
* every resting view has its entry's shape and dtype, lies inside one arena slab (shares its
  storage, starts at an `ALIGN`-aligned byte, never straddles two slabs) and no two overlap;
* `host_bytes` is the bytes of the arenas allocated: each a power of two for "pinned" (at most an
  arena, unless it holds a larger tensor) with less than one (the largest) arena wasted in all,
  exactly the packed bytes for "plain";
* a tensor larger than an arena gets a power-of-two arena of its own which the next tensors fill,
  and `load_into` rebuilds the packed slab `layout` describes, byte for byte, from the pieces.

The pinned allocation itself (`pin_memory=True`) and the non-blocking copies only run on CUDA
(tests/test_offload_gpu.py).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from infinitetalk.runtime.block_store import ALIGN, HostSource, current, layout, plan_arenas, views
from infinitetalk.runtime.offload import BlockStreamer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _arena_of(t: torch.Tensor, source: HostSource) -> int:
    """The index of the arena slab whose bytes hold all of `t` (asserts there is exactly one)."""
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    found = [a for a, slab in enumerate(source.arenas)
             if t.untyped_storage().data_ptr() == slab.untyped_storage().data_ptr()
             and slab.data_ptr() <= lo and hi <= slab.data_ptr() + slab.numel()]
    assert len(found) == 1, (t.shape, t.dtype, found)
    return found[0]


def _check_resting(source: HostSource, layouts: dict) -> None:
    ranges = []
    for i, (entries, _n) in layouts.items():
        rest = source.resting(i)
        assert len(rest) == len(entries)
        for e, t in zip(entries, rest):
            assert t.shape == e.shape and t.dtype == e.dtype and t.device.type == "cpu"
            if not e.nbytes:  # an empty tensor (data_ptr 0): a view of an arena's storage all the same
                assert any(t.untyped_storage().data_ptr() == slab.untyped_storage().data_ptr() for slab in source.arenas)
                continue
            a = _arena_of(t, source)
            start = t.data_ptr() - source.arenas[a].data_ptr()
            assert start % ALIGN == 0
            ranges.append((a, start, start + e.nbytes))
    ranges.sort()
    for (a0, _s0, e0), (a1, s1, _e1) in zip(ranges, ranges[1:]):
        assert a0 != a1 or e0 <= s1  # no two tensors share bytes


def _check_bytes(source: HostSource, layouts: dict, arena: int) -> None:
    packed = sum(n for _e, n in layouts.values())
    sizes = [slab.numel() for slab in source.arenas]
    assert source.host_bytes == sum(sizes) >= packed
    largest = max(e.nbytes for entries, _n in layouts.values() for e in entries)
    if source.store == "pinned":
        assert all(_pow2(s) and (s <= arena or s <= 2 * largest) for s in sizes), sizes
        assert source.host_bytes < packed + max(arena, *sizes)  # waste: less than one (the largest) arena
    else:
        assert source.host_bytes == packed  # pageable arenas are exactly as large as what they hold


def _dit_case():
    from test_offload import _dit, _inputs

    model = _dit(4)
    return model, _inputs(model.config)


@pytest.mark.parametrize("store,arena", [("plain", 2**14), ("pinned", 2**14), ("pinned", 2**18)])
def test_streamed_forward_from_small_arenas_is_bit_identical(store, arena):
    from test_offload import _predict, _same

    model, inp = _dit_case()
    branches = ("cond", "drop_audio")
    reference = _predict(model, inp, branches, "context")
    weights = {n: t.clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    streamed = [1, 2, 3]
    layouts = {i: layout(model.blocks[i]) for i in streamed}
    source = HostSource(store, arena_bytes=arena)
    streamer = BlockStreamer(model.blocks, "cpu", streamed, source=source)
    assert len(source.arenas) > len(streamed)  # blocks span several arenas
    assert all(len(source.pieces[i]) > 1 for i in streamed)
    if arena < max(e.nbytes for entries, _n in layouts.values() for e in entries):
        assert max(slab.numel() for slab in source.arenas) > arena  # tensors larger than an arena fit whole
    _check_resting(source, layouts)
    _check_bytes(source, layouts, arena)
    # between their turns the streamed blocks' tensors are the resting views
    got = _predict(model, inp, branches, "context")
    _same(reference, got)
    assert streamer.copies >= 2 * len(streamed)
    loaded = {i for i in streamer._in_slot if i is not None}
    for i in set(streamed) - loaded:
        now = [*model.blocks[i].parameters(), *model.blocks[i].buffers()]
        assert all(any(t.data_ptr() == r.data_ptr() for r in source.resting(i)) for t in now if t.numel())
    streamer.detach()
    assert source.host_bytes == 0 and not source.arenas
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(now[n], t) for n, t in weights.items())
    _same(reference, _predict(model, inp, branches, "context"))


def _stack() -> nn.Sequential:
    """Linears with float32 weights of 10, 10, 4, 4 and 0.75 KiB, bf16 and int64 buffers and an empty one."""
    g = torch.Generator().manual_seed(3)
    layers = []
    for out_f, in_f in ((40, 64), (64, 40), (16, 64), (64, 16), (3, 64)):
        lin = nn.Linear(in_f, out_f)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))
        layers.append(lin)
    stack = nn.Sequential(*layers).requires_grad_(False)
    stack[1].register_buffer("scale", torch.randn(7, generator=g).to(torch.bfloat16))
    stack[2].register_buffer("steps", torch.arange(5, dtype=torch.int64))
    stack[3].register_buffer("empty", torch.empty(0))
    return stack


@pytest.mark.parametrize("store", ["plain", "pinned"])
def test_tensors_larger_than_an_arena_and_load_into_rebuilds_the_packed_slab(store):
    arena = 4096  # the first two weights (10 KiB) are larger than an arena, two fill one exactly
    blocks = nn.ModuleList([_stack() for _ in range(3)])
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    reference = [b(x) for b in blocks]
    layouts = {i: layout(blocks[i]) for i in range(3)}
    originals = {i: [current(e).clone() for e in entries] for i, (entries, _n) in layouts.items()}
    source = HostSource(store, arena_bytes=arena)
    source.pack(layouts)
    _check_resting(source, layouts)
    _check_bytes(source, layouts, arena)
    big = [slab.numel() for slab in source.arenas if slab.numel() > arena]
    assert big and (store != "pinned" or all(_pow2(s) for s in big))
    # the first 10 KiB weight opens a 16 KiB arena (the next power of two), which the tensors after it fill
    spots, sizes = plan_arenas(layouts, arena, pow2=store == "pinned")
    first = spots[0][0][0]
    assert sizes[first] == 16384 if store == "pinned" else 16384 - ALIGN <= sizes[first] <= 16384
    assert sum(1 for a, _s in spots[0] if a == first) >= 5
    for i, (entries, n) in layouts.items():
        assert source.slot_bytes(i) == n
        dst = torch.full((n + 3 * ALIGN,), 7, dtype=torch.uint8)[:n]  # a slot larger than the block
        source.load_into(i, dst)
        got = views(entries, dst)
        for t, want in zip(got, originals[i]):
            assert t.dtype == want.dtype and t.shape == want.shape and torch.equal(t, want)
        assert torch.equal(torch.cat([p.reshape(-1).view(torch.uint8) for p in got]),
                           torch.cat([p.reshape(-1).view(torch.uint8) for p in source.resting(i)]))
    # the blocks' own tensors now rest in the arenas and still compute the same
    assert all(torch.equal(b(x), r) for b, r in zip(blocks, reference))
    source.close()
    assert source.host_bytes == 0


def test_plan_places_blocks_back_to_back_and_fills_arena_ends():
    blocks = nn.ModuleList([_stack() for _ in range(4)])
    layouts = {i: layout(blocks[i]) for i in range(4)}
    for arena in (2**12, 2**14, 2**16, 2**20):
        spots, sizes = plan_arenas(layouts, arena, pow2=True)
        packed = sum(n for _e, n in layouts.values())
        assert all(_pow2(s) for s in sizes) and packed <= sum(sizes) < packed + max(arena, *sizes)
        if arena == 2**14:  # the ends of arenas are filled with a block's later tensors: out of layout order
            assert any([a for a, _s in spots[i]] != sorted(a for a, _s in spots[i]) for i in range(4))
        for i, (entries, _n) in layouts.items():
            for e, (a, start) in zip(entries, spots[i]):
                assert start % ALIGN == 0 and start + e.nbytes <= sizes[a]
        # blocks go in order: no block starts in an arena before the one the block before it ends in
        firsts = [min(a for a, _s in spots[i]) for i in range(4)]
        lasts = [max(a for a, _s in spots[i]) for i in range(4)]
        assert all(lasts[i] <= firsts[i + 1] for i in range(3))
    one, sizes = plan_arenas(layouts, None, pow2=False)  # the spill file: one arena, the packed bytes in order
    assert sizes == [sum(n for _e, n in layouts.values())]
    assert [s for i in range(4) for _a, s in one[i]] == sorted(s for i in range(4) for _a, s in one[i])
    with pytest.raises(ValueError):
        HostSource("plain", arena_bytes=3 * 2**20)

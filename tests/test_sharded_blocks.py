"""DiT blocks sharded over the ranks of a parallel job (`runtime.block_store.ShardedSource`), on the CPU with gloo.

Each rank keeps 1/W of every streamed block's packed bytes; the block streamer gathers a block
into one of its two slots (one all-gather) just before it runs. Checked on two forked ranks
(`run_ranks(..., start_method="fork")`, as tests/test_parallel.py):

* the streamer alone, on a 5-block tiny DiT (float32, fp8 linears, GGUF blocks with a LoRA):
  outputs bit-identical to the resident model on the same rank, each rank's shards about half
  the streamed bytes, at most two whole blocks in the slots, evicted blocks holding placeholders
  of one element, and `detach` gathering the exact weights back;
* the planner: a whole DiT per rank when it fits, else the blocks sharded, else streamed from
  each rank's host memory; one branch group when sharded (a forced `--branch-groups 2` is refused);
* the whole pipeline (`from_pretrained(..., vram_budget=X, parallel=ctx)`) with X inside the
  budget band where the planner shards, found from the plan functions: the video equals the
  one-process video within tests/test_parallel.py's bounds (uint8 frames within one level,
  motion frames relative 1e-4) and the logged plan says the blocks are sharded; and the command
  `infinitetalk generate --model tiny --gpus 2 --device cpu --vram X` (its ranks forked here),
  whose MP4 matches the one-process MP4 (after H.264: mean |diff| < 1 level, as the parallel
  resume test) and whose log says the blocks are sharded, and which refuses --branch-groups 2.
  The tiny model of `--model tiny` has two DiT blocks, and two blocks never shard (the two full
  slots alone hold a whole DiT), so these tests give the tiny model six blocks (`six_block_tiny`).
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing

import numpy as np
import pytest
import torch
import torch.distributed as dist

from infinitetalk.errors import InputError
from infinitetalk.runtime.block_store import ALIGN, ShardedSource, layout
from infinitetalk.runtime.offload import BlockStreamer
from infinitetalk.runtime.offload_plan import GiB, OffloadModels, min_budget, plan_offload
from infinitetalk.runtime.parallel import ParallelContext, plan_layout
from infinitetalk.runtime.parallel_launch import run_ranks

pytestmark = pytest.mark.skipif(
    not dist.is_available() or "fork" not in multiprocessing.get_all_start_methods(),
    reason="needs torch.distributed with gloo and fork",
)

BLOCKS = 6  # DiT blocks of the deeper tiny model of the pipeline test


# ---- the streamer with a sharded source ------------------------------------------------------


def _streamer_case(kind: str) -> dict:
    from test_offload import _dit, _gguf_dit, _inputs, _predict

    model = {"float32": lambda: _dit(5), "fp8": lambda: _dit(5, fp8=True), "gguf": lambda: _gguf_dit(5)}[kind]()
    speakers = 2 if kind == "float32" else 1
    branches = ("cond", "drop_text", "uncond") if kind == "float32" else ("cond", "drop_audio")
    inp = _inputs(model.config, speakers)
    reference = _predict(model, inp, branches, "context")
    weights = {n: t.clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    streamed = [1, 2, 3, 4]
    packed = {i: layout(model.blocks[i])[1] for i in streamed}
    streamer = BlockStreamer(model.blocks, "cpu", streamed, source=ShardedSource(dist.group.WORLD, "cpu"))
    occupied = []
    hooks = [b.register_forward_hook(lambda *_: occupied.append(sum(o is not None for o in streamer._in_slot)))
             for b in model.blocks]
    got = _predict(model, inp, branches, "context")
    for h in hooks:
        h.remove()
    loaded = {i for i in streamer._in_slot if i is not None}
    resting = [max(t.untyped_storage().nbytes() for t in (*model.blocks[i].parameters(), *model.blocks[i].buffers()))
               for i in streamed if i not in loaded]
    out = {
        "identical": len(got) == len(reference) and all(torch.equal(a, b) for a, b in zip(got, reference)),
        "store": streamer.store_bytes, "host": streamer.host_bytes, "packed": sum(packed.values()),
        "largest": max(packed.values()), "slot_bytes": streamer.slot_bytes, "slots": len(streamer._slots),
        "max_occupied": max(occupied), "gathers": streamer.copies, "resting_storage": max(resting),
    }
    streamer.detach()  # a collective: the blocks come back whole on every rank
    now = dict([*model.named_parameters(), *model.named_buffers()])
    out["restored"] = all(torch.equal(now[n], t) for n, t in weights.items())
    out["identical_after_detach"] = all(torch.equal(a, b) for a, b in zip(_predict(model, inp, branches, "context"), reference))
    return out


def _streamer_worker():
    mine = {kind: _streamer_case(kind) for kind in ("float32", "fp8", "gguf")}
    try:  # a forced branch-group count cannot run with sharded blocks: refused before any group is made
        ParallelContext(branch_groups=2).shard_weights()
        mine["forced_groups"] = None
    except InputError as err:
        mine["forced_groups"] = str(err)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def test_sharded_streamer_gives_identical_outputs_with_half_the_bytes_per_rank():
    ranks = run_ranks(_streamer_worker, world=2, device="cpu", start_method="fork")
    for rank, mine in enumerate(ranks):
        for kind in ("float32", "fp8", "gguf"):
            r = mine[kind]
            assert r["identical"] and r["restored"] and r["identical_after_detach"], (rank, kind, r)
            # this rank's shards: half of the streamed bytes, each block padded to a multiple of 2 x ALIGN
            assert r["packed"] / 2 <= r["store"] <= r["packed"] / 2 + 4 * ALIGN, (rank, kind, r)
            assert r["host"] == 0
            # two slots of one (padded) block each, never more than two streamed blocks in them
            assert r["slots"] == 2 and r["slot_bytes"] <= 2 * (r["largest"] + 2 * ALIGN) and r["max_occupied"] <= 2
            assert r["gathers"] >= 2 * 4  # every streamed block gathered again in each forward
            assert r["resting_storage"] <= 16  # evicted blocks hold placeholders, not weights
        assert "--branch-groups 2 needs a whole DiT on every GPU" in mine["forced_groups"]


# ---- the planner -----------------------------------------------------------------------------


def _deep_models(blocks: int = BLOCKS) -> OffloadModels:
    from infinitetalk.models.dit import InfiniteTalkDiT

    base = OffloadModels.tiny()
    with torch.device("meta"):
        dit = InfiniteTalkDiT(base.dit_config.replace(num_layers=blocks))
    return base.with_dit(dit)


def _threshold(models: OffloadModels, holds, lo: int, hi: int, **plan_args) -> int:
    """The smallest budget in (lo, hi] whose plan satisfies `holds` (the planner is monotone in the budget)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if holds(plan_offload(models, mid, **plan_args)):
            hi = mid
        else:
            lo = mid
    return hi


def sharded_band(models: OffloadModels, world: int = 2, **plan_args) -> tuple[int, int]:
    """[low, high): the budgets where `world` ranks shard the DiT blocks (below: host streaming;
    from high on: a whole DiT per rank)."""
    args = dict(size=plan_args.get("size", 480), speakers=plan_args.get("speakers", 1), passes=plan_args.get("passes", 3))
    floor, top = min_budget(models, **args) - 1, 64 * GiB
    whole = _threshold(models, lambda p: p.resident_blocks == p.num_blocks, floor, top, shards=world, **plan_args)
    low = _threshold(models, lambda p: p.sharded or p.resident_blocks == p.num_blocks, floor, top, shards=world, **plan_args)
    return low, whole


def test_planner_replicates_then_shards_then_streams_from_host():
    models = _deep_models()
    low, whole = sharded_band(models, size=480, speakers=2, passes=3)
    assert low < whole
    n, b = models.num_blocks, models.dit_block
    above = plan_offload(models, whole, size=480, speakers=2, passes=3, shards=2)
    assert above.shards == 1 and above.resident_blocks == n and above.host_store == "none"
    mid = plan_offload(models, (low + whole) // 2, size=480, speakers=2, passes=3, shards=2)
    assert mid.sharded and mid.shards == 2 and mid.host_store == "shards" and mid.pinned_bytes == 0
    assert mid.shard_bytes == mid.streamed_blocks * -(-b // 2)
    assert "DiT blocks sharded over 2 ranks, gathered block by block through two slots" in mid.describe()
    # the same budget on one rank (or where sharding is not allowed): streamed from host memory
    alone = plan_offload(models, (low + whole) // 2, size=480, speakers=2, passes=3)
    assert alone.shards == 1 and alone.resident_blocks < n and alone.host_store == "pinned"
    below = plan_offload(models, low - 1, size=480, speakers=2, passes=3, shards=2)
    assert below.shards == 1 and below.resident_blocks < n and below.host_store == "pinned"
    # two blocks never shard: fixed + 2/W blocks + two full slots is more than a whole DiT
    two = OffloadModels.tiny()
    assert all(not plan_offload(two, budget, size=480, shards=2).sharded
               for budget in range(min_budget(two, size=480), 4 * two.total, two.total // 40))


def test_layout_with_sharded_blocks_is_one_branch_group():
    assert plan_layout(4, 2, 40, 21, sharded=True) == plan_layout(4, 2, 40, 21, branch_groups=1)
    assert plan_layout(4, 2, 40, 21).branch_groups == 2  # without sharding 2 branches take 2 groups
    with pytest.raises(InputError, match="--branch-groups 2 needs a whole DiT on every GPU.*leave out --branch-groups"):
        plan_layout(4, 2, 40, 21, branch_groups=2, sharded=True)
    with pytest.raises(InputError, match="3 GPUs cannot share this job with the DiT blocks sharded"):
        plan_layout(3, 3, 40, 21, sharded=True)


# ---- the whole pipeline ----------------------------------------------------------------------


@pytest.fixture
def six_block_tiny(monkeypatch):
    """`--model tiny` with BLOCKS DiT blocks (the planner, the builder and the layout read these configs)."""
    from infinitetalk.runtime.tiny_models import TinyConfigs

    base = TinyConfigs.default()
    deep = dataclasses.replace(base, dit=base.dit.replace(num_layers=BLOCKS))
    monkeypatch.setattr(TinyConfigs, "default", classmethod(lambda cls: deep))
    return deep


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record) -> None:
        self.lines.append(record.getMessage())


def _pipeline_worker(budget_gb: float, jobs: dict):
    from test_parallel import _windows

    from infinitetalk.generation.pipeline import InfiniteTalk

    records = _Records()
    logger = logging.getLogger("infinitetalk")
    logger.setLevel(logging.INFO)
    logger.addHandler(records)
    ctx = ParallelContext()
    pipe = InfiniteTalk.from_pretrained(model="tiny", device="cpu", vram_budget=budget_gb, vram_size=480, parallel=ctx)
    out = {job: _windows(pipe, *jobs[job]) for job in jobs}
    streamer = pipe.components.offload.streamer
    layout_used = ctx.layout(3, pipe.components.dit.config.num_heads, 4)
    stats = {"log": "\n".join(records.lines), "store": streamer.store_bytes, "gathers": streamer.copies,
             "plan": pipe.components.offload.plan, "groups": layout_used.branch_groups}
    logger.removeHandler(records)
    return out, stats


def test_pipeline_with_blocks_sharded_over_two_ranks_equals_one_process(media_dir, six_block_tiny):
    from test_parallel import SMALL, _check_same, _windows

    from infinitetalk.generation.pipeline import InfiniteTalk

    pipe = InfiniteTalk.from_pretrained(model="tiny", device="cpu", vram_budget=None)
    assert len(pipe.components.dit.blocks) == BLOCKS
    jobs = {
        "one": pipe.prepare(image=media_dir / "portrait.png", audio=media_dir / "speaker1.wav", **SMALL),
        "two": pipe.prepare(image=media_dir / "two_people.png", audio=media_dir / "speaker1.wav",
                            audio2=media_dir / "speaker2.wav", audio_type="para",
                            boxes=((0, 0, 700, 1440), (1860, 0, 2560, 1440)), **{**SMALL, "bucket_longest_side": 64}),
    }
    reference = {job: _windows(pipe, *jobs[job]) for job in jobs}
    # the budget: the middle of the band where the planner shards (as from_pretrained plans: 2 speakers, 3 passes)
    models = OffloadModels.tiny().with_dit(pipe.components.dit)
    low, whole = sharded_band(models, size=480, speakers=2, passes=3)
    budget_gb = (low + whole) / 2 / GiB
    out, stats = run_ranks(_pipeline_worker, (budget_gb, jobs), world=2, device="cpu", start_method="fork")
    for job in jobs:
        _check_same(out[job], reference[job])
    plan = stats["plan"]
    assert plan.shards == 2 and plan.streamed_blocks > 2 and stats["groups"] == 1
    assert "DiT blocks sharded over 2 ranks, gathered block by block through two slots" in stats["log"]
    assert stats["store"] <= plan.streamed_blocks * (plan.block_bytes // 2 + 64 * ALIGN)
    assert stats["gathers"] > plan.streamed_blocks * 2  # blocks gathered again and again, not parked in the slots


def _cli_rank(argv: list) -> int:
    from infinitetalk.cli import main

    return main(argv)


def test_cli_gpus_2_with_a_vram_budget_that_shards(media_dir, tmp_path, capfd, six_block_tiny):
    from test_e2e_tiny import probe_mp4

    from infinitetalk.cli import main

    models = OffloadModels.tiny()  # the six-block tiny model, sized from its configs as the command plans it
    low, whole = sharded_band(models, size=480, speakers=2, passes=3)
    budget = f"{(low + whole) / 2 / GiB:.6f}"
    argv = ["generate", "--model", "tiny", "--device", "cpu", "--steps", "2", "--frame-num", "13", "--motion-frame", "5",
            "--max-seconds", "0.5", "--size", "480", "--image", str(media_dir / "portrait.png"),
            "--audio", str(media_dir / "speaker1.wav")]
    alone = tmp_path / "alone.mp4"
    assert main([*argv, "--output", str(alone)]) == 0  # one process, every model resident
    capfd.readouterr()
    shared = tmp_path / "shared.mp4"
    rc = run_ranks(_cli_rank, ([*argv, "--gpus", "2", "--vram", budget, "--output", str(shared)],), world=2,
                   device="cpu", start_method="fork")
    err = capfd.readouterr().err
    assert rc == 0, err[-3000:]
    assert "DiT blocks sharded over 2 ranks, gathered block by block through two slots" in err
    got, want = probe_mp4(shared)["frames"].astype(int), probe_mp4(alone)["frames"].astype(int)
    assert got.shape == want.shape and np.abs(got - want).mean() < 1.0

    refused = tmp_path / "refused.mp4"
    rc = run_ranks(_cli_rank, ([*argv, "--gpus", "2", "--vram", budget, "--branch-groups", "2", "--output",
                                str(refused)],), world=2, device="cpu", start_method="fork")
    err = capfd.readouterr().err
    assert rc == 2 and "--branch-groups 2 needs a whole DiT on every GPU" in err and "Traceback" not in err
    assert not refused.exists()

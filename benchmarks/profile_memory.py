#!/usr/bin/env python
"""What is alive at the peak of one DiT forward (14B, random weights, 480p, GPU)?

Builds the model like bench_dit.py, applies a fast-path variant, runs one warm-up forward
(compilation), then records the CUDA caching allocator's history over one more forward and
replays it: the peak of allocated bytes above the state before the forward, and the blocks
alive at that moment grouped by where they were allocated (file:line and the source line,
which for compiled blocks names the buffer's shape). Prints a table, writes JSON (`--out`).

    python benchmarks/profile_memory.py --variant fp8x --speakers 1 --out $OUT/mem.json
"""
from __future__ import annotations

import argparse
import json
import linecache
import sys
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_dit import build_random_model, make_inputs  # noqa: E402
from bench_kernels import git_commit  # noqa: E402
from infinitetalk.models.dit import WanDiTConfig  # noqa: E402
from infinitetalk.runtime.fast import FastOptions, make_fast  # noqa: E402

VARIANTS = {
    "bf16": {},
    "fp8x": {"fp8": True, "fp8_attention": True, "fp8_fast_accum": True},
    "bf16attn8": {"fp8_attention": True},
}


def where(frames: list[dict]) -> str:
    """The most telling frame: the first in generated (inductor) or repository code."""
    for f in frames:
        name = f.get("filename", "")
        if "torchinductor" in name or "/infinitetalk/" in name or "benchmarks/" in name:
            line = linecache.getline(name, f.get("line", 0)).strip()
            short = name.split("/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')} | {line[:110]}"
    if frames:
        f = frames[0]
        return f"{f.get('filename', '?').split('/')[-1]}:{f.get('line')} {f.get('name')}"
    return "?"


def replay(snapshot: dict, device: int) -> dict:
    trace = snapshot["device_traces"][device]
    live: dict[int, tuple[int, str]] = {}
    cur = peak = 0
    peak_live: dict[int, tuple[int, str]] = {}
    for ev in trace:
        action = ev["action"]
        if action == "alloc":
            live[ev["addr"]] = (ev["size"], where(ev.get("frames", [])))
            cur += ev["size"]
            if cur > peak:
                peak = cur
                peak_live = dict(live)
        elif action in ("free_completed",):
            if ev["addr"] in live:
                cur -= live.pop(ev["addr"])[0]
    groups: dict[str, list[int]] = defaultdict(list)
    for size, origin in peak_live.values():
        groups[origin].append(size)
    rows = sorted(((sum(s), len(s), o) for o, s in groups.items()), reverse=True)
    return {"peak_above_start_gb": round(peak / 1e9, 3), "events": len(trace),
            "live_at_peak": [{"gb": round(b / 1e9, 3), "blocks": n, "where": o} for b, n, o in rows[:25]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="fp8x", choices=sorted(VARIANTS))
    p.add_argument("--speakers", type=int, default=1)
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--out", type=Path)
    p.add_argument("--layers", type=int, default=None, help="blocks in the model (default: the 14B's 40)")
    p.add_argument("--dump-code", type=Path, default=None,
                   help="write the generated (inductor) code of the compiled blocks to this folder")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    dev = torch.device("cuda")
    cfg = WanDiTConfig.infinitetalk_14b()
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    model = build_random_model(cfg, dev, torch.bfloat16)
    make_fast(model, FastOptions(**VARIANTS[args.variant]))
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    inp = make_inputs(cfg, (args.size, args.size), 81, args.speakers, dev)
    res = {"benchmark": "memory at the peak of one forward", "device": torch.cuda.get_device_name(dev),
           "torch": torch.__version__, "commit": git_commit(), "variant": args.variant, "speakers": args.speakers,
           "weights_gb": round(weights / 1e9, 3)}
    with torch.inference_mode():
        cached = model.precompute_conditions([inp["context"]], inp["clip_fea"], inp["audio"][None])
        x, y, t = inp["x"][None], inp["y"][None], inp["t"]
        fn = lambda: model(x, t, y=y, ref_target_masks=inp["ref_target_masks"], conditions=cached)  # noqa: E731
        if args.dump_code:
            from torch._inductor.utils import run_and_get_code

            _, codes = run_and_get_code(fn)
            args.dump_code.mkdir(parents=True, exist_ok=True)
            for i, code in enumerate(codes):
                (args.dump_code / f"{args.variant}_{args.speakers}spk_graph{i}.py").write_text(code)
        else:
            fn()
        torch.cuda.synchronize()
        res["conditions_gb"] = round(cached.nbytes() / 1e9, 3)
        res["allocated_before_gb"] = round(torch.cuda.memory_allocated() / 1e9, 3)
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
        fn()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        res["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        res["peak_over_weights_gb"] = round((torch.cuda.max_memory_allocated() - weights) / 1e9, 3)
    res.update(replay(snap, torch.cuda.current_device()))
    print(f"{res['device']} {args.variant} {args.speakers} spk: weights {res['weights_gb']} GB, conditions "
          f"{res['conditions_gb']} GB, allocated before {res['allocated_before_gb']} GB, peak "
          f"{res['peak_allocated_gb']} GB (+{res['peak_over_weights_gb']} over weights; +{res['peak_above_start_gb']} "
          f"above the state before the forward)")
    for row in res["live_at_peak"]:
        print(f"{row['gb']:7.3f} GB {row['blocks']:4d}  {row['where']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

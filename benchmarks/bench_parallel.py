"""One video on several GPUs: step and window times of every layout, with the collective time broken out.

    python benchmarks/bench_parallel.py --gpus 1 --out benchmarks/results/parallel_h200_w1.json   # overhead at 1 GPU
    python benchmarks/bench_parallel.py --gpus 8 --out benchmarks/results/parallel_h200_w8.json   # every layout of 8
    python benchmarks/bench_parallel.py --gpus 2 --tiny --device cpu --steps 2                    # CPU check (gloo)

Random weights of the real model sizes (`bench_dit.build_random_model`) on every rank, the fast
path (`--fp8`, `--fp8-attention`, `--compile` as in the pipeline), one 81-frame window at
`--size`. For each layout of `--gpus` ranks (`runtime.parallel.plan_layout` with every possible
number of branch groups) it reports, on rank 0:

* `step_s`: one sampling step (every guidance branch: 2 with `--branches 2` as the fast
  preset, 3 for the default guidance), median over `--repeat` steps after `--warmup`;
* `window_s`: the sampler over `--steps` steps (`generation.sampler.sample_window` with the
  parallel `step_fn`, no VAE);
* `collective_s`: the time inside collectives in one profiled step (CUDA: NCCL kernels,
  summed per rank and averaged over the ranks' streams as rank 0 sees them; CPU: the c10d
  operators), and its share of `step_s`.

At `--gpus 1` it also times the plain path (`GuidedDiT.predict_branch` per branch, as the
single-GPU pipeline runs it) against `ParallelGuidedDiT.predict_step` in a world of one, and
reports `overhead_pct` from interleaved steps (the target is <= 2%).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import build_random_model, make_inputs  # noqa: E402

from infinitetalk.config import GenerationConfig  # noqa: E402
from infinitetalk.generation.guidance import THREE_PASS, TWO_PASS  # noqa: E402
from infinitetalk.generation.sampler import sample_window  # noqa: E402
from infinitetalk.models.dit import WanDiTConfig  # noqa: E402
from infinitetalk.quant.fp8 import quantize_dit  # noqa: E402
from infinitetalk.generation.guided_dit import GuidedDiT  # noqa: E402
from infinitetalk.runtime.fast import FastOptions, make_fast  # noqa: E402
from infinitetalk.runtime.parallel import ParallelContext, layout_fits  # noqa: E402
from infinitetalk.runtime.parallel_launch import run_ranks  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _collective_seconds(fn, device) -> float:
    """Seconds spent in collectives during one call of `fn` (see module doc)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    total = 0.0
    for item in prof.key_averages():
        name = item.key.lower()
        if device.type == "cuda":
            if "nccl" in name:
                total += getattr(item, "device_time_total", 0.0) / 1e6
        elif name.startswith("c10d::"):
            total += item.cpu_time_total / 1e6
    return total


def _worker(opts: dict) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if opts["device"] == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = WanDiTConfig.tiny() if opts["tiny"] else WanDiTConfig.infinitetalk_14b()
    model = build_random_model(cfg, device, dtype)
    if opts["fp8"]:
        quantize_dit(model)
    make_fast(model, FastOptions.for_device(device, fp8_fast_accum=opts["fp8"],
                                            fp8_attention=opts["fp8_attention"],
                                            compile_blocks=opts["compile"] and device.type == "cuda"))
    inputs = make_inputs(cfg, opts["size"], opts["frames"], opts["speakers"], device)
    x, t = inputs.pop("x"), inputs.pop("t")
    if opts["speakers"] == 1:
        inputs.pop("ref_target_masks")
    branches = TWO_PASS if opts["branches"] == 2 else THREE_PASS
    world = dist.get_world_size()
    frames = x.shape[1]
    gen_cfg = GenerationConfig(sample_steps=opts["steps"], text_guide_scale=1.0 if opts["branches"] == 2 else 5.0,
                               audio_guide_scale=2.0, shift=2.0)
    report = {"world": world, "layouts": []}

    if world == 1:  # the plain single-GPU path against the parallel path in a world of one, interleaved
        plain = GuidedDiT(model, branches, **inputs)
        par = ParallelContext().guided_dit(model, branches, **inputs)
        both = {"plain": [], "parallel": []}
        for _ in range(opts["repeat"]):
            both["plain"] += _timed(lambda: [plain.predict_branch(x, t, b) for b in branches], device, opts["warmup"], 1)
            both["parallel"] += _timed(lambda: par.predict_step(x, t, {}), device, opts["warmup"], 1)
        report["plain_step_s"] = statistics.median(both["plain"])
        report["parallel_step_s"] = statistics.median(both["parallel"])
        report["overhead_pct"] = 100.0 * (report["parallel_step_s"] / report["plain_step_s"] - 1.0)
        del plain, par

    for groups in range(1, world + 1):
        if not layout_fits(world, groups, len(branches), cfg.num_heads, frames):
            continue
        ctx = ParallelContext(branch_groups=groups)
        den = ctx.guided_dit(model, branches, **inputs)
        step = lambda: den.predict_step(x, t, {})  # noqa: E731
        times = _timed(step, device, opts["warmup"], opts["repeat"])
        collective = _collective_seconds(step, device)
        motion = x[:, :1].clone()
        window = _timed(lambda: sample_window(den.predict_branch, x, motion, 1, gen_cfg, None, first_window=True,
                                              step_fn=den.predict_step), device, 0, 1)
        entry = {"layout": str(den.layout), "branch_groups": den.layout.branch_groups,
                 "sequence": den.layout.sequence, "step_s": statistics.median(times), "step_times_s": times,
                 "collective_s": collective, "window_s": window[0], "window_steps": opts["steps"]}
        entry["collective_share"] = collective / entry["step_s"] if entry["step_s"] else None
        report["layouts"].append(entry)
        del den
    return report if dist.get_rank() == 0 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny model (CPU check of the script)")
    p.add_argument("--size", default="480x832", help="HxW pixels (default 480x832)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--speakers", type=int, choices=(1, 2), default=1)
    p.add_argument("--branches", type=int, choices=(2, 3), default=2, help="2: fast preset guidance, 3: default")
    p.add_argument("--steps", type=int, default=4, help="sampler steps of the timed window (fast preset: 4)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--fp8-attention", action="store_true")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    args = p.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    if args.tiny:
        h, w = min(h, 64), min(w, 128)
    opts = {"device": args.device, "tiny": args.tiny, "size": (h, w), "frames": args.frames, "speakers": args.speakers,
            "branches": args.branches, "steps": args.steps, "warmup": args.warmup, "repeat": args.repeat,
            "fp8": args.fp8, "fp8_attention": args.fp8_attention, "compile": args.compile}
    report = run_ranks(_worker, (opts,), world=args.gpus, device=args.device)
    report["options"] = opts
    report["machine"] = {"platform": platform.platform(), "torch": torch.__version__,
                         "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor()}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

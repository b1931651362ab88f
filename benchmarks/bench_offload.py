"""Offloading under VRAM budgets: smaller GPUs emulated on one big one, against the resident run.

    python benchmarks/bench_offload.py --size 480 --dtype bf16 --out $OUT/offload_480_bf16.json
    python benchmarks/bench_offload.py --size 720 --dtype fp8 --budgets 16,12 --speakers 1,2
    python benchmarks/bench_offload.py --tiny --device cpu --out /tmp/offload_tiny.json   # CPU check of the script

One process measures one size bucket set and one weight dtype (bf16 or fp8 block linears), with
random weights of the real model sizes (14B DiT, ViT-H CLIP, Wan VAE) built on the GPU:
1. the resident run (no cap): for each speaker count, one DiT forward (the "cond" branch with
   the window's cached text/CLIP keys and values, as `GuidedDiT` runs it) and, for one speaker,
   one full `--preset fast` window (CLIP, VAE encodes, 4 steps x 2 passes, decode, colour);
2. per budget (largest first): `plan_offload` for that budget, the plan applied (streamed blocks
   packed into pinned host memory behind a `BlockStreamer`, CLIP and VAE behind `ModulePlacer`s,
   FFN chunks, tiled decode), the process capped with
   `torch.cuda.set_per_process_memory_fraction(budget / total)`, then the same measures; the DiT
   forward also with pageable host memory (the pinned-vs-pageable comparison). Then undone.
Per case: `peak_reserved_gb` (`max_memory_reserved`), times and their ratios to the resident run
of this process, the host RSS now and its peak since the case began (`host_rss_peak_scope`: "case";
"process" where /proc/self/clear_refs cannot reset it), pinned bytes, the plan in words,
and the issue's targets checked (`targets`). The size is the plan's worst case: the largest
bucket of the set (480: 1088x384, 720: 1920x512).
Without CUDA (and without --tiny) it writes {"skipped": "no CUDA"} and exits 0. Each budget
re-packs the streamed blocks and runs a window: split the budgets over several calls
(`--budgets 24,16` then `--budgets 12,8,6`) to stay under the device's per-command limit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from infinitetalk.config import PRESETS, GenerationConfig  # noqa: E402
from infinitetalk.quant.fp8 import quantize_dit  # noqa: E402
from infinitetalk.generation.color import match_and_blend_colors  # noqa: E402
from infinitetalk.generation.conditioning import image_condition, motion_latent  # noqa: E402
from infinitetalk.generation.guidance import Guidance  # noqa: E402
from infinitetalk.generation.sampler import draw_window_noise, sample_window  # noqa: E402
from infinitetalk.models.dit import WanDiTConfig  # noqa: E402
from infinitetalk.models.image import CLIPVisionConfig, CLIPVisionEncoder  # noqa: E402
from infinitetalk.models.vae import VAEFastOptions, WanVAE, WanVAEConfig  # noqa: E402
from infinitetalk.generation.guided_dit import GuidedDiT  # noqa: E402
from infinitetalk.runtime.fast import FastOptions, make_fast  # noqa: E402
from infinitetalk.runtime.offload import (  # noqa: E402
    BlockStreamer, ModulePlacer, host_ram_available, release_cached_memory, use_expandable_segments)
from infinitetalk.runtime.host_memory import process_memory  # noqa: E402
from infinitetalk.runtime.offload_plan import GiB, OffloadModels, plan_offload  # noqa: E402

TARGETS = {  # (size, fp8) -> GB the issue wants the job to fit, at <= 1.10x the resident time
    (480, True): 6, (480, False): 8, (720, True): 12, (720, False): 16,
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_rss_peak() -> bool:
    """Start a new host RSS peak here (Linux: writing 5 to /proc/self/clear_refs resets VmHWM).

    Without it the peak is the process's (`ru_maxrss` never goes down), and every budget case of a
    sweep would report the largest of all the cases before it, transitions between stores included."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _rss(scope: str) -> dict:
    """Host RSS now and its peak: since the case began (`scope="case"`) or over the process."""
    mem = process_memory()
    now, hwm = (mem.rss, mem.peak_rss) if mem is not None else (None, None)
    if scope != "case" or hwm is None:
        scope, hwm = "process", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"host_rss_gb": None if now is None else round(now / GiB, 2), "host_rss_peak_gb": round(hwm / GiB, 2),
            "host_rss_peak_scope": scope}


def live_allocations(top: int = 12) -> list:
    """The largest live CUDA allocations at an out-of-memory error, with the Python lines that made
    them (from `torch.cuda.memory._snapshot()`; needs `_record_memory_history`), grouped by line."""
    groups: dict = {}
    try:
        for segment in torch.cuda.memory._snapshot()["segments"]:
            for block in segment["blocks"]:
                if block.get("state") != "active_allocated":
                    continue
                frames = [f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in block.get("frames", [])
                          if f["filename"].endswith(".py") and "/torch/" not in f["filename"]][:3]
                entry = groups.setdefault(" < ".join(frames) or "unknown", [0, 0])
                entry[0] += block["size"]
                entry[1] += 1
    except Exception as exc:  # a report, never a second failure
        return [f"no snapshot: {type(exc).__name__}: {exc}"]
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"gib": round(size / GiB, 3), "count": count, "where": where} for where, (size, count) in ranked]


def _random_module(cls, cfg, device, dtype, seed):
    torch.manual_seed(seed)
    with torch.device(device):
        return cls(cfg).to(dtype).eval().requires_grad_(False)


class Job:
    """The models and inputs of one size/dtype, and the window as the pipeline runs it."""

    def __init__(self, args, device):
        from bench_dit import build_random_model

        self.args, self.device = args, device
        self.fp8 = args.dtype == "fp8"
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if args.tiny:
            from infinitetalk.runtime.tiny_models import TinyConfigs

            tiny = TinyConfigs.default()
            dcfg, vcfg, ccfg = tiny.dit.replace(num_layers=4), tiny.vae, tiny.clip
            self.models = OffloadModels.tiny(dtype, self.fp8)
        else:
            dcfg, vcfg, ccfg = WanDiTConfig.infinitetalk_14b(), WanVAEConfig(), CLIPVisionConfig()
            self.models = OffloadModels.infinitetalk_14b(dtype, self.fp8)
        self.cfg, self.dtype = dcfg, dtype
        plan = plan_offload(self.models, 1000 * GiB, size=args.size)
        self.hw = (plan.height, plan.width) if not args.tiny else (64, 64)
        self.dit = build_random_model(dcfg, device, dtype)
        torch._dynamo.reset()
        if self.fp8:
            quantize_dit(self.dit)
        make_fast(self.dit, FastOptions(compile_blocks=device.type == "cuda", fp8_fast_accum=self.fp8))
        self.vae_fast = VAEFastOptions() if device.type == "cuda" else None
        self.vae = _random_module(WanVAE, vcfg, device, dtype, 1)
        self.clip = _random_module(CLIPVisionEncoder, ccfg, device, torch.float16 if device.type == "cuda" else dtype, 2)
        gen = torch.Generator(device=device).manual_seed(0)
        rnd = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
        self.context = rnd(min(24, dcfg.text_len), dcfg.text_dim) * 0.3
        self.context_null = rnd(min(120, dcfg.text_len), dcfg.text_dim) * 0.3
        frames = 1 + 4 * ((args.frames - 1) // 4)
        self.audio = {n: rnd(n, frames, dcfg.audio_window, dcfg.audio_layers, dcfg.audio_channels) * 0.5 for n in (1, 2)}
        h, w = self.hw
        self.masks = torch.zeros(3, h, w, device=device)
        self.masks[0, :, : w // 2] = 1
        self.masks[1, :, w // 2:] = 1
        self.cond = rnd(3, 1, h, w).clamp(-1, 1)
        self.gcfg = GenerationConfig(**{**PRESETS["fast"]["settings"], "frame_num": frames,
                                        "motion_frame": min(9, frames - 1), "size": args.size})
        self.streamer = None
        self.placers: dict = {}
        self.plan = None

    # -- placement
    def placed(self, module):
        import contextlib

        if self.streamer is not None:  # as the Offloader does: the block slots are freed while another model runs
            self.streamer.release()
        placer = self.placers.get(id(module))
        return placer.on_device() if placer is not None else contextlib.nullcontext()

    def apply(self, plan, store: str) -> None:
        """Carry out `plan` (as `runtime.offload.Offloader` does) with host store `store`."""
        self.plan = plan
        use_expandable_segments(self.device)  # as the Offloader does (segments made from now on)
        streamed = range(plan.resident_blocks, len(self.dit.blocks))
        for i in streamed:
            self.dit.blocks[i].to("cpu")
        if len(streamed):
            self.streamer = BlockStreamer(self.dit.blocks, self.device, streamed, store)
        self.dit.ffn_chunks = plan.ffn_chunks
        if not plan.encoders_resident:
            for module in (self.clip, self.vae):
                module.to("cpu")
                self.placers[id(module)] = ModulePlacer(module, self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def restream(self, store: str) -> None:
        """The streamed blocks behind a new streamer with host store `store`. `BlockStreamer.detach` leaves
        them in host memory, so nothing goes through the GPU (bringing the whole DiT back under the
        budget's cap ran out of memory at 010ed5c)."""
        self.streamer.detach()
        release_cached_memory()  # the pinned arenas just freed, before the pageable ones are made
        self.streamer = BlockStreamer(self.dit.blocks, self.device, range(self.plan.resident_blocks, len(self.dit.blocks)), store)

    def undo(self) -> None:
        if self.streamer is not None:
            self.streamer.detach()
            self.streamer = None
        self.dit.to(self.device)
        for module in (self.clip, self.vae):
            module.to(self.device)
        self.placers.clear()
        self.dit.ffn_chunks = 1
        self.plan = None
        release_cached_memory()  # the next case starts without this one's pinned arenas in PyTorch's host cache

    @property
    def cache_conditions(self) -> str:
        """As the pipeline runs it: text/CLIP keys and values cached unless the plan recomputes them."""
        return "none" if self.plan is not None and self.plan.cache_conditions == "none" else "context"

    # -- measures
    def guided(self, speakers: int, branches=("cond",)):
        h, w = self.hw
        t_lat = self.gcfg.latent_frames
        gen = torch.Generator(device=self.device).manual_seed(1)
        y = torch.randn(self.cfg.in_dim - 16, t_lat, h // 8, w // 8, generator=gen, device=self.device)
        clip_fea = torch.randn(1, 257, self.cfg.clip_dim, generator=gen, device=self.device).to(self.dtype)
        guided = GuidedDiT(self.dit, branches, context=self.context, context_null=self.context_null, clip_fea=clip_fea,
                           y=y, audio=self.audio[speakers].to(self.dtype), ref_target_masks=self.masks if speakers == 2 else None,
                           cache_conditions=self.cache_conditions)
        latent = torch.randn(16, t_lat, h // 8, w // 8, generator=gen, device=self.device)
        return guided, latent

    def forward_s(self, speakers: int, reps: int) -> float:
        with torch.inference_mode():
            guided, latent = self.guided(speakers)
            t = torch.tensor([900.0], device=self.device)
            guided.predict_branch(latent, t, "cond")  # warm-up (compilation on the first call)
            times = []
            for _ in range(reps):
                _sync(self.device)
                start = time.perf_counter()
                guided.predict_branch(latent, t, "cond")
                _sync(self.device)
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    def window_s(self, speakers: int = 1, steps: int | None = None) -> float:
        """One window as the pipeline runs it; `steps` overrides the preset's sampling steps (a warm-up)."""
        cfg, device = self.gcfg, self.device
        if steps is not None:
            cfg = dataclasses.replace(cfg, sample_steps=steps)
        tiling = self.plan.decode_tiling() if self.plan is not None else None
        chunk = 1 if self.plan is not None and self.plan.vae_chunk_latents == 1 else None  # as the pipeline does
        with torch.inference_mode():
            _sync(device)
            start = time.perf_counter()
            with self.placed(self.clip):
                clip_fea = self.clip(self.cond[None].to(device, next(self.clip.parameters()).dtype)).to(self.dtype)
            with self.placed(self.vae):
                y = image_condition(self.vae, self.cond, cfg.frame_num, chunk, self.vae_fast).to(device)
                motion = motion_latent(self.vae, self.cond, chunk, self.vae_fast).to(device)
            h, w = self.hw
            gen = torch.Generator(device=device).manual_seed(0)
            noise = draw_window_noise((16, cfg.latent_frames, h // 8, w // 8), gen, device)
            guided = GuidedDiT(self.dit, Guidance.from_config(cfg).branches, context=self.context,
                               context_null=self.context_null, clip_fea=clip_fea, y=y,
                               audio=self.audio[speakers].to(self.dtype),
                               ref_target_masks=self.masks if speakers == 2 else None,
                               cache_conditions=self.cache_conditions)
            latent = sample_window(guided.predict_branch, noise, motion, 1, cfg, gen, first_window=True)
            del guided
            with self.placed(self.vae):
                video = self.vae.decode(latent[None], chunk_latents=chunk, fast=self.vae_fast, tiling=tiling)[0].float()
            video = match_and_blend_colors(video, self.cond.to(device), cfg.color_correction_strength)
            ((video + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu()
            _sync(device)
        return time.perf_counter() - start


def measure_case(job: Job, args, speakers_list, with_window: bool, rss_scope: str) -> dict:
    device = job.device
    out = {}
    for speakers in speakers_list:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        entry = {} if args.no_forward else {"forward_s": round(job.forward_s(speakers, args.reps), 3)}
        if with_window and speakers == 1:
            # the first window compiles and autotunes what the window has new (VAE shapes, tiles),
            # the second is the steady state a longer job runs at; a warm-up window of fewer steps
            # compiles the same shapes in less time (--warmup-steps)
            if args.warmup_steps:
                entry["window_warmup_s"] = round(job.window_s(1, args.warmup_steps), 3)
                entry["warmup_steps"] = args.warmup_steps
            else:
                entry["window_cold_s"] = round(job.window_s(1), 3)
            entry["window_s"] = round(job.window_s(1), 3)
        if device.type == "cuda":
            entry["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / GiB, 3)
            entry["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / GiB, 3)
        entry.update(_rss(rss_scope))
        out[f"{speakers}spk"] = entry
    return out


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # the memory-fraction cap needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    result = {
        "benchmark": "offload",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "commit": os.environ.get("INFINITETALK_COMMIT", "unknown"),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "size": args.size, "dtype": args.dtype, "frames": args.frames, "preset": "fast",
        "host_ram_available_gb": round((host_ram_available() or 0) / GiB, 1),
        "cases": {}, "errors": {},
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "expandable_segments_under_budget": device.type == "cuda",
    }

    def save():
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    job = Job(args, device)
    speakers = [int(s) for s in args.speakers.split(",")]
    if device.type == "cuda":  # where each live block was allocated, for the out-of-memory report
        # live allocations only, Python frames only: no event history, no C++ unwinding per allocation
        torch.cuda.memory._record_memory_history(enabled="state", context="state", stacks="python")
        result["memory_history"] = "state, python stacks"
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    print(f"--- resident ({args.size}p, {args.dtype})", flush=True)
    scope = "case" if _reset_rss_peak() else "process"
    resident = measure_case(job, args, speakers, not args.no_window, scope)
    result["cases"]["resident"] = resident
    save()
    budgets = [float(b) for b in args.budgets.split(",")] if not args.tiny else [0.0]
    for gb in sorted(budgets, reverse=True):
        key = f"{gb:g}GB"
        print(f"--- budget {key}", flush=True)
        case: dict = {}
        # the case's host peak starts after the previous case's undo: it covers this plan's store and forwards
        # (the pageable step comes after the measurement and is not in it)
        scope = "case" if _reset_rss_peak() else "process"
        try:
            if args.tiny:  # stream every block of the 4-layer tiny DiT on the CPU
                plan = plan_offload(job.models, GiB, size=args.size)
                plan = dataclasses.replace(plan, num_blocks=len(job.dit.blocks), resident_blocks=0, encoders_resident=False,
                                           text_encoder="gpu", host_store="pinned")
            else:
                plan = plan_offload(job.models, int(gb * GiB), size=args.size, speakers=max(speakers), passes=2,
                                    host_ram_bytes=host_ram_available())
            case = {"plan": plan.describe(), "plan_vram_gb": round(plan.vram_bytes / GiB, 3),
                    "resident_blocks": plan.resident_blocks, "host_store": plan.host_store}
            store = "pinned" if plan.host_store == "pinned" else ("mmap" if plan.host_store == "mmap" else "plain")
            job.apply(plan, store)
            case["pinned_gb"] = round(job.streamer.host_bytes / GiB, 3) if job.streamer and store == "pinned" else 0.0
            if total is not None:
                torch.cuda.set_per_process_memory_fraction(min(1.0, gb * GiB / total), device)
            case.update(measure_case(job, args, speakers, not args.no_window, scope))
            if job.streamer is not None and store == "pinned" and not args.no_pageable:
                job.restream("plain")  # the same plan, the streamed blocks in pageable host memory
                case["forward_pageable_s"] = round(job.forward_s(1, args.reps), 3)
                case["pageable_vs_pinned"] = round(case["forward_pageable_s"] / case["1spk"]["forward_s"], 3) \
                    if "forward_s" in case.get("1spk", {}) else None
            for spk in speakers:
                mine, ref = case[f"{spk}spk"], resident[f"{spk}spk"]
                if "forward_s" in mine and "forward_s" in ref:
                    mine["forward_ratio"] = round(mine["forward_s"] / ref["forward_s"], 3)
                if "window_s" in mine and "window_s" in ref:
                    mine["window_ratio"] = round(mine["window_s"] / ref["window_s"], 3)
                if "window_cold_s" in mine and "window_cold_s" in ref:
                    mine["window_cold_ratio"] = round(mine["window_cold_s"] / ref["window_cold_s"], 3)
            if "forward_ratio" in case.get("2spk", {}) and "forward_ratio" in case.get("1spk", {}):
                case["two_vs_one_speaker"] = round(case["2spk"]["forward_ratio"] / case["1spk"]["forward_ratio"], 3)
            result["cases"][key] = case
        except Exception as exc:  # keep going: one failing budget must not lose the others
            traceback.print_exc()
            result["errors"][key] = f"{type(exc).__name__}: {str(exc)[:400]}"
            if any(k.endswith("spk") for k in case):  # what was measured before the failure
                result.setdefault("partial_cases", {})[key] = case
            if "plan" in case:  # what the failing run had planned
                result.setdefault("failed_plans", {})[key] = case["plan"]
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                result.setdefault("oom_live_allocations", {})[key] = live_allocations()
        finally:
            if total is not None:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
            job.undo()
        save()
    result["targets"] = check_targets(result, args.size, args.dtype == "fp8")
    save()
    return result


def check_targets(result: dict, size: int, fp8: bool) -> dict:
    """The issue's targets for this size/dtype: the budget, peak VRAM within it, time ratios <= 1.10x (two speakers <= 1.05x of one)."""
    gb = TARGETS.get((size, fp8))
    case = result["cases"].get(f"{gb:g}GB") if gb is not None else None
    if case is None:
        return {"budget_gb": gb, "measured": False}
    one = case.get("1spk", {})
    checks = {
        "budget_gb": gb, "measured": True,
        "peak_within_budget": one.get("peak_reserved_gb", 1e9) <= gb,
        "forward_ratio_ok": one["forward_ratio"] <= 1.10 if "forward_ratio" in one else None,
        "window_ratio_ok": one["window_ratio"] <= 1.10 if "window_ratio" in one else None,
    }
    if "two_vs_one_speaker" in case:
        checks["two_speakers_ok"] = case["two_vs_one_speaker"] <= 1.05
        checks["two_speakers_peak_within_budget"] = case["2spk"].get("peak_reserved_gb", 1e9) <= gb
    return checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, choices=(480, 720), default=480)
    ap.add_argument("--dtype", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--budgets", default="24,16,12,8,6", help="GB, comma-separated")
    ap.add_argument("--speakers", default="1,2")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-window", action="store_true", help="DiT forwards only")
    ap.add_argument("--no-forward", action="store_true",
                    help="windows only (a 720p bf16 case with two windows per run fits a ten-minute call this way)")
    ap.add_argument("--warmup-steps", type=int, default=0,
                    help="run the first (compiling) window with this many sampling steps instead of timing a full "
                         "cold window (saves time at 720p)")
    ap.add_argument("--no-pageable", action="store_true", help="skip the pageable-memory forward")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny random models, every block streamed (CPU check)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available() or (args.device == "cpu" and not args.tiny):
        print("bench_offload: no CUDA device; nothing measured")
        if args.out:
            Path(args.out).write_text(json.dumps({"skipped": "no CUDA"}) + "\n")
        return 0
    result = run(args)
    print(json.dumps({k: result[k] for k in ("cases", "errors", "targets")}, indent=1)[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())

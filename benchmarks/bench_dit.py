#!/usr/bin/env python
"""Time the 14B InfiniteTalk DiT forward on one GPU: reference path vs fast path, bf16 and fp8.

Builds the DiT with random weights directly on the GPU (meta -> bf16 -> to_empty -> random
init in place; no files), then times one forward (CUDA events, median) for each phase asked:

  baseline  the reference path, official-like: float64 complex RoPE, reference routing map,
            torch's default SDPA choice, eager, one forward per guidance branch;
  fast      `make_fast(FastOptions())`: SDPA cuDNN > flash, cached float32 RoPE, fused routing
            map, regional torch.compile, text/CLIP/audio keys and values precomputed per window;
  guidance  (480p, one speaker) the three guidance passes of a step batched in one forward;
  fastbhld  the fast path with `attention.sdpa_attention_bhld` (contiguous [B, H, L, D] q/k/v);
  fp8       the fast path with fp8 linear layers (`quant/fp8.py`), quantised in place.

Sizes: 480p = 640x640 bucket (latent 80x80, 21 latent frames, 33,600 tokens), 720p =
960x960 (75,600 tokens); one and two speakers. In the same run the floor kernels
(`benchmarks/bench_kernels.py`: bf16 GEMM, fp8 GEMM, SDPA backends) give this GPU's ceilings,
from which each forward's floor = linear FLOPs / GEMM rate + attention FLOPs / SDPA rate.

Results go to JSON after every measurement (a crash keeps what was measured), with the device
name, torch version and the commit (`--commit` or $INFINITETALK_COMMIT: .git may not travel).
`--tiny` runs the same code on a tiny config (CPU works) to check the script itself.

  python benchmarks/bench_dit.py --out $OUT/dit.json --sizes 480 --phases baseline,fast,guidance,fp8
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_monitor import GpuMonitor  # noqa: E402
from infinitetalk.models.dit import InfiniteTalkDiT, WanDiTConfig  # noqa: E402
from infinitetalk.generation.guided_dit import GuidedDiT  # noqa: E402
from infinitetalk.quant.fp8 import quantize_dit  # noqa: E402
from infinitetalk.runtime.fast import FastOptions, make_fast  # noqa: E402

SIZES = {"480": (640, 640), "720": (960, 960)}
VIDEO_FRAMES = 81
PROMPT_TOKENS = 120


# ---- model and inputs ----------------------------------------------------------------------


def build_random_model(cfg: WanDiTConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> InfiniteTalkDiT:
    """The DiT with random weights made on `device` in `dtype` (never a float32 copy).

    Linear/conv weights N(0, 1/fan_in), biases N(0, 0.02^2), modulation tables N(0, 1/dim),
    norm weights 1 + N(0, 0.1^2): the parity generator's recipe, so activations stay realistic.
    """
    with torch.device("meta"):
        model = InfiniteTalkDiT(cfg)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.normal_(0.0, cfg.dim**-0.5, generator=gen)
            elif p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=gen)
            elif p.dim() == 1:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, math.prod(p.shape[1:]) ** -0.5, generator=gen)
    return model.eval()


def make_inputs(cfg: WanDiTConfig, size: tuple[int, int], frames: int, speakers: int, device, seed: int = 1) -> dict:
    """One sample's window inputs at a pixel size (latent = size / 8, frames video frames)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    t_lat = (frames - 1) // cfg.vae_scale + 1
    h, w = size[0] // 8, size[1] // 8
    rnd = lambda *shape, scale=1.0: torch.randn(*shape, generator=gen, device=device) * scale  # noqa: E731
    masks = torch.zeros(3, h, w, device=device)
    masks[0, h // 10 : h - h // 10, w // 20 : w // 2 - w // 20] = 1
    masks[1, h // 10 : h - h // 10, w // 2 + w // 20 : w - w // 20] = 1
    masks[2] = 1 - masks[0].clamp(max=1) - masks[1]
    return {
        "x": rnd(16, t_lat, h, w),
        "y": rnd(cfg.in_dim - 16, t_lat, h, w),
        "t": torch.tensor([900.0], device=device),
        "context": rnd(min(PROMPT_TOKENS, cfg.text_len), cfg.text_dim, scale=0.3),
        "context_null": rnd(min(PROMPT_TOKENS // 2, cfg.text_len), cfg.text_dim, scale=0.3),
        "clip_fea": rnd(1, 257, cfg.clip_dim),
        "audio": rnd(speakers, frames, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, scale=0.5),
        "ref_target_masks": masks,
    }


def tokens_of(cfg: WanDiTConfig, size, frames) -> tuple[int, int, int]:
    t_lat = (frames - 1) // cfg.vae_scale + 1
    return t_lat, size[0] // 8 // cfg.patch_size[1], size[1] // 8 // cfg.patch_size[2]


def forward_flops(cfg: WanDiTConfig, grid, speakers: int, batch: int = 1) -> dict:
    """FLOPs of one forward: linear layers and attention (QK^T + PV), per the block structure."""
    f, h, w = grid
    L = f * h * w
    d, ffn = cfg.dim, cfg.ffn_dim
    ctx = 257 + cfg.text_len
    m = cfg.context_tokens * speakers
    lin = L * d * d * 2 * (4 + 2 + 2) + 2 * L * d * ffn * 2  # self q,k,v,o; cross q,o; audio q,proj; ffn
    lin_ctx = ctx * d * d * 2 * 4 + f * m * cfg.output_dim * 2 * d * 2  # per-window keys/values
    attn = 4 * L * L * d + 4 * L * ctx * d + 4 * L * m * d  # self, text+image, per-frame audio
    attn_map = 4 * L * (h * w) * d if speakers == 2 else 0  # fused routing map (padded values)
    n = cfg.num_layers * batch
    return {"linear": n * lin, "context_linear": n * lin_ctx, "attention": n * (attn + attn_map)}


# ---- timing --------------------------------------------------------------------------------


def cuda_time(fn, warmup: int, reps: int, device) -> dict:
    """Median seconds of `reps` calls after `warmup` (CUDA events; wall clock on the CPU), peak GB,
    and on CUDA the GPU's mean power and SM clock over the timed calls (energy of one call)."""
    is_cuda = device.type == "cuda"
    t0 = time.perf_counter()
    for _ in range(warmup):
        out = fn()
    if is_cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    with GpuMonitor() as monitor:
        for _ in range(reps):
            if is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                s = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - s)
    power = monitor.summary() if is_cuda else {}
    if "power_w_mean" in power:  # energy of one call at the mean power while busy
        power["energy_j"] = round(power["power_w_mean"] * statistics.median(times), 1)
    peak = torch.cuda.max_memory_allocated() / 1e9 if is_cuda else None
    return {"s": statistics.median(times), "times": [round(t, 4) for t in times], "warmup_s": round(first, 2),
            "peak_gb": None if peak is None else round(peak, 2), "gpu": power, "_out": out}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double(), b.double()
    return {"max_rel": ((a - b).abs().max() / b.abs().max()).item(), "l2_rel": ((a - b).norm() / b.norm()).item()}


# ---- phases --------------------------------------------------------------------------------


class Bench:
    def __init__(self, args, cfg, device):
        self.args, self.cfg, self.device = args, cfg, device
        self.result: dict = {"benchmark": "dit_forward", "measures": {}, "errors": {}, "accuracy": {}}
        self.outputs: dict = {}

    def save(self):
        if self.args.out:
            self.args.out.parent.mkdir(parents=True, exist_ok=True)
            self.args.out.write_text(json.dumps(self.result, indent=2, default=str) + "\n")

    def measure(self, key: str, fn, warmup: int, reps: int, keep_output: bool = False, **info):
        print(f"--- {key} ...", flush=True)
        try:
            with torch.inference_mode():
                r = cuda_time(fn, warmup, reps, self.device)
            out = r.pop("_out")
            if keep_output:
                self.outputs[key] = out
            r.update(info)
            self.result["measures"][key] = r
            print(f"    {key}: {r['s']:.3f} s (runs {r['times']}, first {r['warmup_s']} s, peak {r['peak_gb']} GB)",
                  flush=True)
        except Exception as exc:  # keep going: one failure must not lose the other numbers
            traceback.print_exc()
            self.result["errors"][key] = f"{type(exc).__name__}: {str(exc)[:500]}"
            out = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.save()
        return out

    def forward_fn(self, model, inp, branch="cond", cached=None):
        """One guidance branch's forward (plain inputs, or precomputed conditions)."""
        ctx = inp["context_null"] if branch in ("drop_text", "uncond") else inp["context"]
        audio = inp["audio"] if branch in ("cond", "drop_text") else torch.zeros_like(inp["audio"])[-1:]
        x, y, t = inp["x"][None], inp["y"][None], inp["t"]
        masks = inp["ref_target_masks"]
        if cached is not None:
            return lambda: model(x, t, y=y, ref_target_masks=masks, conditions=cached)
        return lambda: model(x, t, [ctx], inp["clip_fea"], y, audio[None], masks)


def fp8_attention_ceiling(iters: int) -> dict:
    """The cuDNN fp8 attention kernel alone at 480p (pre-quantised inputs), when it can run."""
    from infinitetalk.runtime.fp8_attention import (
        CudnnFp8Attention, fp8_attention_supported, quantize_attention_inputs,
    )

    if not fp8_attention_supported("cuda"):
        return {}
    n, h, d = 33_600, 40, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = (torch.randn(1, n, h, d, device="cuda", generator=g) for _ in range(3))
    inputs = quantize_attention_inputs(*qkv)
    attn = CudnnFp8Attention()
    run = lambda: attn._run(*inputs)  # noqa: E731
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        run()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / iters
    return {"fp8_sdpa_cudnn_ms": round(ms, 3), "fp8_sdpa_cudnn_tflops": round(4.0 * h * n * n * d / ms / 1e9, 1)}


def run(args) -> dict:
    device = torch.device(args.device)
    cfg = WanDiTConfig.tiny() if args.tiny else WanDiTConfig.infinitetalk_14b()
    dtype = torch.bfloat16
    commit = args.commit or os.environ.get("INFINITETALK_COMMIT")
    bench = Bench(args, cfg, device)
    res = bench.result
    res.update({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(), "commit": commit,
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": "tiny" if args.tiny else "infinitetalk_14b", "dtype": "bfloat16", "weights": "random",
        "video_frames": args.frames, "sizes": args.sizes, "phases": args.phases,
    })
    phases = set(args.phases)
    sizes = {s: SIZES[s] for s in args.sizes}
    if args.tiny:
        sizes = {s: (v[0] // 10 // 16 * 16 or 16, v[1] // 10 // 16 * 16 or 16) for s, v in sizes.items()}

    # floor kernels first (same run, clean GPU)
    if "kernels" in phases and device.type == "cuda":
        print("--- floor kernels ...", flush=True)
        try:
            from bench_kernels import run_kernel_benchmarks

            k = run_kernel_benchmarks(warmup=3, iters=args.kernel_iters)
            k.update(fp8_attention_ceiling(args.kernel_iters))
            res["kernels"] = k
        except Exception as exc:
            traceback.print_exc()
            res["errors"]["kernels"] = f"{type(exc).__name__}: {exc}"
        bench.save()

    t0 = time.perf_counter()
    model = build_random_model(cfg, device, dtype)
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    res["build_s"] = round(time.perf_counter() - t0, 1)
    res["weights_bf16_gb"] = round(weights_gb, 2)
    print(f"model built in {res['build_s']} s, {weights_gb:.1f} GB of weights", flush=True)
    inputs = {(s, n): make_inputs(cfg, sizes[s], args.frames, n, device) for s in sizes for n in (1, 2)}
    speakers = [int(n) for n in args.speakers]
    w, r = args.warmup, args.reps

    if "baseline" in phases:  # reference options (what the constructor gives)
        for s in sizes:
            for n in speakers:
                if s == "720" and n == 2 and args.skip_720_baseline_2spk:
                    continue
                inp = inputs[(s, n)]
                bench.measure(f"baseline_bf16_{s}p_{n}spk", bench.forward_fn(model, inp), 1, 1 if s == "720" else r,
                              keep_output=(s == args.sizes[0]))

    if phases & {"fast", "guidance", "fp8"}:
        make_fast(model, FastOptions(compile_blocks=not args.no_compile, compile_mode=args.compile_mode))

    def fast_phase(label: str, spk=speakers, cache: str = args.cache):
        """cache: "context" (the pipeline's default: text/CLIP keys and values cached), "all", "none"."""
        for s in sizes:
            for n in spk:
                inp = inputs[(s, n)]
                cached = None
                if cache != "none":
                    with torch.inference_mode():
                        cached = model.precompute_conditions([inp["context"]], inp["clip_fea"], inp["audio"][None],
                                                             audio_kv=(cache == "all"))
                key = f"{label}_forward_{s}p_{n}spk"
                bench.measure(key, bench.forward_fn(model, inp, cached=cached), w, r, keep_output=(s == args.sizes[0]),
                              conditions_gb=round(cached.nbytes() / 1e9, 3) if cached is not None else 0.0)
                del cached

    if "fast" in phases:
        fast_phase("bf16")
    if "nocache" in phases:  # text/CLIP/audio keys and values computed in every forward (no cached conditions)
        fast_phase("bf16_nocache", cache="none")
    if "fastbhld" in phases:  # the same fast path, SDPA on contiguous [B, H, L, D] copies
        from infinitetalk.models.attention import sdpa_attention, sdpa_attention_bhld

        model.attention = sdpa_attention_bhld
        fast_phase("bf16_bhld")
        model.attention = sdpa_attention
    if "routingcheck" in phases and 2 in speakers:
        # the fused routing map vs the reference one inside the same fast path: separates a
        # kernel error from the argmax sensitivity of the two-speaker routing
        from infinitetalk.models.attention import reference_attention_map, sdpa_attention_map

        s = args.sizes[0]
        inp = inputs[(s, 2)]
        with torch.inference_mode():
            cached = model.precompute_conditions([inp["context"]], inp["clip_fea"], inp["audio"][None])
        model.routing_map = reference_attention_map
        bench.measure(f"bf16_refmap_forward_{s}p_2spk", bench.forward_fn(model, inp, cached=cached), 1, 1,
                      keep_output=True)
        model.routing_map = sdpa_attention_map
        del cached
    if "guidance" in phases and args.sizes[0] in sizes:
        s = args.sizes[0]
        inp = inputs[(s, 1)]
        for branches in (("cond", "drop_text", "uncond"),):
            with torch.inference_mode():
                guided = GuidedDiT(model, branches, context=inp["context"], context_null=inp["context_null"],
                                   clip_fea=inp["clip_fea"], y=inp["y"], audio=inp["audio"],
                                   ref_target_masks=inp["ref_target_masks"], batch_guidance=True)
            bench.measure(f"bf16_guidance3_batched_{s}p_1spk", lambda: guided.predict(inp["x"], inp["t"]), w, r,
                          conditions_gb=round(guided.conditions_nbytes() / 1e9, 3), branches=list(branches))
            del guided
    def reconfigure(label: str, spk, cache: str = args.cache, **options):
        """Re-apply the fast path with other options (fresh compilation) and time it."""
        try:
            torch._dynamo.reset()
            make_fast(model, FastOptions(compile_blocks=not args.no_compile, compile_mode=args.compile_mode, **options))
            if options.get("fp8"):
                res["weights_fp8_gb"] = round(
                    sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
                    + sum(b.numel() * b.element_size() for b in model.buffers()) / 1e9, 2)
            fast_phase(label, spk, cache)
        except Exception as exc:
            traceback.print_exc()
            res["errors"][label] = f"{type(exc).__name__}: {exc}"

    if "ffnchunk" in phases:  # exact: the FFN on 4 token chunks (peak memory)
        reconfigure("bf16_ffn4", speakers, ffn_chunks=4)
    if "bf16attn8" in phases:  # bf16 linears, fp8 self-attention
        reconfigure("bf16_attn8", [1], fp8_attention=True)
    if "fp8" in phases:
        try:
            torch._dynamo.reset()
            quantize_dit(model)
            make_fast(model, FastOptions(compile_blocks=not args.no_compile, compile_mode=args.compile_mode))
            res["weights_fp8_gb"] = round(
                sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
                + sum(b.numel() * b.element_size() for b in model.buffers()) / 1e9, 2)
            fast_phase("fp8", [int(n) for n in args.fp8_speakers])
        except Exception as exc:
            traceback.print_exc()
            res["errors"]["fp8"] = f"{type(exc).__name__}: {exc}"

    fp8_spk = [int(n) for n in args.fp8_speakers]
    if "fp8attn" in phases:  # fp8 linears and fp8 self-attention (the model is fp8 from the fp8 phase)
        reconfigure("fp8attn", fp8_spk, fp8=True, fp8_attention=True)
    if "fp8attnfa" in phases:  # ... plus fast accumulation in the fp8 GEMMs, FFN in 4 chunks
        reconfigure("fp8attnfa", fp8_spk, fp8=True, fp8_attention=True, fp8_fast_accum=True, ffn_chunks=4)
    if "fp8attnfanc" in phases:  # ... without cached conditions
        reconfigure("fp8attnfa_nocache", fp8_spk, cache="none", fp8=True, fp8_attention=True, fp8_fast_accum=True)
    if "fp8x" in phases:  # what --fp8 --fp8-attention runs: fp8 linears (fast accumulation) and fp8 attention
        reconfigure("fp8x", fp8_spk, fp8=True, fp8_attention=True, fp8_fast_accum=True)
    if "profile" in phases and device.type == "cuda":  # kernel time breakdown of the last configuration
        s = args.sizes[0]
        for n in [int(k) for k in args.profile_speakers]:
            inp = inputs[(s, n)]
            with torch.inference_mode():
                cached = model.precompute_conditions([inp["context"]], inp["clip_fea"], inp["audio"][None])
                fn = bench.forward_fn(model, inp, cached=cached)
                fn()
                torch.cuda.synchronize()
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn()
                    torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
            print(f"profile, {n} speaker(s)", flush=True)
            print(table, flush=True)
            res["profile_top" if n == 1 else f"profile_top_{n}spk"] = [
                {"name": e.key[:120], "cuda_ms": round(e.device_time_total / 1e3, 2), "calls": e.count}
                for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:60]
            ]
            del cached

    # accuracy of the fast paths against the baseline output (same random weights and inputs)
    s0 = args.sizes[0]
    for n in speakers:
        base = bench.outputs.get(f"baseline_bf16_{s0}p_{n}spk")
        for label in ("bf16", "fp8", "bf16_ffn4", "bf16_attn8", "fp8attn", "fp8attnfa", "bf16_nocache",
                      "fp8attnfa_nocache", "fp8x"):
            out = bench.outputs.get(f"{label}_forward_{s0}p_{n}spk")
            if base is not None and out is not None:
                res["accuracy"][f"{label}_fast_vs_baseline_{s0}p_{n}spk"] = rel_err(out, base)
        refmap = bench.outputs.get(f"bf16_refmap_forward_{s0}p_{n}spk")
        if refmap is not None and bench.outputs.get(f"bf16_forward_{s0}p_{n}spk") is not None:
            res["accuracy"][f"bf16_fused_vs_reference_map_{s0}p_{n}spk"] = rel_err(
                bench.outputs[f"bf16_forward_{s0}p_{n}spk"], refmap)
        b16 = bench.outputs.get(f"bf16_forward_{s0}p_{n}spk")
        for label in ("fp8", "fp8attn", "fp8attnfa", "bf16_attn8", "bf16_nocache", "fp8x"):
            other = bench.outputs.get(f"{label}_forward_{s0}p_{n}spk")
            if b16 is not None and other is not None:
                res["accuracy"][f"{label}_vs_bf16_fast_{s0}p_{n}spk"] = rel_err(other, b16)

    summarize(res, cfg, sizes, args.frames, weights_gb)
    bench.save()
    return res


def summarize(res: dict, cfg, sizes, frames, weights_gb) -> None:
    """Flat keys of the issue, floors and ratios."""
    m = res["measures"]
    get = lambda k: m[k]["s"] if k in m else None  # noqa: E731
    res["bf16_forward_480p_s"] = get("bf16_forward_480p_1spk")
    fp8_key = next((k for k in ("fp8x_forward_480p_1spk", "fp8_forward_480p_1spk") if k in m), None)
    res["fp8_forward_480p_s"] = get(fp8_key) if fp8_key else None
    res["fp8_forward_480p_measure"] = fp8_key
    res["fast_preset_window_480p_s"] = None
    res["fast_preset_window_480p_note"] = (
        "null: needs the full pipeline (VAE, sampler with the 4-step LoRA preset), which does not exist in this "
        "commit; estimate = 4 steps x 2 passes x forward + VAE encode/decode")
    k = res.get("kernels") or {}
    gemm = k.get("bf16_gemm_ffn_tflops")
    fp8 = k.get("fp8_rowwise_gemm_ffn_tflops")
    sdpa = max([v for v in (k.get("sdpa_cudnn_tflops"), k.get("sdpa_flash_tflops")) if v] or [0]) or None
    sdpa8 = k.get("fp8_sdpa_cudnn_tflops")
    fp8_fa = k.get("fp8_rowwise_gemm_ffn_fast_accum_tflops")
    rows = []
    for key, val in m.items():
        parts = key.split("_")
        size = next((p[:-1] for p in parts if p.endswith("p") and p[:-1] in SIZES), None)
        spk = next((int(p[0]) for p in parts if p.endswith("spk")), 1)
        batch = 3 if "guidance3" in key else 1
        floor = None
        if size and gemm and sdpa and size in sizes:
            fl = forward_flops(cfg, tokens_of(cfg, sizes[size], frames), spk, batch)
            rate = fp8 if key.startswith("fp8") and fp8 else gemm
            if key.startswith("fp8x") and fp8_fa:  # fast accumulation
                rate = fp8_fa
            # fp8 self-attention: its FLOPs at the fp8 kernel's rate (the cross-attention stays bf16)
            attn_rate = sdpa8 if ("attn8" in key or key.startswith("fp8x") or key.startswith("fp8attn")) and sdpa8 else sdpa
            lin = fl["linear"] + (fl["context_linear"] if key.startswith("baseline") else 0)
            floor = lin / (rate * 1e12) + fl["attention"] / (attn_rate * 1e12)
            val["flops_linear"] = lin
            val["flops_attention"] = fl["attention"]
        val["floor_s"] = None if floor is None else round(floor, 3)
        val["ratio_to_floor"] = None if floor is None else round(val["s"] / floor, 3)
        if val.get("peak_gb") is not None:
            held = res.get("weights_fp8_gb", weights_gb) if key.startswith("fp8") else weights_gb
            val["peak_over_weights_gb"] = round(val["peak_gb"] - held, 2)
        rows.append((key, val))
    one, two = get("bf16_forward_480p_1spk"), get("bf16_forward_480p_2spk")
    if one and two:
        res["bf16_two_over_one_speaker_480p"] = round(two / one, 3)
    if get("fp8_forward_480p_1spk") and get("fp8_forward_480p_2spk"):
        res["fp8_two_over_one_speaker_480p"] = round(get("fp8_forward_480p_2spk") / get("fp8_forward_480p_1spk"), 3)
    if get("fp8x_forward_480p_1spk") and get("fp8x_forward_480p_2spk"):
        res["fp8x_two_over_one_speaker_480p"] = round(get("fp8x_forward_480p_2spk") / get("fp8x_forward_480p_1spk"), 3)
    b = get("baseline_bf16_480p_1spk")
    if b and one:
        res["bf16_speedup_over_baseline_480p"] = round(b / one, 3)
    print()
    print(f"{res['device']}, torch {res['torch']}, commit {res['commit']}; weights {weights_gb:.1f} GB bf16")
    if k:
        print(f"ceilings: bf16 GEMM {gemm} TFLOP/s, fp8 GEMM {fp8} TFLOP/s, SDPA best {sdpa} TFLOP/s")
    print(f"{'measure':<36} {'ours s':>8} {'floor s':>8} {'ratio':>6} {'peak GB':>8}")
    for key, val in rows:
        fl = val.get("floor_s")
        print(f"{key:<36} {val['s']:>8.3f} {fl if fl is not None else '-':>8} {val.get('ratio_to_floor') or '-':>6} "
              f"{val.get('peak_gb') if val.get('peak_gb') is not None else '-':>8}")
    for key, val in res["accuracy"].items():
        print(f"accuracy {key}: max_rel {val['max_rel']:.3e}, l2_rel {val['l2_rel']:.3e}")
    for key, val in res["errors"].items():
        print(f"ERROR {key}: {val[:200]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny config and sizes (checks the script; CPU is fine)")
    p.add_argument("--sizes", default="480,720", type=lambda s: s.split(","))
    p.add_argument("--speakers", default="1,2", type=lambda s: s.split(","))
    p.add_argument("--phases", default="kernels,baseline,fast,guidance,fp8", type=lambda s: s.split(","))
    p.add_argument("--frames", type=int, default=VIDEO_FRAMES)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--kernel-iters", type=int, default=10)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-mode", default=None)
    p.add_argument("--skip-720-baseline-2spk", action="store_true")
    p.add_argument("--fp8-speakers", default="1,2", type=lambda s: s.split(","))
    p.add_argument("--profile-speakers", default="1", type=lambda s: s.split(","),
                   help="speaker counts whose forward the profile phase breaks down into kernels")
    p.add_argument("--commit")
    p.add_argument("--cache", default="context", choices=("context", "all", "none"),
                   help="which keys/values the timed forwards get precomputed (default: the pipeline's 'context')")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    for name in ("cache_size_limit", "recompile_limit"):  # one compiled graph per shape / speaker count / dtype
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 16)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time one full 81-frame window the way the pipeline makes it (CLIP, VAE encode of the
conditioning and motion frames, the sampler with guidance over the DiT, VAE decode, colour
correction, frames to the host), with random weights of the real model sizes on the GPU.

    python benchmarks/bench_window.py --out $OUT/window.json            # preset fast, bf16 and fp8
    python benchmarks/bench_window.py --variants bf16,fp8,fp8x          # fp8x: + fp8 attention, fast accumulation
    python benchmarks/bench_window.py --tiny --device cpu                # CPU check of the script

It runs the same functions as `InfiniteTalk._run` (generation.conditioning, generation.guided_dit.GuidedDiT,
generation.sampler, models.vae with VAEFastOptions, generation.color) minus file decoding and
MP4 writing, so it needs no PyAV on the device. It times a first window (CLIP and `y` are
computed) and a later window (motion latents from the last 9 frames, `y` reused), after one
warm-up window that pays for compilation. Prompt features are random tensors (umT5 runs once per
job, not per window).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import build_random_model  # noqa: E402

from infinitetalk.config import PRESETS, GenerationConfig  # noqa: E402
from infinitetalk.generation.color import match_and_blend_colors  # noqa: E402
from infinitetalk.generation.conditioning import image_condition, motion_latent  # noqa: E402
from infinitetalk.generation.guidance import Guidance  # noqa: E402
from infinitetalk.generation.sampler import draw_window_noise, sample_window  # noqa: E402
from infinitetalk.models.dit import WanDiTConfig  # noqa: E402
from infinitetalk.models.image import CLIPVisionConfig, CLIPVisionEncoder  # noqa: E402
from infinitetalk.models.vae import VAEFastOptions, WanVAE, WanVAEConfig  # noqa: E402
from infinitetalk.generation.guided_dit import GuidedDiT  # noqa: E402
from infinitetalk.runtime.fast import FastOptions, make_fast  # noqa: E402


def _random_module(cls, cfg, device, dtype, seed):
    torch.manual_seed(seed)
    with torch.device(device):
        return cls(cfg).to(dtype).eval().requires_grad_(False)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_window(parts, cfg, cond, motion_frames, first, generator, device):
    """One window exactly as the pipeline's loop body; returns (uint8 frames, last 9 frames, seconds).

    The seconds of each stage (CLIP and VAE encodes, conditions, sampler, decode, colour and copy
    to the host) go to `parts_cache["stages"]`; a synchronisation between stages costs ~nothing.
    """
    dit, vae, vae_fast, clip, context, context_null, audio = parts
    stages = {}
    _sync(device)
    start = mark = time.perf_counter()

    def stage(name):
        nonlocal mark
        _sync(device)
        now = time.perf_counter()
        stages[name] = round(now - mark, 3)
        mark = now

    if first:
        parts_cache["clip_fea"] = clip(cond[None].to(device, next(clip.parameters()).dtype)).to(dit.dtype)
        parts_cache["y"] = image_condition(vae, cond, cfg.frame_num, None, vae_fast).to(device)
    source = cond if first else motion_frames
    motion = motion_latent(vae, source, None, vae_fast).to(device)
    stage("encode")
    lat_h, lat_w = cond.shape[-2] // 8, cond.shape[-1] // 8
    noise = draw_window_noise((16, cfg.latent_frames, lat_h, lat_w), generator, device)
    guided = GuidedDiT(dit, Guidance.from_config(cfg).branches, context=context, context_null=context_null,
                       clip_fea=parts_cache["clip_fea"], y=parts_cache["y"], audio=audio)
    stage("conditions")
    n_motion = 1 if first else cfg.motion_latent_frames
    latent = sample_window(guided.predict_branch, noise, motion, n_motion, cfg, generator, first_window=first)
    stage("sample")
    video = vae.decode(latent[None], fast=vae_fast)[0].float()
    stage("decode")
    video = match_and_blend_colors(video, cond.to(device), cfg.color_correction_strength)
    frames = ((video + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).cpu()
    last = video[:, -cfg.motion_frame:].clone()
    stage("colour_and_copy")
    parts_cache["stages"] = stages
    return frames, last, time.perf_counter() - start


parts_cache: dict = {}


VARIANTS = {
    "bf16": {},
    "fp8": {"fp8": True},  # fp8 block linears
    "fp8x": {"fp8": True, "fp8_attention": True, "fp8_fast_accum": True},  # + fp8 self-attention, fast accumulation
    "bf16attn8": {"fp8_attention": True},
}


def bench(args, variant: str, device) -> dict:
    options = VARIANTS[variant]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        from infinitetalk.runtime.tiny_models import TinyConfigs

        tiny = TinyConfigs.default()
        dcfg, vcfg, ccfg = tiny.dit, tiny.vae, tiny.clip
        size = (64, 64)
    else:
        dcfg, vcfg, ccfg = WanDiTConfig.infinitetalk_14b(), WanVAEConfig(), CLIPVisionConfig.vit_h_14()
        size = (args.size, args.size)
    dit = build_random_model(dcfg, device, dtype)
    torch._dynamo.reset()  # a fresh compilation per variant
    make_fast(dit, FastOptions(compile_blocks=device.type == "cuda", **options))
    vae_fast = VAEFastOptions() if device.type == "cuda" else None
    vae = _random_module(WanVAE, vcfg, device, dtype, 1)
    clip = _random_module(CLIPVisionEncoder, ccfg, device, torch.float16 if device.type == "cuda" else dtype, 2)
    gen = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    context = rnd(min(24, dcfg.text_len), dcfg.text_dim) * 0.3
    context_null = rnd(min(120, dcfg.text_len), dcfg.text_dim) * 0.3
    audio = rnd(1, 81, dcfg.audio_window, dcfg.audio_layers, dcfg.audio_channels) * 0.5
    cond = rnd(3, 1, *size).clamp(-1, 1)
    settings = dict(PRESETS[args.preset]["settings"])
    if args.steps:
        settings["sample_steps"] = args.steps
    cfg = GenerationConfig(**settings)
    parts = (dit, vae, vae_fast, clip, context, context_null, audio)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = {}
    _, last, times["warmup_first_s"] = run_window(parts, cfg, cond, None, True, gen, device)
    _, last, times["warmup_later_s"] = run_window(parts, cfg, cond, last, False, gen, device)
    _, last, times["first_window_s"] = run_window(parts, cfg, cond, None, True, gen, device)
    stages = {"first_window": parts_cache["stages"]}
    frames, last, times["later_window_s"] = run_window(parts, cfg, cond, last, False, gen, device)
    stages["later_window"] = parts_cache["stages"]
    out = {k: round(v, 3) for k, v in times.items()}
    out.update(
        preset=args.preset, steps=cfg.sample_steps, branches=list(Guidance.from_config(cfg).branches),
        options=options, size=list(size), frames=int(frames.shape[0]), stages_s=stages,
        peak_gb=round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None,
    )
    del dit, vae, clip
    parts_cache.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fast", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--variants", default="bf16,fp8", help=f"comma-separated, from {sorted(VARIANTS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny random models (CPU check of the script)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    result = {
        "benchmark": "window",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "commit": os.environ.get("INFINITETALK_COMMIT", "unknown"),
        "measures": {},
    }
    for variant in args.variants.split(","):
        result["measures"][f"{args.preset}_{variant}"] = bench(args, variant, device)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'measure':28s} {'first window s':>15s} {'later window s':>15s} {'peak GB':>8s}")
    for key, m in result["measures"].items():
        print(f"{key:28s} {m['first_window_s']:15.2f} {m['later_window_s']:15.2f} {str(m['peak_gb']):>8s}")
        for which, st in m["stages_s"].items():
            print(f"    {which}: " + ", ".join(f"{k} {v:.3f} s" for k, v in st.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

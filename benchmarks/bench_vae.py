#!/usr/bin/env python
"""Time the Wan VAE on one GPU: the official-like float32 path vs the bf16 fast path.

Builds the released VAE architecture (127M parameters) with random weights directly on the
device (norm gains drawn from U(0.5, 1.5) so that every path matters), then for each variant
times (CUDA events, median of --reps after one warm-up call that also pays cuDNN autotuning and
torch.compile):

  encode       video [1, 3, 81, 640, 640] (uniform in [-1, 1])            -> latent [1, 16, 21, 80, 80]
  encode_cond  [the first frame of that video, then 80 zero frames]       (the I2V conditioning latent)
  decode       latent [1, 16, 21, 80, 80] (standard normal)               -> video [1, 3, 81, 640, 640]

Variants: `fp32_official` = float32 weights, no options, one latent frame per step (the official
schedule; cuDNN with its default flags, TF32 convolutions allowed as in torch's defaults);
`bf16_plain` = bf16 weights, no options; then bf16 with `VAEFastOptions` choices (layout,
norm + SiLU mode, chunk size). Accuracy of every variant against `fp32_official` on the same
inputs: max |diff| / max |ref| and ||diff|| / ||ref||. Peak memory is the allocator's peak during
the timed calls minus the weights. In the same run: the convolution ceiling (one 3x3x3 conv3d
at the decoder's full-resolution shape, bf16, both layouts) and the FLOPs of each call counted
on the meta device, from which floor = FLOPs / conv rate.

JSON (rewritten after every measure) with the device name, torch version and the commit
(`--commit`, $INFINITETALK_COMMIT or .bench/COMMIT). `--tiny` runs everything on the tiny config
and small sizes (the CPU is fine) to check the script.

  python benchmarks/bench_vae.py --out $OUT/vae.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from infinitetalk.models.vae import (  # noqa: E402
    AttentionBlock,
    CausalConv3d,
    FrameConv2d,
    VAEFastOptions,
    WanVAE,
    WanVAEConfig,
)

TARGETS = {"encode": 1.2, "decode": 2.0}  # seconds, issue 6, 81 frames 640x640 on an H100
OFFICIAL_FP32 = {"encode": 2.03, "decode": 3.30}  # the official code measured in issue 6

VARIANTS = {
    "bf16_plain": None,
    "bf16_cl_inplace_c1": VAEFastOptions(channels_last=True, norm_act="inplace", chunk_latents=1),
    "bf16_cl_inplace_c4": VAEFastOptions(channels_last=True, norm_act="inplace", chunk_latents=4),
    "bf16_ncdhw_compiled_c4": VAEFastOptions(channels_last=False, norm_act="compiled", chunk_latents=4),
    "bf16_cl_compiled_c4": VAEFastOptions(channels_last=True, norm_act="compiled", chunk_latents=4),
    "bf16_cl_compiled_c2": VAEFastOptions(channels_last=True, norm_act="compiled", chunk_latents=2),
}
DEFAULT_VARIANT = "bf16_cl_compiled_c4"  # = VAEFastOptions()


def build(cfg: WanVAEConfig, device: torch.device, seed: int = 0) -> WanVAE:
    torch.manual_seed(seed)
    with torch.device(device):
        model = WanVAE(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model.requires_grad_(False)


def timed(fn, warmup: int, reps: int, device: torch.device, weights_bytes: int) -> dict:
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    for _ in range(warmup):
        out = fn()
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    del out
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        out = None
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            s = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - s)
    peak = (torch.cuda.max_memory_allocated() - weights_bytes) / 1e9 if cuda else None
    return {"s": statistics.median(times), "times": [round(t, 4) for t in times], "first_s": round(first, 2),
            "peak_gb_over_weights": None if peak is None else round(peak, 2), "_out": out}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> dict:
    got, ref = got.double(), ref.double()
    d = got - ref
    return {"max_rel": float(d.abs().max() / ref.abs().max()), "l2_rel": float(d.norm() / ref.norm()),
            "finite": bool(torch.isfinite(got).all())}


def count_flops(cfg: WanVAEConfig, video_shape, latent_shape) -> dict:
    """Multiply-add FLOPs (x2) of the convolutions and attention of encode and decode, on the meta device."""
    with torch.device("meta"):
        model = WanVAE(cfg).eval()
    total = {"n": 0}

    def hook(mod, inp, out):
        if isinstance(mod, FrameConv2d):
            k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, CausalConv3d):
            k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1] * mod.kernel_size[2]
        elif isinstance(mod, AttentionBlock):
            b, c, t, h, w = out.shape
            total["n"] += 2 * b * t * (4 * c * c * h * w + 2 * (h * w) ** 2 * c)
            return
        else:
            return
        total["n"] += 2 * out.numel() * k

    for m in model.modules():
        if isinstance(m, (FrameConv2d, CausalConv3d, AttentionBlock)):
            m.register_forward_hook(hook)
    res = {}
    model.encode(torch.empty(video_shape, device="meta"))
    res["encode"], total["n"] = total["n"], 0
    model.decode(torch.empty(latent_shape, device="meta"), clamp=False)
    res["decode"] = total["n"]
    return res


def conv_ceiling(device: torch.device, channels: int, frames: int, size: int, reps: int = 5) -> dict:
    """One bf16 causal-shaped 3x3x3 conv3d (no time padding) at a decoder shape, both layouts."""
    out = {}
    if device.type != "cuda":
        return out
    x0 = torch.randn(1, channels, frames + 2, size, size, device=device, dtype=torch.bfloat16)
    w0 = torch.randn(channels, channels, 3, 3, 3, device=device, dtype=torch.bfloat16) / (27 * channels) ** 0.5
    flops = 2 * channels * channels * 27 * frames * size * size
    with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False, allow_tf32=True):
        for layout, fmt in (("ncdhw", torch.contiguous_format), ("ndhwc", torch.channels_last_3d)):
            x, w = x0.contiguous(memory_format=fmt), w0.contiguous(memory_format=fmt)
            for _ in range(2):
                F.conv3d(x, w, padding=(0, 1, 1))
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                F.conv3d(x, w, padding=(0, 1, 1))
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            s = statistics.median(times)
            out[f"conv3d_{channels}c_{frames}f_{size}px_{layout}"] = {"ms": round(s * 1e3, 3), "tflops": round(flops / s / 1e12, 1)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny config, 9 frames of 64x64 (checks the script)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), type=lambda s: [v for v in s.split(",") if v])
    p.add_argument("--commit")
    args = p.parse_args(argv)
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)

    device = torch.device(args.device)
    cfg = WanVAEConfig.tiny() if args.tiny else WanVAEConfig()
    frames, size = (9, 64) if args.tiny else (args.frames, args.size)
    latent_frames, lat = 1 + (frames - 1) // 4, size // 8
    commit = args.commit or os.environ.get("INFINITETALK_COMMIT")
    if not commit and (REPO / ".bench" / "COMMIT").exists():
        commit = (REPO / ".bench" / "COMMIT").read_text().strip()
    res: dict = {
        "benchmark": "vae", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(), "commit": commit,
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": "tiny" if args.tiny else "wan2.1_vae", "weights": "random", "frames": frames, "size": size,
        "targets_s": TARGETS, "official_fp32_s": OFFICIAL_FP32, "default_variant": DEFAULT_VARIANT,
        "measures": {}, "accuracy": {}, "errors": {},
    }

    def save():
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=2, default=str) + "\n")

    res["flops"] = count_flops(cfg, (1, 3, frames, size, size), (1, 16, latent_frames, lat, lat))
    try:
        ceil = conv_ceiling(device, 96 if not args.tiny else 16, 4, size)
        res["conv_ceiling"] = ceil
        rates = [v["tflops"] for v in ceil.values()]
        res["conv_rate_tflops"] = max(rates) if rates else None
    except Exception as exc:
        traceback.print_exc()
        res["errors"]["conv_ceiling"] = f"{type(exc).__name__}: {exc}"
    save()

    g = torch.Generator(device="cpu").manual_seed(5)
    video = (torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1).to(device)
    cond = torch.zeros_like(video)
    cond[:, :, :1] = video[:, :, :1]
    latent = torch.randn(1, 16, latent_frames, lat, lat, generator=g).to(device)
    inputs = {"encode": video, "encode_cond": cond, "decode": latent}

    fp32 = build(cfg, device)
    bf16 = build(cfg, device).to(torch.bfloat16)
    refs: dict = {}
    runs = [("fp32_official", fp32, None)] + [(v, bf16, VARIANTS[v]) for v in args.variants]
    for label, model, fast in runs:
        wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for what, x in inputs.items():
            key = f"{label}_{what}"
            print(f"--- {key} ...", flush=True)
            if what == "decode":
                fn = lambda: model.decode(x, clamp=False, chunk_latents=None if fast else 1, fast=fast)  # noqa: E731
            else:
                fn = lambda: model.encode(x, chunk_latents=None if fast else 1, fast=fast)  # noqa: E731
            try:
                with torch.inference_mode():
                    r = timed(fn, 1, args.reps, device, wbytes)
                out = r.pop("_out")
                res["measures"][key] = r
                if label == "fp32_official":
                    refs[what] = out
                else:
                    res["accuracy"][key] = rel_err(out, refs[what])
                del out
                acc = res["accuracy"].get(key, {})
                print(f"    {key}: {r['s']:.3f} s (runs {r['times']}, first {r['first_s']} s, peak +{r['peak_gb_over_weights']} GB)"
                      + (f" max_rel {acc['max_rel']:.2e} l2_rel {acc['l2_rel']:.2e}" if acc else ""), flush=True)
            except Exception as exc:
                traceback.print_exc()
                res["errors"][key] = f"{type(exc).__name__}: {str(exc)[:500]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()

    m, rate = res["measures"], res.get("conv_rate_tflops")
    for what in ("encode", "decode"):
        default = m.get(f"{DEFAULT_VARIANT}_{what}")
        best = min((v["s"], k) for k, v in m.items() if k.endswith(f"_{what}") and not k.startswith("fp32")) if m else None
        res[f"vae_{what}_s"] = default["s"] if default else None
        res[f"vae_{what}_best"] = {"variant": best[1], "s": best[0]} if best else None
        res[f"vae_{what}_fp32_s"] = m.get(f"fp32_official_{what}", {}).get("s")
        if rate:
            res[f"vae_{what}_floor_s"] = round(res["flops"][what] / (rate * 1e12), 3)
    save()

    print(f"\n{'measure':<36}{'s':>8}{'peak+GB':>9}{'max_rel':>10}{'l2_rel':>10}")
    for k, v in m.items():
        a = res["accuracy"].get(k, {})
        print(f"{k:<36}{v['s']:>8.3f}{str(v['peak_gb_over_weights']):>9}"
              f"{a.get('max_rel', float('nan')):>10.2e}{a.get('l2_rel', float('nan')):>10.2e}")
    print(f"flops: encode {res['flops']['encode'] / 1e12:.1f} TFLOP, decode {res['flops']['decode'] / 1e12:.1f} TFLOP; "
          f"conv ceiling {rate} TFLOP/s {res.get('conv_ceiling')}")
    for what in ("encode", "decode"):
        print(f"{what}: default {res[f'vae_{what}_s']} s, best {res[f'vae_{what}_best']}, fp32 {res[f'vae_{what}_fp32_s']} s, "
              f"floor {res.get(f'vae_{what}_floor_s')} s, target {TARGETS[what]} s")
    for k, v in res["errors"].items():
        print(f"ERROR {k}: {v[:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""GGUF Q8_0 / Q4_K DiT vs bf16 in one run: forward time and weight VRAM (issue 13, item 5).

1. Random 14B InfiniteTalk DiT (Wan2.1-I2V-14B + adapter) in bf16 on the GPU
   (`bench_dit.build_random_model`); weight bytes = memory allocated after the build; the
   forward (480p bucket 640x640, 81 frames, one speaker, cond branch) timed with CUDA events.
2. The same weights converted by `convert_gguf.py` to city96-layout GGUF files (Q8_0, Q4_K),
   written to --dir; the bf16 model is freed.
3. Each GGUF file loaded through the public `load_dit(file)` onto the GPU: the block linears
   stay `GGUFLinear` (raw blocks, dequantised per forward); weight bytes and forward timed alike,
   and the output compared with the bf16 output.
Every model runs the same path: `make_fast(FastOptions())` unless --no-fast (then eager).
Targets: forward <= 1.10x bf16; weight VRAM <= 0.56 (Q8_0) / 0.30 (Q4_K) of bf16.
JSON is written after every measurement.

  python benchmarks/bench_gguf.py --out $OUT/gguf.json --dir /tmp/gguf            # H200
  python benchmarks/bench_gguf.py --out /tmp/gguf.json --dir /tmp/gguf --tiny      # checks the script (CPU)
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_dit import SIZES, VIDEO_FRAMES, build_random_model, cuda_time, make_inputs, rel_err  # noqa: E402
from convert_gguf import write_gguf  # noqa: E402
from infinitetalk.models.dit import WanDiTConfig  # noqa: E402
from infinitetalk.quant.gguf_linear import GGUFLinear  # noqa: E402
from infinitetalk.runtime.fast import FastOptions, make_fast  # noqa: E402
from infinitetalk.weights.dit_loader import load_dit  # noqa: E402


def allocated(device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(device)
    return 0


def module_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def forward(model, inp):
    with torch.inference_mode():
        return model(inp["x"][None], inp["t"], [inp["context"]], inp["clip_fea"], inp["y"][None], inp["audio"][None],
                     inp["ref_target_masks"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dir", required=True, help="where the GGUF files are written (about 24 GB for 14B)")
    ap.add_argument("--types", default="Q8_0,Q4_K")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--no-fast", dest="fast", action="store_false")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = WanDiTConfig.tiny(dim=256, ffn_dim=512, num_heads=2) if args.tiny else WanDiTConfig.infinitetalk_14b()
    size = (64, 64) if args.tiny else SIZES["480"]
    frames = 9 if args.tiny else VIDEO_FRAMES
    out_dir = Path(args.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "config": "tiny" if args.tiny else "14b", "size": size, "frames": frames,
              "fast": args.fast, "runs": {}}

    def save():
        Path(args.out).write_text(json.dumps(result, indent=2))

    inp = make_inputs(cfg, size, frames, 1, device)
    base0 = allocated(device)
    model = build_random_model(cfg, device, torch.bfloat16)
    weights = allocated(device) - base0
    state = {k: v for k, v in model.state_dict().items()}
    if args.fast:
        make_fast(model, FastOptions(compile_blocks=device.type == "cuda"))
    timing = cuda_time(lambda: forward(model, inp), args.warmup, args.reps, device)
    reference = timing.pop("_out").float().cpu()
    result["runs"]["bf16"] = {"weight_bytes": weights or module_bytes(model), **timing}
    save()
    print(f"bf16: {timing['s']:.3f} s, weights {(weights or module_bytes(model)) / 2**30:.2f} GiB", flush=True)
    files = {}
    for qtype in args.types.split(","):
        path = out_dir / f"dit_random_{'tiny' if args.tiny else '14b'}_{qtype}.gguf"
        start = time.time()
        result["runs"].setdefault(qtype, {})["tensor_types"] = write_gguf(state, path, qtype)
        result["runs"][qtype]["convert_s"] = round(time.time() - start, 1)
        files[qtype] = path
        save()
    del model, state
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    bf16_bytes = result["runs"]["bf16"]["weight_bytes"]
    for qtype, path in files.items():
        base0 = allocated(device)
        start = time.time()
        model = load_dit(path, device=device, dtype=torch.bfloat16, config=cfg)
        load_s = time.time() - start
        weights = (allocated(device) - base0) or module_bytes(model)
        layers = sum(isinstance(m, GGUFLinear) for m in model.modules())
        if args.fast:
            make_fast(model, FastOptions(compile_blocks=device.type == "cuda"))
        timing = cuda_time(lambda: forward(model, inp), args.warmup, args.reps, device)
        out = timing.pop("_out").float().cpu()
        run = result["runs"][qtype]
        run.update(weight_bytes=weights, weight_ratio=round(weights / bf16_bytes, 4), gguf_layers=layers,
                   load_s=round(load_s, 1), time_ratio=round(timing["s"] / result["runs"]["bf16"]["s"], 4),
                   error_vs_bf16=rel_err(out, reference), **timing)
        save()
        print(f"{qtype}: {timing['s']:.3f} s ({run['time_ratio']:.3f}x bf16), weights {weights / 2**30:.2f} GiB "
              f"({run['weight_ratio']:.3f} of bf16), {layers} GGUF layers, rel L2 vs bf16 {run['error_vs_bf16']['l2_rel']:.4f}",
              flush=True)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

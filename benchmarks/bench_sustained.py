#!/usr/bin/env python
"""Do the DiT's big kernels keep their speed under sustained load (clocks, power)?

The fp8 attention kernel takes 26.8 ms in a short loop but ~30.8 ms per call inside a 2.3 s
DiT forward (kernel profile). This times, call by call, for a few seconds each:
- the fp8 attention kernel alone (480p shape, pre-quantised inputs);
- the bf16 cuDNN SDPA alone;
- the fp8 attention interleaved with fp8 GEMMs of the FFN shape, like a block;
and samples the SM clock and power with nvidia-smi meanwhile. Prints per-phase means of the
first and last calls, writes JSON (`--out`). Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_kernels import git_commit  # noqa: E402
from infinitetalk.runtime.fp8_attention import (  # noqa: E402
    CudnnFp8Attention,
    fp8_attention_supported,
    quantize_attention_inputs,
)

HEADS, HEAD_DIM, TOKENS, DIM, FFN = 40, 128, 33_600, 5120, 13824


def timed_calls(fns, seconds: float) -> list[list[float]]:
    """Call each fn of `fns` in turn until `seconds` pass; per-fn lists of per-call ms."""
    out = [[] for _ in fns]
    events = []
    t_end = time.time() + seconds
    while time.time() < t_end:
        for i, fn in enumerate(fns):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            events.append((i, s, e))
        if len(events) > 400:
            break
        torch.cuda.synchronize() if len(events) % 8 == 0 else None
    torch.cuda.synchronize()
    for i, s, e in events:
        out[i].append(s.elapsed_time(e))
    return out


def summary(ms: list[float]) -> dict:
    n = len(ms)
    head, tail = ms[: min(5, n)], ms[n // 2 :]
    return {"calls": n, "first5_ms": round(sum(head) / len(head), 3), "second_half_ms": round(sum(tail) / len(tail), 3),
            "min_ms": round(min(ms), 3), "max_ms": round(max(ms), 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--seconds", type=float, default=4.0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or not fp8_attention_supported("cuda"):
        print("needs CUDA with compute capability >= 9.0 and the cuDNN frontend")
        return 0
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, TOKENS, HEADS, HEAD_DIM, device=dev, generator=g)
    k = torch.randn(1, TOKENS, HEADS, HEAD_DIM, device=dev, generator=g) + 0.5
    v = torch.randn(1, TOKENS, HEADS, HEAD_DIM, device=dev, generator=g).bfloat16()
    q8, k8, v8, dq, dk, dv, so = quantize_attention_inputs(q, k, v)
    fp8 = CudnnFp8Attention()
    attn8 = lambda: fp8._run(q8, k8, v8, dq, dk, dv, so)  # noqa: E731
    qb, kb, vb = q.bfloat16().transpose(1, 2), k.bfloat16().transpose(1, 2), v.transpose(1, 2)
    del q, k

    def sdpa():
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(qb, kb, vb)

    x8 = torch.randn(TOKENS, DIM, device=dev, generator=g).to(torch.float8_e4m3fn)
    w1 = torch.randn(FFN, DIM, device=dev, generator=g).to(torch.float8_e4m3fn)
    w2 = torch.randn(DIM, FFN, device=dev, generator=g).to(torch.float8_e4m3fn)
    h8 = torch.randn(TOKENS, FFN, device=dev, generator=g).to(torch.float8_e4m3fn)
    sa, sb1, sb2 = (torch.ones(TOKENS, 1, device=dev), torch.ones(1, FFN, device=dev), torch.ones(1, DIM, device=dev))
    gemm1 = lambda: torch._scaled_mm(x8, w1.t(), scale_a=sa, scale_b=sb1, out_dtype=torch.bfloat16, use_fast_accum=True)  # noqa: E731
    gemm2 = lambda: torch._scaled_mm(h8, w2.t(), scale_a=sa, scale_b=sb2, out_dtype=torch.bfloat16, use_fast_accum=True)  # noqa: E731
    for fn in (attn8, sdpa, gemm1, gemm2):
        fn()
    torch.cuda.synchronize()

    log = Path(tempfile.mkstemp(suffix=".csv")[1])
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu",
                            "--format=csv,noheader", "-lms", "100"], stdout=log.open("w"), stderr=subprocess.DEVNULL)
    res = {"benchmark": "sustained kernels", "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "commit": git_commit(), "phases": {}}
    phases = [
        ("fp8 attention alone", [attn8]),
        ("bf16 cuDNN SDPA alone", [sdpa]),
        ("fp8 attention + FFN fp8 GEMMs", [attn8, gemm1, gemm2]),
    ]
    for name, fns in phases:
        time.sleep(2.0)  # let the GPU cool / clocks recover between phases
        t0 = time.time()
        calls = timed_calls(fns, args.seconds)
        res["phases"][name] = {"t0": t0, "kernels": [summary(c) for c in calls]}
    smi.terminate()
    smi.wait()
    samples = []
    for line in log.read_text().splitlines():
        parts = [s.strip() for s in line.split(",")]
        try:
            samples.append({"clock_mhz": float(parts[1].split()[0]), "power_w": float(parts[2].split()[0]),
                            "temp_c": float(parts[3])})
        except (IndexError, ValueError):
            continue
    os.unlink(log)
    res["smi_samples"] = len(samples)
    if samples:
        busy = [s for s in samples if s["power_w"] > 200]
        res["busy_clock_mhz_min_mean"] = (min(s["clock_mhz"] for s in busy) if busy else None,
                                          round(sum(s["clock_mhz"] for s in busy) / max(1, len(busy))))
        res["busy_power_w_max"] = max(s["power_w"] for s in samples)
        res["clock_trace"] = [(s["clock_mhz"], s["power_w"]) for s in samples[::3]]
    print(f"{res['device']}, torch {res['torch']}")
    for name, ph in res["phases"].items():
        for i, kk in enumerate(ph["kernels"]):
            print(f"{name:34s} #{i} calls {kk['calls']:4d} first5 {kk['first5_ms']:8.2f} ms  "
                  f"second half {kk['second_half_ms']:8.2f} ms  min {kk['min_ms']:8.2f}  max {kk['max_ms']:8.2f}")
    print("busy clock MHz (min, mean):", res.get("busy_clock_mhz_min_mean"), " max power W:", res.get("busy_power_w_max"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Floor kernels of the 14B DiT forward on this GPU: GEMM (bf16, fp8) and attention (SDPA).

Measures, at the shapes of one 480p forward (640x640 bucket, 81 frames = 33,600 tokens):
- bf16 GEMM at the FFN shape: [33600, 5120] @ [5120, 13824];
- fp8 e4m3 GEMM at the same shape through `torch._scaled_mm` with row-wise scales
  (scale_a [M, 1], scale_b [1, N], bf16 out), without and with fast accumulation, plus the
  whole `Fp8Linear` forward (per-token activation quantisation included) when the package
  can be imported;
- SDPA, 33,600 tokens x 40 heads x 128, bf16, with each backend (cuDNN, flash, efficient)
  forced through `torch.nn.attention.sdpa_kernel`, for contiguous [B, H, L, D] inputs and for
  the [B, L, H, D] -> transpose views a DiT produces.
Each kernel: warm-up runs, then N timed runs with CUDA events; the median is reported (min too)
in ms and TFLOP/s (GEMM 2*M*N*K, attention 4*B*H*L*L*D).

Run standalone:  python benchmarks/bench_kernels.py --out $OUT/kernels.json
Without CUDA it prints a message, writes {"skipped": "no CUDA"} and exits 0.
`run_kernel_benchmarks()` can be imported by other benchmark scripts so that forward timings and
their floors come from the same run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]

# Shapes of one 480p forward of the 14B model (one speaker, one guidance pass).
TOKENS = 33_600  # 21 latent frames x (640/16) x (640/16)
DIM = 5_120
FFN = 13_824
HEADS = 40
HEAD_DIM = 128

# What a kernel that cannot run raises (no viable backend, unsupported arch, out of memory).
_KERNEL_ERRORS = (RuntimeError, NotImplementedError, ValueError)


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def time_cuda(fn: Callable[[], object], warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of `iters` runs of fn (after `warmup` runs), timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _entry(name: str, times: list[float], flops: float, shape: str, note: str = "") -> dict:
    median = statistics.median(times)
    entry = {
        "name": name,
        "shape": shape,
        "ms": round(median, 4),
        "min_ms": round(min(times), 4),
        "runs": len(times),
        "tflops": round(flops / (median * 1e-3) / 1e12, 1),
    }
    if note:
        entry["note"] = note
    return entry


def _failed(name: str, shape: str, exc: BaseException) -> dict:
    return {"name": name, "shape": shape, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}


def bench_gemm(device, warmup: int, iters: int, m: int = TOKENS, k: int = DIM, n: int = FFN) -> list[dict]:
    results = []
    shape = f"[{m},{k}] @ [{k},{n}]"
    flops = 2.0 * m * n * k
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen) / k**0.5  # nn.Linear layout [N, K]

    try:
        results.append(_entry("bf16_gemm_ffn", time_cuda(lambda: a @ w.t(), warmup, iters), flops, shape))
    except _KERNEL_ERRORS as exc:
        results.append(_failed("bf16_gemm_ffn", shape, exc))

    a_scale = (a.float().abs().amax(dim=1, keepdim=True) / 448.0).clamp_min(1e-12)
    a_q = (a.float() / a_scale).to(torch.float8_e4m3fn)
    w_scale = (w.float().abs().amax(dim=1) / 448.0).clamp_min(1e-12)
    w_q = (w.float() / w_scale[:, None]).to(torch.float8_e4m3fn)
    b_scale = w_scale.reshape(1, -1).contiguous()
    for fast in (False, True):
        name = "fp8_rowwise_gemm_ffn" + ("_fast_accum" if fast else "")

        def run(fast=fast):
            return torch._scaled_mm(a_q, w_q.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=torch.bfloat16,
                                    use_fast_accum=fast)

        try:
            results.append(_entry(name, time_cuda(run, warmup, iters), flops, shape,
                                  "fp8 e4m3 operands already quantised"))
        except _KERNEL_ERRORS as exc:
            results.append(_failed(name, shape, exc))
    del a_q, w_q

    layer = _fp8_linear(w)
    if layer is not None:
        with torch.inference_mode():
            try:
                results.append(_entry("fp8_linear_ffn", time_cuda(lambda: layer(a), warmup, iters), flops, shape,
                                      "Fp8Linear forward, per-token activation quantisation included (eager)"))
            except _KERNEL_ERRORS as exc:
                results.append(_failed("fp8_linear_ffn", shape, exc))
    return results


def _fp8_linear(weight_bf16: torch.Tensor):
    """Fp8Linear built from the bench weight, or None when the package is not importable."""
    sys.path.insert(0, str(REPO / "src"))
    try:
        from infinitetalk.quant.fp8 import Fp8Linear
    except Exception as exc:  # the package is optional for this script
        print(f"(Fp8Linear row skipped: {exc})", file=sys.stderr)
        return None
    linear = torch.nn.Linear(weight_bf16.shape[1], weight_bf16.shape[0], bias=True, device=weight_bf16.device,
                             dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(weight_bf16)
        linear.bias.zero_()
    return Fp8Linear.from_linear(linear)


def bench_sdpa(device, warmup: int, iters: int, tokens: int = TOKENS, heads: int = HEADS, head_dim: int = HEAD_DIM) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    results = []
    flops = 4.0 * heads * tokens * tokens * head_dim
    gen = torch.Generator(device=device).manual_seed(0)
    # [B, L, H, D] as the DiT produces it; .transpose(1, 2) gives [B, H, L, D] views.
    blhd = [torch.randn(1, tokens, heads, head_dim, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(3)]
    bhld = [t.transpose(1, 2).contiguous() for t in blhd]
    backends = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    views = [t.transpose(1, 2) for t in blhd]
    for label, layout, qkv in (("", f"[1,{heads},L,{head_dim}] contiguous", bhld),
                               ("_blhd_view", f"[1,L,{heads},{head_dim}].transpose(1,2) views", views)):
        for name, backend in backends:
            key = f"sdpa_{name}{label}"
            shape = f"{layout}, L={tokens}"

            def run(backend=backend, qkv=qkv):
                with sdpa_kernel(backend):
                    return sdpa(*qkv)

            try:
                results.append(_entry(key, time_cuda(run, warmup, iters), flops, shape))
            except _KERNEL_ERRORS as exc:
                results.append(_failed(key, shape, exc))
    return results


def run_kernel_benchmarks(warmup: int = 3, iters: int = 10, device: str = "cuda") -> dict:
    """All floor kernels on `device`; returns the JSON-ready dict (see module docstring)."""
    dev = torch.device(device)
    props = torch.cuda.get_device_properties(dev)
    result = {
        "benchmark": "kernels",
        "device": torch.cuda.get_device_name(dev),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))),
        "gpu_memory_gb": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "commit": git_commit(),
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "warmup": warmup,
        "runs": iters,
        "kernels": [],
    }
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        result["kernels"] += bench_gemm(dev, warmup, iters)
        torch.cuda.empty_cache()
        result["kernels"] += bench_sdpa(dev, warmup, iters)
        torch.cuda.empty_cache()
    # flat keys for ratio tables: <name>_ms and <name>_tflops
    for k in result["kernels"]:
        if "ms" in k:
            result[f"{k['name']}_ms"] = k["ms"]
            result[f"{k['name']}_tflops"] = k["tflops"]
    return result


def print_table(result: dict) -> None:
    print(f"{result['device']} (sm {result['capability']}), torch {result['torch']}, CUDA {result['cuda']}, "
          f"commit {result['commit'] or '?'}; median of {result['runs']} runs")
    print(f"{'kernel':<34} {'ms':>9} {'TFLOP/s':>9}  shape")
    for k in result["kernels"]:
        if "error" in k:
            print(f"{k['name']:<34} {'failed':>9} {'':>9}  {k['error']}")
        else:
            print(f"{k['name']:<34} {k['ms']:>9.3f} {k['tflops']:>9.1f}  {k['shape']}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON to this path")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per kernel (default 3)")
    parser.add_argument("--iters", type=int, default=10, help="timed runs per kernel; the median is kept (default 10)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device, nothing measured.")
        result = {"skipped": "no CUDA", "torch": torch.__version__, "commit": git_commit()}
    else:
        result = run_kernel_benchmarks(args.warmup, args.iters)
        print_table(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

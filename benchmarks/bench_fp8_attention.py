#!/usr/bin/env python
"""fp8 self-attention (cuDNN graph, `CudnnFp8Attention`) against bf16 SDPA at the DiT's shapes.

For 480p (33,600 tokens) and 720p (75,600 tokens), 40 heads of 128, one sample:
- bf16 cuDNN SDPA as the DiT runs it (`sdpa_attention`: float32 q/k after RoPE cast to bf16,
  [B, L, H, D] views), and the kernel alone on bf16 inputs;
- `CudnnFp8Attention` as the DiT runs it (key smoothing, per-tensor quantisation, kernel,
  output conversion), and its cuDNN kernel alone on pre-quantised inputs;
- accuracy on 2,048 queries against a float32 reference over all keys (relative L2 and
  max-abs / max|ref|), for flat (q, k ~ N(0, 1)) and peaked (x3) attention, for bf16 and fp8;
- a check that the cuDNN graph computes what `emulate_fp8_attention` describes (small shape);
- a check that the attention works inside `torch.compile` (graph break at the cuDNN call).
Prints a table, writes JSON (`--out`). Without CUDA or the cuDNN frontend it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_kernels import _entry, git_commit, time_cuda  # noqa: E402
from infinitetalk.models.attention import PreferredSdpa, sdpa_attention  # noqa: E402
from infinitetalk.runtime.fp8_attention import (  # noqa: E402
    CudnnFp8Attention,
    emulate_fp8_attention,
    fp8_attention_supported,
    quantize_attention_inputs,
)

HEADS, HEAD_DIM = 40, 128
TOKENS = {"480p": 33_600, "720p": 75_600}


def errors(got: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (got.float() - ref.float())
    return {
        "rel_l2": round((d.norm() / ref.float().norm()).item(), 5),
        "max_rel": round((d.abs().max() / ref.float().abs().max()).item(), 5),
    }


def reference(q, k, v, queries: int) -> torch.Tensor:
    """float32 attention of the first `queries` queries over all keys (math kernel, chunked heads)."""
    out = []
    for h in range(q.shape[2]):
        qh = q[:, :queries, h : h + 1].float().transpose(1, 2)
        kh = k[:, :, h : h + 1].float().transpose(1, 2)
        vh = v[:, :, h : h + 1].float().transpose(1, 2)
        s = (qh @ kh.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        out.append((s.softmax(-1) @ vh).transpose(1, 2))
    return torch.cat(out, dim=2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--sizes", default="480p,720p", type=lambda s: s.split(","))
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or not fp8_attention_supported("cuda"):
        msg = "needs CUDA with compute capability >= 9.0 and the cuDNN frontend (pip install nvidia-cudnn-frontend)"
        print(msg)
        if args.out:
            args.out.write_text(json.dumps({"skipped": msg}))
        return 0
    import cudnn

    dev = torch.device("cuda")
    res = {
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "cudnn_backend": torch.backends.cudnn.version(),
        "cudnn_frontend": getattr(cudnn, "__version__", "?"),
        "commit": git_commit(),
        "timings": [],
        "accuracy": {},
    }
    sdpa = PreferredSdpa(("cudnn", "flash", "efficient", "math"))
    fp8 = CudnnFp8Attention(fallback=sdpa)

    # semantics: the cuDNN graph against its emulation
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, 1024, 4, HEAD_DIM, device=dev, generator=g)
    k = torch.randn(1, 1024, 4, HEAD_DIM, device=dev, generator=g)
    v = torch.randn(1, 1024, 4, HEAD_DIM, device=dev, generator=g).bfloat16()
    res["accuracy"]["cudnn_vs_emulation_1024"] = errors(fp8(q, k, v), emulate_fp8_attention(q, k, v))
    res["accuracy"]["emulation_vs_fp32_1024"] = errors(emulate_fp8_attention(q, k, v), reference(q, k, v, 1024))

    # inside torch.compile
    def block_like(q, k, v):
        return fp8(q * 1.0, k * 1.0, v).float().sum(-1)

    compiled = torch.compile(block_like, dynamic=False)
    res["accuracy"]["compiled_vs_eager"] = errors(compiled(q, k, v), block_like(q, k, v))

    for size in args.sizes:
        n = TOKENS[size]
        flops = 4.0 * HEADS * n * n * HEAD_DIM
        for peak in (1.0, 3.0):
            g = torch.Generator(device=dev).manual_seed(1)
            q = torch.randn(1, n, HEADS, HEAD_DIM, device=dev, generator=g) * peak
            k = torch.randn(1, n, HEADS, HEAD_DIM, device=dev, generator=g) * peak + 0.5  # a shared key component
            v = torch.randn(1, n, HEADS, HEAD_DIM, device=dev, generator=g).bfloat16()
            ref = reference(q, k, v, 2048)
            with sdpa.context():
                out_bf16 = sdpa_attention(q, k, v)[:, :2048]
            out_fp8 = fp8(q, k, v)[:, :2048]
            res["accuracy"][f"{size}_peak{peak:g}_bf16"] = errors(out_bf16, ref)
            res["accuracy"][f"{size}_peak{peak:g}_fp8"] = errors(out_fp8, ref)
            if peak != 1.0:
                continue
            shape = f"1x{n}x{HEADS}x{HEAD_DIM}"
            with sdpa.context():
                t = time_cuda(lambda: sdpa_attention(q, k, v), 2, args.iters)
            res["timings"].append(_entry(f"{size} bf16 sdpa_attention (as in the DiT)", t, flops, shape))
            qb, kb = q.bfloat16().transpose(1, 2), k.bfloat16().transpose(1, 2)
            vb = v.transpose(1, 2)
            with sdpa.context():
                t = time_cuda(lambda: F.scaled_dot_product_attention(qb, kb, vb), 2, args.iters)
            res["timings"].append(_entry(f"{size} bf16 cuDNN kernel only", t, flops, shape))
            t = time_cuda(lambda: fp8(q, k, v), 2, args.iters)
            res["timings"].append(_entry(f"{size} fp8 CudnnFp8Attention (as in the DiT)", t, flops, shape))
            q8, k8, v8, dq, dk, dv, so = quantize_attention_inputs(q, k, v)
            t = time_cuda(lambda: fp8._run(q8, k8, v8, dq, dk, dv, so), 2, args.iters)
            res["timings"].append(_entry(f"{size} fp8 cuDNN kernel only (e4m3 out)", t, flops, shape))
            del q, k, v, qb, kb, vb, q8, k8, v8
            torch.cuda.empty_cache()

    print(f"{res['device']}, torch {res['torch']}, cuDNN {res['cudnn_backend']}, frontend {res['cudnn_frontend']}")
    print(f"{'kernel':58s} {'ms':>9s} {'TFLOP/s':>8s}")
    for e in res["timings"]:
        print(f"{e['name']:58s} {e['ms']:9.2f} {e.get('tflops', 0):8.0f}")
    for name, e in res["accuracy"].items():
        print(f"accuracy {name:34s} rel L2 {e['rel_l2']:.4f}  max {e['max_rel']:.4f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The FFN's GELU + row-wise fp8 quantisation at 480p: compiled unfused ops vs the Triton kernel.

Input: the first FFN layer's output, [33,600 tokens, 13,824] bf16. Times
  - `compiled`: torch.compile of quantize_activation_rowwise(gelu(h)) (what an fp8 block ran),
  - `triton_wN`: `gelu_quantize_rowwise` (runtime/fp8_gelu.py) with N warps per row,
and reports ms, the effective bandwidth (one read of h, one e4m3 write) and whether the
outputs match the torch version. Prints a table, writes JSON (`--out`). Without CUDA it says so.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_kernels import git_commit, time_cuda  # noqa: E402
from infinitetalk.quant.fp8 import quantize_activation_rowwise  # noqa: E402
from infinitetalk.runtime.fp8_gelu import gelu_quantize_reference, gelu_quantize_rowwise  # noqa: E402

M, N = 33_600, 13_824


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    h = (torch.randn(M, N, device="cuda") * 2).bfloat16()
    ref_q, ref_s = gelu_quantize_reference(h)
    unfused = torch.compile(lambda x: quantize_activation_rowwise(F.gelu(x, approximate="tanh")))
    cases = {"compiled": lambda: unfused(h)}
    for warps in (4, 8, 16, 32):
        cases[f"triton_w{warps}"] = (lambda w: lambda: gelu_quantize_rowwise(h, w))(warps)
    bytes_moved = M * N * (2 + 1) + M * 4
    res = {"benchmark": "fp8 gelu quantisation", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "commit": git_commit(), "shape": [M, N], "cases": {}}
    print(f"{'case':12s} {'ms':>8s} {'GB/s':>8s}  match")
    for name, fn in cases.items():
        q, s = fn()
        ms = median(time_cuda(fn, 3, args.iters))
        differ = (q.float() != ref_q.float()).float().mean().item()
        entry = {"ms": round(ms, 4), "gbps": round(bytes_moved / ms / 1e6, 1), "values_differing": differ,
                 "scale_max_rel": ((s - ref_s).abs() / ref_s).max().item()}
        res["cases"][name] = entry
        print(f"{name:12s} {ms:8.3f} {entry['gbps']:8.1f}  {differ:.2e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

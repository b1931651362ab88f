#!/usr/bin/env python
"""The two-speaker routing map at 480p: can its fused attention use narrower values?

`sdpa_attention_map` runs SDPA(q, k_frame0, V) with V = the 3 region masks padded to the head
size (128), because the fused kernels are assumed to need equal q/k/v head sizes: half of its
FLOPs (P V) and its 344 MB output are padding. This times, on 33,600 queries x 1,600 keys x 40
heads (bf16), the current call and SDPA with values padded only to 8, 16, 32 or 64 channels,
per backend (cuDNN, flash, efficient), and checks each against the current map.
Prints a table, writes JSON (`--out`). Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_kernels import git_commit, time_cuda  # noqa: E402
from infinitetalk.models.attention import PreferredSdpa, sdpa_attention_map  # noqa: E402

L, K, H, D = 33_600, 1_600, 40, 128


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, L, H, D, device=dev, generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, L, H, D, device=dev, generator=g, dtype=torch.bfloat16)
    masks = torch.zeros(1, 3, K, device=dev)
    masks[0, 0, :500] = 1
    masks[0, 1, 500:1000] = 1
    masks[0, 2, 1000:] = 1
    sdpa = PreferredSdpa()
    with sdpa.context():
        ref = sdpa_attention_map(q, k, K, masks)
        t = median(time_cuda(lambda: sdpa_attention_map(q, k, K, masks), 2, args.iters))
    res = {"benchmark": "routing map", "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "commit": git_commit(), "rows": [{"variant": "sdpa_attention_map (values padded to 128)", "ms": t}]}
    qh = q.transpose(1, 2)
    kh = k[:, :K].transpose(1, 2)
    for width in (8, 16, 32, 64):
        vals = F.pad(masks.transpose(1, 2), (0, width - 3))[:, :, None, :].expand(1, K, H, width)
        vh = vals.to(torch.bfloat16).contiguous().transpose(1, 2)
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            row = {"variant": f"values padded to {width}, {name}"}
            try:
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(qh, kh, vh)
                    row["ms"] = median(time_cuda(lambda: F.scaled_dot_product_attention(qh, kh, vh), 2, args.iters))
                per_mask = out.transpose(1, 2)[..., :3].float().mean(2)
                got = (per_mask / masks.sum(-1)[:, None, :]).transpose(1, 2)
                row["max_abs_diff_vs_current"] = (got - ref).abs().max().item()
                row["max_ref"] = ref.abs().max().item()
            except Exception as exc:  # noqa: BLE001
                row["error"] = str(exc).splitlines()[0][:200]
            res["rows"].append(row)
    print(f"{res['device']}, torch {res['torch']}")
    for r in res["rows"]:
        print(f"{r['variant']:44s} {r.get('ms', float('nan')):8.3f} ms  "
              f"{('diff %.2e' % r['max_abs_diff_vs_current']) if 'max_abs_diff_vs_current' in r else r.get('error', '')}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

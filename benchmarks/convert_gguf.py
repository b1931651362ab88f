#!/usr/bin/env python
"""Write a DiT state dict (random 14B weights by default) as a city96-layout GGUF: Q8_0 or Q4_K.

Layout (ComfyUI-GGUF convert.py + llama-quantize for arch `wan`): official key names, no prefix;
F32 for 1-D tensors, tensors of <= 1024 values, `*.modulation` and the 5-D patch embedding; the
`blocks.N` linear weights in the chosen type (Q4_K needs rows of a multiple of 256, else F16);
everything else F16. The InfiniteTalk adapter tensors go into the same file (a merged model), so
`load_dit(file)` needs no separate adapter. Quantisation runs with torch on the model's device
(`infinitetalk.quant.gguf_quantize`).

  python benchmarks/convert_gguf.py --type Q4_K --out /tmp/dit_q4k.gguf            # random 14B on cuda
  python benchmarks/convert_gguf.py --type Q8_0 --out /tmp/tiny.gguf --tiny --device cpu
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from infinitetalk.quant.gguf_quantize import BLOCK_VALUES, QUANTIZERS  # noqa: E402
from infinitetalk.quant.fp8 import is_dit_fp8_layer  # noqa: E402

FILE_TYPES = {"Q8_0": 7, "Q4_K": 15}  # LlamaFileType MOSTLY_Q8_0, MOSTLY_Q4_K_M


def tensor_type(name: str, tensor: torch.Tensor, qtype: str) -> str:
    if tensor.dim() <= 1 or tensor.numel() <= 1024 or ".modulation" in name or tensor.dim() == 5:
        return "F32"
    if name.endswith(".weight") and tensor.dim() == 2 and is_dit_fp8_layer(name[: -len(".weight")]):
        return qtype if tensor.shape[1] % BLOCK_VALUES[qtype] == 0 else "F16"
    return "F16"


def write_gguf(state: dict, path: Path, qtype: str, log=print) -> dict:
    """Write `state` (official names, any device) to `path`; returns {ggml type: tensor count}."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "wan")
    writer.add_quantization_version(2)
    writer.add_file_type(FILE_TYPES[qtype])
    counts: dict[str, int] = {}
    start = time.time()
    for name, tensor in state.items():
        kind = tensor_type(name, tensor, qtype)
        counts[kind] = counts.get(kind, 0) + 1
        if kind in QUANTIZERS:
            raw = QUANTIZERS[kind](tensor).cpu().numpy().reshape(tensor.shape[0], -1)
            writer.add_tensor(name, raw, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        else:
            dtype = np.float32 if kind == "F32" else np.float16
            writer.add_tensor(name, tensor.detach().to(torch.float32).cpu().numpy().astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB, {counts}) in {time.time() - start:.0f} s")
    return counts


def main(argv=None) -> int:
    from bench_dit import build_random_model
    from infinitetalk.models.dit import WanDiTConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--type", choices=sorted(QUANTIZERS), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="the tiny config (checks the script on a CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = WanDiTConfig.tiny(dim=256, ffn_dim=512, num_heads=2) if args.tiny else WanDiTConfig.infinitetalk_14b()
    model = build_random_model(cfg, torch.device(args.device), torch.bfloat16, seed=args.seed)
    write_gguf(dict(model.state_dict()), Path(args.out), args.type)
    return 0


if __name__ == "__main__":
    sys.exit(main())

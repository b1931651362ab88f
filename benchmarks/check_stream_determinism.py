"""Is a streamed forward different from the resident one because of a race, or because of kernel choice?

Runs the 14B DiT (random weights, compiled blocks, small input) resident twice, then streamed with a
device synchronisation after every block hook (no overlap at all), then streamed as shipped, and
prints for each the max |difference| to the first resident run, how many elements differ, and how
many graphs dynamo compiled so far (a recompilation in the streamed run means new kernels, whose
runtime autotuning may choose another reduction order). Run on a CUDA machine:
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 benchmarks/check_stream_determinism.py
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "benchmarks")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    ap.add_argument("--resident", type=int, default=8, help="blocks kept resident (the rest stream)")
    args = ap.parse_args()

    from bench_dit import build_random_model
    from test_offload_gpu import _inputs, _run
    from torch._dynamo.utils import counters

    from infinitetalk.models.dit import WanDiTConfig
    from infinitetalk.runtime.fast import FastOptions, make_fast
    from infinitetalk.runtime.offload import BlockStreamer

    class SyncedStreamer(BlockStreamer):
        def before(self, index):
            super().before(index)
            torch.cuda.synchronize()

    cfg = WanDiTConfig.infinitetalk_14b()
    model = make_fast(build_random_model(cfg, torch.device("cuda"), torch.bfloat16), FastOptions(compile_blocks=True))
    inp = _inputs(cfg, 1)
    rows = []

    def report(name, outs, ref):
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(ref, outs))
        differ = sum(int((a != b).sum()) for a, b in zip(ref, outs))
        row = dict(run=name, max_abs_diff=diff, elements_differ=differ,
                   unique_graphs=int(counters["stats"].get("unique_graphs", 0)))
        rows.append(row)
        print(f"{name:28s} max|diff| {diff:.6f}  differing {differ:9d}  graphs {row['unique_graphs']}", flush=True)

    ref = _run(model, inp)
    report("resident A", ref, ref)
    report("resident B", _run(model, inp), ref)
    for block in model.blocks[args.resident:]:
        block.to("cpu")
    torch.cuda.empty_cache()
    for name, cls in (("streamed, sync per block", SyncedStreamer), ("streamed, overlapped", BlockStreamer),
                      ("streamed, overlapped again", BlockStreamer)):
        streamer = cls(model.blocks, "cuda", range(args.resident, cfg.num_layers), store="pinned")
        report(name, _run(model, inp), ref)
        streamer.detach()
        for block in model.blocks[args.resident:]:
            block.to("cpu")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(torch=torch.__version__, device=torch.cuda.get_device_name(),
                                                  rows=rows), indent=1))


if __name__ == "__main__":
    main()

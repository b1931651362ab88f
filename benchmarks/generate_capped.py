#!/usr/bin/env python
"""`infinitetalk generate` on a GPU capped at the job's `--vram` budget, reporting the peak it reached.

    python benchmarks/generate_capped.py --weights /tmp/w14 --vram 6 --fp8 --image face.png --audio a.wav ...

Every argument goes to `infinitetalk generate` unchanged. Before the job starts, the process's share
of the GPU is capped at the `--vram` value with `torch.cuda.set_per_process_memory_fraction` (how
`bench_offload.py` emulates a smaller card), so a load or a phase that needs more than the budget fails
here as it would on a card of that size, instead of borrowing memory the big card happens to have.
At the end it prints one line of JSON: the exit code, seconds, `max_memory_reserved` and
`max_memory_allocated` in GiB, and the host RSS peak (`ru_maxrss`).
"""
from __future__ import annotations

import json
import resource
import sys
import time

import torch

GiB = 1024**3


def _budget(argv: list[str]) -> float:
    for i, arg in enumerate(argv):
        if arg == "--vram" and i + 1 < len(argv):
            return float(argv[i + 1])
        if arg.startswith("--vram="):
            return float(arg.split("=", 1)[1])
    raise SystemExit("generate_capped.py needs --vram GB (a number: the cap it applies).")


def main(argv: list[str] | None = None) -> int:
    from infinitetalk.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    budget = _budget(argv)
    if not torch.cuda.is_available():
        raise SystemExit("generate_capped.py caps a CUDA GPU; none is available here.")
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget * GiB / total), device)
    start = time.perf_counter()
    code = cli_main(["generate", *argv])
    report = {
        "exit_code": code, "seconds": round(time.perf_counter() - start, 1), "budget_gb": budget,
        "device": torch.cuda.get_device_name(device),
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / GiB, 3),
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / GiB, 3),
        "host_rss_peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 2),
    }
    print(json.dumps(report))
    return code


if __name__ == "__main__":
    sys.exit(main())

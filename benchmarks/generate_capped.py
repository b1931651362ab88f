#!/usr/bin/env python
"""`infinitetalk generate` on a GPU capped at the job's `--vram` budget, reporting the peak it reached.

    python benchmarks/generate_capped.py --weights /tmp/w14 --vram 6 --fp8 --image face.png --audio a.wav ...

Every argument goes to `infinitetalk generate` unchanged. Before the job starts, the process's share
of the GPU is capped at the `--vram` value with `torch.cuda.set_per_process_memory_fraction` (how
`bench_offload.py` emulates a smaller card), so a load or a phase that needs more than the budget fails
here as it would on a card of that size, instead of borrowing memory the big card happens to have.
At the end it prints one line of JSON: the exit code, seconds, `max_memory_reserved` and
`max_memory_allocated` in GiB, and host memory: the RSS peak (`ru_maxrss`, which counts the pages of
memory-mapped weight files the kernel can drop), and, sampled every 0.25 s
(`runtime.host_memory.HostMemorySampler`), the peak of what the process holds (anonymous + shared:
pinned memory is shared memory to the kernel) and of the mapped file pages. `--memory-trace FILE`
writes every sample (seconds, anon, shmem, file in GiB) as JSON.
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


def _take(argv: list[str], flag: str) -> str | None:
    """Remove `flag VALUE` from argv (an option of this script, not of `generate`); its value or None."""
    if flag in argv:
        i = argv.index(flag)
        value = argv[i + 1]
        del argv[i : i + 2]
        return value
    return None


def main(argv: list[str] | None = None) -> int:
    from infinitetalk.cli import main as cli_main
    from infinitetalk.runtime.host_memory import HostMemorySampler

    argv = list(sys.argv[1:] if argv is None else argv)
    trace = _take(argv, "--memory-trace")
    budget = _budget(argv)
    if not torch.cuda.is_available():
        raise SystemExit("generate_capped.py caps a CUDA GPU; none is available here.")
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget * GiB / total), device)
    start = time.perf_counter()
    with HostMemorySampler(0.25) as sampler:
        code = cli_main(["generate", *argv])
    peaks = sampler.peaks
    report = {
        "exit_code": code, "seconds": round(time.perf_counter() - start, 1), "budget_gb": budget,
        "device": torch.cuda.get_device_name(device),
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / GiB, 3),
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / GiB, 3),
        "host_rss_peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 2),
        "host_held_peak_gb": round(peaks.get("held", 0) / GiB, 2),
        "host_anon_peak_gb": round(peaks.get("anon", 0) / GiB, 2),
        "host_pinned_shmem_peak_gb": round(peaks.get("shmem", 0) / GiB, 2),
        "host_file_pages_peak_gb": round(peaks.get("file", 0) / GiB, 2),
        "host_held_at_end_gb": round(sampler.samples[-1][1].held / GiB, 2) if sampler.samples else None,
    }
    if trace:
        rows = [[round(t, 2), *(round(getattr(m, k) / GiB, 3) for k in ("anon", "shmem", "file"))]
                for t, m in sampler.samples]
        with open(trace, "w") as fh:
            json.dump({"columns": ["seconds", "anon_gb", "shmem_gb", "file_gb"], "samples": rows, **report}, fh)
    print(json.dumps(report))
    return code


if __name__ == "__main__":
    sys.exit(main())

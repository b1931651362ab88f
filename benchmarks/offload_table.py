#!/usr/bin/env python
"""The README's "Small GPUs" table from `bench_offload.py` JSON files (the numbers come from the files).

    python benchmarks/offload_table.py benchmarks/results/*offload_*.json
One row per budget case of each file: size, dtype, budget, peak VRAM, DiT forward and window time
as ratios to the resident run of the same file (with the seconds), two speakers vs one, pinned
host bytes, host RSS peak of the case, and the pageable-memory forward where it was measured.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _ratio(case: dict, ref: dict, key: str) -> str:
    if key not in case or key not in ref:
        return "-"
    return f"{case[key] / ref[key]:.3f}x ({case[key]:.2f} s vs {ref[key]:.2f} s)"


def _host_peak(entry: dict, first_case: bool) -> str:
    """The case's host RSS peak; files from before per-case peaks hold the process's peak, which is the
    case's own only for the first budget case (the resident run before it holds no host copy of the
    weights): the others show the RSS after the case instead."""
    if "host_rss_peak_gb" not in entry:
        return "-"
    if entry.get("host_rss_peak_scope") == "case" or first_case:
        return f"{entry['host_rss_peak_gb']:.1f} GB"
    now = entry.get("host_rss_gb")
    return f"{now:.1f} GB after (no per-case peak)" if now is not None else "-"


def rows(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    if "cases" not in data:
        return []
    resident = data["cases"].get("resident", {})
    out = []
    first = True
    for key, case in data["cases"].items():
        if key == "resident":
            continue
        one, ref = case.get("1spk", {}), resident.get("1spk", {})
        two = case.get("2spk")
        two_txt = "-"
        if two and "2spk" in resident:
            peak = f" (peak {two['peak_reserved_gb']:.2f} GB)" if "peak_reserved_gb" in two else ""
            two_txt = f"{case['two_vs_one_speaker']:.3f}{peak}" if "two_vs_one_speaker" in case else "-"
        host = _host_peak(one, first)
        first = False
        pageable = (f"{case['forward_pageable_s'] / ref['forward_s']:.2f}x" if "forward_pageable_s" in case and ref else "-")
        out.append(
            f"| {data['size']}p, {data['dtype']} | {key[:-2]} GB | {one.get('peak_reserved_gb', float('nan')):.2f} GB "
            f"(resident {ref.get('peak_reserved_gb', float('nan')):.1f} GB) | {_ratio(one, ref, 'forward_s')} "
            f"| {_ratio(one, ref, 'window_s')} | {two_txt} | {case.get('resident_blocks', '?')}/40, "
            f"{case.get('pinned_gb', 0):.1f} GB pinned | {host} | {pageable} |")
    for key, err in data.get("errors", {}).items():
        out.append(f"| {data['size']}p, {data['dtype']} | {key[:-2]} GB | failed: {err[:120]} | | | | | | |")
    return out


def main(argv=None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        print(__doc__)
        return 2
    print("| case | budget | peak VRAM | DiT forward vs resident | `--preset fast` window vs resident "
          "| 2 speakers vs 1 (forward ratio) | blocks resident, host store | host RSS peak | pageable forward vs resident |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        for row in rows(path):
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

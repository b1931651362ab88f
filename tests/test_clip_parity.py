"""CLIP visual tower vs the official outputs in ../shared/parity/clip (synthetic real-size weights).

The weights are regenerated with parity/genweights.py from keys.json and the seed in case.json,
saved as an official-layout .pth (all `visual.*` keys, including the unused last block,
post_norm and head) and loaded through the public loader. The generated dict is freed before
loading, so the peak is about two copies of the ~632M-parameter tower (~5 GB).
"""
from __future__ import annotations

import gc
import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import report
from infinitetalk.models.image import CLIPVisionConfig
from infinitetalk.weights.clip_loader import load_clip_vision


def _config_for(case: dict, keys: list) -> CLIPVisionConfig:
    """Sizes from the key shapes; the head count (not visible in shapes) from the case's model string."""
    heads = re.search(r"\bheads=(\d+)", case.get("model", ""))
    return CLIPVisionConfig.from_shapes(dict(keys), num_heads=int(heads.group(1)) if heads else None)


def _cases(clip_dir: Path) -> list[Path]:
    found = []
    for path in sorted(clip_dir.glob("*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
        if {"image", "output"} <= names:
            found.append(path)
    return found


@pytest.mark.slow
def test_clip_matches_official(parity_dir: Path, tmp_path: Path):
    clip_dir = parity_dir / "clip"
    case = json.loads((clip_dir / "case.json").read_text())
    cases = _cases(clip_dir)
    assert cases, f"no CLIP case (*.safetensors with image/output) in {clip_dir}"

    sys.path.insert(0, str(parity_dir))
    try:
        from genweights import generate, load_keys
    finally:
        sys.path.remove(str(parity_dir))

    cpu0, wall0 = time.process_time(), time.perf_counter()
    keys = load_keys(clip_dir / "keys.json")
    weights = tmp_path / "models_clip_synthetic.pth"
    state = generate(keys, case["seed"])
    torch.save(state, weights)
    del state
    gc.collect()
    cpu1, wall1 = time.process_time(), time.perf_counter()

    cfg = _config_for(case, keys)
    try:
        model = load_clip_vision(weights, cfg, device="cpu", dtype=torch.float32)
    finally:
        weights.unlink()  # 2.5 GB; pytest keeps old tmp dirs around
    cpu2, wall2 = time.process_time(), time.perf_counter()

    for path in cases:
        data = load_file(str(path))
        with torch.no_grad():
            pixels = model.preprocess(data["image"])
            if "dbg_preprocessed" in data:
                report(f"clip/{path.stem}/dbg_preprocessed", pixels, data["dbg_preprocessed"])
            out = model.encode_pixels(pixels)
            report(f"clip/{path.stem}/output", out, data["output"])
    cpu3, wall3 = time.process_time(), time.perf_counter()
    print(
        f"[time] clip parity: generate+save {cpu1 - cpu0:.1f}s cpu / {wall1 - wall0:.1f}s wall, "
        f"load {cpu2 - cpu1:.1f}s cpu / {wall2 - wall1:.1f}s wall, "
        f"forward {cpu3 - cpu2:.1f}s cpu / {wall3 - wall2:.1f}s wall"
    )

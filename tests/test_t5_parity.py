"""umT5 encoder vs the official outputs in ../shared/parity/t5 (tiny config, official key layout)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import report
from infinitetalk.models.text import UMT5Config
from infinitetalk.weights.t5_loader import load_umt5_encoder

CONTEXT = re.compile(r"^context_(\d+)$")


def _checkpoint(t5_dir: Path) -> Path:
    found = sorted(t5_dir.glob("*.pth")) + sorted(t5_dir.glob("models_t5*.safetensors"))
    assert len(found) == 1, f"expected one encoder checkpoint in {t5_dir}, found {found}"
    return found[0]


def _cases(t5_dir: Path) -> list[Path]:
    from safetensors import safe_open

    cases = []
    for path in sorted(t5_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if {"ids", "mask"} <= set(f.keys()):
                cases.append(path)
    return cases


def test_t5_matches_official(parity_dir: Path):
    cpu0 = time.process_time()
    t5_dir = parity_dir / "t5"
    cfg = UMT5Config.from_dict(json.loads((t5_dir / "config.json").read_text()))
    model = load_umt5_encoder(_checkpoint(t5_dir), cfg, dtype=torch.float32)
    cases = _cases(t5_dir)
    assert cases, f"no case with ids/mask in {t5_dir}"
    for path in cases:
        data = load_file(str(path))
        ids, mask = data["ids"], data["mask"]
        with torch.no_grad():
            padded = model(ids, mask)
            contexts = [u[:n] for u, n in zip(padded, mask.gt(0).sum(1).tolist())]
        expected = {int(m.group(1)): t for k, t in data.items() if (m := CONTEXT.match(k))}
        assert sorted(expected) == list(range(ids.shape[0])), f"context_i keys {sorted(expected)} for batch {ids.shape[0]}"
        for i, ctx in enumerate(contexts):
            report(f"t5/{path.stem}/context_{i}", ctx, expected[i])
        if "dbg_padded_output" in data:
            report(f"t5/{path.stem}/dbg_padded_output", padded, data["dbg_padded_output"])
        if "dbg_block0_pos_bias" in data:
            bias = model.blocks[0].pos_embedding(ids.shape[1], ids.shape[1]) if model.blocks[0].pos_embedding is not None else model.pos_embedding(ids.shape[1], ids.shape[1])
            report(f"t5/{path.stem}/dbg_block0_pos_bias", bias, data["dbg_block0_pos_bias"])
        # valid rows do not depend on the pad length: drop the padding columns entirely
        longest = int(mask.sum(1).max())
        with torch.no_grad():
            short = model(ids[:, :longest], mask[:, :longest])
        for i, ctx in enumerate(contexts):
            torch.testing.assert_close(short[i, : ctx.shape[0]], ctx, rtol=1e-5, atol=1e-5 * float(ctx.abs().max()))
    print(f"[time] t5 parity: {time.process_time() - cpu0:.2f}s cpu")

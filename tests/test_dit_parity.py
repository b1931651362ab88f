"""DiT parity with the official implementation on ../shared/parity/dit (float32, CPU).

Cases are found by reading the folder: every `cases/*.json` with its `.safetensors`, every
variant listed in the json's "variants" (each names its context tensor, its audio expression and
its expected output). The model is loaded through the public `load_dit`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED, report
from infinitetalk.errors import InternalError
from infinitetalk.weights.dit_loader import load_dit

CASE_FILES = sorted((SHARED / "parity" / "dit" / "cases").glob("*.json"))
ZEROS_LAST = re.compile(r"torch\.zeros_like\((\w+)\)\[-1:\]")


@pytest.fixture(scope="module")
def dit_dir(parity_dir) -> Path:
    return parity_dir / "dit"


@pytest.fixture(scope="module")
def model(dit_dir):
    return load_dit(dit_dir / "checkpoint", dit_dir / "infinitetalk.safetensors", device="cpu", dtype=torch.float32)


def _load_case(json_path: Path) -> tuple[dict, dict]:
    spec = json.loads(json_path.read_text())
    tensors = load_file(str(json_path.with_suffix(".safetensors")))
    return spec, tensors


def _resolve(expr: str, tensors: dict) -> torch.Tensor:
    """A variant's input: a tensor name, or `torch.zeros_like(name)[-1:]` (the dropped audio)."""
    head = expr.split()[0]
    if head in tensors:
        return tensors[head]
    match = ZEROS_LAST.fullmatch(head)
    if match and match.group(1) in tensors:
        return torch.zeros_like(tensors[match.group(1)])[-1:]
    raise AssertionError(f"cannot interpret variant input {expr!r}")


def _call(model, tensors: dict, context: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    """The official per-sample call model([x], t, [ctx], clip_fea, seq_len, [y], audio, masks)."""
    with torch.inference_mode():
        return model(
            tensors["x"][None], tensors["t"], [context], tensors["clip_fea"], tensors["y"][None],
            audio[None], tensors.get("ref_target_masks"),
        )


def _case_paths(parity_dir) -> list[Path]:
    paths = sorted((parity_dir / "dit" / "cases").glob("*.json"))
    assert paths, f"no DiT parity cases in {parity_dir / 'dit' / 'cases'}"
    return paths


@pytest.mark.parametrize("case_json", CASE_FILES or [None], ids=lambda p: p.stem if p else "no-cases")
def test_dit_outputs_match_official(model, parity_dir, case_json):
    paths = [case_json] if case_json is not None else _case_paths(parity_dir)
    failures = []
    for path in paths:
        spec, tensors = _load_case(path)
        _, frames, height, width = tensors["x"].shape
        tokens = frames * (height // 2) * (width // 2)
        assert spec.get("seq_len", tokens) == tokens, "the reference padded seq_len, which is not supported"
        assert spec["variants"], f"{path} lists no variants"
        for name, variant in spec["variants"].items():
            out = _call(model, tensors, _resolve(variant["CONTEXT"], tensors), _resolve(variant["AUDIO"], tensors))
            assert out.dtype == torch.float32
            try:
                report(f"dit/{path.stem}/{variant['expected']}", out, tensors[variant["expected"]], rel_tol=1e-4)
            except AssertionError as exc:
                failures.append(str(exc))
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("case_json", CASE_FILES or [None], ids=lambda p: p.stem if p else "no-cases")
def test_dit_intermediates_match_official(model, parity_dir, case_json):
    """Informative: patch embedding, audio tokens, every block's output and the head (cond call)."""
    paths = [case_json] if case_json is not None else _case_paths(parity_dir)
    for path in paths:
        spec, tensors = _load_case(path)
        captured: dict[str, torch.Tensor] = {}

        def keep(key, fn=lambda o: o):
            return lambda _m, _i, out: captured.__setitem__(key, fn(out))

        hooks = [
            model.patch_embedding.register_forward_hook(keep("dbg_x_embedded", lambda o: o.flatten(2).transpose(1, 2))),
            model.audio_proj.register_forward_hook(keep("dbg_audio_proj_out")),
            model.head.register_forward_hook(keep("dbg_head_out")),
        ]
        hooks += [b.register_forward_hook(keep(f"dbg_block{i}_out")) for i, b in enumerate(model.blocks)]
        try:
            cond = next(v for v in spec["variants"].values() if v["expected"] == "out_cond")
            _call(model, tensors, _resolve(cond["CONTEXT"], tensors), _resolve(cond["AUDIO"], tensors))
        finally:
            for h in hooks:
                h.remove()
        compared = [k for k in captured if k in tensors]
        assert compared, f"no debug tensors of {path.name} could be compared"
        for key in compared:
            report(f"dit/{path.stem}/{key}", captured[key], tensors[key], rel_tol=1e-4)


def test_one_speaker_ignores_ref_target_masks(model, parity_dir):
    """With one speaker the routing map is not computed: masks or not, the output is identical."""
    for path in _case_paths(parity_dir):
        _, tensors = _load_case(path)
        audio = tensors["audio"][:1]
        with torch.inference_mode():
            args = (tensors["x"][None], tensors["t"], [tensors["context"]], tensors["clip_fea"], tensors["y"][None], audio[None])
            with_masks = model(*args, tensors["ref_target_masks"])
            without = model(*args, None)
        assert torch.equal(with_masks, without)


def test_two_speakers_need_masks(model, parity_dir):
    for path in _case_paths(parity_dir):
        _, tensors = _load_case(path)
        if tensors["audio"].shape[0] != 2:
            continue
        with pytest.raises(InternalError, match="ref_target_masks"):
            with torch.inference_mode():
                model(tensors["x"][None], tensors["t"], [tensors["context"]], tensors["clip_fea"], tensors["y"][None], tensors["audio"][None])
        return
    pytest.skip("no two-speaker case in the fixtures")


def test_batch_equals_separate_calls(model, parity_dir):
    """B=2 (different contexts, latents and timesteps) equals two B=1 calls, for 1 and 2 speakers."""
    for path in _case_paths(parity_dir):
        _, tensors = _load_case(path)
        x = torch.stack([tensors["x"], tensors["x"].flip(-1)])
        t = torch.cat([tensors["t"], tensors["t"] - 100.0])
        y = torch.stack([tensors["y"], tensors["y"]])
        audio = torch.stack([tensors["audio"], tensors["audio"] * 0.5])
        contexts = [tensors["context"], tensors["context_null"]]
        masks = tensors["ref_target_masks"]
        with torch.inference_mode():
            batched = model(x, t, contexts, tensors["clip_fea"].expand(2, -1, -1), y, audio, masks)
            for i in range(2):
                single = model(x[i : i + 1], t[i : i + 1], [contexts[i]], tensors["clip_fea"], y[i : i + 1], audio[i : i + 1], masks)
                report(f"dit/{path.stem}/batch_sample{i}", batched[i : i + 1], single, rel_tol=1e-5)

"""Audio windows: parity/window (exact) and the behaviour beyond the official code."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from infinitetalk.generation.audio_windows import audio_for_window, audio_window, extend_by_reflection, window_indices
from infinitetalk.generation.windows import plan_windows


def test_parity_window(parity_dir):
    spec = json.loads((parity_dir / "window" / "window.json").read_text())
    tensors = load_file(str(parity_dir / "window" / "window.safetensors"))
    full = tensors["full_embedding"]
    frame_num, motion, cap = spec["clip_length"], spec["motion_frame"], spec["max_frames_num"]
    # the product's planner and per-window slicing, as the pipeline calls them
    from_plan = {w.start: w for w in plan_windows(full.shape[0], frame_num, motion, "streaming", cap)}
    assert spec["cases"], "no window cases found"
    for name, case in spec["cases"].items():
        start = case["audio_start_idx"]
        expected = tensors[f"{name}_expected"]
        indices = tensors[f"{name}_indices"]
        if start in from_plan:
            planned = from_plan[start]
            assert planned.needs_padding == (case["flip_extension_miss_length"] > 0), name
            window = audio_for_window([full], planned)
            length = case["embedding_length_used"]
        else:  # a case the loop does not produce (e.g. the direct end clamp)
            assert case["flip_extension_miss_length"] == 0
            window = audio_window([full], start, frame_num)
            length = full.shape[0]
        got_idx = window_indices(start, length, frame_num)
        assert torch.equal(got_idx, indices), f"{name}: indices differ"
        got = window[0]
        err = (got - expected).abs().max().item()
        print(f"[parity] window/{name}: start {start} max|diff|={err:.1e} (exact expected)")
        assert got.shape == expected.shape and torch.equal(got, expected), name
    loop_starts = {c["audio_start_idx"] for c in spec["cases"].values() if c["audio_start_idx"] % (frame_num - motion) == 0}
    assert set(from_plan) == loop_starts, "the plan's window starts differ from the official loop's"


def test_multi_speaker_window_shape():
    e1 = torch.randn(120, 12, 8)
    e2 = torch.randn(120, 12, 8)
    w = audio_window([e1, e2], 10)
    assert w.shape == (2, 81, 5, 12, 8)
    assert torch.equal(w[1, 0, 2], e2[10]) and torch.equal(w[0, 3, 0], e1[11])


@pytest.mark.parametrize("frames", [1, 7, 30, 80, 81])
def test_audio_shorter_than_a_window(frames):
    emb = torch.arange(frames, dtype=torch.float32)[:, None, None].expand(frames, 2, 3).contiguous()
    plan = plan_windows(frames, 81, 9, "streaming", 1000)
    assert len(plan) == 1 and plan[0].is_last and plan[0].new_frames == frames
    window = audio_for_window([emb], plan[0])
    assert window.shape == (1, 81, 5, 2, 3)
    # the first frames are the audio itself, the rest a reflection of it (no values invented)
    assert torch.equal(window[0, :frames, 2], emb)
    assert set(window.unique().tolist()) <= set(range(frames))


def test_reflection_matches_official_rule_and_ping_pongs():
    e = torch.arange(10.0)
    out, miss = extend_by_reflection(e, 12)
    assert miss == 5 and torch.equal(out, torch.cat([e, torch.flip(e[-5:], dims=[0])]))
    out, miss = extend_by_reflection(e, 5)
    assert miss == 0 and out is e
    out, miss = extend_by_reflection(torch.arange(3.0), 8)
    assert miss == 8 and out.tolist() == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 1]

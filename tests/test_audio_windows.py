"""Audio windows: parity/window (exact) and the behaviour beyond the official code."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from infinitetalk.generation.audio_windows import (
    audio_window,
    extend_by_reflection,
    iter_audio_windows,
    plan_audio_chunks,
    total_frames,
    window_indices,
)


def test_parity_window(parity_dir):
    spec = json.loads((parity_dir / "window" / "window.json").read_text())
    tensors = load_file(str(parity_dir / "window" / "window.safetensors"))
    full = tensors["full_embedding"]
    frame_num, motion, cap = spec["clip_length"], spec["motion_frame"], spec["max_frames_num"]
    from_loop = {
        chunk.start: (chunk, window)
        for chunk, window in iter_audio_windows([full], frame_num, motion, cap)
    }
    assert spec["cases"], "no window cases found"
    for name, case in spec["cases"].items():
        start = case["audio_start_idx"]
        expected = tensors[f"{name}_expected"]
        indices = tensors[f"{name}_indices"]
        if start in from_loop:
            chunk, window = from_loop[start]
            assert chunk.miss == case["flip_extension_miss_length"], name
            assert full.shape[0] + chunk.miss == case["embedding_length_used"], name
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


def test_multi_speaker_window_shape():
    e1 = torch.randn(120, 12, 8)
    e2 = torch.randn(120, 12, 8)
    w = audio_window([e1, e2], 10)
    assert w.shape == (2, 81, 5, 12, 8)
    assert torch.equal(w[1, 0, 2], e2[10]) and torch.equal(w[0, 3, 0], e1[11])


def test_official_schedule_motion_frame_9():
    plan = plan_audio_chunks(400, 81, 9, 1000)
    assert [c.start for c in plan] == [0, 72, 144, 216, 288, 360]
    assert plan[-1].is_last and not any(c.is_last for c in plan[:-1])
    assert plan[-1].miss == 360 + 81 - 400 + 3
    assert sum(c.keep_frames for c in plan) == total_frames(400, 1000) == 400
    assert [c.keep_from for c in plan] == [0, 9, 9, 9, 9, 9]


def test_frame_cap_and_clip_mode():
    plan = plan_audio_chunks(5000, 81, 9, 1000)
    assert plan[-1].end >= 1000 and plan[-1].miss == 0
    assert sum(c.keep_frames for c in plan) == 1000
    clip = plan_audio_chunks(5000, 81, 9, 81)
    assert len(clip) == 1 and clip[0].is_last and clip[0].keep_frames == 81


@pytest.mark.parametrize("frames", [1, 7, 30, 80, 81])
def test_audio_shorter_than_a_window(frames):
    emb = torch.arange(frames, dtype=torch.float32)[:, None, None].expand(frames, 2, 3).contiguous()
    chunks = list(iter_audio_windows([emb], 81, 9, 1000))
    assert len(chunks) == 1
    chunk, window = chunks[0]
    assert chunk.is_last and chunk.keep_frames == frames
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

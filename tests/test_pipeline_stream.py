"""The Python API on the tiny model: `stream` yields each window's new frames, seeds are
reproducible, and the random numbers are drawn in the official order. Short windows
(frame_num 21, motion_frame 5) and 1.2 s of speech keep it cheap."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from infinitetalk.errors import InputError
from infinitetalk.generation.pipeline import InfiniteTalk
from infinitetalk.progress import ProgressTracker


@pytest.fixture(scope="module")
def pipe():
    return InfiniteTalk.from_pretrained(model="tiny", device="cpu")


@pytest.fixture(scope="module")
def short_job(media_dir, tmp_path_factory):
    # 1.2 s of speech: 30 frames = two windows (21, then 16 new of which 9 are kept)
    from infinitetalk.media.audio_decode import decode_audio
    from test_e2e_tiny import write_wav

    folder = tmp_path_factory.mktemp("speech")
    wave = decode_audio(media_dir / "speech_44k_stereo.wav", 16000)[: int(1.2 * 16000)]
    return write_wav(folder / "s.wav", wave, 16000)


SHORT = dict(frame_num=21, motion_frame=5)


def _collect(pipe, media_dir, audio, **settings):
    return list(pipe.stream(image=media_dir / "portrait.png", audio=audio, sample_steps=1, **SHORT, **settings))


def test_stream_yields_new_frames_per_window(pipe, media_dir, short_job):
    chunks = _collect(pipe, media_dir, short_job, seed=3)
    assert [c.index for c in chunks] == [0, 1] and all(c.total_windows == 2 for c in chunks)
    assert chunks[0].out_start == 0 and chunks[0].out_end == 21 and chunks[1].out_start == 21
    assert chunks[1].out_end == 30
    for c in chunks:
        assert c.frames.dtype == np.uint8 and c.frames.shape[1:] == (64, 128, 3)
        assert c.frames.shape[0] == c.out_end - c.out_start
    again = _collect(pipe, media_dir, short_job, seed=3)
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(chunks, again)), "same seed, other frames"
    other = _collect(pipe, media_dir, short_job, seed=4, max_frames=21)
    assert not np.array_equal(chunks[0].frames, other[0].frames)


def test_rng_is_consumed_in_the_official_order(pipe, media_dir, short_job):
    """Per window: the initial noise; later windows also 1 + steps motion-shaped draws."""
    inputs, cfg = pipe.prepare(image=media_dir / "portrait.png", audio=short_job, sample_steps=2, seed=11,
                               **SHORT)
    plan = pipe.plan(inputs, cfg)
    results = list(pipe._run(inputs, cfg, plan, ProgressTracker(), None))
    h, w = inputs.latent_hw
    replay = torch.Generator().manual_seed(11)
    for result in results:
        torch.randn((16, cfg.latent_frames, h, w), generator=replay)
        if not result.window.is_first:
            for _ in range(1 + cfg.sample_steps):
                torch.randn((16, result.window.motion_latent_frames, h, w), generator=replay)
        assert torch.equal(result.rng_state, replay.get_state()), f"window {result.window.index}"
        assert result.motion.shape == (3, cfg.motion_frame, 64, 128)


def test_teacache_runs_through_the_pipeline(pipe, media_dir, short_job):
    """TeaCache skips whole DiT evaluations inside a real window (tiny random model: a huge
    threshold, since its timestep embedding moves far more per step than the real model's)."""
    calls = []
    hook = pipe.components.dit.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        job = dict(image=media_dir / "portrait.png", audio=short_job, sample_steps=8, seed=3, mode="clip", **SHORT)
        plain = next(pipe.stream(**job)).frames
        full = len(calls)
        calls.clear()
        cached = next(pipe.stream(**job, use_teacache=True, teacache_thresh=1e9)).frames
    finally:
        hook.remove()
    print(f"[teacache] block evaluations per window: {full} without, {len(calls)} with TeaCache")
    assert len(calls) < full and plain.shape == cached.shape

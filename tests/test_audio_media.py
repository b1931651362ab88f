"""Audio decoding, loudness and speaker arrangement on real files (../shared/media, parity/audio)."""
from __future__ import annotations

import json
import math
import wave

import av
import numpy as np
import pytest
import soxr
import torch
from safetensors.torch import load_file

from infinitetalk.errors import AudioError, InputError
from infinitetalk.media.audio import arrange_speakers, load_speakers, load_speech
from infinitetalk.media.audio_decode import declared_duration, decode_audio
from infinitetalk.media.audio_loudness import integrated_loudness, loudness_gain

MEDIA = [
    "speech.mp3",
    "speech.m4a",
    "speech_44k_stereo.wav",
    "english_tts_22k_mono.wav",
    "talking_458px_25fps.mp4",
    "speaker1.wav",
    "speaker2.wav",
]


# ------------------------------------------------------------------ parity: the official waveform
def test_parity_waveform_from_input_wav(parity_dir):
    case = json.loads((parity_dir / "audio" / "case.json").read_text())
    expected = load_file(str(parity_dir / "audio" / "waveform_16k.safetensors"))["waveform"]
    speech = load_speech(parity_dir / "audio" / "input.wav")
    got = torch.from_numpy(speech.waveform)
    assert speech.waveform.dtype == np.float32
    assert got.shape == expected.shape == (case["waveform_samples"],)
    err = (got - expected).abs().max().item()
    print(f"[parity] audio/waveform_16k: max|diff|={err:.3e} (exact expected); loudness "
          f"{speech.loudness_lufs!r} vs reference {case['input_loudness_lufs_at_16k']!r}")
    assert torch.equal(got, expected), f"waveform differs from the reference by {err:.3e}"
    assert abs(speech.loudness_lufs - case["input_loudness_lufs_at_16k"]) < 1e-9


def test_streamed_resampling_equals_one_shot(parity_dir, media_dir):
    """The chunked soxr stream gives the one-shot `soxr.resample` (librosa's path) bit for bit."""
    for path in [parity_dir / "audio" / "input.wav", media_dir / "speech_44k_stereo.wav", media_dir / "english_tts_22k_mono.wav"]:
        with wave.open(str(path)) as w:
            ch, rate = w.getnchannels(), w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, ch).T
        x = pcm.astype(np.float32) / np.float32(32768.0)
        mono = np.mean(x, axis=0)
        ref = soxr.resample(mono, rate, 16000, quality="soxr_hq")
        want = int(math.ceil(mono.shape[0] * (16000.0 / rate)))
        ref = np.concatenate([ref, np.zeros(max(0, want - ref.shape[0]), np.float32)])[:want]
        got = decode_audio(path)
        assert got.shape == ref.shape
        assert np.array_equal(got, ref), f"{path.name}: max diff {np.abs(got - ref).max():.3e}"


def test_loudness_matches_pyloudnorm(media_dir):
    """Our bounded-memory meter gives pyloudnorm's number (up to pyloudnorm's numpy-2 float32
    block sums; with numpy < 2, as in the reference, it is identical, see the parity test)."""
    import pyloudnorm as pyln

    for name in ("speech.mp3", "english_tts_22k_mono.wav"):
        x = decode_audio(media_dir / name)
        ours = integrated_loudness(x, 16000)
        theirs = pyln.Meter(16000).integrated_loudness(x)
        print(f"[loudness] {name}: ours {ours:.9f} pyloudnorm {theirs:.9f}")
        assert abs(ours - theirs) < 1e-5


def test_silence_is_not_normalised():
    assert loudness_gain(float("-inf")) == 1.0
    assert loudness_gain(float("nan")) == 1.0
    assert loudness_gain(-120.0) == 1.0
    assert loudness_gain(-23.0) == pytest.approx(1.0)
    silent = np.zeros(16000, dtype=np.float32)
    assert integrated_loudness(silent, 16000) == float("-inf")


# ------------------------------------------------------------------ real files
@pytest.mark.parametrize("name", MEDIA)
def test_real_file_decodes(media_dir, name):
    path = media_dir / name
    speech = load_speech(path)
    source = declared_duration(path)
    assert speech.sample_rate == 16000
    assert speech.waveform.dtype == np.float32 and speech.waveform.ndim == 1
    assert np.isfinite(speech.waveform).all()
    assert source is not None
    print(f"[media] {name}: {speech.duration_s:.4f} s decoded, {source:.4f} s declared, "
          f"{speech.loudness_lufs:.2f} LUFS, {speech.num_frames} frames")
    assert abs(speech.duration_s - source) <= 0.04
    assert speech.num_frames == int(speech.num_samples / 16000 * 25)
    assert 0.01 < np.abs(speech.waveform).max() < 1.5  # really speech, normalised


def test_two_speakers_para_and_add(media_dir):
    short, long = sorted(
        [load_speech(media_dir / "english_tts_22k_mono.wav"), load_speech(media_dir / "speaker1.wav")],
        key=lambda s: s.num_samples,
    )
    assert short.num_samples < long.num_samples
    para = arrange_speakers([short, long], "para")
    n = max(short.num_samples, long.num_samples)
    assert para.num_speakers == 2 and para.num_samples == n
    assert np.array_equal(para.speakers[0][: short.num_samples], short.waveform)
    assert not para.speakers[0][short.num_samples:].any()
    assert np.array_equal(para.speakers[1], long.waveform)
    assert np.array_equal(para.mix, para.speakers[0] + para.speakers[1])

    add = arrange_speakers([short, long], "add")
    total = short.num_samples + long.num_samples
    assert add.num_samples == total and add.num_frames == int(total / 16000 * 25)
    assert np.array_equal(add.speakers[0][: short.num_samples], short.waveform)
    assert not add.speakers[0][short.num_samples:].any()
    assert not add.speakers[1][: short.num_samples].any()
    assert np.array_equal(add.speakers[1][short.num_samples:], long.waveform)
    assert np.array_equal(add.mix, np.concatenate([short.waveform, long.waveform]))

    silent_second = arrange_speakers([short, None], "add")
    assert silent_second.num_samples == 2 * short.num_samples and not silent_second.speakers[1].any()

    tracks = load_speakers([media_dir / "speaker1.wav", media_dir / "speaker2.wav"], "para")
    assert tracks.num_speakers == 2 and tracks.speakers[0].shape == tracks.speakers[1].shape
    single = load_speakers([media_dir / "speech.mp3"])
    assert single.mode == "single" and single.num_speakers == 1

    with pytest.raises(InputError, match="'para'"):
        arrange_speakers([short, long], "mix")
    with pytest.raises(InputError, match="one or two speakers"):
        arrange_speakers([short, long, short])


# ------------------------------------------------------------------ bad input
def _cut(src, dst, fraction):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def test_missing_path(tmp_path):
    with pytest.raises(AudioError, match="not found.*Check the path"):
        load_speech(tmp_path / "nowhere.wav")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.mp3"
    p.write_bytes(b"")
    with pytest.raises(AudioError, match="is empty"):
        load_speech(p)


def test_text_file_is_not_audio(tmp_path):
    p = tmp_path / "notes.wav"
    p.write_text("these are not the samples you are looking for\n" * 20)
    with pytest.raises(AudioError, match="not a readable audio or video file"):
        load_speech(p)


def test_png_is_not_audio(media_dir):
    with pytest.raises(AudioError, match="no audio stream \\(it is an image\\)"):
        load_speech(media_dir / "portrait.png")


def test_truncated_wav(media_dir, tmp_path):
    p = _cut(media_dir / "speech_44k_stereo.wav", tmp_path / "cut.wav", 0.5)
    with pytest.raises(AudioError, match="is truncated: its WAV header"):
        load_speech(p)


def test_truncated_mp3(media_dir, tmp_path):
    p = _cut(media_dir / "speech.mp3", tmp_path / "cut.mp3", 0.5)
    with pytest.raises(AudioError, match="is truncated: its header announces 10.68 s"):
        load_speech(p)


def test_truncated_m4a(media_dir, tmp_path):
    p = _cut(media_dir / "speech.m4a", tmp_path / "cut.m4a", 0.5)
    with pytest.raises(AudioError, match="damaged, truncated"):
        load_speech(p)


def test_header_only_wav(media_dir, tmp_path):
    p = _cut(media_dir / "speaker1.wav", tmp_path / "head.wav", 0.00002)
    with pytest.raises(AudioError):
        load_speech(p)


def test_video_without_audio(tmp_path):
    p = tmp_path / "silent.mp4"
    with av.open(str(p), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with pytest.raises(AudioError, match="has no audio stream \\(it contains video only\\).*sound track"):
        load_speech(p)


def test_too_short_audio(tmp_path):
    p = tmp_path / "blip.wav"
    with wave.open(str(p), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.ones(300) * 1000).astype("<i2").tobytes())
    with pytest.raises(AudioError, match="less than one video frame"):
        load_speech(p)

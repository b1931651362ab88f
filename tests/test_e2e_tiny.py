"""End-to-end runs of `infinitetalk generate --model tiny` on the shared media, checked with PyAV.

Each run goes through the real command (argument parsing, input checks, tiny random models of
every component, window loop, segments, final MP4) and the output file is decoded again:
25 fps, the tiny bucket's resolution, an audio stream, video duration within one frame of the
audio duration, and frames that are not constant. Few sampling steps, short windows
(`--frame-num 21 --motion-frame 5`, SHORT) and a few seconds of speech keep the suite fast; the
clip-mode case and the short-audio cases keep the official 81-frame window.
"""
from __future__ import annotations

import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from infinitetalk.cli import main
from infinitetalk.media.frames import choose_bucket, size_buckets

STEPS = "2"
SHORT = ["--frame-num", "21", "--motion-frame", "5"]  # 21-frame windows: 16 new frames each after the first


def probe_mp4(path: Path) -> dict:
    """Decode an MP4: fps, size, durations, frame statistics."""
    with av.open(str(path)) as c:
        assert c.streams.video, f"{path} has no video stream"
        v = c.streams.video[0]
        info = {
            "fps": v.average_rate,
            "width": v.codec_context.width,
            "height": v.codec_context.height,
            "has_audio": bool(c.streams.audio),
            "audio_s": None,
        }
        if c.streams.audio:
            a = c.streams.audio[0]
            info["audio_s"] = float(a.duration * a.time_base)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    info["frames"] = frames
    info["video_s"] = frames.shape[0] / float(info["fps"])
    return info


def tiny_bucket(image_hw: tuple[int, int]) -> tuple[int, int]:
    return choose_bucket(image_hw[0], image_hw[1], size_buckets(480, 128))


def check_video(path: Path, source_hw: tuple[int, int], expect_frames: int | None = None) -> dict:
    info = probe_mp4(path)
    h, w = tiny_bucket(source_hw)
    assert info["fps"] == Fraction(25), info["fps"]
    assert (info["height"], info["width"]) == (h, w)
    assert max(h, w) == 128
    assert info["has_audio"], "no audio stream"
    assert abs(info["video_s"] - info["audio_s"]) <= 1 / 25 + 1e-6, (info["video_s"], info["audio_s"])
    frames = info["frames"].astype(np.float32)
    assert frames.std() > 5.0, "frames are (nearly) constant"
    assert np.abs(np.diff(frames, axis=0)).mean() > 0.5, "the video does not change over time"
    if expect_frames is not None:
        assert frames.shape[0] == expect_frames
    return info


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    rc = main(["generate", "--model", "tiny", "--steps", STEPS, *args])
    err = capsys.readouterr().err
    return rc, err


def image_hw(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.height, im.width


def audio_frames(path: Path) -> int:
    from infinitetalk.media.audio import load_speech

    return load_speech(path).num_frames


def test_i2v_streaming_multiple_windows(media_dir, tmp_path, capsys):
    out = tmp_path / "i2v.mp4"
    audio = cut_wav(media_dir, tmp_path, 3.4)  # 85 frames: five 21-frame windows
    rc, err = run_cli(["--image", str(media_dir / "portrait.png"), "--audio", str(audio), "--output", str(out),
                       "--mode", "streaming", "--prompt", "A person talks.", *SHORT], capsys)
    assert rc == 0, err
    assert "RANDOM" in err
    assert "5 window(s)" in err and "window 3/5" in err and "eta" in err
    assert "step 2/2" not in err  # not a terminal: one line per window, no step lines
    assert err.count("wrote ") == 1
    n = audio_frames(audio)
    info = check_video(out, image_hw(media_dir / "portrait.png"), expect_frames=n)
    assert n == 85
    assert not (tmp_path / "i2v.mp4.job").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i2v.mp4", "short.wav"]
    print(f"[e2e] i2v: {info['frames'].shape[0]} frames {info['width']}x{info['height']}, "
          f"video {info['video_s']:.3f} s, audio {info['audio_s']:.3f} s")


def test_v2v_dubbing(media_dir, tmp_path, capsys):
    out = tmp_path / "v2v.mp4"
    audio = media_dir / "speech.mp3"
    video = media_dir / "talking_458px_25fps.mp4"
    # two windows: the second one takes its reference frame from the video at 21 - 5 frames
    rc, err = run_cli(["--video", str(video), "--audio", str(audio), "--output", str(out), "--max-seconds", "1.2",
                       *SHORT], capsys)
    assert rc == 0, err
    assert "2 window(s)" in err
    with av.open(str(video)) as c:
        hw = (c.streams.video[0].codec_context.height, c.streams.video[0].codec_context.width)
    check_video(out, hw, expect_frames=30)


def test_two_speakers_with_boxes(media_dir, tmp_path, capsys):
    out = tmp_path / "duo.mp4"
    src = media_dir / "two_people.png"
    h, w = image_hw(src)
    rc, err = run_cli(["--image", str(src), "--audio", str(media_dir / "speaker1.wav"),
                       "--audio2", str(media_dir / "speaker2.wav"), "--audio-type", "para",
                       "--bbox1", f"0,0,{w // 2},{h}", "--bbox2", f"{w // 2},0,{w},{h}",
                       "--max-seconds", "1.5", *SHORT, "--output", str(out)], capsys)
    assert rc == 0, err
    assert "2 window(s)" in err
    check_video(out, (h, w), expect_frames=37)


def test_clip_mode_one_window(media_dir, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    rc, err = run_cli(["--image", str(media_dir / "portrait.png"), "--audio", str(media_dir / "speech.m4a"),
                       "--mode", "clip", "--output", str(out)], capsys)
    assert rc == 0, err
    assert "1 window(s)" in err
    check_video(out, image_hw(media_dir / "portrait.png"), expect_frames=81)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(rate)
        wf.writeframes(pcm.tobytes())
    return path


def cut_wav(media_dir: Path, tmp_path: Path, seconds: float, name: str = "short.wav") -> Path:
    from infinitetalk.media.audio_decode import decode_audio

    speech = decode_audio(media_dir / "speech_44k_stereo.wav", 16000)
    return write_wav(tmp_path / name, speech[: int(seconds * 16000)], 16000)


def test_audio_shorter_than_one_window(media_dir, tmp_path, capsys):
    short = cut_wav(media_dir, tmp_path, 1.5)
    out = tmp_path / "short.mp4"
    rc, err = run_cli(["--image", str(media_dir / "portrait.png"), "--audio", str(short), "--output", str(out)], capsys)
    assert rc == 0, err
    check_video(out, image_hw(media_dir / "portrait.png"), expect_frames=37)


def test_max_seconds_cuts_video_and_audio(media_dir, tmp_path, capsys):
    out = tmp_path / "cut.mp4"
    rc, err = run_cli(["--image", str(media_dir / "portrait.png"), "--audio", str(media_dir / "speech.mp3"),
                       "--max-seconds", "2", "--output", str(out)], capsys)
    assert rc == 0, err
    check_video(out, image_hw(media_dir / "portrait.png"), expect_frames=50)


def test_quiet_prints_nothing(media_dir, tmp_path, capsys):
    short = cut_wav(media_dir, tmp_path, 0.6)
    out = tmp_path / "q.mp4"
    rc, err = run_cli(["--image", str(media_dir / "portrait.png"), "--audio", str(short), "--output", str(out),
                       "--quiet"], capsys)
    assert rc == 0
    assert err == ""
    assert out.is_file()

"""Incremental MP4 writer: real files checked with PyAV (fps, size, audio, duration, atomic rename)."""
import os

import av
import numpy as np
import pytest
import torch

from infinitetalk.errors import MediaError
from infinitetalk.media.frames import VideoFrameReader, choose_bucket, load_image, prepare_frame, size_buckets
from infinitetalk.media.writer import VideoWriter, to_uint8_frames


def _speech(media_dir, seconds):
    """A real speech track (first channel of speaker1.wav) resampled by PyAV to 16 kHz mono float32."""
    with av.open(str(media_dir / "speaker1.wav")) as c:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
        chunks = [r.to_ndarray()[0] for f in c.decode(audio=0) for r in resampler.resample(f)]
    audio = np.concatenate(chunks).astype(np.float32)
    n = int(seconds * 16000)
    return np.tile(audio, n // len(audio) + 1)[:n]


def _probe(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        a = c.streams.audio[0] if c.streams.audio else None
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        info = dict(fps=float(v.average_rate), size=(v.codec_context.width, v.codec_context.height),
                    pix_fmt=v.codec_context.pix_fmt, codec=v.codec_context.name, frames=len(frames),
                    audio_codec=a.codec_context.name if a else None,
                    audio_s=float(a.duration * a.time_base) if a else None)
    return info, frames


def _window_frames(image, n, phase):
    """A moving test window from a real image: [3, n, H, W] in [-1, 1]."""
    x = image.repeat(1, n, 1, 1)
    shift = torch.arange(n).float()[None, :, None, None] * 0.02 + phase
    return (x + torch.sin(shift)).clamp(-1, 1)


def test_windows_with_speech(media_dir, tmp_path):
    image = load_image(media_dir / "portrait.png")
    target = choose_bucket(image.height, image.width, size_buckets(480, 128))
    frames = prepare_frame(image, target)  # [3, 1, h, w]
    audio_frames = 200  # 8 s at 25 fps
    speech = _speech(media_dir, audio_frames / 25 + 0.3)  # longer than the video: must be cut
    out = tmp_path / "sub" / "talk.mp4"
    with VideoWriter(out, target[1], target[0], audio=speech, preset="ultrafast") as writer:
        for i, n in enumerate([81, 72, 47]):
            writer.append(_window_frames(frames, n, i))
            assert not out.exists()  # not visible before it is complete
    assert writer.frames_written == 200
    assert os.listdir(out.parent) == ["talk.mp4"]
    info, decoded = _probe(out)
    assert info["fps"] == 25 and info["size"] == (target[1], target[0]) and info["pix_fmt"] == "yuv420p"
    assert info["codec"] == "h264" and info["audio_codec"] == "aac"
    assert info["frames"] == 200
    assert abs(info["audio_s"] - 200 / 25) <= 1 / 25, info
    stds = [f.astype(np.float32).std() for f in decoded[:5]]
    assert min(stds) > 5  # real picture, not a constant frame
    assert np.abs(decoded[0].astype(int) - decoded[40].astype(int)).mean() > 1  # frames change
    # pixels survive encoding: compare with the exact uint8 conversion of the first frame
    ref = to_uint8_frames(_window_frames(frames, 1, 0))[0]
    assert np.abs(decoded[0].astype(int) - ref.astype(int)).mean() < 4


def test_audio_shorter_than_video_and_no_audio(tmp_path):
    frames = torch.rand(3, 30, 32, 48) * 2 - 1
    path = tmp_path / "short.mp4"
    with VideoWriter(path, 48, 32, audio=np.zeros(8000, np.float32), preset="ultrafast") as w:
        w.append(frames)
    info, _ = _probe(path)
    assert info["frames"] == 30 and info["audio_s"] == pytest.approx(0.5, abs=0.05)
    path2 = tmp_path / "silent.mp4"
    with VideoWriter(path2, 48, 32, preset="ultrafast") as w:
        w.append(to_uint8_frames(frames))
    info2, _ = _probe(path2)
    assert info2["frames"] == 30 and info2["audio_codec"] is None


def test_exception_removes_temp(tmp_path):
    path = tmp_path / "fail.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(path, 32, 32, audio=np.zeros(16000, np.float32), preset="ultrafast") as w:
            w.append(torch.zeros(3, 10, 32, 32))
            assert w.temp_path.exists() and w.temp_path.parent == tmp_path
            raise RuntimeError("generation crashed")
    assert list(tmp_path.iterdir()) == []
    w2 = VideoWriter(tmp_path / "abort.mp4", 32, 32, preset="ultrafast")
    w2.append(torch.zeros(3, 3, 32, 32))
    w2.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MediaError):
        w2.append(torch.zeros(3, 1, 32, 32))


def test_bad_input(tmp_path):
    with VideoWriter(tmp_path / "x.mp4", 32, 32, preset="ultrafast") as w:
        with pytest.raises(ValueError):
            w.append(torch.zeros(3, 2, 16, 16))
        w.append(torch.zeros(3, 2, 32, 32))
    with pytest.raises(ValueError):
        VideoWriter(tmp_path / "odd.mp4", 33, 32)
    empty = VideoWriter(tmp_path / "empty.mp4", 32, 32)
    with pytest.raises(MediaError):
        empty.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.mp4"]


def test_uint8_conversion_is_official():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).view(3, 1, 1, 2)
    got = to_uint8_frames(x)
    expected = np.clip(((x.numpy() + 1) / 2).transpose(1, 2, 3, 0) * 255, 0, 255).astype(np.uint8)
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("frames", [1, 8, 21])
def test_uint8_conversion_by_chunks_matches_the_whole_window(frames):
    """The conversion runs a few frames at a time (bounded host memory); every frame, a view included,
    comes out as the whole-window formula gives it, from float32 and from bf16."""
    x = torch.randn(3, frames, 6, 10, generator=torch.Generator().manual_seed(frames)) * 1.3
    for src in (x, x.to(torch.bfloat16), x[:, frames // 2 :]):
        expected = ((src.float() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()
        got = to_uint8_frames(src)
        assert got.dtype == np.uint8 and got.flags.c_contiguous and np.array_equal(got, expected)


def test_video_source_round_trip(media_dir, tmp_path):
    """V2V-style: frames read from the real talking video by time, written back at 25 fps."""
    path = tmp_path / "v2v.mp4"
    with VideoFrameReader(media_dir / "talking_458px_25fps.mp4") as reader, \
            VideoWriter(path, 128, 128, audio=np.zeros(16000 * 2, np.float32), preset="ultrafast") as w:
        for s in range(0, 50):
            w.append(prepare_frame(reader.frame_at(s / 25), (128, 128)))
    info, decoded = _probe(path)
    assert info["frames"] == 50 and info["size"] == (128, 128)
    assert abs(info["audio_s"] - 2.0) <= 1 / 25

"""Speech tracks for the generator: decode, 16 kHz mono, -23 LUFS, one or two speakers.

`load_speech(path)` is the official `audio_prepare_single` (librosa.load at 16 kHz, then
pyloudnorm normalisation to -23 LUFS, skipped when the loudness is not finite or |L| > 100),
done in-process with PyAV and bounded memory (see `audio_decode` and `audio_loudness`). Audio
inside a video file is read directly (the official code shells out to ffmpeg for that).

`arrange_speakers` is the official `audio_prepare_multi`:
  * 'para': both speakers talk over the same time line; the shorter track is padded with
    silence to the longer one (the official code needs equal lengths and would fail otherwise);
  * 'add': speaker 1 first, then speaker 2: track 1 = [s1, zeros(len s2)], track 2 =
    [zeros(len s1), s2];
  * a missing speaker (None) is silence of the other's length, as the official 'None' path.
The output video's sound track is the sum of the arranged tracks.

Frame counts use the official formula `int(samples / 16000 * 25)` (25 fps video).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import AudioError, InputError
from .audio_decode import TARGET_RATE, decode_audio
from .audio_loudness import TARGET_LUFS, normalize_loudness

VIDEO_FPS = 25
SPEAKER_MODES = ("para", "add")


def frames_for_samples(samples: int, sample_rate: int = TARGET_RATE, fps: int = VIDEO_FPS) -> int:
    """Number of video frames (and wav2vec2 feature frames) for `samples` audio samples."""
    return int(samples / sample_rate * fps)


@dataclass(frozen=True)
class Speech:
    """One speaker's track: float32 mono at `sample_rate` Hz, loudness-normalised.

    `loudness_lufs` is the loudness measured before normalisation (None when the track is
    shorter than one 400 ms measuring block), `gain` the factor that was applied (1.0 if none).
    """

    waveform: np.ndarray
    sample_rate: int = TARGET_RATE
    source: Optional[str] = None
    loudness_lufs: Optional[float] = None
    gain: float = 1.0

    @property
    def num_samples(self) -> int:
        return int(self.waveform.shape[0])

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate

    @property
    def num_frames(self) -> int:
        """Video frames at 25 fps covered by this track (official `int(duration * 25)`)."""
        return frames_for_samples(self.num_samples, self.sample_rate)


@dataclass(frozen=True)
class SpeakerTracks:
    """Arranged per-speaker tracks (all the same length) and their sum for the output video."""

    speakers: tuple[np.ndarray, ...]
    mix: np.ndarray
    mode: str
    sample_rate: int = TARGET_RATE
    # where the speech came from (for the output's sound track at its own rate, `soundtrack`):
    # each speaker's file, the loudness gain applied, its 16 kHz length before arranging
    sources: tuple[Optional[str], ...] = ()
    gains: tuple[float, ...] = ()
    lengths: tuple[int, ...] = ()

    @property
    def num_speakers(self) -> int:
        return len(self.speakers)

    @property
    def num_samples(self) -> int:
        return int(self.mix.shape[0])

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate

    @property
    def num_frames(self) -> int:
        return frames_for_samples(self.num_samples, self.sample_rate)


def load_speech(
    path: os.PathLike | str,
    *,
    normalize: bool = True,
    target_lufs: float = TARGET_LUFS,
    sample_rate: int = TARGET_RATE,
) -> Speech:
    """Decode a speech file (or a video's sound track) to a 16 kHz, -23 LUFS `Speech`.

    Raises AudioError for a missing, empty, truncated or non-audio file, and for audio shorter
    than one video frame (0.04 s), which cannot drive any frame.
    """
    wave = decode_audio(path, sample_rate)
    if frames_for_samples(wave.shape[0], sample_rate) < 1:
        raise AudioError(
            f"{path} holds only {wave.shape[0] / sample_rate * 1000:.0f} ms of audio, less than one video "
            "frame (40 ms). Give a longer speech file."
        )
    loudness, gain = None, 1.0
    if normalize:
        wave, loudness, gain = normalize_loudness(wave, sample_rate, target_lufs)
    return Speech(waveform=wave, sample_rate=sample_rate, source=str(path), loudness_lufs=loudness, gain=gain)


def _as_wave(item: Union[Speech, np.ndarray, None], rate: int) -> Optional[np.ndarray]:
    if item is None:
        return None
    if isinstance(item, Speech):
        if item.sample_rate != rate:
            raise InputError(f"Speaker tracks must share one sample rate ({item.sample_rate} Hz != {rate} Hz).")
        return item.waveform
    arr = np.asarray(item, dtype=np.float32)
    if arr.ndim != 1:
        raise InputError(f"A speaker track must be a 1-D mono waveform, got shape {arr.shape}.")
    return arr


def _pad(x: np.ndarray, before: int, total: int) -> np.ndarray:
    out = np.zeros(total, dtype=np.float32)
    out[before:before + x.shape[0]] = x
    return out


def arrange_speakers(
    speeches: Sequence[Union[Speech, np.ndarray, None]],
    mode: str = "para",
    sample_rate: int = TARGET_RATE,
) -> SpeakerTracks:
    """Arrange one or two speaker tracks as the official pipeline does (see module doc).

    One speaker: returned as is (mode 'single'). Two: `mode` is 'para' or 'add'; one of the
    two may be None (that speaker stays silent).
    """
    speeches = list(speeches)
    if not 1 <= len(speeches) <= 2:
        raise InputError(f"InfiniteTalk takes one or two speakers, got {len(speeches)} audio tracks.")
    waves = [_as_wave(s, sample_rate) for s in speeches]
    if all(w is None for w in waves):
        raise InputError("No speaker audio was given; give at least one speech file.")
    if len(waves) == 1:
        w = np.ascontiguousarray(waves[0], dtype=np.float32)
        return SpeakerTracks(speakers=(w,), mix=w, mode="single", sample_rate=sample_rate)
    if mode not in SPEAKER_MODES:
        raise InputError(f"Unknown two-speaker mode '{mode}'; use 'para' (together) or 'add' (one after the other).")
    a, b = waves
    if a is None:
        a = np.zeros_like(b)
    if b is None:
        b = np.zeros_like(a)
    if mode == "para":
        total = max(a.shape[0], b.shape[0])
        t1, t2 = _pad(a, 0, total), _pad(b, 0, total)
    else:
        total = a.shape[0] + b.shape[0]
        t1, t2 = _pad(a, 0, total), _pad(b, a.shape[0], total)
    return SpeakerTracks(speakers=(t1, t2), mix=t1 + t2, mode=mode, sample_rate=sample_rate)


def load_speakers(
    paths: Sequence[Optional[os.PathLike | str]],
    mode: str = "para",
    *,
    normalize: bool = True,
) -> SpeakerTracks:
    """`load_speech` each path (None = silent speaker) and `arrange_speakers` them."""
    speeches = [None if p is None else load_speech(p, normalize=normalize) for p in paths]
    tracks = arrange_speakers(speeches, mode)
    if all(s is not None for s in speeches):
        tracks = dataclasses.replace(tracks, sources=tuple(s.source for s in speeches),
                                     gains=tuple(float(s.gain) for s in speeches),
                                     lengths=tuple(s.num_samples for s in speeches))
    return tracks

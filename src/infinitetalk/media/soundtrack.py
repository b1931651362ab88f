"""The sound track of the output video: the speech at its own sample rate and channels.

The model needs 16 kHz mono speech features; the viewer does not. `soundtrack(tracks)` decodes
each speaker's file again at its original rate and channel count (PyAV's resampler; more than
two channels are downmixed to stereo, rates AAC cannot carry go to the next one it can, at most
48 kHz), applies the loudness gain the 16 kHz track got, and arranges the speakers on the same
time line as the model's tracks ('para': together; 'add': speaker 2 starts where speaker 1's
16 kHz track ends), mixed at the higher of their rates. `aac_bit_rate` picks the encoder rate.
The official behaviour (the 16 kHz mono mix) stays available as `SpeakerTracks.mix`.
"""
from __future__ import annotations

import logging
from typing import Optional

import av
import numpy as np

from ..errors import AudioError
from .audio import SpeakerTracks

log = logging.getLogger(__name__)

AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
"""Sample rates the AAC encoder takes, up to the 48 kHz we ever write."""


def sound_rate(rate: int) -> int:
    """The AAC rate a source rate is written at: itself when AAC takes it, else the next higher
    one (at most 48 kHz)."""
    for candidate in AAC_RATES:
        if candidate >= rate:
            return candidate
    return AAC_RATES[-1]


def aac_bit_rate(rate: int, channels: int) -> int:
    """96 kbit/s per channel from 32 kHz up (transparent speech and music), 64 below."""
    return (96_000 if rate >= 32000 else 64_000) * channels


def probe_sound(path: str) -> tuple[int, int]:
    """(sample rate, channels) of the first audio stream of `path`."""
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        return int(stream.codec_context.sample_rate or stream.rate), int(stream.codec_context.channels or 1)


def decode_sound(path: str, rate: int, channels: int) -> np.ndarray:
    """The first audio stream of `path` as float32 [channels, samples] at `rate` (1 or 2 channels)."""
    layout = "mono" if channels == 1 else "stereo"
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
    pieces = []
    try:
        with av.open(str(path)) as c:
            for frame in c.decode(c.streams.audio[0]):
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray())
            for out in resampler.resample(None):
                pieces.append(out.to_ndarray())
    except av.error.FFmpegError as err:
        raise AudioError(f"{path} could not be decoded again for the sound track ({err}).") from err
    if not pieces:
        return np.zeros((channels, 0), dtype=np.float32)
    return np.concatenate(pieces, axis=1).astype(np.float32, copy=False)


def _fit(x: np.ndarray, start: int, total: int, channels: int) -> np.ndarray:
    out = np.zeros((channels, total), dtype=np.float32)
    x = np.broadcast_to(x, (channels, x.shape[1])) if x.shape[0] == 1 else x
    end = min(total, start + x.shape[1])
    if end > start:
        out[:, start:end] = x[:, : end - start]
    return out


def soundtrack(tracks: SpeakerTracks) -> Optional[tuple[np.ndarray, int]]:
    """(float32 [channels, samples], rate) of the speakers' original sound, arranged like
    `tracks`; None when the tracks do not come from files (then use `tracks.mix`)."""
    if not tracks.sources or any(s is None for s in tracks.sources):
        return None
    probes = [probe_sound(s) for s in tracks.sources]
    rate = sound_rate(max(r for r, _ in probes))
    channels = min(2, max(c for _, c in probes))
    waves = [decode_sound(s, rate, channels) * np.float32(g) for s, g in zip(tracks.sources, tracks.gains)]
    ratio = rate / tracks.sample_rate
    total = int(round(tracks.num_samples * ratio))
    if tracks.mode == "add":
        starts = [0, int(round(tracks.lengths[0] * ratio))]
    else:
        starts = [0] * len(waves)
    mix = sum(_fit(w, s, total, channels) for w, s in zip(waves, starts))
    np.clip(mix, -1.0, 1.0, out=mix)
    log.info("sound track: %d Hz, %d channel(s), %d speaker(s)", rate, channels, len(waves))
    return mix, rate


def sound_track(tracks: SpeakerTracks, official: bool = False) -> tuple[np.ndarray, int]:
    """(audio, rate) for the output: the original sound (`soundtrack`), or with `official` (or
    when the speech did not come from files) the 16 kHz mono mix the model heard."""
    found = None if official else soundtrack(tracks)
    return found if found is not None else (tracks.mix, tracks.sample_rate)

"""Decode any audio file (or the sound track of a video file) to 16 kHz mono float32, in-process.

Numerically this follows what the official code gets from `librosa.load(path, sr=16000)`:
samples as float32 (16-bit PCM divided by 32768, exactly as libsndfile does), channels averaged
to mono *first*, then one soxr 'HQ' resampling of the whole signal, then the length fixed to
`ceil(n * 16000 / rate)` samples (librosa's `fix_length`). On the official parity wav this gives
the reference waveform bit for bit.

Unlike librosa it never holds the source signal in memory: PyAV (FFmpeg inside the wheel, no
system ffmpeg) decodes packet by packet, each chunk is mixed down and pushed through a
`soxr.ResampleStream`, so a 1-hour 48 kHz stereo file needs the 16 kHz output (230 MB for an
hour) plus a few MB of buffers. The streamed resampler equals the one-shot `soxr.resample` on
the parity fixture and on the test media (checked in tests/test_audio_media.py).

Bad inputs raise `AudioError` with a sentence: missing path, empty file, a FIFO or device, not a
media file, no audio stream, truncated file (decoded length clearly shorter than the header
says), decode error, NaN or infinite float samples (found while decoding).
"""
from __future__ import annotations

import logging
import math
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import AudioError

log = logging.getLogger(__name__)

TARGET_RATE = 16000
# A decoded track shorter than its header promises by more than this is reported as truncated.
TRUNCATION_TOLERANCE_S = 0.5
TRUNCATION_TOLERANCE_FRACTION = 0.02
# For WAV the header is exact: more than one video frame (40 ms) missing counts as truncated.
WAV_TRUNCATION_TOLERANCE_S = 0.04


def _frame_to_float(frame) -> np.ndarray:
    """One PyAV AudioFrame -> float32 array [channels, samples] with libsndfile's scaling."""
    fmt = frame.format
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not fmt.is_planar:  # packed: [1, samples * channels], interleaved
        data = data.reshape(-1, channels).T
    name = fmt.name.rstrip("p")
    if name == "s16":
        return data.astype(np.float32) / np.float32(32768.0)
    if name == "s32":
        return (data.astype(np.float64) / 2147483648.0).astype(np.float32)
    if name == "u8":
        return (data.astype(np.float32) - np.float32(128.0)) / np.float32(128.0)
    if name == "s64":
        return (data.astype(np.float64) / 9223372036854775808.0).astype(np.float32)
    if name in ("flt", "dbl"):
        return data.astype(np.float32, copy=False)
    raise AudioError(f"Unsupported sample format '{fmt.name}' in the audio stream.")


def _mono(samples: np.ndarray) -> np.ndarray:
    """Average channels like numpy's mean over axis 0 (sequential sum, then divide)."""
    if samples.shape[0] == 1:
        return np.ascontiguousarray(samples[0])
    total = samples[0].copy()
    for ch in range(1, samples.shape[0]):
        total += samples[ch]
    return total / np.float32(samples.shape[0])


def _check_path(path: Path) -> None:
    from .images import regular_file

    if not path.exists():
        raise AudioError(f"Audio file not found: {path}. Check the path and try again.")
    if path.is_dir():
        raise AudioError(f"{path} is a folder, not an audio file. Give the path of a speech file.")
    regular_file(path, "audio", AudioError)  # FIFOs and devices are named as such


def _wav_missing_seconds(path: Path) -> float | None:
    """Seconds of audio a RIFF/WAVE file's `data` chunk announces but the file lacks (None if not WAV).

    FFmpeg's wav reader silently shortens its duration to what is on disk, so a cut-off WAV can
    only be recognised from the header itself. The RIFF size field is not used: several writers
    get it wrong by a few bytes.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        byte_rate = None
        offset = 12
        while True:
            fh.seek(offset)
            hdr = fh.read(8)
            if len(hdr) < 8:
                return None
            chunk_id, chunk_size = hdr[:4], struct.unpack("<I", hdr[4:8])[0]
            if chunk_id == b"fmt ":
                fmt = fh.read(16)
                if len(fmt) == 16:
                    byte_rate = struct.unpack("<I", fmt[8:12])[0]
            elif chunk_id == b"data":
                if chunk_size in (0, 0xFFFFFFFF) or not byte_rate:  # streamed WAV: size unset
                    return None
                missing = offset + 8 + chunk_size - size
                return max(missing, 0) / byte_rate
            offset += 8 + chunk_size + (chunk_size & 1)


class _Buffer:
    """Append-only float32 buffer that grows by 1.5x when its estimate was too small."""

    def __init__(self, capacity: int):
        self.data = np.zeros(max(capacity, 1024), dtype=np.float32)
        self.size = 0

    def append(self, x: np.ndarray) -> None:
        end = self.size + x.shape[0]
        if end > self.data.shape[0]:
            grown = np.zeros(max(end, int(self.data.shape[0] * 1.5)), dtype=np.float32)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size:end] = x
        self.size = end

    def finish(self, length: int) -> np.ndarray:
        """The first `length` samples (zero-padded), without a copy when the buffer is big enough."""
        if length > self.data.shape[0]:
            self.append(np.zeros(length - self.size, dtype=np.float32))
        self.data[self.size:length] = 0.0
        return self.data[:length]


def decode_audio(path: os.PathLike | str, sample_rate: int = TARGET_RATE) -> np.ndarray:
    """Decode the first audio stream of `path` to float32 mono at `sample_rate` Hz.

    Works for audio files (WAV, MP3, M4A/AAC, FLAC, OGG/Opus, ...) and video files with sound
    (MP4, MOV, MKV, WebM, ...). Memory: the output plus small decode/resample buffers.
    """
    import av
    import soxr

    path = Path(path)
    _check_path(path)
    missing = _wav_missing_seconds(path)
    if missing is not None and missing > WAV_TRUNCATION_TOLERANCE_S:
        raise AudioError(
            f"{path} is truncated: its WAV header announces {missing:.2f} s more audio than the file "
            "holds. The copy or download was cut off; get the complete file."
        )
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        raise AudioError(
            f"{path} is not a readable audio or video file ({exc.strerror or exc}). It may be damaged, "
            "truncated or of another type; give a speech file such as WAV, MP3, M4A or FLAC."
        ) from exc
    with container:
        if not container.streams.audio:
            fmt = container.format.name
            if fmt.endswith("_pipe") or fmt == "image2":
                what = "it is an image"
            else:
                what = "it contains " + (", ".join(sorted({s.type for s in container.streams})) or "no streams") + " only"
            raise AudioError(
                f"{path} has no audio stream ({what}). "
                "Give a speech file, or a video file that has a sound track."
            )
        stream = container.streams.audio[0]
        declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        in_rate = None
        resampler = None
        # one growing output buffer (sized from the declared duration) instead of thousands of
        # small pieces, which fragment the heap and double the peak when joined
        buf = _Buffer(int((declared or 0.0) * sample_rate * 1.01) + sample_rate)
        n_in = 0
        try:
            for frame in container.decode(stream):
                if frame.samples == 0:
                    continue
                if in_rate is None:
                    in_rate = int(frame.rate)
                    if in_rate != sample_rate:
                        resampler = soxr.ResampleStream(in_rate, sample_rate, 1, dtype="float32", quality="HQ")
                elif int(frame.rate) != in_rate:
                    raise AudioError(
                        f"{path} changes its sample rate in the middle of the stream "
                        f"({in_rate} Hz then {frame.rate} Hz); convert it to a plain WAV first."
                    )
                mono = _mono(_frame_to_float(frame))
                if mono.dtype.kind == "f" and not np.isfinite(mono).all():
                    at = (n_in + int(np.argmin(np.isfinite(mono)))) / in_rate
                    raise AudioError(
                        f"{path} holds invalid samples (NaN or infinite) at {at:.2f} s; the file is damaged. "
                        "Re-export it as 16-bit PCM WAV."
                    )
                n_in += mono.shape[0]
                buf.append(resampler.resample_chunk(mono, last=False) if resampler else mono)
        except av.error.FFmpegError as exc:
            at = n_in / in_rate if in_rate else 0.0
            raise AudioError(
                f"{path} could not be decoded after {at:.2f} s ({exc.strerror or exc}); the file is "
                "damaged or truncated. Re-export or download it again."
            ) from exc
        if n_in == 0:
            raise AudioError(f"{path} contains no audio samples. Give a file that contains speech.")
        if resampler is not None:
            buf.append(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))

    decoded_s = n_in / in_rate
    if declared is not None and declared - decoded_s > max(TRUNCATION_TOLERANCE_S, TRUNCATION_TOLERANCE_FRACTION * declared):
        raise AudioError(
            f"{path} is truncated: its header announces {declared:.2f} s of audio but only "
            f"{decoded_s:.2f} s could be decoded. Get the complete file."
        )
    # librosa.resample's fix_length: ceil(n * ratio) samples, zero-padded or trimmed.
    want = int(math.ceil(n_in * (float(sample_rate) / in_rate))) if in_rate != sample_rate else n_in
    out = buf.finish(want)
    log.debug("decoded %s: %d samples at %d Hz -> %d at %d Hz", path, n_in, in_rate, want, sample_rate)
    return out


def declared_duration(path: os.PathLike | str) -> float | None:
    """Duration in seconds of the first audio stream as the container declares it (None if unknown)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            return container.duration / 1e6 if container.duration else None
    except av.error.FFmpegError:
        return None

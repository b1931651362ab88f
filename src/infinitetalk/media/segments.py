"""Video segments of a resumable job, and their final assembly into one MP4 with sound.

Each finished window is written as its own small video-only H.264 MP4 (`write_segment`), under
a temporary name renamed into place, so a killed job keeps every finished window. At the end
`concat_segments` copies the segments' compressed packets one after another into the output
(no re-encoding, so no second generation loss), encodes the speech as AAC alongside, cut to the
video length, and renames the finished file into place.

Segments are encoded without B-frames (`bframes=0`): then every packet's decode time equals its
presentation time and shifting each segment by the frames before it gives a valid, strictly
increasing time line. All segments use the same encoder settings and size, so they share one
H.264 parameter set (checked; if a segment differs, that job's video is re-encoded instead).
"""
from __future__ import annotations

import logging
import os
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence, Union

import av
import numpy as np

from ..config import AUDIO_SAMPLE_RATE, FPS
from ..errors import MediaError, storage_error
from .writer import VideoWriter, to_uint8_frames

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
SEGMENT_OPTIONS = {"crf": "18", "preset": "medium", "bframes": "0"}


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.partial{path.suffix}")


def write_segment(path: PathLike, frames, fps: int = FPS, options: Optional[dict] = None) -> Path:
    """Encode `frames` (uint8 [T, H, W, 3] or float [3, T, H, W] in [-1, 1]) as a video-only MP4.

    Written to a temporary name in the same folder, then renamed to `path` (atomic).
    """
    path = Path(path)
    data = to_uint8_frames(frames)
    if data.shape[0] == 0:
        raise ValueError("a segment needs at least one frame")
    height, width = data.shape[1:3]
    temp = _temp_name(path)
    try:
        with av.open(str(temp), mode="w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuv420p"
            stream.codec_context.time_base = Fraction(1, fps)
            stream.options = dict(options or SEGMENT_OPTIONS)
            for i, image in enumerate(data):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = i
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
        os.replace(temp, path)
    except OSError as err:  # PyAV's errno errors are OSErrors too (disk full, read-only, ...)
        temp.unlink(missing_ok=True)
        raise storage_error(path, err) from err
    except av.error.FFmpegError as err:
        temp.unlink(missing_ok=True)
        raise MediaError(f"Writing the video segment {path} failed: {err}") from err
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def as_channels(audio: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """Speech as float32 [channels, samples] (a 1-D mono waveform becomes one channel)."""
    if audio is None:
        return None
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2 or audio.shape[0] not in (1, 2):
        raise ValueError(f"audio must be [samples] or [1 or 2 channels, samples], got shape {audio.shape}")
    return np.ascontiguousarray(audio)


class AudioTrack:
    """AAC encoding of a mono or stereo float32 waveform, written up to a given sample as video
    is added (packets stay interleaved with the video)."""

    def __init__(self, container, audio: Optional[np.ndarray], sample_rate: int):
        from .soundtrack import aac_bit_rate

        self.container = container
        self.audio = as_channels(audio)
        self.rate = sample_rate
        self.written = 0
        self.stream = None
        if self.audio is not None:
            channels = self.audio.shape[0]
            self.layout = "mono" if channels == 1 else "stereo"
            self.stream = container.add_stream("aac", rate=sample_rate, layout=self.layout)
            self.stream.bit_rate = aac_bit_rate(sample_rate, channels)
            self.stream.codec_context.time_base = Fraction(1, sample_rate)

    @property
    def samples(self) -> int:
        return 0 if self.audio is None else int(self.audio.shape[1])

    def write_until(self, sample: int) -> None:
        if self.stream is None:
            return
        sample = min(sample, self.samples)
        step = self.rate  # one second per frame object keeps packets interleaved finely
        while self.written < sample:
            end = min(sample, self.written + step)
            chunk = np.ascontiguousarray(self.audio[:, self.written : end])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=self.layout)
            frame.sample_rate = self.rate
            frame.pts = self.written
            frame.time_base = Fraction(1, self.rate)
            self.container.mux(self.stream.encode(frame))
            self.written = end

    def flush(self) -> None:
        if self.stream is not None:
            self.container.mux(self.stream.encode(None))


def _same_parameters(paths: Sequence[Path]) -> bool:
    ref = None
    for p in paths:
        with av.open(str(p)) as c:
            ctx = c.streams.video[0].codec_context
            key = (ctx.width, ctx.height, ctx.pix_fmt, bytes(ctx.extradata or b""))
        if ref is None:
            ref = key
        elif key != ref:
            log.warning("segment %s has other H.264 parameters than the first; re-encoding the video", p)
            return False
    return True


def concat_segments(
    segments: Sequence[PathLike],
    output: PathLike,
    audio: Optional[np.ndarray] = None,
    sample_rate: int = AUDIO_SAMPLE_RATE,
    fps: int = FPS,
    temp_dir: Optional[PathLike] = None,
) -> Path:
    """Join `segments` (in order) into `output` with `audio` (float32 [samples] or [channels,
    samples] at `sample_rate`) as AAC, cut to the video length.

    Packet copy when all segments share their parameters, else decode + re-encode. Written to a
    temporary name in `temp_dir` (default: beside `output`; the job folder, so a kill leaves
    nothing beside the output) and renamed when complete. Returns the output path.
    """
    paths = [Path(s) for s in segments]
    if not paths:
        raise MediaError("No video segment to assemble; nothing was generated.")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if not _same_parameters(paths):
        return _reencode(paths, output, audio, sample_rate, fps, temp_dir)
    temp = _temp_name(output) if temp_dir is None else _temp_name(Path(temp_dir) / output.name)
    try:
        with av.open(str(temp), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
            with av.open(str(paths[0])) as first:
                video_out = out.add_stream_from_template(first.streams.video[0])
            track = AudioTrack(out, audio, sample_rate)
            frames = 0
            for path in paths:
                with av.open(str(path)) as seg:
                    stream = seg.streams.video[0]
                    tb = stream.time_base
                    offset = int(round(Fraction(frames, fps) / tb))
                    count = 0
                    for packet in seg.demux(stream):
                        if packet.size == 0 or packet.pts is None:
                            continue
                        packet.pts += offset
                        if packet.dts is not None:
                            packet.dts += offset
                        packet.stream = video_out
                        out.mux(packet)
                        count += 1
                frames += count
                track.write_until(frames * sample_rate // fps)
            track.flush()
        os.replace(temp, output)
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise storage_error(output, err) from err
    except av.error.FFmpegError as err:
        temp.unlink(missing_ok=True)
        raise MediaError(f"Assembling {output} from its segments failed: {err}") from err
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%d frames, %.2f s) from %d segment(s)", output, frames, frames / fps, len(paths))
    return output


def _reencode(paths: Sequence[Path], output: Path, audio, sample_rate: int, fps: int, temp_dir=None) -> Path:
    writer = None
    try:
        for path in paths:
            with av.open(str(path)) as seg:
                for frame in seg.decode(video=0):
                    image = frame.to_ndarray(format="rgb24")
                    if writer is None:
                        writer = VideoWriter(output, image.shape[1], image.shape[0], audio, sample_rate, fps,
                                             temp_dir=temp_dir)
                    writer.append(image[None])
        if writer is None:
            raise MediaError("The video segments hold no frame.")
        return writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise

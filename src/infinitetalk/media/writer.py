"""Incremental MP4 writer: H.264 yuv420p at 25 fps plus the speech track as AAC, via PyAV.

Frames are encoded as they are appended (one window at a time), so host memory does not grow
with the video length. The speech track (float32 mono or stereo, any AAC rate) is encoded alongside up to the
current video time and, at close, cut to the video length. The file is written under a
temporary name in the destination folder and renamed into place only when complete; on an
exception inside the `with` block, or `abort()`, the temporary file is removed.
"""
from __future__ import annotations

import logging
import os
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Optional, Union

import av
import numpy as np
import torch

from infinitetalk.config import AUDIO_SAMPLE_RATE, FPS
from infinitetalk.errors import MediaError, storage_error

log = logging.getLogger(__name__)


_CONVERT_FRAMES = 8


def to_uint8_frames(frames: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """Video frames as uint8 [T, H, W, 3].

    Accepts the model's float [3, T, H, W] in [-1, 1] (official conversion: (x+1)/2*255,
    clipped, truncated to uint8) or uint8 [T, H, W, 3] as is.
    """
    if isinstance(frames, np.ndarray) and frames.dtype == np.uint8:
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be [T, H, W, 3], got {frames.shape}")
        return frames
    x = torch.as_tensor(frames)
    if x.dim() != 4 or x.shape[0] != 3:
        raise ValueError(f"float frames must be [3, T, H, W] in [-1, 1], got {tuple(x.shape)}")
    x = x.detach()
    out = torch.empty((x.shape[1], x.shape[2], x.shape[3], 3), dtype=torch.uint8)
    # a few frames at a time, so the float temporaries stay small next to the window (a 720p window in
    # float32 is 0.9 GB; converting it whole held two more float copies of it in host memory)
    for s in range(0, x.shape[1], _CONVERT_FRAMES):
        y = x[:, s : s + _CONVERT_FRAMES].float().cpu().add(1)
        y.div_(2).mul_(255).clamp_(0, 255)
        out[s : s + _CONVERT_FRAMES] = y.permute(1, 2, 3, 0).to(torch.uint8)
    return out.numpy()


class VideoWriter:
    """Write an MP4 incrementally; use as a context manager.

    `VideoWriter(path, width, height, audio=None, sample_rate=16000, fps=25, crf=18, preset="medium")`
    `append(frames)`: add frames ([3, T, H, W] float in [-1, 1] or [T, H, W, 3] uint8).
    `close() -> Path`: finish (audio cut to the video length), rename into place.
    `abort()`: stop and delete the temporary file.
    """

    def __init__(
        self,
        path: Union[str, Path],
        width: int,
        height: int,
        audio: Optional[np.ndarray] = None,
        sample_rate: int = AUDIO_SAMPLE_RATE,
        fps: int = FPS,
        crf: int = 18,
        preset: str = "medium",
        temp_dir: Optional[Union[str, Path]] = None,
    ):
        if width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs even sizes, got {width}x{height}")
        self.path = Path(path)
        self.width, self.height, self.fps = width, height, fps
        self.sample_rate = sample_rate
        self.frames_written = 0
        from .segments import as_channels

        self._audio = as_channels(audio)  # [channels, samples]
        self._audio_written = 0
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MediaError(f"Cannot create the output folder {self.path.parent}: {err}") from err
        folder = Path(temp_dir) if temp_dir is not None else self.path.parent
        self.temp_path = folder / f".{self.path.stem}.{uuid.uuid4().hex[:8]}.partial.mp4"
        try:
            self._container = av.open(str(self.temp_path), mode="w", format="mp4",
                                      options={"movflags": "+faststart"})
        except (av.error.FFmpegError, OSError) as err:
            raise MediaError(f"Cannot write the output video {self.path}: {err}") from err
        try:
            self._video = self._container.add_stream("libx264", rate=fps)
            self._video.width, self._video.height = width, height
            self._video.pix_fmt = "yuv420p"
            self._video.codec_context.time_base = Fraction(1, fps)
            self._video.options = {"crf": str(crf), "preset": preset}
            self._audio_stream = None
            if self._audio is not None:
                from .soundtrack import aac_bit_rate

                self._layout = "mono" if self._audio.shape[0] == 1 else "stereo"
                self._audio_stream = self._container.add_stream("aac", rate=sample_rate, layout=self._layout)
                self._audio_stream.bit_rate = aac_bit_rate(sample_rate, self._audio.shape[0])
                self._audio_stream.codec_context.time_base = Fraction(1, sample_rate)
        except Exception:
            self._discard()
            raise

    # -- writing -------------------------------------------------------------------------
    def append(self, frames: Union[torch.Tensor, np.ndarray]) -> None:
        """Encode `frames` now and the speech up to the new video end."""
        self._check_open()
        data = to_uint8_frames(frames)
        if data.shape[1:3] != (self.height, self.width):
            raise ValueError(f"frames are {data.shape[2]}x{data.shape[1]}, the video is {self.width}x{self.height}")
        try:
            for image in data:
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = self.frames_written
                self._container.mux(self._video.encode(frame))
                self.frames_written += 1
            self._write_audio(self._audio_target())
        except OSError as err:
            self.abort()
            raise storage_error(self.path, err) from err
        except av.error.FFmpegError as err:
            self.abort()
            raise MediaError(f"Writing {self.path} failed: {err}") from err

    def _audio_target(self) -> int:
        return (self.frames_written * self.sample_rate) // self.fps

    def _write_audio(self, until: int) -> None:
        if self._audio_stream is None:
            return
        until = min(until, self._audio.shape[1])
        if until <= self._audio_written:
            return
        chunk = np.ascontiguousarray(self._audio[:, self._audio_written : until])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=self._layout)
        frame.sample_rate = self.sample_rate
        frame.pts = self._audio_written
        frame.time_base = Fraction(1, self.sample_rate)
        self._container.mux(self._audio_stream.encode(frame))
        self._audio_written = until

    # -- finishing -----------------------------------------------------------------------
    def close(self) -> Path:
        """Flush the encoders, cut the audio to the video length, and rename into place."""
        self._check_open()
        if self.frames_written == 0:
            self.abort()
            raise MediaError(f"No frame was written to {self.path}; nothing to save.")
        try:
            self._write_audio(self._audio_target())
            self._container.mux(self._video.encode(None))
            if self._audio_stream is not None:
                self._container.mux(self._audio_stream.encode(None))
            self._container.close()
            self._closed = True
            os.replace(self.temp_path, self.path)
        except OSError as err:
            self.abort()
            raise storage_error(self.path, err) from err
        except av.error.FFmpegError as err:
            self.abort()
            raise MediaError(f"Finishing {self.path} failed: {err}") from err
        log.info("wrote %s (%d frames, %.2f s)", self.path, self.frames_written, self.frames_written / self.fps)
        return self.path

    def abort(self) -> None:
        """Stop writing and remove the temporary file (safe to call more than once)."""
        self._discard()

    def _discard(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except Exception as err:  # noqa: BLE001 - best effort while cleaning up after a failure
                log.debug("closing the aborted container failed: %s", err)
        try:
            self.temp_path.unlink(missing_ok=True)
        except OSError as err:
            log.warning("could not remove the temporary file %s: %s", self.temp_path, err)

    def _check_open(self) -> None:
        if self._closed:
            raise MediaError(f"The writer of {self.path} is already closed.")

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

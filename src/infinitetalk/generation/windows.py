"""Window planner: which frames each 81-frame window makes, keeps and conditions on.

Pure arithmetic, no tensors. It follows the official streaming loop (`wan/multitalk.py`,
`generate_infinitetalk`): window k starts at audio frame s_k = k * (frame_num - motion_frame);
the first window keeps all its frames, later windows drop their first `motion_frame` frames
(they repeat the previous window's last frames, which were fed back as motion latents); a
window is the last one when s + frame_num >= min(frame cap, audio frames); the video is cut
to min(frame cap, audio frames). In clip mode the cap is one window (frame_num frames).

One extension over the official code: audio shorter than one window (which the official
code refuses) gives a single window whose output is cut to the audio length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from infinitetalk.config import FPS
from infinitetalk.errors import InputError


@dataclass(frozen=True)
class Window:
    """One window of the plan.

    `start`/`end`: audio-frame range [start, end) the window is generated for (end - start =
    frame_num; end may pass the audio length on the last window, see `needs_padding`).
    `keep`: slice of the window's decoded frames that go into the output video.
    `out_start`/`out_end`: where those frames land in the output video (out_end - out_start ==
    number of kept frames).
    `motion_frames`: pixel frames that condition the window as motion latents (1 = the reference
    frame itself for the first window, `motion_frame` = the previous window's last frames later);
    `motion_latent_frames` = 1 + (motion_frames - 1) // 4.
    `needs_padding`: the window reaches past the audio features, so they are extended by
    reflection first (official: miss = end - len + 3; E = cat([E, flip(E[-miss:])])).
    `reference_time_s`: time in the source video of this window's reference frame (V2V).
    """

    index: int
    start: int
    end: int
    keep: slice
    out_start: int
    out_end: int
    is_first: bool
    is_last: bool
    motion_frames: int
    motion_latent_frames: int
    needs_padding: bool
    reference_time_s: float

    @property
    def new_frames(self) -> int:
        """Number of frames this window adds to the output video."""
        return self.out_end - self.out_start


@dataclass(frozen=True)
class WindowPlan:
    """All windows of a job and the final video length in frames."""

    windows: tuple[Window, ...]
    total_frames: int
    audio_frames: int
    frame_num: int
    motion_frame: int

    def __len__(self) -> int:
        return len(self.windows)

    def __iter__(self):
        return iter(self.windows)

    def __getitem__(self, i: int) -> Window:
        return self.windows[i]

    @property
    def duration_s(self) -> float:
        return self.total_frames / FPS


def frame_cap(mode: str, frame_num: int, max_frames: Optional[int]) -> Optional[int]:
    """The frame cap of a mode: one window in clip mode, `max_frames` (None = none) in streaming."""
    if mode == "clip":
        return frame_num if max_frames is None else min(frame_num, max_frames)
    if mode == "streaming":
        return max_frames
    raise InputError(f"mode must be 'clip' or 'streaming', got {mode!r}.")


def plan_windows(
    audio_frames: int,
    frame_num: int = 81,
    motion_frame: int = 9,
    mode: str = "streaming",
    max_frames: Optional[int] = None,
) -> WindowPlan:
    """Plan the windows for `audio_frames` audio-feature frames (25 per second).

    Returns a WindowPlan whose windows, concatenated through their `keep` slices, give exactly
    `total_frames` = min(cap, audio_frames) frames.
    """
    if audio_frames < 1:
        raise InputError("The speech is too short: it gives no video frame (at least 1/25 s of audio is needed).")
    if frame_num < 1 or (frame_num - 1) % 4 != 0:
        raise InputError(f"frame_num must be 4n+1, got {frame_num}.")
    if not 1 <= motion_frame < frame_num:
        raise InputError(f"motion_frame must be between 1 and frame_num-1, got {motion_frame}.")
    cap = frame_cap(mode, frame_num, max_frames)
    if cap is not None and cap < 1:
        raise InputError(f"max_frames must be at least 1, got {cap}.")
    total = audio_frames if cap is None else min(cap, audio_frames)
    stride = frame_num - motion_frame

    windows = []
    start = 0
    index = 0
    while True:
        first = index == 0
        end = start + frame_num
        last = end >= total
        keep_from = 0 if first else motion_frame
        keep_to = min(frame_num, total - start)
        motion = 1 if first else motion_frame
        windows.append(
            Window(
                index=index,
                start=start,
                end=end,
                keep=slice(keep_from, keep_to),
                out_start=start + keep_from,
                out_end=start + keep_to,
                is_first=first,
                is_last=last,
                motion_frames=motion,
                motion_latent_frames=1 + (motion - 1) // 4,
                needs_padding=end >= audio_frames,
                reference_time_s=start / FPS,
            )
        )
        if last:
            break
        start += stride
        index += 1
    return WindowPlan(tuple(windows), total, audio_frames, frame_num, motion_frame)

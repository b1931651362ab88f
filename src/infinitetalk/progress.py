"""One progress interface for the CLI, the Python API, the web UI and the HTTP server.

Long-running code reports through a `ProgressCallback`: a plain callable receiving typed
events (subclasses of `ProgressEvent`). It never prints by itself; front ends render the same
events as a terminal display (CLI), page components (UI) or a job status / SSE stream (HTTP).

    JobStarted      the plan: windows, frames, seconds, size, steps, seed, first window (resume)
    StageStarted    / StageFinished: "load", "encode_audio", "encode_prompt", "write", ...
    WindowStarted   / WindowFinished: index (0-based) and count; finished carries the new frames
    StepFinished    one sampler step of a window
    Notice          a sentence worth showing (e.g. "the tiny model's video is noise")
    JobFinished     / JobFailed / JobCancelled: the end, exactly one of them per job

Every event carries `elapsed_s` (since the job started) and `eta_s` (remaining seconds, None
until it can be estimated), both from one `EtaEstimator`, which ignores warm-up: the first
sampler step of a run (kernel selection, compilation) and the first window's extra work
(encoders, reference frame) do not enter the rates.

`CancelToken` stops a job from another thread: the tracker checks it before every window and
after every sampler step, and raises `JobCancelledError` there; finished windows stay resumable.
"""
from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional

from .errors import JobCancelledError


@dataclass(frozen=True, kw_only=True)
class ProgressEvent:
    """Base of every event: `elapsed_s` since the job started, `eta_s` of the whole job."""

    elapsed_s: float = 0.0
    eta_s: Optional[float] = None

    @property
    def kind(self) -> str:
        """snake_case name of the event type, e.g. "window_finished" (the `type` in `to_dict`)."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).lower()

    def to_dict(self) -> dict:
        """Plain JSON-ready data: {"type": kind, field: value, ...}."""
        return {"type": self.kind, **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class JobStarted(ProgressEvent):
    windows: int = 0
    frames: int = 0
    duration_s: float = 0.0
    width: int = 0
    height: int = 0
    steps: int = 0
    seed: int = 0
    first_window: int = 0  # > 0 when resuming


@dataclass(frozen=True, kw_only=True)
class StageStarted(ProgressEvent):
    stage: str = ""
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class StageFinished(ProgressEvent):
    stage: str = ""
    seconds: float = 0.0


@dataclass(frozen=True, kw_only=True)
class WindowStarted(ProgressEvent):
    index: int = 0
    count: int = 0


@dataclass(frozen=True, kw_only=True)
class WindowFinished(ProgressEvent):
    index: int = 0
    count: int = 0
    frames: int = 0  # new frames this window added to the video
    out_end: int = 0  # frames of the video made so far
    seconds: float = 0.0  # this window's wall time
    segment: Optional[str] = None  # the window's playable video-only MP4 (generate), if any


@dataclass(frozen=True, kw_only=True)
class StepFinished(ProgressEvent):
    window: int = 0
    windows: int = 0
    step: int = 0  # 1-based
    steps: int = 0


@dataclass(frozen=True, kw_only=True)
class Notice(ProgressEvent):
    message: str = ""
    level: str = "info"


@dataclass(frozen=True, kw_only=True)
class JobFinished(ProgressEvent):
    output: Optional[str] = None
    frames: int = 0
    duration_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class JobFailed(ProgressEvent):
    message: str = ""
    error: str = ""  # the error type's name


@dataclass(frozen=True, kw_only=True)
class JobCancelled(ProgressEvent):
    message: str = ""
    next_window: int = 0  # windows finished and kept
    resumable: bool = False


ProgressCallback = Callable[[ProgressEvent], None]

EVENT_TYPES = {cls.__name__: cls for cls in (JobStarted, StageStarted, StageFinished, WindowStarted, WindowFinished,
                                             StepFinished, Notice, JobFinished, JobFailed, JobCancelled)}


def null_progress(event: ProgressEvent) -> None:  # noqa: ARG001 - the do-nothing callback
    """A callback that ignores everything (the default)."""


class CancelToken:
    """Thread-safe request to stop a job; `check()` raises JobCancelledError once cancelled."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise JobCancelledError("The job was cancelled; its finished windows are kept and it can be resumed.")


class EtaEstimator:
    """Remaining time of a job from its step and window rates, warm-up excluded.

    rate of a step: mean duration of the finished steps after the first of this run; per-window
    overhead (encode, decode, write): mean of (window time - its steps) over windows after the
    first of this run (the first window's until one exists). Until one warm step exists, the
    ETA is unknown (None).
    """

    def __init__(self, windows: int, steps: int, first_window: int = 0):
        self.windows, self.steps, self.first_window = windows, max(1, steps), first_window
        self._step_times: list[float] = []
        self._overheads: list[float] = []
        self._first_overhead: Optional[float] = None
        self._steps_seen = 0
        self._window = first_window
        self._window_steps = 0
        self._window_step_time = 0.0

    def window_started(self, index: int) -> None:
        self._window, self._window_steps, self._window_step_time = index, 0, 0.0

    def step_done(self, seconds: float) -> None:
        self._steps_seen += 1
        self._window_steps += 1
        self._window_step_time += seconds
        if self._steps_seen > 1:
            self._step_times.append(seconds)

    def window_done(self, index: int, seconds: float) -> None:
        overhead = max(0.0, seconds - self._window_step_time)
        if index > self.first_window:
            self._overheads.append(overhead)
        elif self._first_overhead is None:
            self._first_overhead = overhead  # used only until a later window has finished
        self._window = index + 1
        self._window_steps = 0
        self._window_step_time = 0.0

    def eta(self) -> Optional[float]:
        if not self._step_times:
            return None
        step = sum(self._step_times) / len(self._step_times)
        if self._overheads:
            overhead = sum(self._overheads) / len(self._overheads)
        else:
            overhead = self._first_overhead or 0.0
        windows_left = max(0, self.windows - self._window)  # including the current one
        steps_left = max(0, windows_left * self.steps - self._window_steps)
        return steps_left * step + windows_left * overhead


class ProgressTracker:
    """Stamps elapsed time and ETA on events, forwards them, and checks the cancel token.

    Producers call the methods below; `callback` gets the typed events.
    """

    def __init__(self, callback: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None):
        self.callback = callback or null_progress
        self.cancel = cancel
        self.start = time.monotonic()
        self.estimator: Optional[EtaEstimator] = None
        self._mark = self.start
        self._window_start = self.start
        self._window = 0
        self._windows = 0

    def _send(self, cls, **fields) -> None:
        eta = self.estimator.eta() if self.estimator is not None else None
        self.callback(cls(elapsed_s=time.monotonic() - self.start, eta_s=eta, **fields))

    def check_cancel(self) -> None:
        if self.cancel is not None:
            self.cancel.check()

    def job_started(self, *, windows: int, frames: int, duration_s: float, width: int, height: int, steps: int,
                    seed: int, first_window: int = 0) -> None:
        self.estimator = EtaEstimator(windows, steps, first_window)
        self._windows = windows
        self._send(JobStarted, windows=windows, frames=frames, duration_s=duration_s, width=width, height=height,
                   steps=steps, seed=seed, first_window=first_window)

    @contextmanager
    def stage(self, name: str, message: str = "") -> Iterator[None]:
        t0 = time.monotonic()
        self._send(StageStarted, stage=name, message=message)
        yield
        self._send(StageFinished, stage=name, seconds=time.monotonic() - t0)

    def window_started(self, index: int, count: int) -> None:
        self.check_cancel()
        self._window, self._windows = index, count
        self._window_start = self._mark = time.monotonic()
        if self.estimator is not None:
            self.estimator.window_started(index)
        self._send(WindowStarted, index=index, count=count)

    def step(self, step: int, steps: int) -> None:
        now = time.monotonic()
        if self.estimator is not None:
            self.estimator.step_done(now - self._mark)
        self._mark = now
        self._send(StepFinished, window=self._window, windows=self._windows, step=step, steps=steps)
        self.check_cancel()

    def window_finished(self, index: int, count: int, frames: int, out_end: int, segment: Optional[str] = None) -> None:
        seconds = time.monotonic() - self._window_start
        if self.estimator is not None:
            self.estimator.window_done(index, seconds)
        self._send(WindowFinished, index=index, count=count, frames=frames, out_end=out_end, seconds=seconds,
                   segment=segment)

    def notice(self, message: str, level: str = "info") -> None:
        self._send(Notice, message=message, level=level)

    def finished(self, output: Optional[str], frames: int, duration_s: float) -> None:
        self.callback(JobFinished(elapsed_s=time.monotonic() - self.start, eta_s=0.0, output=output, frames=frames,
                                  duration_s=duration_s))

    def failed(self, message: str, error: str) -> None:
        self.callback(JobFailed(elapsed_s=time.monotonic() - self.start, message=message, error=error))

    def cancelled(self, message: str, next_window: int, resumable: bool) -> None:
        self.callback(JobCancelled(elapsed_s=time.monotonic() - self.start, message=message, next_window=next_window,
                                   resumable=resumable))

"""One progress interface for the CLI, the Python API, the web UI and the HTTP server.

Long-running code reports through a `ProgressCallback`: a plain callable receiving a
`ProgressEvent`. It never prints by itself. Front ends turn events into a bar (CLI), a
progress component (UI) or a job status (HTTP).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class ProgressEvent:
    """What happened. `stage` names the work ("load", "encode", "window", "step", "decode",
    "write", ...); `current`/`total` count units of that stage (total 0 = unknown); `message`
    is a short human sentence; `elapsed_s` is time since the tracker started; `eta_s` is the
    estimated remaining time of the whole job when it can be estimated, else None."""

    stage: str
    current: int = 0
    total: int = 0
    message: str = ""
    elapsed_s: float = 0.0
    eta_s: Optional[float] = None
    extra: dict = field(default_factory=dict)


ProgressCallback = Callable[[ProgressEvent], None]


def null_progress(event: ProgressEvent) -> None:  # noqa: ARG001 - the do-nothing callback
    """A callback that ignores everything (the default)."""


class ProgressTracker:
    """Small helper that stamps elapsed time and an ETA on events before forwarding them.

    The ETA is the mean time per finished unit of `eta_stage` times the units left.
    """

    def __init__(self, callback: Optional[ProgressCallback] = None, eta_stage: str = "window"):
        self.callback = callback or null_progress
        self.eta_stage = eta_stage
        self.start = time.monotonic()
        self._eta: Optional[float] = None

    def emit(self, stage: str, current: int = 0, total: int = 0, message: str = "", **extra) -> None:
        elapsed = time.monotonic() - self.start
        if stage == self.eta_stage and total > 0 and current > 0:
            self._eta = elapsed / current * (total - current)
        self.callback(ProgressEvent(stage, current, total, message, elapsed, self._eta, dict(extra)))

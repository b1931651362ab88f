"""One worker thread that owns one `JobService` and runs the page's jobs one after another.

The models stay loaded between jobs (the service keeps the last pipeline). Each submitted job
gets a `JobHandle`: the progress callback of the service writes into it (on the worker thread),
and the page reads `snapshot()` copies of it (on Gradio's threads), so every field is changed
and read under the handle's lock. The handle also keeps copies of the finished windows'
segments (the service deletes its own when the job completes) and builds the preview MP4 of
the frames so far, with the job's sound, from them.
"""
from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import progress as ev
from ..errors import InfiniteTalkError, JobCancelledError
from ..progress import CancelToken
from ..service import JobService, JobSpec, PreparedJob

log = logging.getLogger(__name__)

QUEUED, RUNNING, FINISHED, FAILED, CANCELLED = "queued", "running", "finished", "failed", "cancelled"
ENDED = (FINISHED, FAILED, CANCELLED)


@dataclass(frozen=True)
class JobView:
    """A consistent copy of a job's progress for rendering."""

    id: str
    title: str
    state: str
    stage: str = ""
    window: int = 0  # 0-based index of the current window
    windows: int = 0
    windows_done: int = 0
    step: int = 0
    steps: int = 0
    frames_done: int = 0
    frames: int = 0
    elapsed_s: float = 0.0
    eta_s: Optional[float] = None
    message: str = ""  # the error / cancel sentence
    notices: tuple[str, ...] = ()
    output: Optional[str] = None
    segments: int = 0  # finished windows with a copied segment (for the preview)
    resumable: bool = False


class JobHandle:
    """A submitted job: its spec, cancel token and progress (see the module doc)."""

    def __init__(self, job_id: str, title: str, spec: JobSpec, prepared: PreparedJob, preview_dir: Path):
        self.id, self.title, self.spec, self.prepared = job_id, title, spec, prepared
        self.cancel_token = CancelToken()
        self.preview_dir = Path(preview_dir)
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._view = JobView(job_id, title, QUEUED, stage="waiting for the job before it")
        self._segments: dict[int, Path] = {}
        self._preview: Optional[tuple[int, Path]] = None
        self._preview_lock = threading.Lock()

    # ---- written by the worker thread ------------------------------------------------------
    def _update(self, **changes) -> None:
        with self._lock:
            self._view = _replace(self._view, **changes)

    def on_event(self, event: ev.ProgressEvent) -> None:
        """The service's progress callback (cheap: a file copy per finished window at most)."""
        times = {"elapsed_s": event.elapsed_s, "eta_s": event.eta_s}
        if isinstance(event, ev.JobStarted):
            self._keep_earlier_segments(event.first_window)
            self._update(state=RUNNING, windows=event.windows, frames=event.frames, steps=event.steps,
                         window=event.first_window, windows_done=event.first_window, stage="", **times)
        elif isinstance(event, ev.StageStarted):
            self._update(state=RUNNING, stage=event.message or event.stage, **times)
        elif isinstance(event, ev.StageFinished):
            self._update(stage="", **times)
        elif isinstance(event, ev.WindowStarted):
            self._update(window=event.index, windows=event.count, step=0, **times)
        elif isinstance(event, ev.StepFinished):
            self._update(window=event.window, step=event.step, steps=event.steps, **times)
        elif isinstance(event, ev.WindowFinished):
            if event.segment:
                self._keep_segment(event.index, Path(event.segment))
            self._update(windows_done=event.index + 1, frames_done=event.out_end, step=0,
                         segments=len(self._segments), **times)
        elif isinstance(event, ev.Notice):
            with self._lock:
                self._view = _replace(self._view, notices=self._view.notices + (event.message,))
        elif isinstance(event, ev.JobCancelled):
            self._update(resumable=event.resumable, **times)

    def _keep_segment(self, index: int, source: Path) -> None:
        target = self.preview_dir / f"segment_{index:05d}.mp4"
        try:
            self.preview_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        except OSError as err:  # a preview is a nicety: the job goes on without it
            log.warning("could not keep the segment of window %d for the preview: %s", index + 1, err)
            return
        with self._lock:
            self._segments[index] = target

    def _keep_earlier_segments(self, first_window: int) -> None:
        """On a resume, the windows made before the interruption join the preview too."""
        from ..generation.job_state import JobDir

        job_dir = JobDir(Path(self.spec.output).expanduser())
        for index in range(first_window):
            source = job_dir.segment_path(index)
            if index not in self._segments and source.is_file():
                self._keep_segment(index, source)

    def finish(self, state: str, message: str = "", output: Optional[str] = None) -> None:
        self._update(state=state, message=message, output=output, stage="",
                     eta_s=0.0 if state == FINISHED else None)
        self.done.set()

    # ---- read by the page ---------------------------------------------------------------
    def snapshot(self) -> JobView:
        with self._lock:
            return self._view

    def cancel(self) -> None:
        self.cancel_token.cancel()
        if self.snapshot().state == QUEUED:
            self._update(stage="cancelling before it starts")

    def preview(self) -> Optional[Path]:
        """An MP4 with sound of the finished windows so far (rebuilt when a window was added)."""
        from ..media.segments import concat_segments

        with self._lock:
            segments = [self._segments[i] for i in sorted(self._segments)]
        # only the unbroken run from window 0 makes a valid preview
        run = []
        for i, path in enumerate(segments):
            if path.name != f"segment_{i:05d}.mp4":
                break
            run.append(path)
        if not run:
            return None
        with self._preview_lock:
            if self._preview is not None and self._preview[0] == len(run):
                return self._preview[1]
            target = self.preview_dir / f"preview_{len(run):05d}.mp4"
            audio = self.prepared.inputs.tracks.mix
            concat_segments(run, target, audio=audio, sample_rate=self.prepared.inputs.tracks.sample_rate)
            old = self._preview
            self._preview = (len(run), target)
        if old is not None:
            old[1].unlink(missing_ok=True)
        return target


def _replace(view: JobView, **changes) -> JobView:
    from dataclasses import replace

    return replace(view, **changes)


@dataclass
class _Stop:
    pass


@dataclass
class JobWorker:
    """Runs submitted jobs in order on one daemon thread with one JobService."""

    service: JobService = field(default_factory=JobService)

    def __post_init__(self) -> None:
        self._queue: "queue.Queue[JobHandle | _Stop]" = queue.Queue()
        self._jobs: dict[str, JobHandle] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="infinitetalk-ui-worker", daemon=True)
        self._thread.start()

    def submit(self, handle: JobHandle) -> JobHandle:
        with self._lock:
            self._jobs[handle.id] = handle
        self._queue.put(handle)
        return handle

    def get(self, job_id: Optional[str]) -> Optional[JobHandle]:
        with self._lock:
            return self._jobs.get(job_id) if job_id else None

    def busy_ids(self) -> list[str]:
        with self._lock:
            return [j for j, h in self._jobs.items() if h.snapshot().state not in ENDED]

    def cancel(self, job_id: Optional[str]) -> bool:
        handle = self.get(job_id)
        if handle is None or handle.snapshot().state in ENDED:
            return False
        handle.cancel()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is running, end the thread (bounded wait)."""
        for job_id in self.busy_ids():
            self.cancel(job_id)
        self._queue.put(_Stop())
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            handle = self._queue.get()
            if isinstance(handle, _Stop):
                return
            self._run(handle)

    def _run(self, handle: JobHandle) -> None:
        t0 = time.monotonic()
        try:
            result = self.service.run(handle.spec, progress=handle.on_event, cancel=handle.cancel_token,
                                      prepared=handle.prepared)
        except JobCancelledError as err:
            handle.finish(CANCELLED, str(err))
        except InfiniteTalkError as err:
            handle.finish(FAILED, str(err))
        except Exception as err:  # noqa: BLE001 - an internal bug: logged with its traceback, one line on the page
            log.exception("internal error in job %s", handle.id)
            handle.finish(FAILED, f"internal error: {type(err).__name__}: {err} (the server log has the details)")
        else:
            handle.finish(FINISHED, output=str(result.output))
            log.info("job %s finished in %.1f s", handle.id, time.monotonic() - t0)

"""What the page's buttons do, as plain Python: start a job from the form, resume an
interrupted one, follow a job's progress, cancel it, fetch the weights.

`Page` holds the server-wide parts (options, the one `JobWorker`, the `Downloader`); the
per-browser-tab parts (the current job id, the history) travel in and out as plain values, so
Gradio can keep them in `gr.State`. Following a job is a generator of `Update`s: the page turns
each into its components' values. No method lets an exception reach Gradio: user errors become
the CLI's `error: <sentence>`, internal bugs one line (their traceback goes to the log).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from ..errors import InfiniteTalkError
from ..service import JobService
from . import render
from .forms import Form, build_spec, title_of
from .job_folders import find_job, interrupted_jobs, new_job_folder
from .options import UiOptions
from .weights_panel import Downloader, lora_rows, weights_root, weights_rows
from .worker import CANCELLED, FINISHED, JobHandle, JobWorker

log = logging.getLogger(__name__)

POLL_S = 0.4
KEEP = object()  # "leave this component as it is"


@dataclass
class Update:
    """New values for the page's job components (KEEP = unchanged)."""

    status: object = KEEP
    progress: object = KEEP
    preview: object = KEEP
    result: object = KEEP
    history: object = KEEP  # the new history list (the page renders it)
    job: object = KEEP  # the current job id of this tab
    interrupted: object = KEEP  # list of (label, id) choices


def internal_error(err: Exception) -> str:
    log.error("internal error in the page", exc_info=err)
    return render.status(f"internal error: {type(err).__name__}: {err} (the server log has the details)", "error")


@dataclass
class Page:
    options: UiOptions
    worker: JobWorker = field(default=None)  # type: ignore[assignment]
    downloader: Downloader = field(default_factory=Downloader)

    def __post_init__(self) -> None:
        if self.worker is None:
            self.worker = JobWorker(JobService())

    # ---- jobs ----------------------------------------------------------------------------
    def generate(self, form: Form, history: list) -> Iterator[Update]:
        """Check the form, queue the job, then follow it to its end."""
        yield Update(status=render.status("checking the inputs ..."), progress=render.progress(None),
                     preview=None, result=None)
        folder = None
        try:
            folder = new_job_folder(self.options.jobs_dir, Path(form.image or form.video or "video").stem)
            spec, shown = build_spec(form, folder, self.options)
            prepared = self.worker.service.check(spec)
            title = title_of(form)
            folder.write_record(spec, title, shown, len(prepared.plan))
        except InfiniteTalkError as err:
            sentence = str(err) if folder is None else folder.upload_names(str(err))
            if folder is not None:
                folder.remove()  # nothing half-made stays behind
            yield Update(status=render.error_status(sentence))
            return
        except Exception as err:  # noqa: BLE001 - never a traceback on the page
            if folder is not None:
                folder.remove()
            yield Update(status=internal_error(err))
            return
        handle = self.worker.submit(JobHandle(folder.id, title, spec, prepared, folder.preview_dir))
        yield from self.follow(handle, history, shown)

    def resume(self, job_id: Optional[str], history: list) -> Iterator[Update]:
        """Continue an interrupted job from its folder (same files and settings)."""
        yield Update(status=render.status("checking the interrupted job ..."), progress=render.progress(None),
                     preview=None, result=None)
        try:
            if job_id in self.worker.busy_ids():
                yield Update(status=render.error_status("That job is running already; wait for it or cancel it."))
                return
            folder = find_job(self.options.jobs_dir, job_id)
            record = folder.read_record()
            spec = record["spec"].with_(resume=True)
            prepared = self.worker.service.check(spec)
        except InfiniteTalkError as err:
            yield Update(status=render.error_status(str(err)), interrupted=self.interrupted_choices())
            return
        except Exception as err:  # noqa: BLE001
            yield Update(status=internal_error(err))
            return
        handle = self.worker.submit(JobHandle(folder.id, record.get("title", folder.id), spec, prepared,
                                              folder.preview_dir))
        yield from self.follow(handle, history, record.get("settings", {}), resumed=True)

    def follow(self, handle: JobHandle, history: list, shown: dict, resumed: bool = False) -> Iterator[Update]:
        """Updates while the job runs: progress on every change, the preview after each window."""
        verb = "resuming" if resumed else "started"
        yield Update(job=handle.id, status=render.status(f"{verb}: {handle.title}"),
                     interrupted=self.interrupted_choices())
        last, shown_segments = None, 0
        while True:
            ended = handle.done.wait(POLL_S)
            view = handle.snapshot()
            update = Update()
            if view != last:
                update.progress = render.progress(view)
                last = view
            if view.segments > shown_segments and view.state != FINISHED:
                try:
                    preview = handle.preview()
                except InfiniteTalkError as err:
                    log.warning("no preview: %s", err)
                    preview = None
                if preview is not None:
                    update.preview = str(preview)
                    shown_segments = view.segments
            if update.progress is not KEEP or update.preview is not KEEP:
                yield update  # also on the last round: a preview made just before the end is shown
            if ended:
                break
        view = handle.snapshot()
        final = Update(progress=render.progress(view), job=None, interrupted=self.interrupted_choices())
        if view.state == FINISHED:
            final.result = view.output
            final.status = render.status(f"wrote {Path(view.output).name} ({view.frames} frames, "
                                         f"{view.frames / 25:.2f} s) in {render.clock(view.elapsed_s)}", "ok")
            final.history = list(history) + [{
                "title": handle.title, "output": view.output, "frames": view.frames, "seconds": view.elapsed_s,
                "when": time.strftime("%H:%M:%S"), "settings": dict(shown, resumed=resumed),
            }]
            try:  # the finished video replaces the preview of the last windows
                final.preview = str(handle.preview()) if view.segments else KEEP
            except InfiniteTalkError:
                pass
        elif view.state == CANCELLED:
            kept = f"; {view.windows_done} finished window(s) kept: resume it from the list" if view.windows_done else ""
            final.status = render.status(f"cancelled{kept}.", "info")
        else:
            final.status = render.error_status(view.message)
        yield final

    def cancel(self, job_id: Optional[str]) -> str:
        try:
            if self.worker.cancel(job_id):
                return render.status("cancelling: the job stops after the current sampling step ...")
            return render.status("No job of this page is running.")
        except Exception as err:  # noqa: BLE001
            return internal_error(err)

    def interrupted_choices(self) -> list[tuple[str, str]]:
        try:
            jobs = interrupted_jobs(self.options.jobs_dir, busy=self.worker.busy_ids())
        except OSError as err:
            log.warning("cannot list %s: %s", self.options.jobs_dir, err)
            return []
        return [(job.label, job.folder.id) for job in jobs]

    # ---- weights -------------------------------------------------------------------------
    def weights_html(self) -> str:
        try:
            root = weights_root(self.options.weights)
            return render.weights_status(self.options.model, root, weights_rows(root), lora_rows(root))
        except Exception as err:  # noqa: BLE001
            return internal_error(err)

    def download(self, variant: str, timeout_s: float = 24 * 3600) -> Iterator[tuple[str, str]]:
        """(progress html, weights html) while the download of `variant` runs, then the result."""
        root = weights_root(self.options.weights)
        try:
            self.downloader.start(root, variant)
        except InfiniteTalkError as err:
            yield render.error_status(str(err)), self.weights_html()
            return
        deadline = time.monotonic() + timeout_s
        while not self.downloader.wait(0.5) and time.monotonic() < deadline:
            v = self.downloader.view()
            yield render.download_progress(v.label, v.bytes, v.step, v.steps), KEEP
        v = self.downloader.view()
        if v.error:
            yield render.error_status(v.error), self.weights_html()
        elif v.finished:
            yield render.status(v.label, "ok"), self.weights_html()
        else:
            yield render.download_progress(v.label + " (still running)", v.bytes, v.step, v.steps), self.weights_html()

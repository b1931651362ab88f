"""What the `infinitetalk` command shows: job progress events and log records, on stderr.

Two renderings of the same typed events (`infinitetalk.progress`), chosen by `make_display`:

- `RichDisplay` when stderr is a terminal: a live bar for the windows and one for the steps of
  the current window, with the job's elapsed time and ETA (from the events, counted on between
  them), plus the start line, one line per finished window and the end line above the bars.
- `LogLines` otherwise (a log file, a pipe): exactly one line when the job starts, one per
  finished window and one at the end ("wrote X"); no stage or step lines.

`configure_logging` installs one handler on the root logger, so every log record (this package,
libraries, Python `warnings`) and every warning notice of a job is printed in one format:
"warning: <message>" ("debug <logger>: <message>" and so on with --verbose).
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Optional, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text

from . import progress as ev

log = logging.getLogger("infinitetalk.service")


# ---- text of the lines --------------------------------------------------------------------------


def clock(seconds: Optional[float]) -> str:
    """mm:ss (h:mm:ss past an hour); "--:--" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def start_line(event: ev.JobStarted, load_s: Optional[float] = None) -> str:
    text = (f"{event.frames} frames ({event.duration_s:.2f} s) at {event.width}x{event.height}, "
            f"{event.windows} window(s) of {event.steps} steps, seed {event.seed}")
    if event.first_window:
        text += f", resuming at window {min(event.first_window, event.windows - 1) + 1}"
    if load_s is not None:
        text += f" (models loaded in {load_s:.1f} s)"
    return text


def window_line(event: ev.WindowFinished) -> str:
    return (f"window {event.index + 1}/{event.count} done: {event.out_end} frames so far, "
            f"{event.seconds:.1f} s  elapsed {clock(event.elapsed_s)}  eta {clock(event.eta_s)}")


def end_line(event: ev.JobFinished) -> str:
    return f"wrote {event.output} ({event.frames} frames, {event.duration_s:.2f} s) in {clock(event.elapsed_s)}"


def _notice(event: ev.Notice, write) -> None:
    """Warning notices go through logging (one format with every other warning); others are lines."""
    level = logging.getLevelName(event.level.upper())
    if isinstance(level, int) and level >= logging.WARNING:
        log.log(level, event.message)
    else:
        write(event.message)


# ---- log lines (stderr is not a terminal) -------------------------------------------------------


class LogLines:
    """Events -> plain lines: start, one per finished window, end (see the module doc)."""

    def __init__(self, stream: Optional[TextIO] = None):
        self._stream = stream
        self._load_s: Optional[float] = None

    def _write(self, text: str) -> None:
        stream = self._stream or sys.stderr
        stream.write(text + "\n")
        stream.flush()

    def __call__(self, event: ev.ProgressEvent) -> None:
        if isinstance(event, ev.StageFinished) and event.stage == "load":
            self._load_s = event.seconds
        elif isinstance(event, ev.JobStarted):
            self._write(start_line(event, self._load_s))
        elif isinstance(event, ev.WindowFinished):
            self._write(window_line(event))
        elif isinstance(event, ev.Notice):
            _notice(event, self._write)
        elif isinstance(event, ev.JobFinished) and event.output:
            self._write(end_line(event))

    def close(self) -> None:
        """Nothing to tear down (the same interface as RichDisplay)."""


# ---- live display (stderr is a terminal) --------------------------------------------------------


class RichDisplay:
    """Events -> a `rich` live display: a windows bar and a steps bar with elapsed time and ETA.

    Elapsed and ETA are the last event's values, moved on by the time since that event, so they
    keep counting during a long step. `close()` stops the display (also after an error).
    """

    def __init__(self, console: Optional[Console] = None):
        self.console = console or Console(stderr=True, highlight=False)
        self._progress = None
        self._windows_task = None
        self._steps_task = None
        self._last: Optional[ev.ProgressEvent] = None
        self._last_at = time.monotonic()
        self._load_s: Optional[float] = None

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def times(self) -> str:
        """"elapsed mm:ss  eta mm:ss" of the job now, from the last event."""
        if self._last is None:
            return ""
        since = time.monotonic() - self._last_at
        eta = None if self._last.eta_s is None else self._last.eta_s - since
        return f"elapsed {clock(self._last.elapsed_s + since)}  eta {clock(eta)}"

    def _start(self, event: ev.JobStarted) -> None:
        self.close()
        self._progress = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), _TimesColumn(self),
            console=self.console, transient=True,
        )
        self._windows_task = self._progress.add_task("windows", total=event.windows, completed=event.first_window,
                                                     times=True)
        self._steps_task = self._progress.add_task("steps", total=event.steps, completed=0, times=False)
        self._progress.start()

    def __call__(self, event: ev.ProgressEvent) -> None:
        self._last, self._last_at = event, time.monotonic()
        p = self._progress
        if isinstance(event, ev.StageStarted) and event.message:
            self._print(event.message + " ...")
        elif isinstance(event, ev.StageFinished) and event.stage == "load":
            self._load_s = event.seconds
        elif isinstance(event, ev.JobStarted):
            self._print(start_line(event, self._load_s))
            self._start(event)
        elif isinstance(event, ev.WindowStarted) and p is not None:
            p.update(self._windows_task, description=f"window {event.index + 1}/{event.count}")
            p.reset(self._steps_task, total=p.tasks[self._steps_task].total, completed=0)
        elif isinstance(event, ev.StepFinished) and p is not None:
            p.update(self._steps_task, completed=event.step, total=event.steps)
        elif isinstance(event, ev.WindowFinished):
            if p is not None:
                p.update(self._windows_task, completed=event.index + 1)
            self._print(window_line(event))
        elif isinstance(event, ev.Notice):
            _notice(event, self._print)
        elif isinstance(event, (ev.JobFinished, ev.JobFailed, ev.JobCancelled)):
            self.close()
            if isinstance(event, ev.JobFinished) and event.output:
                self._print(end_line(event))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class _TimesColumn(ProgressColumn):
    """The job's elapsed time and ETA, on the rows whose task has the field times=True."""

    def __init__(self, display: RichDisplay):
        super().__init__()
        self.display = display

    def render(self, task) -> Text:
        return Text(self.display.times() if task.fields.get("times") else "")


def make_display(stream: Optional[TextIO] = None):
    """RichDisplay when `stream` (default stderr) is a terminal, else LogLines."""
    stream = stream or sys.stderr
    if bool(getattr(stream, "isatty", lambda: False)()):
        return RichDisplay(Console(file=stream, highlight=False))
    return LogLines(stream)


# ---- logging ------------------------------------------------------------------------------------


class _StderrHandler(logging.StreamHandler):
    """Writes to the current sys.stderr (so a live display that redirects it, or a test that
    captures it, gets the records)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


class _Formatter(logging.Formatter):
    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name == "py.warnings":  # "file:line: Category: text\n  source line" -> "Category: text"
            message = _short_warning(message)
        if record.exc_info and self.verbose:
            message += "\n" + self.formatException(record.exc_info)
        where = f" {record.name}" if self.verbose else ""
        return f"{record.levelname.lower()}{where}: {message}"


def _short_warning(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else text
    parts = first.split(": ", 1)
    if len(parts) == 2 and ":" in parts[0]:  # "path.py:12: UserWarning: ..." -> "UserWarning: ..."
        return parts[1]
    return first


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """One stderr handler and format for every log record and Python warning (see module doc).

    Called once per command; a second call replaces the handler it installed before."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_infinitetalk", False):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler._infinitetalk = True  # type: ignore[attr-defined]
    handler.setFormatter(_Formatter(verbose))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    logging.captureWarnings(True)
    # libraries that print through their own handler would use another format
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        _route_transformers(transformers)


def _route_transformers(module) -> None:
    try:
        tlog = module.utils.logging
        tlog.disable_default_handler()
        tlog.enable_propagation()
    except AttributeError:
        pass

"""HTML of the page's live parts: the status line, the progress bars, the history and the
weights panel. Plain functions of plain data; every text is escaped."""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Optional, Sequence

from .worker import CANCELLED, FAILED, FINISHED, QUEUED, JobView

FILE_ROUTE = "/gradio_api/file="


def clock(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def status(text: str, kind: str = "info") -> str:
    """One line for the status box; kind: info | ok | error."""
    return f'<div class="it-status it-{kind}" data-kind="{kind}">{html.escape(text)}</div>'


def error_status(sentence: str) -> str:
    """An error as the CLI prints it: `error: <sentence>`."""
    return status(f"error: {sentence}", "error")


def _bar(label: str, done: float, total: float, elem: str) -> str:
    total = max(total, 1)
    pct = max(0.0, min(100.0, 100.0 * done / total))
    return (f'<div class="it-bar" id="{elem}"><div class="it-bar-label">{html.escape(label)}</div>'
            f'<progress max="100" value="{pct:.1f}"></progress></div>')


def progress(view: Optional[JobView]) -> str:
    """Window and step bars with elapsed time and ETA (empty before a job)."""
    if view is None:
        return '<div id="it-progress" data-state="idle"></div>'
    windows = max(view.windows, 1)
    if view.state == FINISHED:
        head = f"done: {view.frames} frames in {clock(view.elapsed_s)}"
    elif view.state == QUEUED:
        head = view.stage or "queued"
    elif view.state in (FAILED, CANCELLED):
        head = f"{view.state} after {view.windows_done}/{windows} window(s), {clock(view.elapsed_s)}"
    else:
        head = view.stage or f"window {min(view.window + 1, windows)}/{windows}"
    times = f"elapsed {clock(view.elapsed_s)} · ETA {clock(view.eta_s)}"
    if not view.windows:  # before the plan is known (queued, loading the models)
        notes = "".join(f'<div class="it-notice">note: {html.escape(n)}</div>' for n in view.notices)
        return (f'<div id="it-progress" data-state="{view.state}" data-windows-done="0" data-windows="0">'
                f'<div class="it-progress-head">{html.escape(head)} <span class="it-times">{times}</span></div>'
                f"{notes}</div>")
    window_done = view.windows_done + (view.step / view.steps if view.steps and view.state not in
                                       (FINISHED, FAILED, CANCELLED) else 0.0)
    parts = [f'<div id="it-progress" data-state="{view.state}" data-windows-done="{view.windows_done}" '
             f'data-windows="{view.windows}">',
             f'<div class="it-progress-head">{html.escape(head)} <span class="it-times">{times}</span></div>',
             _bar(f"windows {view.windows_done}/{view.windows} · frames {view.frames_done}/{view.frames}",
                  window_done, windows, "it-bar-windows")]
    if view.steps and view.state not in (FINISHED, FAILED, CANCELLED, QUEUED):
        parts.append(_bar(f"window {min(view.window + 1, windows)}: step {view.step}/{view.steps}",
                          view.step, view.steps, "it-bar-steps"))
    for notice in view.notices:
        parts.append(f'<div class="it-notice">note: {html.escape(notice)}</div>')
    parts.append("</div>")
    return "".join(parts)


def file_url(path: str | Path) -> str:
    return FILE_ROUTE + html.escape(str(Path(path).resolve()), quote=True)


SHOWN_SETTINGS = ("task", "speakers", "speech", "preset", "size", "steps", "seed", "shift", "text_guide_scale",
                  "audio_guide_scale", "teacache", "color_correction", "mode", "max_seconds", "boxes", "model", "vram")


def history(entries: Sequence[dict]) -> str:
    """The videos made since the page was opened, newest first, each playable, with its settings."""
    if not entries:
        return '<div id="it-history" data-count="0"><em>No video made yet on this page.</em></div>'
    rows = []
    for entry in reversed(entries):
        settings = entry.get("settings", {})
        items = "".join(f"<li><b>{html.escape(k.replace('_', ' '))}</b> {html.escape(str(settings[k]))}</li>"
                        for k in SHOWN_SETTINGS if settings.get(k) not in (None, ""))
        prompt = settings.get("prompt") or ""
        rows.append(
            '<div class="it-history-item">'
            f'<video controls preload="metadata" src="{file_url(entry["output"])}"></video>'
            f'<div><div class="it-history-title">{html.escape(entry.get("title", ""))}</div>'
            f'<div class="it-history-meta">{html.escape(entry.get("when", ""))} · {entry.get("frames", 0)} frames · '
            f'made in {clock(entry.get("seconds"))} · <a href="{file_url(entry["output"])}" download>download</a></div>'
            + (f'<div class="it-history-prompt">{html.escape(prompt)}</div>' if prompt else "")
            + f"<ul>{items}</ul></div></div>"
        )
    return f'<div id="it-history" data-count="{len(entries)}">' + "".join(rows) + "</div>"


def weights_status(model: str, root: Path, rows: Sequence[tuple[str, int, int, Sequence[str]]],
                   loras: Sequence[tuple[str, bool]]) -> str:
    """rows: (variant, files found, files needed, first missing names); loras: (preset, present)."""
    lines = [f'<div id="it-weights" data-model="{html.escape(model)}">',
             f"<div>Weights folder: <code>{html.escape(str(root))}</code></div>"]
    if model == "tiny":
        lines.append("<div>This page runs the <b>tiny</b> model: small random weights, no files needed "
                     "(its videos are noise). The official files below are for <code>--model infinitetalk-14b</code>."
                     "</div>")
    lines.append("<ul>")
    for variant, found, needed, missing in rows:
        who = "one speaker" if variant == "single" else "two speakers"
        if found == needed:
            lines.append(f'<li data-variant="{variant}" data-complete="1">{variant} ({who}): all {needed} files found</li>')
        else:
            shown = ", ".join(html.escape(m) for m in missing[:3]) + (" ..." if len(missing) > 3 else "")
            lines.append(f'<li data-variant="{variant}" data-complete="0">{variant} ({who}): {found}/{needed} files '
                         f"found; missing {shown}</li>")
    for preset, present in loras:
        lines.append(f"<li>LoRA of the {preset} preset: {'found' if present else 'missing'}</li>")
    lines.append("</ul></div>")
    return "".join(lines)


def download_progress(label: str, done_bytes: int, step: int, steps: int) -> str:
    return (f'<div id="it-download">{html.escape(label)} · {done_bytes / 2**30:.2f} GiB on disk'
            + _bar(f"part {step}/{steps}", step, steps, "it-bar-download") + "</div>")

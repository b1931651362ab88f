"""The weights panel: which official files are found, and their download with progress.

The download runs `weights.hub.download_weights` on its own thread (one at a time per page
server); its progress is the part of the plan being fetched (from the hub module's log lines)
and the bytes in the weights folder, measured on disk, partial files included.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import PRESETS
from ..errors import InfiniteTalkError
from ..weights.hub import LORA_DIR, VARIANTS, WeightsLayout, default_weights_dir, download_plan

log = logging.getLogger(__name__)


def weights_root(weights: Optional[str]) -> Path:
    return Path(weights).expanduser() if weights else default_weights_dir()


def weights_rows(root: Path) -> list[tuple[str, int, int, list[str]]]:
    """(variant, found, needed, missing paths relative to root) for each adapter variant."""
    rows = []
    for variant in VARIANTS:
        layout = WeightsLayout(root, variant)
        try:
            needed = layout.required_files()
            missing = layout.missing_files()
        except InfiniteTalkError as err:
            rows.append((variant, 0, 1, [str(err)]))
            continue
        rel = [str(m.relative_to(root)) if m.is_relative_to(root) else str(m) for m in missing]
        rows.append((variant, len(needed) - len(missing), len(needed), rel))
    return rows


def lora_rows(root: Path) -> list[tuple[str, bool]]:
    return [(name, (root / LORA_DIR / Path(p["lora"]["filename"]).name).is_file())
            for name, p in PRESETS.items() if p.get("lora")]


def bytes_on_disk(root: Path) -> int:
    total = 0
    for base, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(base, name))
            except OSError:
                pass
    return total


@dataclass(frozen=True)
class DownloadView:
    running: bool
    label: str
    step: int
    steps: int
    bytes: int
    error: Optional[str] = None
    finished: bool = False


class Downloader:
    """One download of the official files at a time (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._root: Optional[Path] = None
        self._view = DownloadView(False, "", 0, 0, 0)

    def start(self, root: Path, variant: str) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._root = root
            steps = len(download_plan(variant))
            self._view = DownloadView(True, f"starting the {variant} download into {root}", 0, steps, 0)
            self._thread = threading.Thread(target=self._run, args=(root, variant), daemon=True,
                                            name="infinitetalk-ui-download")
            self._thread.start()

    def _set(self, **changes) -> None:
        from dataclasses import replace

        with self._lock:
            self._view = replace(self._view, **changes)

    def _run(self, root: Path, variant: str) -> None:
        from ..weights.hub import download_weights

        def on_log(message: str) -> None:
            with self._lock:
                step = self._view.step + 1
            self._set(step=step, label=message)

        try:
            download_weights(root, variant, log_fn=on_log)
        except InfiniteTalkError as err:
            self._set(running=False, error=str(err))
        except Exception as err:  # noqa: BLE001 - an internal bug: one line on the page, the traceback in the log
            log.exception("the weights download failed")
            self._set(running=False, error=f"internal error: {type(err).__name__}: {err}")
        else:
            self._set(running=False, finished=True, step=self._view.steps, label=f"all {variant} files are in {root}")

    def view(self) -> DownloadView:
        with self._lock:
            view, root = self._view, self._root
        if root is not None and view.running:
            from dataclasses import replace

            view = replace(view, bytes=bytes_on_disk(root))
        return view

    def wait(self, timeout: float) -> bool:
        """True when no download is running (waits up to `timeout` seconds)."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()


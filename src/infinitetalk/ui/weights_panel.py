"""The weights panel: which official files are found, and their download with progress.

A download runs on its own thread (one at a time per page server): the official files of a
variant ("single" / "multi": `weights.hub.download_weights`) or the LoRA of a preset ("fast" /
"fusionx": `weights.hub.download_preset_lora`, into WEIGHTS/loras/). Its progress is the part
of the plan being fetched (from the hub module's log lines) and the bytes in the weights folder,
measured on disk, partial files included.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import PRESETS
from ..errors import InfiniteTalkError, InputError
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


def lora_presets() -> tuple[str, ...]:
    """The presets whose LoRA the panel can fetch (fast, fusionx)."""
    return tuple(name for name, p in PRESETS.items() if p.get("lora"))


def download_steps(target: str) -> int:
    """Parts of a download: the hub items of a variant, one file for a preset's LoRA."""
    if target in VARIANTS:
        return len(download_plan(target))
    if target in lora_presets():
        return 1
    raise InputError(f"Nothing to download called {target!r}; choose one of: "
                     f"{', '.join(VARIANTS + lora_presets())}.")


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
    """One download at a time (thread-safe): `start(root, target)` with target a weights variant
    (single, multi) or a preset whose LoRA is fetched (fast, fusionx)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._root: Optional[Path] = None
        self._view = DownloadView(False, "", 0, 0, 0)

    def start(self, root: Path, target: str) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            steps = download_steps(target)
            self._root = root
            what = f"the {target} download" if target in VARIANTS else f"the download of the {target} LoRA"
            self._view = DownloadView(True, f"starting {what} into {root}", 0, steps, 0)
            self._thread = threading.Thread(target=self._run, args=(root, target), daemon=True,
                                            name="infinitetalk-ui-download")
            self._thread.start()

    def _set(self, **changes) -> None:
        from dataclasses import replace

        with self._lock:
            self._view = replace(self._view, **changes)

    def _run(self, root: Path, target: str) -> None:
        from ..weights.hub import download_preset_lora, download_weights

        def on_log(message: str) -> None:
            with self._lock:
                step = self._view.step + 1
            self._set(step=step, label=message)

        try:
            if target in VARIANTS:
                download_weights(root, target, log_fn=on_log)
                done = f"all {target} files are in {root}"
            else:
                spec = PRESETS[target]["lora"]
                self._set(step=1, label=f"downloading {spec['repo']} ({spec['filename']}) -> {root / LORA_DIR}")
                path = download_preset_lora(root, target)
                done = f"the {target} LoRA is in {path}"
        except InfiniteTalkError as err:
            self._set(running=False, error=str(err))
        except Exception as err:  # noqa: BLE001 - an internal bug: one line on the page, the traceback in the log
            log.exception("the weights download failed")
            self._set(running=False, error=f"internal error: {type(err).__name__}: {err}")
        else:
            self._set(running=False, finished=True, step=self._view.steps, label=done)

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


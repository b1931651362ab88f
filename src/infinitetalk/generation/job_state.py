"""The resumable state of one `generate` job: a folder next to the output, `OUTPUT.job/`.

    out.mp4.job/
      settings.json        {"version", "hash", "settings"}: every setting and input checksum
                           that decides the video; a resume with another hash is refused
      segment_00000.mp4    one video-only H.264 segment per finished window (written to a
      segment_00001.mp4    temporary name and renamed, so a segment is complete or absent)
      state.pt             after each segment: next window index, frames written so far, the
                           window's last motion frames (float32 [3, motion_frame, H, W], exactly
                           what the next window is conditioned on) and the RNG state

`state.pt` is replaced atomically after its segment is in place, so after a kill the state always
points at a window whose predecessors' segments exist; a segment past the state (killed between
the rename and the state write) is ignored and made again. A run without `--resume` clears the
folder and starts over; a finished job assembles the segments into the output and removes it.
Uninterrupted and resumed jobs go through the same segments, so their videos are identical.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import ResumeError

log = logging.getLogger(__name__)

STATE_VERSION = 1
PathLike = Union[str, Path]


def settings_hash(settings: dict) -> str:
    """sha256 of the canonical JSON of `settings`."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class JobState:
    """Where a job stands after its last finished window."""

    next_window: int
    frames_written: int
    motion: torch.Tensor
    rng_state: torch.Tensor


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temp, path)


class JobDir:
    """The state folder of the job that writes `output` (see module doc)."""

    def __init__(self, output: PathLike):
        output = Path(output)
        self.root = output.with_name(output.name + ".job")
        self.settings_file = self.root / "settings.json"
        self.state_file = self.root / "state.pt"

    def segment_path(self, index: int) -> Path:
        return self.root / f"segment_{index:05d}.mp4"

    def exists(self) -> bool:
        return self.settings_file.is_file()

    # ---- starting ------------------------------------------------------------------------
    def check_resumable(self, settings: dict) -> None:
        """Raise ResumeError now if a saved job exists and was made with other settings
        (lets the command fail before loading models); nothing saved is fine."""
        if self.exists():
            stored = self._read_settings()
            if stored.get("hash") != settings_hash(settings):
                raise ResumeError(self._mismatch_sentence(stored.get("settings", {}), settings))

    def start(self, settings: dict, resume: bool) -> Optional[JobState]:
        """Open the job: with `resume`, return the saved state (None if nothing to resume);
        otherwise (or when there is nothing) start a fresh folder. Raises ResumeError when the
        saved job was made with other settings."""
        digest = settings_hash(settings)
        if resume and self.exists():
            stored = self._read_settings()
            if stored.get("hash") != digest:
                raise ResumeError(self._mismatch_sentence(stored.get("settings", {}), settings))
            state = self.load_state()
            if state is None:
                log.info("the job in %s has no finished window yet; starting it from the beginning", self.root)
                self._clear_segments(0)
                return None
            self._clear_segments(state.next_window)
            missing = [str(self.segment_path(i)) for i in range(state.next_window) if not self.segment_path(i).is_file()]
            if missing:
                raise ResumeError(
                    f"The job folder {self.root} lacks finished segment(s) {', '.join(missing[:3])}; it cannot be "
                    "resumed. Run the same command without --resume to start over."
                )
            log.info("resuming %s at window %d (%d frames done)", self.root, state.next_window + 1, state.frames_written)
            return state
        if resume:
            log.info("nothing to resume in %s; starting a new job", self.root)
        elif self.root.exists():
            log.info("removing the unfinished job %s (pass --resume to continue it instead)", self.root)
        self.remove()
        self.root.mkdir(parents=True, exist_ok=True)
        payload = {"version": STATE_VERSION, "hash": digest, "settings": settings}
        _atomic_write_bytes(self.settings_file, json.dumps(payload, indent=1, sort_keys=True, default=str).encode())
        return None

    def _read_settings(self) -> dict:
        try:
            data = json.loads(self.settings_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ResumeError(
                f"The job settings {self.settings_file} cannot be read ({err}); run without --resume to start over."
            ) from err
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ResumeError(
                f"The job folder {self.root} was written by another version; run without --resume to start over."
            )
        return data

    def _mismatch_sentence(self, old: dict, new: dict) -> str:
        def flat(d: dict) -> dict:
            out = {}
            for key, value in json.loads(json.dumps(d, default=str)).items():
                if isinstance(value, dict):
                    out.update({f"{sub}": v for sub, v in value.items()})
                else:
                    out[key] = value
            return out

        a, b = flat(old), flat(new)
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        names = {"inputs": "input file contents"}
        what = ", ".join(names.get(k, k) for k in changed[:8]) or "the settings"
        return (
            f"Cannot resume: the unfinished job in {self.root} was made with other settings or input files "
            f"(differences: {what}). Use exactly the same command and files to resume, or run without "
            "--resume to start over."
        )

    def _clear_segments(self, first_stale: int) -> None:
        for path in self.root.glob("segment_*.mp4"):
            try:
                index = int(path.stem.split("_")[1])
            except (IndexError, ValueError):
                continue
            if index >= first_stale:
                path.unlink(missing_ok=True)
        for path in self.root.glob(".*.partial*"):
            path.unlink(missing_ok=True)

    # ---- progress ------------------------------------------------------------------------
    def save_state(self, state: JobState) -> None:
        """Atomically replace state.pt (call after the window's segment is in place)."""
        temp = self.state_file.with_name(".state.pt.tmp")
        torch.save(
            {
                "version": STATE_VERSION,
                "next_window": int(state.next_window),
                "frames_written": int(state.frames_written),
                "motion": state.motion.detach().to("cpu", torch.float32).contiguous(),
                "rng_state": state.rng_state.detach().cpu(),
            },
            temp,
        )
        os.replace(temp, self.state_file)

    def load_state(self) -> Optional[JobState]:
        if not self.state_file.is_file():
            return None
        try:
            data = torch.load(self.state_file, map_location="cpu", weights_only=True)
            return JobState(int(data["next_window"]), int(data["frames_written"]), data["motion"], data["rng_state"])
        except Exception as err:  # noqa: BLE001 - any damage means the state cannot be used
            raise ResumeError(
                f"The job state {self.state_file} is damaged ({err}); run without --resume to start over."
            ) from err

    def segments(self, count: int) -> list[Path]:
        return [self.segment_path(i) for i in range(count)]

    def remove(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)

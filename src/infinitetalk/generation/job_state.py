"""The resumable state of one `generate` job: a folder next to the output, `OUTPUT.job/`.

    out.mp4.job/
      settings.json        {"version", "hash", "settings"}: every setting and input checksum
                           that decides the video; a resume with another hash is refused
      segment_00000.mp4    one video-only H.264 segment per finished window (written to a
      segment_00001.mp4    temporary name and renamed, so a segment is complete or absent)
      state.pt             after each segment: next window index, frames written so far, the
                           window's last motion frames (float32 [3, motion_frame, H, W], exactly
                           what the next window is conditioned on), the RNG state and the sha256
                           and frame count of every finished segment
      lock                 "pid host" of the job writing OUTPUT, flock'ed while it runs (`OutputLock`)

`state.pt` is replaced atomically after its segment is in place, so after a kill the state always
points at a window whose predecessors' segments exist; a segment past the state (killed between
the rename and the state write) is ignored and made again. `verify` checks a saved state
against the job's plan (window range, frame count, motion shape, RNG state, segment checksums)
before any model loads. A run without `resume` refuses to discard finished windows unless
`restart` is given; a finished job assembles the segments into the output (its temporary file
inside the job folder) and removes the folder. Every write error is a `StorageError` sentence
that keeps the job resumable, and no temporary file is left behind. Uninterrupted and resumed
jobs go through the same segments, so their videos are identical.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import OutputBusyError, ResumeError, storage_error, unpickling_reason

log = logging.getLogger(__name__)

STATE_VERSION = 2
LOCK_NAME = "lock"
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
    segments: list = field(default_factory=list)  # [sha256, frames] of segments 0 .. next_window-1


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    try:
        with open(temp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise storage_error(path, err) from err
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def file_digest(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class OutputLock:
    """The exclusive lock of the job writing `output`: `OUTPUT.job/lock`, flock'ed while held.

    The file holds "pid host" of its holder. A lock left by a crashed job is not held by any
    process (the kernel drops a flock with its process), so it is recognised as stale and taken
    over; one held by a running job raises OutputBusyError naming it. `release` removes the
    file (and the folder when nothing else is in it). Use as a context manager.
    """

    def __init__(self, output: PathLike):
        self.output = Path(output)
        self.root = self.output.with_name(self.output.name + ".job")
        self.path = self.root / LOCK_NAME
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _busy(self, fd: int) -> OutputBusyError:
        try:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
        except OSError:
            holder = []
        who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
        return OutputBusyError(f"Another job ({who}) is writing {self.output}; wait until it ends, or give this job "
                               "another --output.")

    def acquire(self) -> "OutputLock":
        if self._fd is not None:
            return self
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise storage_error(self.root, err) from err
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise storage_error(self.path, err) from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = self._busy(fd)
                os.close(fd)
                raise busy from None
            try:  # the holder before us may have removed the file between our open and flock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                self.root.mkdir(parents=True, exist_ok=True)
                continue
            previous = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            if previous:
                log.info("the lock of %s was left by a job that ended without finishing (%s); taking it over",
                         self.output, previous)
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            except OSError as err:
                os.close(fd)
                raise storage_error(self.path, err) from err
            self._fd = fd
            return self
        raise OutputBusyError(f"Other jobs keep starting and ending on {self.output}; give this job another --output.")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)
            try:
                self.root.rmdir()  # only when nothing else is left in it
            except OSError:
                pass
        finally:
            os.close(fd)

    @staticmethod
    def holder(output: PathLike) -> Optional[str]:
        """The sentence of OutputBusyError when a running job holds the lock of `output`, else None
        (checks without taking the lock)."""
        lock = OutputLock(output)
        try:
            fd = os.open(lock.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return str(lock._busy(fd))
        finally:
            os.close(fd)
        return None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


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
    def has_finished_windows(self) -> bool:
        """True when the folder holds work a fresh start would throw away (a state or a segment)."""
        return self.state_file.is_file() or any(self.root.glob("segment_*.mp4"))

    def check_start(self, settings: dict, resume: bool, restart: bool = False) -> None:
        """Refuse, before any model loads, what `start` would refuse: a resume of a job made with
        other settings, or a fresh start that would discard finished windows without `restart`."""
        if resume:
            self.check_resumable(settings)
        elif not restart and self.exists() and self.has_finished_windows():
            raise ResumeError(self._interrupted_sentence())

    def _interrupted_sentence(self) -> str:
        try:
            state = self.load_state()
            done = f" with {state.next_window} finished window(s)" if state is not None else ""
        except ResumeError:
            done = ""
        output = self.root.with_name(self.root.name[: -len(".job")])
        return (f"An interrupted job writing {output} exists in {self.root}{done}; add --resume to continue it, "
                "or --restart to discard it and start over.")

    def check_resumable(self, settings: dict) -> None:
        """Raise ResumeError now if a saved job exists and was made with other settings
        (lets the command fail before loading models); nothing saved is fine."""
        if self.exists():
            stored = self._read_settings()
            if stored.get("hash") != settings_hash(settings):
                raise ResumeError(self._mismatch_sentence(stored.get("settings", {}), settings))

    def start(self, settings: dict, resume: bool, restart: bool = False) -> Optional[JobState]:
        """Open the job (hold its `OutputLock` first): with `resume`, return the saved state (None
        if nothing to resume); otherwise start a fresh folder, refusing (ResumeError) to discard
        finished windows unless `restart`. Raises ResumeError when the saved job was made with
        other settings or its state is damaged."""
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
            self.verify_segments(state)
            log.info("resuming %s at window %d (%d frames done)", self.root, state.next_window + 1, state.frames_written)
            return state
        if resume:
            log.info("nothing to resume in %s; starting a new job", self.root)
        elif self.exists() and self.has_finished_windows():
            if not restart:
                raise ResumeError(self._interrupted_sentence())
            log.info("discarding the unfinished job %s (restart)", self.root)
        self.remove()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise storage_error(self.root, err) from err
        payload = {"version": STATE_VERSION, "hash": digest, "settings": settings}
        _atomic_write_bytes(self.settings_file, json.dumps(payload, indent=1, sort_keys=True, default=str).encode())
        return None

    def _damaged(self, what: str) -> ResumeError:
        return ResumeError(f"The saved job in {self.root} is damaged ({what}); run the same command with --restart "
                           "instead of --resume to start over.")

    def verify_segments(self, state: JobState) -> None:
        """Every finished segment exists with the checksum recorded when it was written."""
        if len(state.segments) != state.next_window:
            raise self._damaged(f"{len(state.segments)} segment records for {state.next_window} finished windows")
        for index, (digest, _frames) in enumerate(state.segments):
            path = self.segment_path(index)
            if not path.is_file():
                raise self._damaged(f"{path.name} is missing")
            if file_digest(path) != digest:
                raise self._damaged(f"{path.name} is not the segment that was written")

    def verify(self, plan, motion_shape: tuple[int, ...], device: Union[str, torch.device] = "cpu") -> Optional[JobState]:
        """Check the saved state against the job's window `plan` before any model loads: window
        range, frames written, motion shape and values, RNG state, segment checksums and frame
        counts. Returns the state (None when nothing is saved); ResumeError with a sentence."""
        state = self.load_state()
        if state is None:
            return None
        n = len(plan)
        if not 0 <= state.next_window <= n:
            raise self._damaged(f"next window {state.next_window} is outside 0..{n}")
        expected = plan.windows[state.next_window - 1].out_end if state.next_window > 0 else 0
        if state.frames_written != expected:
            raise self._damaged(f"{state.frames_written} frames recorded where {expected} were made")
        motion = state.motion
        if not isinstance(motion, torch.Tensor) or tuple(motion.shape) != tuple(motion_shape) \
                or motion.dtype != torch.float32 or not bool(torch.isfinite(motion).all()):
            shape = tuple(motion.shape) if isinstance(motion, torch.Tensor) else type(motion).__name__
            raise self._damaged(f"motion frames of shape {shape}, expected {tuple(motion_shape)} finite float32")
        rng = state.rng_state
        try:
            if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
                raise TypeError("not a byte tensor")
            torch.Generator(device=torch.device(device)).set_state(rng)
        except (RuntimeError, TypeError, ValueError):
            raise self._damaged("the random number state is not valid") from None
        self.verify_segments(state)
        for index, (_digest, frames) in enumerate(state.segments):
            if frames != plan.windows[index].new_frames:
                raise self._damaged(f"segment {index} has {frames} frames, its window makes "
                                    f"{plan.windows[index].new_frames}")
        return state

    def _read_settings(self) -> dict:
        try:
            data = json.loads(self.settings_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ResumeError(
                f"The job settings {self.settings_file} cannot be read ({err}); run the same command with "
                "--restart instead of --resume to start over."
            ) from err
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ResumeError(
                f"The job folder {self.root} was written by another version; run the same command "
                "with --restart instead of --resume to start over."
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
            f"(differences: {what}). Use exactly the same command and files to resume, or run with --restart "
            "instead of --resume to discard its finished windows and start over."
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
        """Atomically replace state.pt (call after the window's segment is in place); a failed
        write leaves no temporary file and raises StorageError."""
        temp = self.state_file.with_name(".state.pt.tmp")
        payload = {
            "version": STATE_VERSION,
            "next_window": int(state.next_window),
            "frames_written": int(state.frames_written),
            "motion": state.motion.detach().to("cpu", torch.float32).contiguous(),
            "rng_state": state.rng_state.detach().cpu(),
            "segments": [[str(d), int(f)] for d, f in state.segments],
        }
        try:
            torch.save(payload, temp)
            os.replace(temp, self.state_file)
        except (OSError, RuntimeError) as err:
            temp.unlink(missing_ok=True)
            # torch.save of plain tensors fails only when writing: its zip writer raises RuntimeError
            cause = err if isinstance(err, OSError) else (_os_error_in(err) or OSError(errno.EIO, "write failed"))
            raise storage_error(self.state_file, cause) from err
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def load_state(self) -> Optional[JobState]:
        if not self.state_file.is_file():
            return None
        try:
            data = torch.load(self.state_file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any damage means the state cannot be used
            raise self._damaged(f"{self.state_file.name} cannot be read: {unpickling_reason(err)}") from None
        try:
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError("written by another version")
            segments = [(str(d), int(f)) for d, f in data["segments"]]
            return JobState(int(data["next_window"]), int(data["frames_written"]), data["motion"], data["rng_state"],
                            segments)
        except (KeyError, TypeError, ValueError) as err:
            raise self._damaged(f"{self.state_file.name}: {err}") from None

    def segments(self, count: int) -> list[Path]:
        return [self.segment_path(i) for i in range(count)]

    def remove(self) -> None:
        """Delete the job's files; the lock file (held by this job) stays until it is released."""
        if not self.root.exists():
            return
        for path in self.root.iterdir():
            if path.name == LOCK_NAME:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if not (self.root / LOCK_NAME).exists():
            try:
                self.root.rmdir()
            except OSError:
                pass


def _os_error_in(err: BaseException) -> Optional[OSError]:
    """The OSError torch.save wraps in a RuntimeError (its zip writer), or one made from the
    message ("No space left on device", ...); None when neither tells the cause."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(err).lower()
    for code, words in ((errno.ENOSPC, "no space left"), (errno.EDQUOT, "quota"), (errno.EROFS, "read-only"),
                        (errno.EFBIG, "file too large"), (errno.EACCES, "permission denied"),
                        (errno.EIO, "input/output error")):
        if words in text:
            return OSError(code, os.strerror(code))
    return None

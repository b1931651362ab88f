"""The request checks every front end shares (called by `JobService.check`, before any model loads).

* `check_fields(spec)`: every number is of its type, finite and in its range (a NaN guidance
  scale would give a black video, a seed past 2**63 a traceback), `resume`/`restart` exclusive.
* `check_output(output, request, spec)`: an .mp4 name; never equal to an input (symlinks and
  hard links resolved) and no input inside the job folder `OUTPUT.job/` that the job deletes.
* `check_storage(output, plan, target_hw)`: the output folder (or its nearest existing parent)
  is writable (probed with a real temporary file, so read-only mounts and permissions show) and
  has room for the estimated segments plus the final video.
* `notices(spec, request, inputs, plan, cfg)`: what is ignored or cut, as sentences for Notice events.
"""
from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ..config import FPS
from ..errors import InputError, StorageError, storage_error
from .job import JobSpec

OUTPUT_SUFFIXES = (".mp4", ".m4v")
MAX_SEED = 2**63 - 1
MAX_SECONDS = 24 * 3600.0
BYTES_PER_PIXEL = 0.5
"""Estimated H.264 (crf 18) bytes per pixel and frame, generous for faces and noise alike."""
SPACE_MARGIN = 16 * 2**20

# field: (kind, low, high, low inclusive); kind "int" or "float"
RANGES = {
    "size": ("int", 480, 720, True),
    "steps": ("int", 1, 1000, True),
    "seed": ("int", 0, MAX_SEED, True),
    "frame_num": ("int", 5, 1001, True),
    "motion_frame": ("int", 1, 1000, True),
    "shift": ("float", 0.0, 100.0, False),
    "text_guide_scale": ("float", 0.0, 100.0, True),
    "audio_guide_scale": ("float", 0.0, 100.0, True),
    "color_correction": ("float", 0.0, 1.0, True),
    "teacache_thresh": ("float", 0.0, 10.0, True),
    "apg_momentum": ("float", -1.0, 1.0, True),
    "apg_norm_threshold": ("float", 0.0, 1e6, False),
    "max_seconds": ("float", 0.0, MAX_SECONDS, False),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_number(name: str, value, kind: str, low: float, high: float, low_inclusive: bool = True) -> None:
    """InputError unless `value` is an int (kind "int") or a finite number within [low, high]."""
    what = _flag(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "int" and not isinstance(value, int)):
        raise InputError(f"{what} must be {'a whole number' if kind == 'int' else 'a number'}, got {value!r}.")
    if not math.isfinite(value):
        raise InputError(f"{what} must be a finite number, got {value}.")
    above = value >= low if low_inclusive else value > low
    if not (above and value <= high):
        lo = f"{low:g}" if kind == "float" else str(low)
        bound = f"from {lo}" if low_inclusive else f"above {lo}"
        hi = "2**63-1" if high == MAX_SEED else (f"{high:g}" if kind == "float" else str(high))
        raise InputError(f"{what} must be {bound} up to {hi}, got {value}.")


def check_fields(spec: JobSpec) -> None:
    for name, (kind, low, high, inclusive) in RANGES.items():
        value = getattr(spec, name)
        if value is not None:
            check_number(name, value, kind, low, high, inclusive)
    for name in ("bbox1", "bbox2"):
        box = getattr(spec, name)
        if box is not None and not all(math.isfinite(v) for v in box):
            raise InputError(f"--{name} must be four finite pixel numbers x_min,y_min,x_max,y_max, got "
                             f"{','.join(str(v) for v in box)}.")
    for path, scale in spec.runtime.loras:
        if not math.isfinite(scale) or abs(scale) > 100:
            raise InputError(f"The LoRA scale of {Path(path).name} must be a finite number up to 100, got {scale}.")
    if spec.resume and spec.restart:
        raise InputError("Give either --resume (continue the saved job) or --restart (discard it), not both.")


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(output: Path, inputs: list[Path]) -> None:
    """The output name, and that writing it (or its job folder) cannot touch an input."""
    if output.is_dir():
        raise InputError(f"The output {output} is a folder; give a file name such as {output / 'talk.mp4'}.")
    out_real = _real(output)
    job_real = _real(output.with_name(output.name + ".job"))
    for given in inputs:
        real = _real(given)
        same = real == out_real
        if not same and output.exists() and given.exists():
            try:
                same = os.path.samefile(output, given)
            except OSError:
                same = False
        if same:
            raise InputError(f"The output {output} is the input file {given}; writing the video would destroy it, "
                             "so give another --output.")
        if _inside(real, job_real):
            raise InputError(f"The input {given} is inside {job_real}, the job folder this job writes and deletes; "
                             "move the input or give another --output.")
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"The output {output} must be an .mp4 file (the video is written as MP4); for example "
                         f"{output.with_suffix('.mp4').name}.")


def _existing_folder(folder: Path) -> Path:
    while not folder.exists():
        if folder.parent == folder:
            break
        folder = folder.parent
    return folder


def probe_writable(folder: Path) -> None:
    """Create and delete a temporary file in `folder` (StorageError saying why it cannot be written)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".infinitetalk-probe-", dir=folder)
    except OSError as err:
        raise StorageError(f"The output folder {folder} cannot be written: {_probe_reason(folder, err)}; give an "
                           "--output in a folder you can write to.") from None
    os.close(fd)
    os.unlink(name)


def _probe_reason(folder: Path, err: OSError) -> str:
    """Why no file can be made in the existing `folder`, in words (not the bare OS message)."""
    code = getattr(err, "errno", None)
    if code in (errno.ENOENT, errno.ENOTDIR, errno.EINVAL) and folder.is_dir():
        return "it does not accept new files (a system folder such as /proc or /sys)"
    if code in (errno.EACCES, errno.EPERM):
        return "it is not writable for this user (permission denied)"
    if code == errno.EROFS:
        return "it is on a read-only file system"
    return storage_error(folder, err).args[0].split(": ", 1)[-1].split(";", 1)[0]


def estimated_bytes(frames: int, target_hw: tuple[int, int], duration_s: float) -> int:
    """Disk space a job needs at its peak: every segment plus the final video, and the sound."""
    h, w = target_hw
    video = int(frames * h * w * BYTES_PER_PIXEL)
    return 2 * video + int(duration_s * 2 * 24_000) + SPACE_MARGIN


def check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise StorageError(f"The output folder {folder} has {free / 2**20:.0f} MiB free but this job needs about "
                           f"{needed / 2**20:.0f} MiB; free some space or give an --output on another disk.")


def check_storage(output: Path, plan, target_hw: tuple[int, int], done_bytes: int = 0) -> None:
    parent = output.parent if str(output.parent) else Path(".")
    folder = _existing_folder(parent)
    if not folder.is_dir():
        raise InputError(f"The output folder {parent} cannot be made: {folder} is a file, not a folder.")
    probe_writable(folder)
    job = output.with_name(output.name + ".job")
    if job.is_dir():
        probe_writable(job)
    needed = estimated_bytes(plan.total_frames, target_hw, plan.duration_s) - done_bytes
    check_space(folder, needed)


def input_paths(spec: JobSpec, request) -> list[Path]:
    paths = [Path(p).expanduser() for p in request.input_files()]
    if spec.input_json:
        paths.append(Path(spec.input_json).expanduser())
    paths += [Path(p) for p, _ in spec.runtime.loras]
    return paths


def notices(spec: JobSpec, request, inputs, plan, cfg) -> list[str]:
    """Sentences about what this job ignores or cuts (shown as Notice events, warning level)."""
    out = []
    if request.speakers == 1 and (spec.audio_type is not None or (spec.input_json and request.audio_type != "para")):
        out.append(f"--audio-type {request.audio_type} only applies to two speakers (--audio2); it is ignored.")
    if request.speakers == 1 and request.boxes and any(b is not None for b in request.boxes):
        out.append("a speaker box only places two speakers; it is ignored for one speaker.")
    speech = inputs.audio_frames
    if plan.total_frames < speech:
        cut = (speech - plan.total_frames) / FPS
        if cfg.mode == "clip" and (cfg.max_frames is None or cfg.max_frames >= plan.total_frames):
            why = f"clip mode makes one window of {cfg.frame_num} frames; use --mode streaming to voice all of it"
        else:
            why = "--max-seconds cuts it"
        out.append(f"the video is {plan.total_frames / FPS:.2f} s long but the speech is {speech / FPS:.2f} s: its "
                   f"last {cut:.2f} s are not used ({why}).")
    return out


def check_variant(variant: Optional[str], speakers: int) -> None:
    if variant == "single" and speakers == 2:
        raise InputError("Two speakers need the multi-speaker adapter, not --variant single; drop --variant (two "
                         "speakers choose multi) or give --variant multi.")

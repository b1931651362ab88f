"""Error types: user-facing ones (`InfiniteTalkError` and its subclasses) and `InternalError`.

Every failure a user can cause or fix raises an `InfiniteTalkError` subclass, with a message that
says what is wrong and what to do. The CLI prints the message (no traceback) and exits with code 2.
A broken invariant inside the package (a bug) raises `InternalError` instead.
"""
from __future__ import annotations

import errno


class InfiniteTalkError(Exception):
    """Base class of every error meant for the user. `str(err)` is the sentence to show."""

    exit_code = 2


class InputError(InfiniteTalkError):
    """A user input (file, option, JSON, box, ...) is missing, unreadable or invalid."""


class AudioError(InputError):
    """An audio input cannot be used: not audio, truncated, empty, silent stream missing."""


class MediaError(InputError):
    """An image or video input cannot be used."""


class WeightsError(InfiniteTalkError):
    """Model weights are missing, incomplete or do not match the model."""


class MissingWeightsError(WeightsError):
    """Weight files are not where they were looked for. `missing` lists the paths."""

    def __init__(self, message: str, missing: list[str] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])


class CheckpointError(WeightsError):
    """A checkpoint file exists but is corrupt, of the wrong format, or has wrong/missing keys."""


class HubError(WeightsError):
    """The model hub cannot be reached or refused a download."""


class ResumeError(InfiniteTalkError):
    """A job cannot be resumed (state missing, or made with other settings)."""


class DeviceOutOfMemoryError(InfiniteTalkError):
    """The accelerator ran out of memory; the message suggests the options that use less."""


class JobCancelledError(InfiniteTalkError):
    """The job was cancelled (cancel token, Ctrl-C); its finished windows are kept for a resume."""

    exit_code = 130


class InternalError(Exception):
    """A bug inside infinitetalk, not something the user can fix: tensors the package builds itself
    have the wrong shape, or a component is called against its contract.

    Deliberately not an `InfiniteTalkError`: front ends report it as an internal error to be
    reported (with the traceback), not as a problem with the user's input.
    """

    exit_code = 1


class OutputBusyError(InfiniteTalkError):
    """Another job holds the lock of the same output (its `OUTPUT.job/lock`)."""


class StorageError(InfiniteTalkError):
    """Writing the output or the job state failed (disk full, read-only folder, I/O error); the
    finished windows stay in `OUTPUT.job/`, so the job can be resumed once the cause is fixed."""


def unpickling_reason(exc: BaseException) -> str:
    """A short reason for a refused or failed `torch.load(weights_only=True)`, without torch's
    advice to load with weights_only=False (never to be given to users)."""
    text = str(exc)
    if "weights_only" in text or "Unsupported global" in text or type(exc).__name__ == "UnpicklingError":
        return "it holds pickled Python objects other than tensors, which are refused for safety"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the folder is on a read-only file system",
    errno.EACCES: "permission was denied",
    errno.EPERM: "permission was denied",
    errno.EFBIG: "the file grew past the size this file system or a limit allows",
    errno.EIO: "the device reported an I/O error",
}


def storage_error(path: object, err: BaseException) -> StorageError:
    """The sentence for a failed write of `path` (the job stays resumable)."""
    code = getattr(err, "errno", None)
    reason = _REASONS.get(code) or (getattr(err, "strerror", None) or str(err) or type(err).__name__)
    return StorageError(
        f"Writing {path} failed: {reason}; fix that (free some space, or choose another --output folder), then run "
        "the same command with --resume to continue: the finished windows are kept."
    )

"""Error types: user-facing ones (`InfiniteTalkError` and its subclasses) and `InternalError`.

Every failure a user can cause or fix raises an `InfiniteTalkError` subclass, with a message that
says what is wrong and what to do. The CLI prints the message (no traceback) and exits with code 2.
A broken invariant inside the package (a bug) raises `InternalError` instead.
"""
from __future__ import annotations


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

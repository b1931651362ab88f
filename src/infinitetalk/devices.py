"""Checking a requested torch device before anything is built on it (typed errors, one sentence)."""
from __future__ import annotations

from typing import Optional, Union

import torch

from .errors import InputError


def resolve_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    """`device` as a torch.device (None: cuda when available, else cpu); InputError when it is
    unknown, not supported, or a CUDA device this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"Unknown device {device!r}; use cpu, cuda or cuda:N.") from None
    if dev.type == "meta":
        return dev  # models are built there before their weights are read
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"The device {str(device)!r} is not supported; use cpu, cuda or cuda:N.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"The device {str(device)!r} was asked for but no CUDA GPU is available; "
                             "use --device cpu (device='cpu').")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"There is no GPU {str(device)!r}; this machine has {torch.cuda.device_count()} "
                             "(cuda:0 ... ).")
    return dev

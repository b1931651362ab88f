"""Server settings: where data lives, which store, which devices, keys, limits, timings."""
from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import InputError


@dataclass(frozen=True)
class Limits:
    """Upload limits, checked while the upload streams in."""

    max_file_bytes: int = 200 * 2**20
    max_audio_seconds: float = 600.0
    max_image_pixels: int = 4096 * 4096
    max_video_frames: int = 25 * 600
    max_field_bytes: int = 64 * 2**10


@dataclass(frozen=True)
class ServerConfig:
    """Everything `infinitetalk serve` decides. `db` None: SQLite in `data`/jobs.db."""

    data: Path
    db: Optional[str] = None
    devices: tuple[str, ...] = ("cpu",)  # one worker per entry; () = API only
    model: str = "infinitetalk-14b"
    weights: Optional[str] = None
    api_keys: tuple[str, ...] = ()
    allow_dir: Optional[Path] = None
    limits: Limits = field(default_factory=Limits)
    heartbeat_timeout: float = 30.0  # a running job whose worker is silent this long is re-queued
    max_attempts: int = 3  # claims of one job before it is failed (a job that kills its workers)
    model_wait: float = 600.0  # a queued job older than this is taken next whatever model is loaded
    webhook_secret: Optional[str] = None  # whsec_...; None: DATA/webhook_secret (created once)
    webhook_attempts: int = 6
    webhook_backoff: float = 2.0  # seconds before the first retry; x4 per further retry

    @property
    def jobs_dir(self) -> Path:
        return self.data / "jobs"

    @property
    def staging_dir(self) -> Path:
        return self.data / "staging"

    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.data / 'jobs.db'}"

    def secret(self) -> str:
        """The webhook signing secret (Standard Webhooks `whsec_` form), made once per data folder."""
        if self.webhook_secret:
            return self.webhook_secret
        path = self.data / "webhook_secret"
        if not path.exists():
            import base64
            import os

            value = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(value + "\n")
        return path.read_text().strip()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_keys: tuple[str, ...]) -> None:
    """Without API keys the server answers on the loopback address only."""
    if not api_keys and not is_loopback(host):
        raise InputError(f"Without --api-key-file the server listens on 127.0.0.1 only; give --api-key-file FILE "
                         f"to serve on {host}.")


def read_api_keys(path: Optional[str]) -> tuple[str, ...]:
    """One key per line; blank lines and '#' comments ignored; keys of at least 16 characters."""
    if not path:
        return ()
    p = Path(path).expanduser()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"The API key file {p} cannot be read ({err.__class__.__name__}).") from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise InputError(f"The API key file {p} holds no key; put one key per line.")
    short = [k for k in keys if len(k) < 16]
    if short:
        raise InputError(f"The API key file {p} has a key shorter than 16 characters; use long random keys "
                         "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))').")
    return keys


def parse_devices(value: str) -> tuple[str, ...]:
    """--gpus: "all" (every CUDA GPU, else one CPU worker), "0,1", "cpu", or "none" (API only)."""
    import torch

    value = (value or "all").strip().lower()
    if value == "none":
        return ()
    if value == "cpu":
        return ("cpu",)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if value == "all":
        return tuple(f"cuda:{i}" for i in range(count)) or ("cpu",)
    try:
        ids = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--gpus {value}: use all, none, cpu or GPU numbers such as 0,1.") from None
    if not ids or len(set(ids)) != len(ids):
        raise InputError(f"--gpus {value}: give each GPU number once, such as 0,1.")
    bad = [i for i in ids if i < 0 or i >= count]
    if bad:
        raise InputError(f"--gpus {value}: there is no GPU {bad[0]} (this machine has {count}).")
    return tuple(f"cuda:{i}" for i in ids)

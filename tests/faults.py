"""Shared helpers of the fault suites (tests/test_faults_*.py): generated inputs, the CLI run
in-process or as a subprocess, and the verdict of each case.

Every case ends in one of: a clean error (exit 2, exactly one `error: ...` sentence, no
traceback), an accepted input (checked and decoded correctly), or a correct video. Anything else
is counted as a traceback. Inputs are hashed before and after each case (`Inputs`): a changed
or missing input counts as a file lost. The session fixture `tally` (tests/conftest.py: one `Tally`
for the whole session) prints the combined totals once.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import resource
import signal
import struct
import subprocess
import sys
import traceback
import wave
import zlib
from contextlib import redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from infinitetalk.cli import main

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Tally:
    tried: int = 0
    clean_errors: int = 0
    accepted: int = 0
    videos: int = 0
    tracebacks: int = 0
    files_lost: int = 0
    failures: list = field(default_factory=list)

    def line(self) -> str:
        return (f"[faults] cases tried {self.tried}, clean errors {self.clean_errors}, accepted inputs "
                f"{self.accepted}, correct videos {self.videos}, tracebacks {self.tracebacks}, "
                f"files lost {self.files_lost}")


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Inputs:
    """Hashes of input files before a case; `lost()` lists those changed or gone after it."""

    def __init__(self, *paths):
        self.paths = [Path(p) for p in paths if p is not None and Path(p).is_file()]
        self.before = {p: sha(p) for p in self.paths}

    def lost(self) -> list[str]:
        return [str(p) for p in self.paths if not p.is_file() or sha(p) != self.before[p]]


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """`infinitetalk generate ARGS` in-process: (exit code, stderr, traceback text or "")."""
    err = io.StringIO()
    tb = ""
    with redirect_stderr(err):
        try:
            rc = main(["generate", *[str(a) for a in args]])
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 2
        except BaseException:  # noqa: BLE001 - the suite counts these
            rc, tb = 1, traceback.format_exc()
    return rc, err.getvalue(), tb


def run_cli_process(args: list[str], timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "infinitetalk.cli", "generate", *[str(a) for a in args]],
                          capture_output=True, text=True, env=env, timeout=timeout, **popen)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ") or ": error: " in line]


def leftovers(folder: Path, keep: set) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in keep)


def verdict(tally: Tally, name: str, rc: int, stderr: str, tb: str, inputs: Inputs, *, folder: Path,
            keep: set, expect: str, phrase: str = "", video=None) -> None:
    """Count the case and assert its outcome: expect "error" (clean error mentioning `phrase`),
    "video" (rc 0 and `video()` checks the output), or "either"."""
    tally.tried += 1
    lost = inputs.lost()
    tally.files_lost += len(lost)
    errs = error_lines(stderr)
    ok_error = rc == 2 and not tb and "Traceback" not in stderr and len(errs) == 1
    problems = []
    if tb or "Traceback" in stderr or rc not in (0, 2):
        tally.tracebacks += 1
        problems.append(f"traceback/exit {rc}: {(tb or stderr)[-600:]}")
    elif rc == 2:
        if not ok_error:
            problems.append(f"error output is not one line: {stderr!r}")
        elif phrase and phrase.lower() not in errs[0].lower():
            problems.append(f"error does not mention {phrase!r}: {errs[0]}")
        elif expect == "video":
            problems.append(f"expected a video, got: {errs[0]}")
        else:
            tally.clean_errors += 1
    else:  # rc == 0
        if expect == "error":
            problems.append("expected a clean error, the job succeeded")
        else:
            try:
                if video is not None:
                    video()
                tally.videos += 1
            except AssertionError as exc:
                problems.append(f"wrong video: {exc}")
    extra = leftovers(folder, keep)
    if extra:
        problems.append(f"leftover files {extra}")
    if lost:
        problems.append(f"inputs changed or lost: {lost}")
    if problems:
        tally.failures.append(f"{name}: {problems[0][:300]}")
    assert not problems, f"{name}: " + " | ".join(problems)


# ---- generated inputs ----------------------------------------------------------------------


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000, channels: int = 1, freq: float = 220.0) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    data = np.repeat(tone[:, None], channels, axis=1)
    pcm = (np.clip(data, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def write_audio(path: Path, codec: str, fmt: str, rate: int, layout: str = "mono", seconds: float = 1.0,
                container: str | None = None, samples: np.ndarray | None = None) -> Path:
    """Audio through PyAV: `codec` with sample format `fmt` at `rate` (optionally given samples)."""
    channels = 2 if layout == "stereo" else 1
    n = int(seconds * rate)
    if samples is None:
        t = np.arange(n) / rate
        samples = np.repeat((0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)[None], channels, axis=0)
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        stream.format = fmt
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, samples.shape[1], frame_size):
            chunk = np.ascontiguousarray(samples[:, start:start + frame_size], dtype=np.float32)
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(_convert(frame, fmt, layout, rate)):
                out.mux(packet)
        out.mux(stream.encode(None))
    return path


def _convert(frame, fmt: str, layout: str, rate: int):
    resampler = av.AudioResampler(format=fmt, layout=layout, rate=rate)
    frames = resampler.resample(frame) + resampler.resample(None)
    assert len(frames) == 1
    frames[0].pts = frame.pts
    return frames[0]


def write_video(path: Path, frames: int = 10, size: tuple[int, int] = (96, 64), rotation: int | None = None,
                audio: bool = False, hflip: bool = False) -> Path:
    """A small H.264 MP4 (width, height); top-left quarter white; optional display rotation and sound."""
    w, h = size
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=25)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        if rotation is not None or hflip:
            v.set_display_rotation(rotation or 0, hflip=hflip)
        a = out.add_stream("aac", rate=16000, layout="mono") if audio else None
        for i in range(frames):
            img = np.full((h, w, 3), 40, np.uint8)
            img[: h // 2, : w // 2] = 255
            img[h // 2:, w // 2:, 0] = 120 + i
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = i
            out.mux(v.encode(f))
        out.mux(v.encode(None))
        if a is not None:
            t = np.arange(int(frames / 25 * 16000)) / 16000
            wave_ = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)[None]
            for s in range(0, wave_.shape[1], 1024):
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave_[:, s:s + 1024]), format="fltp",
                                                layout="mono")
                fr.sample_rate, fr.pts = 16000, s
                out.mux(a.encode(fr))
            out.mux(a.encode(None))
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says width x height, with one tiny (truncated) data chunk: Pillow opens
    it without decoding, so only a size check made before decoding can stop it cheaply."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Files written by this process may not grow past `limit` bytes (writes fail with EFBIG, as
    on a full disk); the default answer to SIGXFSZ (ending the process) is turned off meanwhile."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)

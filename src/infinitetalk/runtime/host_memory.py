"""Host memory of this process: what it holds (`process_memory`) and giving freed heap pages back
(`trim_host_heap`).

Why `trim_host_heap` exists: PyTorch's CPU tensors come from glibc's `malloc`. glibc serves a
request from its heap (`brk` arenas) below a threshold and with its own `mmap` above it, and it
raises that threshold, up to 32 MiB, each time an `mmap`-served block is freed. Loading a DiT with
`--fp8` frees many float temporaries, so the fp8 weights made after them (a few to 26 MiB each)
come from the heap. Packing them into the streamed-block arenas (`runtime.block_store`) frees
them again, but `free` returns heap pages to the kernel only at the heap's top: the holes stay
resident: with the 14B model that is most of the fp8 blocks' size (`benchmarks/NOTES.md`, v20/v21).
`malloc_trim(0)` walks the heap and gives every free page back (`madvise(MADV_DONTNEED)`).
No Python library offers it; it is one call through `ctypes`, a no-op where the C library is not
glibc (musl, macOS, Windows).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

GiB = 1024**3


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's `malloc_trim`, or None (not Linux, or a C library without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def trim_host_heap() -> bool:
    """Give the C heap's free pages back to the kernel; True when any memory was released.

    Cheap next to what calls it (after packing a model's weights, after dropping a pipeline):
    one pass over the heap's free lists."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


@dataclass(frozen=True)
class ProcessMemory:
    """Resident host memory of a process, from /proc/PID/status, in bytes.

    `anon`: private memory (heap, pageable tensors); `shmem`: shared memory, where the CUDA driver
    keeps page-locked (pinned) allocations; `file`: pages of mapped files (memory-mapped weights),
    which the kernel can drop and read again, so they do not add to what the machine must have.
    `rss` = anon + file + shmem; `peak_rss` is the kernel's high-water mark of `rss` (VmHWM)."""

    rss: int
    anon: int
    file: int
    shmem: int
    peak_rss: int

    @property
    def held(self) -> int:
        """Memory the process holds that the kernel cannot reclaim: anon + shmem."""
        return self.anon + self.shmem


def process_memory(pid: Optional[int] = None) -> Optional[ProcessMemory]:
    """This process's (or `pid`'s) `ProcessMemory`; None where /proc is absent or the process gone."""
    path = f"/proc/{pid or 'self'}/status"
    fields = {"VmRSS:": 0, "RssAnon:": 0, "RssFile:": 0, "RssShmem:": 0, "VmHWM:": 0}
    try:
        with open(path) as fh:
            for line in fh:
                key = line.split(None, 1)[0]
                if key in fields:
                    fields[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return ProcessMemory(rss=fields["VmRSS:"], anon=fields["RssAnon:"], file=fields["RssFile:"],
                         shmem=fields["RssShmem:"], peak_rss=fields["VmHWM:"])


class HostMemorySampler:
    """Samples `process_memory()` on a background thread while a `with` block runs (benchmarks).

    The kernel keeps a high-water mark of the whole RSS only (VmHWM), which counts mapped weight
    file pages; the peak of `held` (anon + shmem: what the machine must really have) needs
    sampling. `peaks` after the block: the largest `held`, `anon`, `shmem`, `file` and `rss` seen
    (each its own maximum), plus the kernel's `peak_rss`; `samples`: (seconds, ProcessMemory)."""

    def __init__(self, interval: float = 0.25, pid: Optional[int] = None):
        self.interval = interval
        self.pid = pid
        self.samples: list[tuple[float, ProcessMemory]] = []
        self._stop = None
        self._thread = None

    def _sample(self, start: float) -> None:
        mem = process_memory(self.pid)
        if mem is not None:
            self.samples.append((time.perf_counter() - start, mem))

    def __enter__(self) -> "HostMemorySampler":
        self._stop = threading.Event()
        start = time.perf_counter()

        def run() -> None:
            while not self._stop.is_set():
                self._sample(start)
                self._stop.wait(self.interval)
            self._sample(start)

        self._thread = threading.Thread(target=run, name="host-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def peaks(self) -> dict:
        """Largest value of each field over the samples, in bytes (empty without samples)."""
        if not self.samples:
            return {}
        mems = [m for _t, m in self.samples]
        out = {k: max(getattr(m, k) for m in mems) for k in ("held", "anon", "shmem", "file", "rss")}
        out["peak_rss"] = mems[-1].peak_rss
        return out

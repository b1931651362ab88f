"""Power and SM clock of the GPU while a measured piece of work runs (nvidia-smi sampling).

    with GpuMonitor() as mon:
        ...  # timed work
    mon.summary()  # {"samples", "power_w_mean", "power_w_max", "sm_clock_mhz_mean", "sm_clock_mhz_min", ...}

nvidia-smi samples every `interval_ms` into a temporary file; samples with the GPU idle (below
`busy_w`) are left out of the means, so the numbers describe the GPU while it works. Without
nvidia-smi (CPU runs) the summary is empty.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path


class GpuMonitor:
    def __init__(self, interval_ms: int = 50, busy_w: float = 200.0, gpu: int = 0):
        self.interval_ms = int(interval_ms)
        self.busy_w = float(busy_w)
        self.gpu = int(gpu)
        self._proc = None
        self._log: Path | None = None
        self.samples: list[dict] = []

    def __enter__(self) -> "GpuMonitor":
        if shutil.which("nvidia-smi") is None:
            return self
        fd, name = tempfile.mkstemp(suffix=".csv")
        os.close(fd)
        self._log = Path(name)
        self._proc = subprocess.Popen(
            ["nvidia-smi", "-i", str(self.gpu), "--query-gpu=clocks.sm,power.draw,temperature.gpu",
             "--format=csv,noheader,nounits", "-lms", str(self.interval_ms)],
            stdout=self._log.open("w"), stderr=subprocess.DEVNULL,
        )
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        self._proc.wait()
        for line in self._log.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            try:
                self.samples.append({"clock_mhz": float(parts[0]), "power_w": float(parts[1]), "temp_c": float(parts[2])})
            except (IndexError, ValueError):
                continue
        self._log.unlink(missing_ok=True)

    def summary(self) -> dict:
        busy = [s for s in self.samples if s["power_w"] >= self.busy_w]
        if not busy:
            return {"samples": len(self.samples)}
        power = [s["power_w"] for s in busy]
        clock = [s["clock_mhz"] for s in busy]
        return {
            "samples": len(busy),
            "power_w_mean": round(sum(power) / len(power), 1),
            "power_w_max": round(max(power), 1),
            "sm_clock_mhz_mean": round(sum(clock) / len(clock)),
            "sm_clock_mhz_min": round(min(clock)),
            "temp_c_max": max(s["temp_c"] for s in busy),
        }

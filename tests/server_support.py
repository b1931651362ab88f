"""Real `infinitetalk serve --model tiny` processes on 127.0.0.1 for the server tests, small media,
a Postgres cluster in a temp folder, and the figures file the closing note quotes."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx

REPO = Path(__file__).resolve().parents[1]
# The smallest job the tiny model runs: one 5-frame window (clip mode), one step.
TINY = {"steps": 1, "frame_num": 5, "motion_frame": 1, "mode": "clip"}
# Several 4-frame windows (for cancel / kill tests): streaming mode, motion frame 1.
WINDOWS = {"steps": 1, "frame_num": 5, "motion_frame": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_image(folder: Path, media_dir: Path) -> Path:
    from PIL import Image

    path = folder / "face.png"
    if not path.exists():
        Image.open(media_dir / "portrait.png").convert("RGB").resize((72, 128)).save(path)
    return path


def short_wav(folder: Path, media_dir: Path, seconds: float) -> Path:
    from test_e2e_tiny import cut_wav

    path = folder / f"speech_{seconds:g}s.wav"
    if not path.exists():
        cut_wav(media_dir, folder, seconds, path.name)
    return path


def record(tmp_root: Path, key: str, value) -> dict:
    """Add a measured figure to SERVER_FIGURES.json under the pytest base temp folder and print it."""
    path = tmp_root / "SERVER_FIGURES.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=1, sort_keys=True))
    print(f"[server figures] {key} = {json.dumps(value)}  ({path})")
    return data


class Server:
    """One `infinitetalk serve` subprocess; `start()` waits (bounded) for /v1/ready."""

    def __init__(self, data: Path, *extra: str, db: Optional[str] = None, port: Optional[int] = None,
                 key: Optional[str] = None):
        self.data, self.extra, self.db, self.key = data, list(extra), db, key
        self.port = port or free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.log = data.parent / f"server_{data.name}_{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw) -> httpx.Client:
        headers = {"authorization": f"Bearer {self.key}"} if self.key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 60.0), **kw)

    def start(self, timeout: float = 180.0) -> "Server":
        cmd = [sys.executable, "-m", "infinitetalk.cli", "serve", "--model", "tiny", "--gpus", "cpu",
               "--host", "127.0.0.1", "--port", str(self.port), "--data", str(self.data), *self.extra]
        if self.db:
            cmd += ["--db", self.db]
        env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/v1/ready", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the server did not get ready in {timeout} s")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def submit(client: httpx.Client, image: Path, audio: Path, settings: dict, **fields) -> dict:
    files = {"image": ("face.png", image.read_bytes(), "image/png"),
             "audio": ("speech.wav", audio.read_bytes(), "audio/wav")}
    answer = client.post("/v1/jobs", files=files, data={"settings": json.dumps(settings), **fields})
    assert answer.status_code == 201, answer.text
    return answer.json()


def wait_for(client: httpx.Client, job_id: str, done, timeout: float = 240.0, every: float = 0.1) -> dict:
    """Poll the job until done(job) is true (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if done(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} did not get there in {timeout} s: {job}"
        time.sleep(every)


def ended(job: dict) -> bool:
    return job["state"] in ("succeeded", "failed", "cancelled")


# ---- Postgres ------------------------------------------------------------------------------


def pg_bin() -> Optional[Path]:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(dirs[-1]).parent if dirs else None


class Postgres:
    """A throw-away cluster (initdb + pg_ctl) on 127.0.0.1, run as the postgres user when we are root."""

    def __init__(self):
        self.bin = pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="infinitetalk-pg-"))
        self.port = free_port()
        self.user = None
        if os.geteuid() == 0:
            import pwd

            self.user = "postgres"
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str) -> None:
        subprocess.run([str(self.bin / args[0]), *args[1:]], check=True, user=self.user, cwd=self.root,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def start(self) -> "Postgres":
        data = self.root / "data"
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run("pg_ctl", "-D", str(data), "-l", str(self.root / "log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        return self

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        except (subprocess.SubprocessError, OSError):
            pass
        shutil.rmtree(self.root, ignore_errors=True)

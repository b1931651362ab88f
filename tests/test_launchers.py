"""scripts/launch.sh in a subprocess on Linux: pointed at the current environment with
INFINITETALK_VENV (so nothing is installed from the internet), it serves the web page with the
tiny model on 127.0.0.1 without a browser; a second run is the same (nothing installed again).
scripts/launch.bat is checked for the same settings (there is no Windows here to run it)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH_SH = REPO / "scripts" / "launch.sh"
STARTUP_S = 150

pytest.importorskip("gradio")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_once(tmp_path: Path, run: int, venv: Path = Path(sys.prefix), **extra_env: str) -> str:
    port = free_port()
    env = dict(os.environ, INFINITETALK_VENV=str(venv), INFINITETALK_MODEL="tiny", INFINITETALK_PORT=str(port),
               INFINITETALK_NO_BROWSER="1", INFINITETALK_UI_OUTPUTS=str(tmp_path / "ui-jobs"),
               GRADIO_ANALYTICS_ENABLED="False", **extra_env)
    log_path = tmp_path / f"launch{run}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", str(LAUNCH_SH)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
                    assert page.status == 200
                    body = page.read().decode("utf-8", "replace")
                assert "Model: tiny" in body, "the page is served with INFINITETALK_MODEL"
                break
            except OSError:
                assert proc.poll() is None, f"the launcher stopped:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, f"no page after {STARTUP_S} s:\n{log_path.read_text()}"
                time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return log_path.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the shell launcher is tested on Linux")
def test_launch_sh_serves_the_page_and_installs_nothing_twice(tmp_path):
    before = sorted(p.name for p in Path(sys.prefix).iterdir())
    for run in (1, 2):
        log = serve_once(tmp_path, run)
        assert f"using {sys.prefix} as it is" in log, log
        assert "installing" not in log and "creating the environment" not in log, log
    assert sorted(p.name for p in Path(sys.prefix).iterdir()) == before, "nothing written into the environment"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the shell launcher is tested on Linux")
def test_launch_sh_first_run_makes_the_environment_then_installs_nothing(tmp_path):
    """The first run creates the environment, installs the package (editable) and writes its
    stamp; the second run finds it up to date. The heavy dependencies (torch, gradio) are seen
    through PYTHONPATH from the test's own environment, so pip installs only infinitetalk
    (it fetches the build backend from the package index, as on a user's machine)."""
    import sysconfig

    venv = tmp_path / "fresh-venv"
    site = sysconfig.get_paths()["purelib"]
    first = serve_once(tmp_path, 1, venv, PYTHONPATH=site, PIP_DISABLE_PIP_VERSION_CHECK="1")
    assert f"creating the environment {venv}" in first and "installing infinitetalk[ui]" in first, first
    stamp = (venv / ".infinitetalk-install").read_text()
    assert stamp.strip().endswith("ui")
    second = serve_once(tmp_path, 2, venv, PYTHONPATH=site, PIP_DISABLE_PIP_VERSION_CHECK="1")
    assert f"{venv} is up to date" in second and "installing" not in second and "creating" not in second, second
    assert (venv / ".infinitetalk-install").read_text() == stamp


def test_launchers_share_their_settings():
    sh = LAUNCH_SH.read_text()
    bat = (REPO / "scripts" / "launch.bat").read_bytes()
    assert b"\r\n" in bat and b"\n" not in bat.replace(b"\r\n", b""), "launch.bat has Windows line ends"
    for name in ("INFINITETALK_VENV", "INFINITETALK_MODEL", "INFINITETALK_PORT", "INFINITETALK_NO_BROWSER",
                 "INFINITETALK_UI_ARGS", ".infinitetalk-install", "[ui]", "infinitetalk.cli"):
        assert name in sh and name.encode() in bat, name
    assert os.access(LAUNCH_SH, os.X_OK), "launch.sh is executable"
    check = subprocess.run(["bash", "-n", str(LAUNCH_SH)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

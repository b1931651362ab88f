"""Kill a real `infinitetalk generate --model tiny` process after its first window and resume it:
the result must equal an uninterrupted run with the same seed, frame for frame."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from test_e2e_tiny import check_video, cut_wav, image_hw, probe_mp4


def _cmd(image, audio, output, *extra):
    return [sys.executable, "-m", "infinitetalk.cli", "generate", "--model", "tiny", "--steps", "1", "--seed", "5",
            "--image", str(image), "--audio", str(audio), "--output", str(output), *extra]


def test_kill_and_resume_equals_uninterrupted(media_dir, tmp_path):
    image = media_dir / "portrait.png"
    audio = cut_wav(media_dir, tmp_path, 4.2)  # 105 frames: two windows
    env = dict(os.environ)

    base = tmp_path / "base.mp4"
    done = subprocess.run(_cmd(image, audio, base), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "out.mp4"
    job = tmp_path / "out.mp4.job"
    proc = subprocess.Popen(_cmd(image, audio, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 600
        while not (job / "state.pt").exists():
            assert proc.poll() is None, "the run ended before its first window was saved"
            assert time.monotonic() < deadline, "no window finished in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed job left a file at the output path"
    assert (job / "segment_00000.mp4").is_file()
    assert not (job / "segment_00001.mp4").exists()

    other = subprocess.run(_cmd(image, audio, out, "--resume", "--seed", "6"), capture_output=True, text=True,
                           env=env, timeout=600)
    assert other.returncode == 2 and "Cannot resume" in other.stderr and "Traceback" not in other.stderr
    assert "seed" in other.stderr and "loading" not in other.stderr  # refused before loading models
    assert not out.exists() and (job / "state.pt").exists()

    resumed = subprocess.run(_cmd(image, audio, out, "--resume"), capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at window" in resumed.stderr
    assert not job.exists()

    a, b = probe_mp4(base), probe_mp4(out)
    assert a["frames"].shape == b["frames"].shape == (105, 64, 128, 3)
    assert np.array_equal(a["frames"], b["frames"]), "the resumed video differs from the uninterrupted one"
    check_video(out, image_hw(image), expect_frames=105)
    print(f"[resume] killed after window 1, resumed: 105 frames equal to the uninterrupted run")

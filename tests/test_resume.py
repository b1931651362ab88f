"""Interrupt a real `infinitetalk generate --model tiny` process and resume it: the result must
equal an uninterrupted run with the same seed, frame for frame.

- SIGKILL after the first window (a crash): no output file, the finished segment kept, a resume
  with other settings refused before any model loads, the resume completes the video.
- Ctrl-C (SIGINT) during window 2: the job stops at the next step (exit 130) and prints one
  message with the command that continues; that command, interrupted by a double Ctrl-C (stop at
  once, exit 130) after one more window, resumes again and completes the video.

Short windows (frame_num 21, motion_frame 5; 2.6 s = 65 frames = four windows) keep it cheap.
"""
from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from infinitetalk.generation.job_state import JobDir

from test_e2e_tiny import check_video, cut_wav, image_hw, probe_mp4

WINDOWS = 4
FRAMES = 65


def _cmd(image, audio, output, *extra):
    return [sys.executable, "-m", "infinitetalk.cli", "generate", "--model", "tiny", "--steps", "2", "--seed", "5",
            "--frame-num", "21", "--motion-frame", "5", "--image", str(image), "--audio", str(audio),
            "--output", str(output), *extra]


@pytest.fixture(scope="module")
def job(media_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    image, audio = media_dir / "portrait.png", cut_wav(media_dir, folder, 2.6)
    base = folder / "base.mp4"
    done = subprocess.run(_cmd(image, audio, base), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return folder, image, audio, probe_mp4(base)["frames"]


def _finished(output) -> int:
    try:
        state = JobDir(output).load_state()
    except Exception:  # noqa: BLE001 - read while the child replaces it: try again
        return -1
    return state.next_window if state is not None else 0


def _start_and_wait(cmd, output, windows_done: int) -> subprocess.Popen:
    """Start `cmd` and return once `windows_done` windows of `output` are saved."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while _finished(output) < windows_done:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before window {windows_done} was saved: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no window finished in time")
        time.sleep(0.02)
    return proc


def _finish(proc: subprocess.Popen) -> str:
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return err


def _same_as_base(out, base_frames) -> None:
    frames = probe_mp4(out)["frames"]
    assert frames.shape == base_frames.shape == (FRAMES, 64, 128, 3)
    assert np.array_equal(frames, base_frames), "the resumed video differs from the uninterrupted one"


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(job):
    folder, image, audio, base = job
    out = folder / "out.mp4"
    jobdir = folder / "out.mp4.job"
    proc = _start_and_wait(_cmd(image, audio, out), out, 1)
    proc.send_signal(signal.SIGKILL)
    _finish(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed job left a file at the output path"
    assert (jobdir / "segment_00000.mp4").is_file()

    other = subprocess.run(_cmd(image, audio, out, "--resume", "--seed", "6"), capture_output=True, text=True,
                           timeout=600)
    assert other.returncode == 2 and "Cannot resume" in other.stderr and "Traceback" not in other.stderr
    assert "seed" in other.stderr and "RANDOM" not in other.stderr  # refused before the models were built
    assert not out.exists() and (jobdir / "state.pt").exists()

    resumed = subprocess.run(_cmd(image, audio, out, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at window" in resumed.stderr
    assert not jobdir.exists()
    _same_as_base(out, base)
    check_video(out, image_hw(image), expect_frames=FRAMES)


def _resume_command(stderr: str) -> list[str]:
    """The command the cancel message prints, as argv for this Python."""
    assert stderr.count("cancelled:") == 1, stderr
    line = stderr.split("To continue, run:\n", 1)[1].splitlines()[0]
    words = shlex.split(line)
    assert words[0] == "infinitetalk" and words[-1] == "--resume", line
    return [sys.executable, "-m", "infinitetalk.cli", *words[1:]]


@pytest.mark.slow
def test_ctrl_c_cancels_cleanly_and_resumes(job):
    folder, image, audio, base = job
    out = folder / "ctrlc.mp4"
    proc = _start_and_wait(_cmd(image, audio, out), out, 1)
    proc.send_signal(signal.SIGINT)  # once: stop at the next step
    err = _finish(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "stopping after the current step" in err
    done = _finished(out)
    assert 1 <= done < WINDOWS and f"{done} of {WINDOWS} window(s) are finished and kept" in err, err
    assert not out.exists() and not list(folder.glob(".ctrlc*")), "a partial video was left"
    resume = _resume_command(err)

    proc = _start_and_wait(resume, out, done + 1)
    proc.send_signal(signal.SIGINT)  # twice: stop at once
    proc.send_signal(signal.SIGINT)
    err = _finish(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.count("cancelled:") == 1
    assert done < _finished(out) and not out.exists()

    final = subprocess.run(_resume_command(err), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    _same_as_base(out, base)
    assert not (folder / "ctrlc.mp4.job").exists()

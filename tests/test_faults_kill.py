"""Fault suite, jobs: interrupted jobs, damaged job folders, locks, a full disk, kills.

* In-process (small 9-frame windows, cheap): a job cancelled after its first window is refused
  by a plain re-run (kept, with the --resume / --restart sentence); each kind of damage to its
  folder is one sentence on --resume before any model loads; the intact folder resumes to the
  frames of an uninterrupted run; --restart discards on purpose; the sound track keeps the
  speech's rate and channels (or the official 16 kHz mono).
  A resume under a file-size limit (the disk "fills") fails with a sentence, keeps the job
  resumable and leaves no temporary file.
* Subprocess (slow): a real `infinitetalk generate` is SIGKILLed after its first window while a
  second job on the same output is refused as busy; the resume takes over the stale lock and
  keeps the finished window (tests/test_resume.py compares a killed-and-resumed CLI run with an
  uninterrupted one frame by frame).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest
import torch

from faults import REPO, Inputs, file_size_limit, run_cli, run_cli_process, sha, verdict, write_wav
from infinitetalk.errors import JobCancelledError
from infinitetalk.progress import CancelToken, WindowFinished
from infinitetalk.service import JobService, JobSpec, RuntimeOptions

SMALL = dict(frame_num=9, motion_frame=5, steps=1, seed=3)


def _frames(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _audio(path):
    with av.open(str(path)) as c:
        a = c.streams.audio[0].codec_context
        return a.sample_rate, a.channels


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("media")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(d / "face.png")
    write_wav(d / "stereo44k.wav", 0.72, rate=44100, channels=2)  # 18 frames: 4 windows of 9 (5 motion)
    write_wav(d / "mono22k.wav", 0.5, rate=22050, freq=500)
    return d


def _spec(media, out, **kw):
    fields = dict(SMALL, image=str(media / "face.png"), audio=str(media / "stereo44k.wav"))
    fields.update(kw)
    return JobSpec(output=str(out), runtime=RuntimeOptions(model="tiny"), **fields)


def _interrupted(service, spec, after: int = 1):
    token = CancelToken()

    def progress(event):
        if isinstance(event, WindowFinished) and event.index == after:
            token.cancel()

    with pytest.raises(JobCancelledError):
        service.run(spec, progress=progress, cancel=token)


def _damage(job, kind):
    state_file = job / "state.pt"
    state = torch.load(state_file, weights_only=True)
    if kind == "truncated_segment":
        seg = job / "segment_00001.mp4"
        seg.write_bytes(seg.read_bytes()[:200])
    elif kind == "empty_segment":
        (job / "segment_00000.mp4").write_bytes(b"")
    elif kind == "missing_segment":
        (job / "segment_00001.mp4").unlink()
    elif kind == "next_window_negative":
        torch.save({**state, "next_window": -1}, state_file)
    elif kind == "next_window_past_end":
        torch.save({**state, "next_window": 99}, state_file)
    elif kind == "motion_wrong_shape":
        torch.save({**state, "motion": torch.zeros(3, 2, 8, 8)}, state_file)
    elif kind == "motion_nan":
        torch.save({**state, "motion": torch.full_like(state["motion"], float("nan"))}, state_file)
    elif kind == "bad_rng_state":
        torch.save({**state, "rng_state": torch.zeros(7, dtype=torch.uint8)}, state_file)
    elif kind == "pickled_code":
        torch.save({**state, "motion": np.zeros(3)}, state_file)  # not loadable with weights_only
    elif kind == "truncated_state":
        state_file.write_bytes(state_file.read_bytes()[:100])
    elif kind == "settings_garbage":
        (job / "settings.json").write_text("{not json")
    else:
        raise AssertionError(kind)


DAMAGE = ["truncated_segment", "empty_segment", "missing_segment", "next_window_negative", "next_window_past_end",
          "motion_wrong_shape", "motion_nan", "bad_rng_state", "pickled_code", "truncated_state", "settings_garbage"]


def _cli_args(media, out, *extra):
    return ["--model", "tiny", "--image", media / "face.png", "--audio", media / "stereo44k.wav", "--output", out,
            *extra]


def test_interrupted_job_kept_damage_refused_resume_identical(media, tmp_path, tally):
    service = JobService()
    inputs = Inputs(media / "face.png", media / "stereo44k.wav")
    base = tmp_path / "base" / "b.mp4"
    base.parent.mkdir()
    service.run(_spec(media, base))
    assert sorted(p.name for p in base.parent.iterdir()) == ["b.mp4"]
    assert _audio(base) == (44100, 2), "the sound track is not the speech's own rate and channels"

    work = tmp_path / "work"
    work.mkdir()
    out = work / "o.mp4"
    _interrupted(service, _spec(media, out))
    job = work / "o.mp4.job"
    assert (job / "state.pt").is_file() and not out.exists()
    pristine = tmp_path / "pristine.job"
    shutil.copytree(job, pristine)
    job_files = {p.name: sha(p) for p in job.iterdir()}

    # a plain re-run keeps the interrupted job and says how to resume it (CLI has no --frame-num:
    # the service is the shared check, so the CLI sentence comes from the same place)
    tally.tried += 1
    with pytest.raises(Exception) as info:
        service.check(_spec(media, out))
    assert "--resume" in str(info.value) and "--restart" in str(info.value)
    assert {p.name: sha(p) for p in job.iterdir()} == job_files
    tally.clean_errors += 1

    loads = service.loads
    for kind in DAMAGE:
        tally.tried += 1
        shutil.rmtree(job)
        shutil.copytree(pristine, job)
        _damage(job, kind)
        before = {p.name: sha(p) for p in job.iterdir()}
        with pytest.raises(Exception) as info:
            service.check(_spec(media, out, resume=True))
        msg = str(info.value)
        assert type(info.value).__name__ in ("ResumeError",), (kind, type(info.value), msg)
        assert "weights_only" not in msg and "\n" not in msg and ("--restart" in msg or "start over" in msg), msg
        assert {p.name: sha(p) for p in job.iterdir()} == before, f"{kind}: the damaged folder was changed"
        tally.clean_errors += 1
    assert service.loads == loads

    # the disk "fills" (a file-size limit on this process) while the resume writes: one
    # sentence, the job still resumable, no temporary file anywhere
    shutil.rmtree(job)
    shutil.copytree(pristine, job)
    tally.tried += 1
    with file_size_limit(max(p.stat().st_size for p in job.iterdir()) + 1):
        with pytest.raises(Exception) as info:
            service.run(_spec(media, out, resume=True))
    assert type(info.value).__name__ == "StorageError" and "--resume" in str(info.value), info.value
    assert not [p.name for p in work.rglob(".*")], list(work.rglob(".*"))
    assert sorted(p.name for p in work.iterdir()) == ["o.mp4.job"]
    tally.clean_errors += 1

    # the intact folder resumes to the uninterrupted frames; nothing is left but the video
    tally.tried += 1
    service.run(_spec(media, out, resume=True))
    assert np.array_equal(_frames(out), _frames(base)), "the resumed video differs from the uninterrupted one"
    assert sorted(p.name for p in work.iterdir()) == ["o.mp4"]
    tally.videos += 1

    # --restart discards an interrupted job on purpose; --official-sound keeps 16 kHz mono
    _interrupted(service, _spec(media, out))
    tally.tried += 1
    service.run(_spec(media, out, restart=True, official_sound=True))
    assert np.array_equal(_frames(out), _frames(base)) and _audio(out) == (16000, 1)
    assert sorted(p.name for p in work.iterdir()) == ["o.mp4"]
    tally.videos += 1

    # stopped after the last window, before the final mux: the resume only assembles the video
    tally.tried += 1
    late = work / "late.mp4"
    _interrupted(service, _spec(media, late), after=3)
    assert not late.exists() and not [p for p in work.iterdir() if p.name.startswith(".")]
    notes = []
    service.run(_spec(media, late, resume=True), progress=lambda e: notes.append(getattr(e, "message", "")))
    assert any("all 4 windows were already made" in n for n in notes), notes
    assert np.array_equal(_frames(late), _frames(base))
    assert sorted(p.name for p in work.iterdir()) == ["late.mp4", "o.mp4"]
    tally.videos += 1

    # two speakers at different rates: mixed at the higher rate, stereo wins
    tally.tried += 1
    duo = work / "duo.mp4"
    service.run(_spec(media, duo, audio2=str(media / "mono22k.wav"), audio_type="add"))
    assert _audio(duo) == (44100, 2)
    assert inputs.lost() == []
    tally.videos += 1


def _popen(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "infinitetalk.cli", "generate", *[str(a) for a in args]],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_kill_busy_and_resume(media, tmp_path, tally):
    image, audio = media / "face.png", tmp_path / "speech.wav"
    write_wav(audio, 4.2, rate=44100, channels=2)  # 105 frames: two 81-frame windows
    inputs = Inputs(image, audio)
    args = lambda out, *extra: ["--model", "tiny", "--steps", "1", "--seed", "5", "--image", image,  # noqa: E731
                                "--audio", audio, "--output", out, *extra]
    work = tmp_path / "work"
    work.mkdir()
    out = work / "o.mp4"
    killed = _popen(args(out))
    job = work / "o.mp4.job"
    try:
        deadline = time.monotonic() + 300
        while not (job / "lock").exists() or not (job / "lock").read_text().strip():
            assert killed.poll() is None and time.monotonic() < deadline, "the job did not start"
            time.sleep(0.05)
        # a second job on the same output is refused while the first runs
        rc, err, tb = run_cli(args(out))
        verdict(tally, "second_job_same_output", rc, err, tb, inputs, folder=work, keep={"o.mp4.job"},
                expect="error", phrase="is writing")
        while not (job / "state.pt").exists():
            assert killed.poll() is None and time.monotonic() < deadline, "no window finished in time"
            time.sleep(0.02)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    finally:
        for p in (killed,):
            if p.poll() is None:
                p.kill()
            p.stderr.close()
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    assert (job / "lock").exists(), "a SIGKILLed job leaves its (stale) lock file"
    first = _frames(job / "segment_00000.mp4")

    # the next resume takes over the stale lock and finishes with the uninterrupted frames
    tally.tried += 1
    resumed = subprocess.run([sys.executable, "-m", "infinitetalk.cli", "generate", *map(str, args(out, "--resume"))],
                             env=dict(os.environ, PYTHONPATH=str(REPO / "src")), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at window 2/2" in resumed.stderr
    frames = _frames(out)
    assert frames.shape[0] == 105 and np.array_equal(frames[:81], first), "the finished window was not kept"
    assert sorted(p.name for p in work.iterdir()) == ["o.mp4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech.wav", "work"]
    assert inputs.lost() == []
    tally.videos += 1


@pytest.mark.slow
def test_sigkill_at_every_stage_then_resume_gives_the_same_video(media, tmp_path, tally):
    """SIGKILL a real `infinitetalk generate` at evenly spaced moments of its run time (model
    load, sampling, segment and state writes, the final mux all fall under one of them), each
    time continuing with --resume, until one run finishes: the video equals an uninterrupted run,
    nothing is left beside it and the inputs are untouched."""
    image, audio = media / "face.png", tmp_path / "speech.wav"
    write_wav(audio, 0.72, rate=22050)  # 18 frames: 4 windows of 9 frames (5 motion)
    inputs = Inputs(image, audio)
    args = lambda out, *extra: ["--model", "tiny", "--steps", "1", "--seed", "9", "--frame-num", "9",  # noqa: E731
                                "--motion-frame", "5", "--image", image, "--audio", audio, "--output", out, *extra]
    base = tmp_path / "base.mp4"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "infinitetalk.cli", "generate", *map(str, args(base))],
                          env=dict(os.environ, PYTHONPATH=str(REPO / "src")), capture_output=True, text=True,
                          timeout=300)
    whole = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-2000:]

    work = tmp_path / "work"
    work.mkdir()
    out = work / "o.mp4"
    kills = 0
    for fraction in (0.3, 0.6, 0.85, 0.97):
        tally.tried += 1
        proc = _popen(args(out, "--resume"))
        try:
            proc.wait(timeout=fraction * whole)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            kills += 1
        finally:
            err = proc.stderr.read()
            proc.stderr.close()
        if proc.returncode == 0:  # this run got to the end
            tally.videos += 1
            break
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
        if out.exists():  # killed after the final rename (while tidying up): the video must be whole
            assert np.array_equal(_frames(out), _frames(base)), "a killed job left a partial or wrong video"
        tally.accepted += 1  # killed on purpose: what it left must resume
    else:
        tally.tried += 1
        final = run_cli_process(args(out, "--resume"))
        assert final.returncode == 0, final.stderr[-2000:]
        tally.videos += 1
    assert kills >= 2, f"only {kills} kill(s) landed: the job ran faster than the kill schedule"
    assert np.array_equal(_frames(out), _frames(base)), "the video after kills and resumes differs"
    assert sorted(p.name for p in work.iterdir()) == ["o.mp4"], sorted(p.name for p in work.iterdir())
    assert inputs.lost() == []

"""The job service on the tiny model, from Python: the event stream of a job, a cancel in the
middle of a window then a resume (frames identical to an uninterrupted run, decoded with PyAV),
and loaded models reused across jobs with the same settings.

Short windows (frame_num 21, motion_frame 5) keep it cheap: 1.2 s of speech = 30 frames = two
windows (21 frames, then 16 new of which 9 are kept).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from infinitetalk import progress as ev
from infinitetalk.errors import DeviceOutOfMemoryError, JobCancelledError
from infinitetalk.progress import CancelToken
from infinitetalk.service import JobService, JobSpec, RuntimeOptions

from test_e2e_tiny import cut_wav, probe_mp4

TERMINAL = (ev.JobFinished, ev.JobFailed, ev.JobCancelled)


@pytest.fixture(scope="module")
def service():
    return JobService()


@pytest.fixture(scope="module")
def job(media_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("service")
    audio = cut_wav(media_dir, folder, 1.2)
    spec = JobSpec(output=str(folder / "base.mp4"), image=str(media_dir / "portrait.png"), audio=str(audio),
                   steps=2, seed=7, frame_num=21, motion_frame=5, runtime=RuntimeOptions(model="tiny", device="cpu"))
    return folder, spec


@pytest.fixture(scope="module")
def base_run(service, job):
    folder, spec = job
    events: list = []
    result = service.run(spec, progress=events.append)
    return result, events


def test_events_in_order_with_one_terminal_event(base_run):
    result, events = base_run
    kinds = [e.kind for e in events]
    print("[service] events:", " ".join(kinds))
    assert sum(isinstance(e, TERMINAL) for e in events) == 1 and isinstance(events[-1], ev.JobFinished)
    assert kinds.index("stage_started") < kinds.index("job_started")  # the model load comes first
    start = events[kinds.index("job_started")]
    assert (start.windows, start.steps, start.frames, start.first_window) == (2, 2, 30, 0)
    stages = [e.stage for e in events if isinstance(e, ev.StageStarted)]
    assert stages == ["load", "encode_audio", "encode_prompt", "write"]
    per_window = [e for e in events if isinstance(e, (ev.WindowStarted, ev.StepFinished, ev.WindowFinished))]
    expect = []
    for w in range(2):
        expect += [("window_started", w), ("step_finished", w, 1), ("step_finished", w, 2), ("window_finished", w)]
    got = [(e.kind, e.index) if not isinstance(e, ev.StepFinished) else (e.kind, e.window, e.step) for e in per_window]
    assert got == expect
    finished = [e for e in events if isinstance(e, ev.WindowFinished)]
    assert [(e.frames, e.out_end, e.count) for e in finished] == [(21, 21, 2), (9, 30, 2)]
    assert all(e.segment and e.segment.endswith(f"segment_{e.index:05d}.mp4") for e in finished)
    times = [e.elapsed_s for e in events]
    assert times == sorted(times)
    assert events[-1].output == str(result.output) and result.frames == 30 and result.windows == 2
    assert any(isinstance(e, ev.Notice) and e.level == "warning" and "RANDOM" in e.message for e in events)


def test_cancel_mid_window_then_resume_gives_the_same_frames(service, job, base_run):
    folder, spec = job
    out = folder / "cut.mp4"
    token = CancelToken()
    events: list = []

    def on_event(event):
        events.append(event)
        if isinstance(event, ev.StepFinished) and event.window == 1 and event.step == 1:
            token.cancel()

    cut = spec.with_(output=str(out))
    with pytest.raises(JobCancelledError):
        service.run(cut, progress=on_event, cancel=token)
    assert isinstance(events[-1], ev.JobCancelled) and sum(isinstance(e, TERMINAL) for e in events) == 1
    assert events[-1].next_window == 1 and events[-1].resumable
    assert not any(isinstance(e, ev.StepFinished) and e.window == 1 and e.step == 2 for e in events)
    assert not out.exists(), "a cancelled job left a video at the output path"
    job_dir = folder / "cut.mp4.job"
    assert (job_dir / "segment_00000.mp4").is_file() and not (job_dir / "segment_00001.mp4").exists()

    resumed: list = []
    service.run(cut.with_(resume=True), progress=resumed.append)
    start = next(e for e in resumed if isinstance(e, ev.JobStarted))
    assert start.first_window == 1
    assert [e.index for e in resumed if isinstance(e, ev.WindowStarted)] == [1]
    assert not job_dir.exists()
    a, b = probe_mp4(base_run[0].output)["frames"], probe_mp4(out)["frames"]
    assert a.shape == b.shape == (30, 64, 128, 3)
    assert np.array_equal(a, b), "the resumed video differs from the uninterrupted one"
    assert service.loads == 1, "the three jobs with the same model settings loaded the model more than once"


def test_models_reused_while_settings_match_reloaded_when_they_change(service, job, base_run):
    folder, spec = job
    before = service.loads
    settings = service.check(spec).model
    assert service.pipeline(settings) is service.pipeline(settings) and service.loads == before
    other = spec.with_(output=str(folder / "multi.mp4"), mode="clip", frame_num=5, motion_frame=1, steps=1,
                       runtime=spec.runtime.with_(variant="multi"))
    service.run(other)
    assert service.loads == before + 1
    assert [m.variant for m in service.loaded()] == ["multi"]  # max_models=1: the old one is dropped


def test_out_of_memory_while_loading_is_a_sentence(job):
    folder, spec = job

    def loader(settings):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    service = JobService(loader=loader)
    events: list = []
    with pytest.raises(DeviceOutOfMemoryError, match="while loading the models") as err:
        service.run(spec.with_(output=str(folder / "oom.mp4")), progress=events.append)
    for option in ("--vram", "--fp8", "--size 480"):
        assert option in str(err.value)
    assert isinstance(events[-1], ev.JobFailed) and events[-1].error == "DeviceOutOfMemoryError"
    assert service.loads == 0 and not service.loaded()
    assert not (folder / "oom.mp4").exists() and not (folder / "oom.mp4.job").exists()

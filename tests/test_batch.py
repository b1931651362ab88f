"""`infinitetalk batch`: job lists read and checked before any load, real tiny runs through one
JobService, outputs decoded with PyAV, the model loads counted, failures reported and skipped.

Jobs are short (0.4 s of speech, 5-frame windows, 1 step) so that real runs take seconds.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import av
import pytest

from faults import file_size_limit
from infinitetalk.cli import build_parser, main
from infinitetalk.errors import InputError
from infinitetalk.generation.job_state import JobDir
from infinitetalk.progress import CancelToken, StepFinished, WindowFinished
from infinitetalk.service import JobService, JobSpec, RuntimeOptions
from infinitetalk.service.batch import BAD, CANCELLED, DONE, FAILED, BatchObserver, plan_batch, run_batch
from infinitetalk.service.batch_files import read_jobs

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SHORT = ["--model", "tiny", "--steps", "1", "--max-seconds", "0.4", "--set", "frame_num=5", "--set", "motion_frame=1"]
FRAMES = 10  # 0.4 s at 25 fps


def tiny_defaults(**changes) -> JobSpec:
    return JobSpec(output="", steps=1, max_seconds=0.4, frame_num=5, motion_frame=1,
                   runtime=RuntimeOptions(model="tiny"), **changes)


def check_mp4(path: Path, frames: int = FRAMES) -> None:
    with av.open(str(path)) as c:
        assert c.streams.video and c.streams.audio, f"{path}: video and sound expected"
        times = [f.time for f in c.decode(video=0)]
    assert len(times) == frames, (path, len(times))
    assert all(abs(b - a - 1 / 25) < 1e-3 for a, b in zip(times, times[1:])), times  # 25 fps


@pytest.fixture()
def job_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "jobs"
    folder.mkdir()
    for stem in ("anna", "cleo"):
        shutil.copy(EXAMPLES / "portrait.jpg", folder / f"{stem}.jpg")
        shutil.copy(EXAMPLES / "speech.wav", folder / f"{stem}.wav")
    shutil.copy(EXAMPLES / "portrait.jpg", folder / "bob.jpg")
    (folder / "bob.wav").write_bytes(b"this is not a sound file\n" * 20)  # the bad job
    (folder / "cleo.txt").write_text("A person talks in a bright studio.\n", encoding="utf-8")
    return folder


def test_folder_batch_runs_good_jobs_reports_the_bad_one_and_keeps_outputs(job_folder, capsys):
    rc = main(["batch", str(job_folder), *SHORT])
    err = capsys.readouterr().err
    assert rc == 2, err
    first = err.index("bad: bob.jpg")
    assert first < err.index("[1/2] anna: started"), "the bad job is reported before any job runs"
    assert "not a readable audio" in err
    assert "models loaded: 1;" in err
    assert "error: 1 of 3 job(s) failed or could not run" in err
    out = job_folder / "outputs"
    assert sorted(p.name for p in out.iterdir()) == ["anna.mp4", "cleo.mp4"]
    for name in ("anna.mp4", "cleo.mp4"):
        check_mp4(out / name)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    # run again: finished outputs are kept, nothing loads
    rc = main(["batch", str(job_folder), *SHORT])
    err = capsys.readouterr().err
    assert rc == 2
    assert "0 job(s) to make, 2 already made, 1 bad" in err
    assert "models loaded: 0;" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_folder_prompt_and_pairing(job_folder):
    (job_folder / "dora.png").write_bytes((EXAMPLES / "portrait.jpg").read_bytes())  # no audio of that name
    jobs = read_jobs(job_folder, tiny_defaults())
    names = {j.name: j for j in jobs.jobs}
    assert set(names) == {"anna", "bob", "cleo"}
    assert names["cleo"].spec.prompt == "A person talks in a bright studio."
    assert names["anna"].spec.output == str(job_folder / "outputs" / "anna.mp4")
    assert [p.where for p in jobs.problems] == ["dora.png"]
    assert "no audio file of the same name" in jobs.problems[0].message


def test_csv_batch_with_one_service(tmp_path):
    shutil.copy(EXAMPLES / "portrait.jpg", tmp_path / "face.jpg")
    shutil.copy(EXAMPLES / "speech.wav", tmp_path / "talk.wav")
    csv = tmp_path / "jobs.csv"
    csv.write_text(
        "name,image,audio,prompt,seed,steps\n"
        "# a comment line\n"
        "first,face.jpg,talk.wav,A person talks.,1,\n"
        "bad,face.jpg,missing.wav,,2,\n"
        "second,face.jpg,talk.wav,\"Talks, then smiles.\",3,1\n"
        "worse,face.jpg,talk.wav,,x,\n",
        encoding="utf-8",
    )
    service = JobService()
    jobs = read_jobs(csv, tiny_defaults(), tmp_path / "out")
    plan = plan_batch(jobs, service)
    assert service.loads == 0, "checking loads nothing"
    problems = {p.where: p.message for p in plan.problems}
    assert set(problems) == {"jobs.csv line 4", "jobs.csv line 6"}
    assert "missing.wav does not exist" in problems["jobs.csv line 4"]
    assert problems["jobs.csv line 6"] == "seed must be a whole number, got 'x'."
    assert [p.job.name for p in plan.jobs] == ["first", "second"]
    assert plan.jobs[1].spec.prompt == "Talks, then smiles." and plan.jobs[1].spec.seed == 3

    events = []

    class Recorder(BatchObserver):
        def job_finished(self, outcome, status):
            events.append((outcome.name, outcome.status, status.done, status.left))

    report = run_batch(plan, service, Recorder())
    assert report.loads == 1 and service.loads == 1
    assert [(o.name, o.status) for o in report.outcomes] == [("first", DONE), ("bad", BAD), ("second", DONE),
                                                              ("worse", BAD)]
    assert events == [("first", DONE, 1, 1), ("second", DONE, 2, 0)]
    for name in ("first", "second"):
        check_mp4(tmp_path / "out" / f"{name}.mp4")
    assert not report.ok


def test_jobs_are_grouped_by_model_settings(tmp_path):
    lines = [
        {"name": "a", "image": "portrait.jpg", "audio": "speech.wav"},
        {"name": "b", "image": "portrait.jpg", "audio": "speech.wav", "variant": "multi"},
        {"name": "c", "image": "portrait.jpg", "audio": "speech.wav", "seed": 5},
        {"name": "d", "image": "portrait.jpg", "audio": "speech.wav", "frame-num": 9},
    ]
    jsonl = tmp_path / "jobs.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n", encoding="utf-8")
    shutil.copy(EXAMPLES / "portrait.jpg", tmp_path)
    shutil.copy(EXAMPLES / "speech.wav", tmp_path)
    plan = plan_batch(read_jobs(jsonl, tiny_defaults()), JobService())
    assert [p.job.name for p in plan.jobs] == ["a", "c", "d", "b"]
    assert plan.groups == 2
    assert plan.jobs[2].spec.frame_num == 9
    assert [p.where for p in plan.problems] == ["jobs.jsonl line 5"]


def test_official_json_list_and_bad_files(tmp_path):
    data = [
        {"prompt": "One.", "cond_video": str(EXAMPLES / "portrait.jpg"), "cond_audio": {"person1": str(EXAMPLES / "speech.wav")}},
        {"prompt": "Two.", "cond_video": str(EXAMPLES / "portrait.jpg"), "cond_audio": {"person1": str(EXAMPLES / "speech.wav")},
         "output": "two", "seed": 9},
    ]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    jobs = read_jobs(path, tiny_defaults())
    assert not jobs.problems
    first, second = (j.spec for j in jobs.jobs)
    assert first.image == str(EXAMPLES / "portrait.jpg") and first.prompt == "One."
    assert second.output == str(tmp_path / "outputs" / "two.mp4") and second.seed == 9
    assert jobs.jobs[0].name == "portrait_speech"  # image stem + audio stem when they differ

    bad = tmp_path / "jobs.csv"
    bad.write_text("image,audio,colour\nface.jpg,talk.wav,red\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"jobs.csv line 1: unknown column\(s\) colour"):
        read_jobs(bad, tiny_defaults())
    with pytest.raises(InputError, match="not a job list"):
        read_jobs(EXAMPLES / "speech.wav", tiny_defaults())


def test_check_only_loads_nothing(tmp_path, capsys):
    csv = tmp_path / "jobs.csv"
    csv.write_text(f"image,audio,output\n{EXAMPLES / 'portrait.jpg'},{EXAMPLES / 'speech.wav'},a\n"
                   f"{EXAMPLES / 'portrait.jpg'},{EXAMPLES / 'speech.wav'},a\n", encoding="utf-8")
    rc = main(["batch", str(csv), "--check", *SHORT])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad: jobs.csv line 3: its output a.mp4 is also written by jobs.csv line 2" in err
    assert not (tmp_path / "outputs").exists()
    assert main(["batch", str(csv), "--check", "--set", "colour=red"]) == 2
    assert "--set colour=red: unknown field(s) colour" in capsys.readouterr().err


def test_example_csv_plans(tmp_path):
    jobs = read_jobs(EXAMPLES / "jobs.csv", tiny_defaults(), tmp_path)
    plan = plan_batch(jobs, JobService())
    assert not plan.problems and len(plan.jobs) >= 2
    assert all(p.spec.output.startswith(str(tmp_path)) for p in plan.jobs)
    assert plan.kept == [] and plan.groups == 1


def cli_defaults(folder: Path) -> JobSpec:
    """The defaults `infinitetalk batch FOLDER *SHORT` gives every job (so a later CLI run matches)."""
    from infinitetalk.batch_cli import _defaults

    return _defaults(build_parser().parse_args(["batch", str(folder), *SHORT]))


def test_interrupted_batch_continues_where_it_stopped(job_folder, capsys):
    for name in ("bob.jpg", "bob.wav"):
        (job_folder / name).unlink()  # two good jobs: anna, then cleo
    token = CancelToken()

    class StopAfterFirstWindowOfCleo(BatchObserver):
        def job_event(self, planned, event, status):
            if planned.job.name == "cleo" and isinstance(event, WindowFinished) and event.index == 0:
                token.cancel()  # as Ctrl-C does: the job stops at its next step, window 1 kept

    service = JobService()
    plan = plan_batch(read_jobs(job_folder, cli_defaults(job_folder)), service)
    windows = {p.job.name: p.windows for p in plan.jobs}
    assert windows["cleo"] >= 3
    report = run_batch(plan, service, StopAfterFirstWindowOfCleo(), cancel=token)
    assert report.interrupted and report.loads == 1
    assert [(o.name, o.status) for o in report.outcomes] == [("anna", DONE), ("cleo", CANCELLED)]
    out = job_folder / "outputs"
    assert (out / "anna.mp4").is_file() and not (out / "cleo.mp4").exists()
    assert JobDir(out / "cleo.mp4").load_state().next_window == 1
    stamp = (out / "anna.mp4").stat().st_mtime_ns

    # the same batch again (as a person would run it): anna is kept, cleo continues at window 2
    rc = main(["batch", str(job_folder), *SHORT])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "1 job(s) to make, 1 already made, 0 bad; 1 model setting(s) to load" in err
    assert f"[1/1] cleo: resuming at window 2/{windows['cleo']} (" in err, err
    assert "models loaded: 1;" in err
    assert (out / "anna.mp4").stat().st_mtime_ns == stamp
    check_mp4(out / "cleo.mp4")
    assert not JobDir(out / "cleo.mp4").exists()


def test_job_failing_while_generating_is_reported_and_the_batch_goes_on(job_folder):
    for name in ("bob.jpg", "bob.wav"):
        (job_folder / name).unlink()
    service = JobService()
    plan = plan_batch(read_jobs(job_folder, tiny_defaults()), service)
    assert [p.job.name for p in plan.jobs] == ["anna", "cleo"] and not plan.problems  # both pass the checks
    steps: dict[str, int] = {}
    stack = contextlib.ExitStack()

    class DiskFillsDuringAnna(BatchObserver):
        """anna's writes hit a file-size limit (the disk "fills" while it runs); cleo's do not."""

        def job_started(self, index, planned, status):
            if planned.job.name == "anna":
                stack.enter_context(file_size_limit(16 * 1024))

        def job_event(self, planned, event, status):
            if isinstance(event, StepFinished):
                steps[planned.job.name] = steps.get(planned.job.name, 0) + 1

        def job_finished(self, outcome, status):
            stack.close()

    try:
        report = run_batch(plan, service, DiskFillsDuringAnna())
    finally:
        stack.close()
    outcomes = {o.name: o for o in report.outcomes}
    assert outcomes["anna"].status == FAILED and outcomes["cleo"].status == DONE, report.outcomes
    assert steps.get("anna", 0) >= 1, "anna failed while generating, after its first sampling step"
    message = outcomes["anna"].message
    assert message.startswith("Writing ") and "--resume" in message and "\n" not in message, message
    assert not report.ok and not report.interrupted and report.loads == 1
    out = job_folder / "outputs"
    assert not (out / "anna.mp4").exists()
    check_mp4(out / "cleo.mp4")

"""The web page's logic without a browser: presets, the form -> JobSpec, upload limits, speaker
boxes, interrupted jobs on disk, the error sentence, and the progress HTML."""
from __future__ import annotations

from pathlib import Path

import pytest

from infinitetalk.config import PRESETS, GenerationConfig
from infinitetalk.errors import InputError
from infinitetalk.generation.job_state import JobDir
from infinitetalk.service import JobService
from infinitetalk.ui import forms as F
from infinitetalk.ui import render
from infinitetalk.ui.job_folders import interrupted_jobs, new_job_folder
from infinitetalk.ui.options import UiOptions
from infinitetalk.ui.worker import FINISHED, RUNNING, JobView

REPO = Path(__file__).resolve().parents[1]
PORTRAIT = REPO / "examples" / "portrait.jpg"
SPEECH = REPO / "examples" / "speech.wav"


@pytest.fixture()
def options(tmp_path) -> UiOptions:
    return UiOptions(model="tiny", output_dir=str(tmp_path / "jobs"), open_browser=False)


def test_presets_set_the_official_recommended_values():
    for page_name, key in F.PRESET_NAMES.items():
        for size in (480, 720):
            values = F.preset_values(page_name, size)
            settings = PRESETS[key]["settings"]
            cfg = GenerationConfig(size=size)
            assert values["steps"] == settings.get("sample_steps", cfg.sample_steps)
            assert values["shift"] == settings.get("shift", cfg.resolved_shift)
            assert values["text_guide_scale"] == settings.get("text_guide_scale", cfg.text_guide_scale)
            assert values["audio_guide_scale"] == settings.get("audio_guide_scale", cfg.audio_guide_scale)
    assert F.preset_values(F.FAST, 480)["steps"] == 4 and F.preset_values(F.FUSIONX, 480)["steps"] == 8
    assert F.preset_values(F.QUALITY, 720)["shift"] == 11.0


def test_form_to_spec_two_speakers_with_boxes_passes_the_service_check(options):
    form = F.Form(image=str(PORTRAIT), speakers=F.TWO_ADD, audio1=str(SPEECH), audio2=str(SPEECH),
                  box_mode=F.BOXES_DRAWN, box1="10,20,300,340", box2="330,20,630,340", prompt="two talk",
                  preset=F.FAST, steps=4, seed=7, shift=2, text_guide_scale=1, audio_guide_scale=2, teacache=True,
                  color_correction=0.5, max_seconds=2, frame_num=21, motion_frame=5)
    folder = new_job_folder(options.jobs_dir, "portrait")
    spec, shown = F.build_spec(form, folder, options)
    assert spec.preset == "fast" and spec.steps == 4 and spec.seed == 7 and spec.teacache
    assert spec.audio_type == "add" and spec.bbox1 == (10, 20, 300, 340) and spec.bbox2 == (330, 20, 630, 340)
    assert spec.color_correction == 0.5 and spec.max_seconds == 2 and spec.frame_num == 21
    assert spec.runtime.model == "tiny" and Path(spec.output).parent == folder.root
    # the uploads are copies inside the job folder (stable for a resume), byte for byte
    for path in (spec.image, spec.audio, spec.audio2):
        assert Path(path).is_relative_to(folder.root)
    assert Path(spec.audio).read_bytes() == SPEECH.read_bytes()
    assert shown["boxes"] == "10,20,300,340 / 330,20,630,340" and shown["preset"] == F.FAST
    prepared = JobService().check(spec)
    assert prepared.inputs.boxes == [(10, 20, 300, 340), (330, 20, 630, 340)]
    assert prepared.plan.total_frames == 50


def test_random_seed_and_missing_inputs(options):
    folder = new_job_folder(options.jobs_dir, "x")
    spec, shown = F.build_spec(F.Form(image=str(PORTRAIT), audio1=str(SPEECH), seed=-1), folder, options)
    assert 0 <= spec.seed < 2**31 and shown["seed"] == spec.seed
    with pytest.raises(InputError, match="Upload a portrait image"):
        F.build_spec(F.Form(audio1=str(SPEECH)), folder, options)
    with pytest.raises(InputError, match="speech of speaker 2"):
        F.build_spec(F.Form(image=str(PORTRAIT), audio1=str(SPEECH), speakers=F.TWO_PARA), folder, options)
    with pytest.raises(InputError, match="Draw a box for each speaker"):
        F.build_spec(F.Form(image=str(PORTRAIT), audio1=str(SPEECH), audio2=str(SPEECH), speakers=F.TWO_PARA,
                            box_mode=F.BOXES_DRAWN, box1="1,2,3,4"), folder, options)


def test_upload_limits(tmp_path):
    short = UiOptions(max_audio_seconds=3, output_dir=str(tmp_path))
    with pytest.raises(InputError, match=r"speech\.wav lasts 6\.0 s; this page accepts speech up to 3 s"):
        F.check_upload(str(SPEECH), "speech of speaker 1", short, audio=True)
    small = UiOptions(max_upload_mb=0.01, output_dir=str(tmp_path))
    with pytest.raises(InputError, match=r"portrait\.jpg is 43\.5 KB; this page accepts uploads up to 0\.01 MB"):
        F.check_upload(str(PORTRAIT), "image", small)
    F.check_upload(str(SPEECH), "speech", UiOptions(output_dir=str(tmp_path)), audio=True)  # within the defaults
    assert F.size_text(3 * 2**20 + 2**19) == "3.50 MB" and F.size_text(512) == "0.5 KB"


def test_video_to_dub_duration_limit(tmp_path, media_dir):
    clip = media_dir / "talking_458px_25fps.mp4"
    seconds, frames = F.video_length(clip)
    assert seconds and seconds > 1 and frames and abs(frames - seconds * 25) <= 2
    short = UiOptions(max_video_seconds=1, output_dir=str(tmp_path))
    with pytest.raises(InputError, match=rf"The video to dub {clip.name} lasts {seconds:.1f} s \({frames} frames\); "
                                         r"this page accepts videos up to 1 s \(start it with --max-video-seconds"):
        F.check_upload(str(clip), "video to dub", short, video=True)
    folder = new_job_folder(short.jobs_dir, clip.stem)
    with pytest.raises(InputError, match="--max-video-seconds"):
        F.build_spec(F.Form(task=F.TASK_VIDEO, video=str(clip), audio1=str(SPEECH)), folder, short)
    F.check_upload(str(clip), "video to dub", UiOptions(output_dir=str(tmp_path)), video=True)  # the default: 600 s
    assert F.video_length(SPEECH) == (None, None)  # no video stream: the service's checks say what is wrong


def test_box_clicks_make_two_boxes_and_drawing():
    clicks = F.BoxClicks()
    clicks, b1, b2 = clicks.click(300, 40, "", "")
    assert clicks.pending == (300, 40) and b1 == ""
    clicks, b1, b2 = clicks.click(20, 350, b1, b2)  # corners in any order
    assert b1 == "20,40,300,350" and clicks.next_speaker == 2
    clicks, b1, b2 = clicks.click(330, 30, b1, b2)
    clicks, b1, b2 = clicks.click(620, 340, b1, b2)
    assert b2 == "330,30,620,340" and clicks.next_speaker == 1 and clicks.pending is None
    picture = F.first_frame(str(PORTRAIT), is_video=False)
    drawn = F.draw_boxes(picture, b1, b2, auto=False)
    assert drawn.size == picture.size
    assert drawn.getpixel((20, 200)) != picture.getpixel((20, 200))  # the box edge is drawn
    assert drawn.getpixel((150, 200)) == picture.getpixel((150, 200))  # the inside is left alone


def test_interrupted_jobs_are_listed_until_their_video_exists(options):
    folder = new_job_folder(options.jobs_dir, "portrait")
    spec, shown = F.build_spec(F.Form(image=str(PORTRAIT), audio1=str(SPEECH)), folder, options)
    folder.write_record(spec, "portrait.jpg + speech.wav", shown, windows=2)
    assert interrupted_jobs(options.jobs_dir) == []  # no job state yet: never started
    JobDir(Path(spec.output)).start({"k": 1}, resume=False)  # what the service writes when a job starts
    listed = interrupted_jobs(options.jobs_dir)
    assert [j.folder.id for j in listed] == [folder.id] and listed[0].windows == 2
    assert "(0/2 windows done)" in listed[0].label
    assert interrupted_jobs(options.jobs_dir, busy=[folder.id]) == []  # running now: not offered
    assert folder.read_record()["spec"] == spec
    Path(spec.output).write_bytes(b"done")
    assert interrupted_jobs(options.jobs_dir) == []


def test_bad_upload_gives_the_cli_sentence(options, tmp_path, monkeypatch, capsys):
    from infinitetalk.cli import main
    from infinitetalk.ui.session import Page

    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"not audio " * 200)
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", "tiny", "--image", str(PORTRAIT), "--audio", "noise.wav",
                 "--output", "out.mp4"]) == 2
    cli_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert cli_line.startswith("error: noise.wav ")

    class NoWorker:  # the check happens before any job reaches the worker
        service = JobService()

    page = Page(options, worker=NoWorker())  # type: ignore[arg-type]
    updates = list(page.generate(F.Form(image=str(PORTRAIT), audio1=str(bad)), []))
    assert render.error_status(cli_line[len("error: "):]) == updates[-1].status
    assert not any(options.jobs_dir.iterdir())  # the refused job left no folder


def test_progress_html():
    view = JobView("id", "t", RUNNING, window=1, windows=3, windows_done=1, step=2, steps=4, frames_done=21,
                   frames=50, elapsed_s=12.4, eta_s=30)
    html = render.progress(view)
    assert 'data-windows-done="1"' in html and "window 2: step 2/4" in html and "ETA 00:30" in html
    assert "windows 1/3 · frames 21/50" in html
    done = render.progress(JobView("id", "t", FINISHED, windows=3, windows_done=3, frames=50, elapsed_s=65))
    assert "done: 50 frames in 01:05" in done and "it-bar-steps" not in done
    assert "&lt;b&gt;" in render.status("<b>")


def test_examples_used_by_the_page_exist():
    assert F.examples_dir() == REPO / "examples"


def test_video_dubbing_form_and_its_first_frame(options, media_dir):
    clip = media_dir / "talking_458px_25fps.mp4"
    folder = new_job_folder(options.jobs_dir, clip.stem)
    spec, shown = F.build_spec(F.Form(task=F.TASK_VIDEO, video=str(clip), image=str(PORTRAIT), audio1=str(SPEECH),
                                      steps=1, max_seconds=1), folder, options)
    assert spec.image is None and Path(spec.video).name == clip.name and shown["task"] == "video dubbing"
    prepared = JobService().check(spec)
    assert prepared.inputs.is_video and prepared.plan.total_frames == 25
    frame = F.first_frame(str(clip), is_video=True)
    assert frame is not None and frame.size[0] > 0
    assert F.first_frame(str(SPEECH), is_video=True) is None  # unreadable as a video: no picture, no error


def test_cli_ui_subcommand_parses_and_refuses_bad_options(capsys):
    from infinitetalk.cli import build_parser, main

    args = build_parser().parse_args(["ui", "--model", "tiny", "--port", "7999", "--no-browser", "--max-upload-mb",
                                      "5", "--max-audio-seconds", "30"])
    from infinitetalk.ui.options import options_from_args

    opts = options_from_args(args)
    assert (opts.model, opts.port, opts.open_browser, opts.max_upload_bytes, opts.max_audio_seconds) == \
        ("tiny", 7999, False, 5 * 2**20, 30)
    assert main(["ui", "--port", "70000", "--no-browser"]) == 2
    assert capsys.readouterr().err.strip() == "error: --port must be between 1 and 65535, got 70000."


def test_vram_budget_field_reaches_the_service(options, tmp_path, capsys):
    from infinitetalk.cli import build_parser, main
    from infinitetalk.ui.options import options_from_args
    from infinitetalk.ui.session import Page

    folder = new_job_folder(options.jobs_dir, "portrait")
    base = dict(image=str(PORTRAIT), audio1=str(SPEECH), steps=1, max_seconds=1)
    for given, expected in (("auto", "auto"), ("", "auto"), ("none", None), (" 12 ", 12.0), ("7.5", 7.5)):
        spec, shown = F.build_spec(F.Form(**base, vram=given), folder, options)
        assert spec.runtime.vram == expected, given
        assert shown["vram"] == ("none" if expected is None else str(expected))
    assert JobService().check(spec).model.vram == 7.5  # the budget is part of the loaded model's settings

    # a bad value: the service's own sentence on the page, and no job folder left behind
    class NoWorker:
        service = JobService()

    page = Page(options, worker=NoWorker())  # type: ignore[arg-type]
    for bad in ("lots", "-2"):
        spec, _ = F.build_spec(F.Form(**base, vram=bad), new_job_folder(tmp_path / "direct", "p"), options)
        with pytest.raises(InputError, match="VRAM budget") as info:  # the service refuses it ...
            JobService().check(spec)
        updates = list(page.generate(F.Form(**base, vram=bad), []))
        assert updates[-1].status == render.error_status(str(info.value)), updates[-1].status  # ... the page says so
    assert [p.name for p in options.jobs_dir.iterdir()] == [folder.id]

    # `infinitetalk ui --vram`: the field's starting value, checked at start
    assert options_from_args(build_parser().parse_args(["ui", "--vram", "12"])).vram == "12"
    assert options_from_args(build_parser().parse_args(["ui"])).vram == "auto"
    assert UiOptions(vram="None", output_dir=str(tmp_path)).vram == "none"
    assert main(["ui", "--vram", "lots", "--no-browser"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: --vram must be auto, none or a positive number of GB, got 'lots'."


def test_speech_from_text_in_the_form(options, tmp_path, monkeypatch):
    folder = new_job_folder(options.jobs_dir, "portrait")
    script = "(s1) Hello there. (s2) Hi, how are you?"
    form = F.Form(image=str(PORTRAIT), audio1=str(SPEECH), speakers=F.TWO_PARA, box_mode=F.BOXES_DRAWN,
                  box1="10,20,300,340", box2="330,20,630,340", text=f"  {script}\n", voice="af_heart",
                  voice2="am_adam", speed=1.2, steps=1)
    spec, shown = F.build_spec(form, folder, options)
    assert (spec.text, spec.voice, spec.voice2, spec.speed) == (script, "af_heart", "am_adam", 1.2)
    assert spec.audio is None and spec.audio2 is None and spec.audio_type is None  # the uploads are not used
    assert spec.bbox1 == (10, 20, 300, 340)
    assert shown["speech"] == "text, voice af_heart / am_adam, speed 1.2"
    assert F.title_of(form) == "portrait.jpg + text"
    # no speech upload needed with text; without either, one sentence
    spec, _ = F.build_spec(F.Form(image=str(PORTRAIT), text="Hello.", voice="", speed=1), folder, options)
    assert spec.text == "Hello." and spec.voice == F.DEFAULT_VOICE and spec.audio is None
    with pytest.raises(InputError, match="Upload the speech of speaker 1, or write the words to speak"):
        F.build_spec(F.Form(image=str(PORTRAIT), text="   "), folder, options)

    # the service synthesises it (Kokoro with random weights, when the tts extra is installed)
    pytest.importorskip("kokoro", reason="the optional 'tts' extra (kokoro) is not installed")
    from test_tts import make_tts_weights

    from infinitetalk.errors import MissingWeightsError

    empty = UiOptions(model="tiny", output_dir=str(tmp_path / "jobs2"), weights=str(tmp_path / "none"))
    spec, _ = F.build_spec(F.Form(image=str(PORTRAIT), text=script, steps=1), new_job_folder(empty.jobs_dir, "p"), empty)
    with pytest.raises(MissingWeightsError, match="Kokoro-82M"):
        JobService().check(spec)
    weights = make_tts_weights(tmp_path / "weights")
    ready = UiOptions(model="tiny", output_dir=str(tmp_path / "jobs3"), weights=str(weights))
    monkeypatch.setenv("INFINITETALK_SPEECH_CACHE", str(tmp_path / "speech_cache"))
    spec, _ = F.build_spec(F.Form(image=str(PORTRAIT), text=script, steps=1, max_seconds=0.4),
                           new_job_folder(ready.jobs_dir, "p"), ready)
    prepared = JobService().check(spec)
    assert prepared.model.variant == "multi" and prepared.plan.total_frames == 10  # (s2): two speakers


def test_weights_panel_offers_the_preset_loras(tmp_path):
    from infinitetalk.ui.weights_panel import Downloader, download_steps, lora_presets

    assert lora_presets() == ("fast", "fusionx")
    assert download_steps("fast") == 1 and download_steps("single") == 4
    with pytest.raises(InputError, match="Nothing to download called 'colour'"):
        Downloader().start(tmp_path, "colour")

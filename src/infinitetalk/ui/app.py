"""The Gradio page: the form, the live progress and preview, history, interrupted jobs and the
weights panel, wired to `session.Page`. `build_app(options)` makes the Blocks; `serve(options)`
launches it (and opens the browser unless told not to)."""
from __future__ import annotations

import logging
from typing import Optional

import gradio as gr

from ..config import DEFAULT_NEGATIVE_PROMPT
from . import forms as F
from . import render
from .options import UiOptions
from .session import KEEP, Page, Update, internal_error
from .weights_panel import lora_presets

log = logging.getLogger(__name__)

CSS = """
.it-status { padding: 8px 12px; border-radius: 6px; white-space: pre-wrap; }
.it-error { background: #fdecea; color: #8a1c13; border: 1px solid #f5c2bd; }
.it-ok { background: #e8f6ec; color: #17552b; border: 1px solid #b7e1c3; }
.it-info { background: #eef3fb; color: #1d3b66; border: 1px solid #c9d8f0; }
#it-progress progress, #it-download progress { width: 100%; height: 14px; }
.it-progress-head { font-weight: 600; margin: 4px 0; } .it-times { font-weight: 400; color: #555; margin-left: 8px; }
.it-bar-label, .it-notice { font-size: 0.9em; color: #444; }
.it-history-item { display: flex; gap: 12px; margin: 8px 0; padding: 8px; border: 1px solid #ddd; border-radius: 6px; }
.it-history-item video { width: 220px; max-height: 160px; background: #000; }
.it-history-item ul { columns: 2; margin: 4px 0; padding-left: 16px; font-size: 0.85em; }
.it-history-title { font-weight: 600; } .it-history-meta, .it-history-prompt { font-size: 0.85em; color: #555; }
"""

INTRO = """# InfiniteTalk
Talking videos of any length from a portrait (or a video to dub) and speech (or text). Each window of 81 frames appears
below as soon as it is made; a cancelled or interrupted job can be resumed from the list."""


def _keep(value):
    return gr.skip() if value is KEEP else value


def build_app(options: UiOptions, page: Optional[Page] = None) -> tuple[gr.Blocks, Page]:
    page = page or Page(options)
    quality = F.preset_values(F.QUALITY, 480)
    with gr.Blocks(title="InfiniteTalk", analytics_enabled=False) as demo:
        job_id = gr.State(None)
        history = gr.State([])
        clicks = gr.State(F.BoxClicks())
        drawn = gr.State(None)  # what the box picture shows now (see redraw)
        gr.Markdown(INTRO + (f"\n\n**Model: {options.model}**" + (" (small random weights: the videos are noise)"
                                                               if options.model == "tiny" else "")))
        with gr.Row():
            with gr.Column(scale=1):
                task = gr.Radio(list(F.TASKS), value=F.TASK_IMAGE, label="Task", elem_id="it-task")
                image = gr.Image(type="filepath", label="Portrait", elem_id="it-image", sources=["upload", "clipboard"])
                video = gr.Video(label="Video to dub", elem_id="it-video", visible=False, sources=["upload"])
                prompt = gr.Textbox(label="Prompt", placeholder="What the video shows, e.g. a woman talks in a studio",
                                    lines=2, elem_id="it-prompt")
                with gr.Accordion("Speakers and speech", open=True):
                    speakers = gr.Radio(list(F.SPEAKER_MODES), value=F.ONE, label="Speakers", elem_id="it-speakers")
                    audio1 = gr.Audio(type="filepath", label="Speech of speaker 1", elem_id="it-audio1",
                                      sources=["upload"])
                    audio2 = gr.Audio(type="filepath", label="Speech of speaker 2", elem_id="it-audio2",
                                      sources=["upload"], visible=False)
                    with gr.Accordion("Or speech from text (Kokoro voices)", open=False):
                        text = gr.Textbox(label="Words to speak (used instead of the uploads when given; "
                                                "(s1) ... (s2) ... turns make two speakers)", lines=3,
                                          placeholder="(s1) Hello, how are you? (s2) Fine, thanks.", elem_id="it-text")
                        with gr.Row():
                            voice = gr.Dropdown(list(F.VOICES), value=F.DEFAULT_VOICE, allow_custom_value=True,
                                                label="Voice of speaker 1", elem_id="it-voice")
                            voice2 = gr.Dropdown(list(F.VOICES), value=F.DEFAULT_VOICE2, allow_custom_value=True,
                                                 label="Voice of speaker 2", elem_id="it-voice2")
                            speed = gr.Slider(0.5, 2.0, value=1.0, step=0.05, label="Speed", elem_id="it-speed")
                    with gr.Group(visible=False) as box_group:
                        box_mode = gr.Radio(list(F.BOX_MODES), value=F.BOXES_AUTO, label="Where the speakers are",
                                            elem_id="it-box-mode")
                        box_canvas = gr.Image(label="Speaker boxes (click two corners per speaker)", type="pil",
                                              interactive=False, elem_id="it-box-canvas")
                        box_hint = gr.Markdown(F.BoxClicks().hint(), elem_id="it-box-hint")
                        with gr.Row():
                            box1 = gr.Textbox(label="Box of speaker 1 (x_min,y_min,x_max,y_max)", elem_id="it-box1")
                            box2 = gr.Textbox(label="Box of speaker 2", elem_id="it-box2")
                        clear_boxes = gr.Button("Clear the boxes", size="sm")
                with gr.Accordion("Quality and speed", open=True):
                    preset = gr.Radio([(v, k) for k, v in F.PRESET_CHOICES.items()], value=F.QUALITY, label="Preset",
                                      elem_id="it-preset")
                    preset_note = gr.Markdown(F.preset_about(F.QUALITY))
                    size = gr.Radio([("480p", 480), ("720p", 720)], value=480, label="Resolution", elem_id="it-size")
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=quality["steps"], step=1, label="Steps", elem_id="it-steps")
                        seed = gr.Number(value=42, precision=0, label="Seed (-1: random)", elem_id="it-seed")
                    with gr.Row():
                        text_scale = gr.Slider(0, 20, value=quality["text_guide_scale"], step=0.5,
                                               label="Text guidance", elem_id="it-text-scale")
                        audio_scale = gr.Slider(0, 20, value=quality["audio_guide_scale"], step=0.5,
                                                label="Audio guidance", elem_id="it-audio-scale")
                    with gr.Row():
                        shift = gr.Slider(0.5, 20, value=quality["shift"], step=0.5, label="Shift", elem_id="it-shift")
                        colour = gr.Slider(0, 1, value=1.0, step=0.05, label="Colour correction",
                                           elem_id="it-colour")
                    with gr.Row():
                        teacache = gr.Checkbox(False, label="TeaCache (skip some model evaluations)",
                                               elem_id="it-teacache")
                        vram = gr.Dropdown(list(F.VRAM_CHOICES), value=options.vram, allow_custom_value=True,
                                           label="VRAM budget: auto, none (all on the GPU) or GB", elem_id="it-vram")
                with gr.Accordion("Advanced", open=False):
                    negative = gr.Textbox(DEFAULT_NEGATIVE_PROMPT, label="Negative prompt", lines=3,
                                          elem_id="it-negative")
                    length = gr.Radio([F.STREAMING, F.CLIP], value=F.STREAMING, label="Length", elem_id="it-length")
                    max_seconds = gr.Number(0, label="Stop after (seconds, 0 = the whole speech)",
                                            elem_id="it-max-seconds")
                    with gr.Row():
                        frame_num = gr.Number(81, precision=0, label="Frames per window (4n+1)",
                                              elem_id="it-frame-num")
                        motion_frame = gr.Number(9, precision=0, label="Motion frames", elem_id="it-motion-frame")
                with gr.Row():
                    generate = gr.Button("Generate video", variant="primary", elem_id="it-generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="it-cancel")
                status = gr.HTML(render.status("Upload a portrait and speech, then press Generate video."),
                                 elem_id="it-status")
            with gr.Column(scale=2):
                progress = gr.HTML(render.progress(None), elem_id="it-progress-box")
                preview = gr.Video(label="Frames so far (with sound)", interactive=False, elem_id="it-preview",
                                   height=320)
                result = gr.Video(label="Video", interactive=False, elem_id="it-result", height=320)
                examples = F.examples_dir()
                if examples is not None:
                    portrait, speech = str(examples / "portrait.jpg"), str(examples / "speech.wav")
                    gr.Examples(
                        examples=[
                            [F.TASK_IMAGE, portrait, F.ONE, speech, None,
                             "A person is talking to the camera in a bright room, natural head movements."],
                            [F.TASK_IMAGE, portrait, F.TWO_ADD, speech, speech, "Two people take turns talking."],
                            [F.TASK_IMAGE, portrait, F.TWO_PARA, speech, speech, "Two people talk together."],
                        ],
                        inputs=[task, image, speakers, audio1, audio2, prompt], label="Examples (examples/)",
                    )
                with gr.Accordion("Interrupted jobs", open=True):
                    interrupted = gr.Dropdown([], label="Unfinished jobs in " + str(options.jobs_dir),
                                              elem_id="it-interrupted", allow_custom_value=False)
                    with gr.Row():
                        resume = gr.Button("Resume", elem_id="it-resume")
                        refresh = gr.Button("Refresh the list", size="sm", elem_id="it-refresh")
                with gr.Accordion("History (videos made on this page)", open=True):
                    history_html = gr.HTML(render.history([]), elem_id="it-history-box")
                with gr.Accordion("Model weights", open=False):
                    weights_html = gr.HTML(page.weights_html(), elem_id="it-weights-box")
                    with gr.Row():
                        dl_single = gr.Button("Download (one speaker)", size="sm", elem_id="it-download-single")
                        dl_multi = gr.Button("Download (two speakers)", size="sm", elem_id="it-download-multi")
                    with gr.Row():
                        dl_loras = {name: gr.Button(f"Download the {name} LoRA", size="sm",
                                                    elem_id=f"it-download-lora-{name}")
                                    for name in lora_presets()}
                    download_html = gr.HTML("", elem_id="it-download-box")

        # ---- form behaviour ------------------------------------------------------------
        def on_task(value):
            return gr.update(visible=value == F.TASK_IMAGE), gr.update(visible=value == F.TASK_VIDEO)

        task.change(on_task, task, [image, video], queue=False)

        def on_speakers(value):
            two = value != F.ONE
            return gr.update(visible=two), gr.update(visible=two)

        speakers.change(on_speakers, speakers, [audio2, box_group], queue=False)

        def on_preset(name, size_value):
            try:
                v = F.preset_values(name, size_value)
            except Exception as err:  # noqa: BLE001
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), internal_error(err)
            return v["steps"], v["shift"], v["text_guide_scale"], v["audio_guide_scale"], F.preset_about(name)

        preset.change(on_preset, [preset, size], [steps, shift, text_scale, audio_scale, preset_note], queue=False)
        size.change(lambda name, s: F.preset_values(name, s)["shift"], [preset, size], shift, queue=False)

        def redraw(task_value, image_value, video_value, mode, b1, b2, state: F.BoxClicks, shown):
            is_video = task_value == F.TASK_VIDEO
            key = (task_value, video_value if is_video else image_value, mode, b1, b2, state.pending)
            if key == shown:
                return gr.skip(), shown
            picture = F.first_frame(video_value if is_video else image_value, is_video)
            return F.draw_boxes(picture, b1, b2, mode == F.BOXES_AUTO, state.pending), key

        # One redraw at a time, and none that would draw what is shown: Gradio saves the picture under the hash
        # of its bytes, rewriting the file each time, so a second redraw of the same picture (a click changes the
        # boxes and the mode, each a redraw) could truncate the file while the browser reads it: a broken picture
        # that the second answer, with the same address, never replaces (CI saw it).
        canvas_inputs = [task, image, video, box_mode, box1, box2, clicks, drawn]
        canvas_outputs = [box_canvas, drawn]
        one_redraw = dict(concurrency_id="it-box-canvas", concurrency_limit=1)
        for trigger in (image.change, video.change, speakers.change, box_mode.change, box1.change, box2.change):
            trigger(redraw, canvas_inputs, canvas_outputs, **one_redraw)

        def on_click(state: F.BoxClicks, b1, b2, mode, evt: gr.SelectData):
            x, y = evt.index[0], evt.index[1]
            state, b1, b2 = state.click(x, y, b1, b2)
            return state, b1, b2, F.BOXES_DRAWN, state.hint()

        box_canvas.select(on_click, [clicks, box1, box2, box_mode], [clicks, box1, box2, box_mode, box_hint]) \
            .then(redraw, canvas_inputs, canvas_outputs, **one_redraw)
        clear_boxes.click(lambda: (F.BoxClicks(), "", "", F.BoxClicks().hint()), None,
                          [clicks, box1, box2, box_hint]).then(redraw, canvas_inputs, canvas_outputs, **one_redraw)

        # ---- jobs ------------------------------------------------------------------------
        job_outputs = [status, progress, preview, result, history_html, history, job_id, interrupted]

        def to_outputs(update: Update, current_history):
            new_history = update.history
            return (_keep(update.status), _keep(update.progress), _keep(update.preview), _keep(update.result),
                    gr.skip() if new_history is KEEP else render.history(new_history),
                    gr.skip() if new_history is KEEP else new_history,
                    _keep(update.job),
                    gr.skip() if update.interrupted is KEEP else gr.update(choices=update.interrupted, value=None))

        form_inputs = [task, image, video, speakers, audio1, audio2, box_mode, box1, box2, prompt, negative, size,
                       preset, steps, seed, shift, text_scale, audio_scale, teacache, colour, length, max_seconds,
                       frame_num, motion_frame, text, voice, voice2, speed, vram]
        assert len(form_inputs) == len(F.FIELDS), "one component per Form field, in the Form's order"

        def on_generate(*values):
            *fields, current_history = values
            try:
                form = F.Form(**dict(zip(F.FIELDS, fields)))
                for update in page.generate(form, current_history):
                    yield to_outputs(update, current_history)
            except Exception as err:  # noqa: BLE001 - never a traceback on the page
                yield to_outputs(Update(status=internal_error(err)), current_history)

        generate.click(on_generate, form_inputs + [history], job_outputs, concurrency_limit=None)

        def on_resume(choice, current_history):
            try:
                for update in page.resume(choice, current_history):
                    yield to_outputs(update, current_history)
            except Exception as err:  # noqa: BLE001
                yield to_outputs(Update(status=internal_error(err)), current_history)

        resume.click(on_resume, [interrupted, history], job_outputs, concurrency_limit=None)
        cancel.click(page.cancel, job_id, status, concurrency_limit=None)

        def on_refresh():
            return gr.update(choices=page.interrupted_choices(), value=None), page.weights_html()

        refresh.click(on_refresh, None, [interrupted, weights_html])
        demo.load(on_refresh, None, [interrupted, weights_html])

        def downloader(variant):
            def run():
                try:
                    for progress_html, weights in page.download(variant):
                        yield progress_html, _keep(weights)
                except Exception as err:  # noqa: BLE001
                    yield internal_error(err), gr.skip()
            return run

        dl_single.click(downloader("single"), None, [download_html, weights_html])
        dl_multi.click(downloader("multi"), None, [download_html, weights_html])
        for name, button in dl_loras.items():
            button.click(downloader(name), None, [download_html, weights_html])
    return demo, page


def serve(options: UiOptions) -> None:
    """Launch the page and block until Ctrl-C (the worker's job is cancelled on the way out)."""
    demo, page = build_app(options)
    options.jobs_dir.mkdir(parents=True, exist_ok=True)
    allowed = [str(options.jobs_dir.resolve())]
    if F.examples_dir() is not None:
        allowed.append(str(F.examples_dir()))
    demo.queue(default_concurrency_limit=4)
    try:
        demo.launch(server_name=options.host, server_port=options.port, share=options.share,
                    inbrowser=options.open_browser, allowed_paths=allowed, max_file_size=options.max_upload_bytes,
                    ssr_mode=False, css=CSS, footer_links=["gradio", "settings"], show_error=False)
    finally:
        page.worker.stop()

"""The web page (`infinitetalk ui`, `python -m infinitetalk.ui`): a Gradio face over the job service.

    options.py      the command line and `UiOptions` (no gradio import)
    forms.py        the form as data: choices, presets, upload limits, speaker boxes, form -> JobSpec
    job_folders.py  one folder per job under --output-dir (uploads, record, state, preview)
    worker.py       the one worker thread with its JobService; JobHandle = a job's live progress
    session.py      what the buttons do (generate, follow, cancel, resume, download), as plain Python
    render.py       the HTML of the status, progress bars, history and weights panel
    weights_panel.py which official files are found; their download on a thread
    app.py          the Gradio layout and its wiring (`build_app`, `serve`)
"""
from .options import UiOptions, add_ui_parser

__all__ = ["UiOptions", "add_ui_parser"]

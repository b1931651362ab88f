"""The settings of the web page and its command line: `infinitetalk ui ...` and `python -m infinitetalk.ui`.

Nothing here imports gradio: the parser is built for `infinitetalk --help` too, and the page is
only imported when the command runs (with a clear sentence when the `ui` extra is missing).
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import InputError

DEFAULT_MAX_UPLOAD_MB = 200.0
DEFAULT_MAX_AUDIO_SECONDS = 600.0
DEFAULT_MAX_VIDEO_SECONDS = 600.0

UI_EXAMPLES = """\
examples:
  infinitetalk ui                          # http://127.0.0.1:7860, opens the browser
  infinitetalk ui --model tiny             # try the page without weights (random models: noise)
  infinitetalk ui --share --no-browser     # a public gradio.live link (e.g. on Colab)
  infinitetalk ui --vram 12                # the page's VRAM budget starts at 12 GB (DiT blocks stream)
"""


def default_output_dir() -> Path:
    """$INFINITETALK_UI_OUTPUTS, else ~/.cache/infinitetalk/ui-jobs (one folder per job)."""
    env = os.environ.get("INFINITETALK_UI_OUTPUTS")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "infinitetalk" / "ui-jobs"


def check_vram_text(value, what: str = "the VRAM budget") -> str:
    """auto / none / a positive number of GB, as text (normalised); InputError otherwise."""
    text = str(value if value is not None else "none").strip().lower()
    if text in ("auto", "none"):
        return text
    try:
        gb = float(text)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and gb > 0):
        raise InputError(f"{what} must be auto, none or a positive number of GB, got {value!r}.")
    return f"{gb:g}"


@dataclass(frozen=True)
class UiOptions:
    """How the page is served and which model its jobs use by default."""

    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    model: str = "infinitetalk-14b"
    weights: Optional[str] = None
    device: Optional[str] = None
    open_browser: bool = True
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    max_video_seconds: float = DEFAULT_MAX_VIDEO_SECONDS
    output_dir: Optional[str] = None
    vram: str = "auto"  # the page's VRAM budget field starts with this: auto, none or GB

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise InputError(f"--port must be between 1 and 65535, got {self.port}.")
        for name, value in (("--max-upload-mb", self.max_upload_mb), ("--max-audio-seconds", self.max_audio_seconds),
                            ("--max-video-seconds", self.max_video_seconds)):
            if not (math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a positive number, got {value}.")
        object.__setattr__(self, "vram", check_vram_text(self.vram, "--vram"))

    @property
    def jobs_dir(self) -> Path:
        return Path(self.output_dir).expanduser() if self.output_dir else default_output_dir()

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def add_ui_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link")
    parser.add_argument("--model", choices=("infinitetalk-14b", "tiny"), default="infinitetalk-14b",
                        help="infinitetalk-14b (official weights) or tiny (small RANDOM models, no download)")
    parser.add_argument("--weights", metavar="DIR", default=None,
                        help="weights folder (default $INFINITETALK_WEIGHTS or ~/.cache/infinitetalk/weights)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    parser.add_argument("--no-browser", dest="open_browser", action="store_false",
                        help="do not open the page in a browser")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, metavar="N",
                        help=f"largest upload accepted, in MB (default {DEFAULT_MAX_UPLOAD_MB:g})")
    parser.add_argument("--max-audio-seconds", type=float, default=DEFAULT_MAX_AUDIO_SECONDS, metavar="N",
                        help=f"longest speech accepted, in seconds (default {DEFAULT_MAX_AUDIO_SECONDS:g})")
    parser.add_argument("--max-video-seconds", type=float, default=DEFAULT_MAX_VIDEO_SECONDS, metavar="N",
                        help=f"longest video to dub accepted, in seconds (default {DEFAULT_MAX_VIDEO_SECONDS:g})")
    parser.add_argument("--vram", metavar="GB|auto|none", default="auto",
                        help="the VRAM budget the page starts with (default auto: the GPU's free memory; none: "
                             "every model resident; a number: GB, DiT blocks stream from host memory); each job "
                             "may change it on the page")
    parser.add_argument("--output-dir", metavar="DIR", default=None,
                        help="where jobs are kept, one folder each (default $INFINITETALK_UI_OUTPUTS or "
                             "~/.cache/infinitetalk/ui-jobs); interrupted jobs there are listed for resuming")


def options_from_args(args: argparse.Namespace) -> UiOptions:
    return UiOptions(host=args.host, port=args.port, share=args.share, model=args.model, weights=args.weights,
                     device=args.device, open_browser=args.open_browser, max_upload_mb=args.max_upload_mb,
                     max_audio_seconds=args.max_audio_seconds, max_video_seconds=args.max_video_seconds,
                     output_dir=args.output_dir, vram=args.vram)


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the page until Ctrl-C."""
    options = options_from_args(args)
    try:
        from .app import serve
    except ImportError as err:
        if getattr(err, "name", "") and str(err.name).split(".")[0] == "gradio":
            raise InputError("The web page needs gradio: pip install 'infinitetalk[ui]'.") from None
        raise
    serve(options)
    return 0


def add_ui_parser(sub) -> argparse.ArgumentParser:
    """The `ui` subcommand of `infinitetalk`."""
    p = sub.add_parser("ui", help="open the web page (Gradio) for making videos",
                       description="Serve the InfiniteTalk web page: upload a portrait (or a video) and speech, "
                                   "watch each window appear, cancel and resume.",
                       epilog=UI_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_ui_arguments(p)
    p.set_defaults(func=cmd_ui)
    return p

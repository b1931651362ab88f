"""The page's form, as plain data: its choices, the preset values it fills in, the upload
limits, the speaker boxes drawn on the picture, and the JobSpec a filled form describes.

No gradio here: the page (app.py) passes the component values in, so all of this is testable
without a browser.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw

from ..config import DEFAULT_NEGATIVE_PROMPT, DEFAULT_SHIFT, PRESETS, GenerationConfig
from ..errors import InputError
from ..generation.inputs import parse_box
from ..service import JobSpec, RuntimeOptions
from .job_folders import JobFolder
from .options import UiOptions

TASK_IMAGE = "Image-driven (a portrait)"
TASK_VIDEO = "Video dubbing (a video)"
TASKS = (TASK_IMAGE, TASK_VIDEO)

ONE = "One speaker"
TWO_PARA = "Two speakers, at the same time (para)"
TWO_ADD = "Two speakers, one after the other (add)"
SPEAKER_MODES = (ONE, TWO_PARA, TWO_ADD)

BOXES_AUTO = "Left and right halves (automatic)"
BOXES_DRAWN = "Boxes drawn on the picture"
BOX_MODES = (BOXES_AUTO, BOXES_DRAWN)

QUALITY, FAST, FUSIONX = "quality", "fast", "fusionx"
PRESET_CHOICES = {
    QUALITY: "quality: 40 steps, official scales",
    FAST: "fast: 4 steps (lightx2v LoRA)",
    FUSIONX: "fusionx: 8 steps (FusionX LoRA)",
}
PRESET_NAMES = {QUALITY: "default", FAST: "fast", FUSIONX: "fusionx"}  # page name -> config.PRESETS key

STREAMING, CLIP = "streaming (the whole speech)", "clip (one window)"
RANDOM_SEED = -1

# Kokoro-82M voices offered in the page (any other name in WEIGHTS/Kokoro-82M/voices may be typed)
VOICES = ("af_heart", "af_bella", "af_nicole", "af_sarah", "am_adam", "am_michael", "am_fenrir", "bf_emma",
          "bf_isabella", "bm_george", "bm_lewis")
DEFAULT_VOICE, DEFAULT_VOICE2 = "af_heart", "am_adam"
VRAM_CHOICES = ("auto", "none")
SECOND_SPEAKER = re.compile(r"\(\s*s\s*2\s*\)", re.IGNORECASE)  # a (s2) turn: two speakers (see media.tts)
BOX_COLOURS = ("#ff3b30", "#0a84ff")


def examples_dir() -> Optional[Path]:
    """The repository's examples/ folder (beside src/), or ./examples, when it holds the sample files."""
    for candidate in (Path(__file__).resolve().parents[3] / "examples", Path.cwd() / "examples"):
        if (candidate / "portrait.jpg").is_file() and (candidate / "speech.wav").is_file():
            return candidate
    return None


def preset_values(preset: str, size: int) -> dict:
    """Steps, shift and guidance scales the preset sets (the official recommended values)."""
    name = PRESET_NAMES.get(preset)
    if name is None:
        raise InputError(f"Unknown preset {preset!r}; choose one of: {', '.join(PRESET_NAMES)}.")
    cfg = GenerationConfig.from_preset(name, size=int(size))
    return {"steps": cfg.sample_steps, "shift": cfg.resolved_shift, "text_guide_scale": cfg.text_guide_scale,
            "audio_guide_scale": cfg.audio_guide_scale}


def preset_about(preset: str) -> str:
    return PRESETS[PRESET_NAMES[preset]]["about"]


# ---- uploads ---------------------------------------------------------------------------------


def size_text(size: int) -> str:
    """Bytes as people read them: KB below a megabyte, else MB with 2 decimals (never "0.0 MB")."""
    if size < 2**20:
        return f"{size / 1024:.1f} KB"
    return f"{size / 2**20:.2f} MB"


def check_upload(path: Optional[str], what: str, options: UiOptions, audio: bool = False,
                 video: bool = False) -> None:
    """Refuse an upload over the size limit, speech over the duration limit, or a video to dub
    over its duration limit (InputError)."""
    if not path:
        return
    p = Path(path)
    if not p.is_file():
        raise InputError(f"The {what} upload is gone from the server; upload it again.")
    size = p.stat().st_size
    if size > options.max_upload_bytes:
        raise InputError(f"The {what} {p.name} is {size_text(size)}; this page accepts uploads up to "
                         f"{options.max_upload_mb:g} MB (start it with --max-upload-mb to change that).")
    if audio:
        seconds = audio_seconds(p)
        if seconds is not None and seconds > options.max_audio_seconds:
            raise InputError(f"The {what} {p.name} lasts {seconds:.1f} s; this page accepts speech up to "
                             f"{options.max_audio_seconds:g} s (start it with --max-audio-seconds to change that).")
    if video:
        seconds, frames = video_length(p)
        if seconds is not None and seconds > options.max_video_seconds:
            count = f" ({frames} frames)" if frames else ""
            raise InputError(f"The {what} {p.name} lasts {seconds:.1f} s{count}; this page accepts videos up to "
                             f"{options.max_video_seconds:g} s (start it with --max-video-seconds to change that).")


def audio_seconds(path: Path) -> Optional[float]:
    """The declared duration of the first audio stream (None when the file does not say)."""
    from ..media.audio_decode import declared_duration

    seconds = declared_duration(path)
    return seconds if seconds is not None and math.isfinite(seconds) else None


def video_length(path: Path) -> tuple[Optional[float], Optional[int]]:
    """(seconds, frames) of the first video stream as the container declares them; the seconds
    from the frame count and rate when no duration is stored; (None, None) when unreadable (the
    service's checks then say what is wrong with the file)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None, None
            stream = container.streams.video[0]
            frames = int(stream.frames) or None
            seconds = None
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration:
                seconds = container.duration / 1e6
            elif frames and stream.average_rate:
                seconds = frames / float(stream.average_rate)
    except (av.error.FFmpegError, OSError, ValueError):
        return None, None
    return (seconds if seconds is not None and math.isfinite(seconds) else None), frames


# ---- speaker boxes ---------------------------------------------------------------------------


def first_frame(path: Optional[str], is_video: bool) -> Optional[Image.Image]:
    """The picture the boxes are drawn on: the image, or the video's first frame (None if unreadable)."""
    if not path:
        return None
    from ..errors import InfiniteTalkError
    from ..media.frames import VideoFrameReader, load_image

    try:
        if is_video:
            with VideoFrameReader(path) as reader:
                return reader.frame_at(0.0).convert("RGB")
        return load_image(path).convert("RGB")
    except (InfiniteTalkError, OSError):
        return None


def box_text(box: Optional[Sequence[float]]) -> str:
    return "" if box is None else ",".join(str(int(round(v))) for v in box)


def box_from_corners(a: Sequence[float], b: Sequence[float]) -> tuple[int, int, int, int]:
    x0, x1 = sorted((int(round(a[0])), int(round(b[0]))))
    y0, y1 = sorted((int(round(a[1])), int(round(b[1]))))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


@dataclass(frozen=True)
class BoxClicks:
    """Clicks on the picture place the boxes: two corners for speaker 1, then two for speaker 2."""

    pending: Optional[tuple[int, int]] = None  # first corner of the box being drawn
    next_speaker: int = 1

    def click(self, x: float, y: float, box1: str, box2: str) -> tuple["BoxClicks", str, str]:
        point = (int(round(x)), int(round(y)))
        if self.pending is None:
            return BoxClicks(point, self.next_speaker), box1, box2
        text = box_text(box_from_corners(self.pending, point))
        if self.next_speaker == 1:
            return BoxClicks(None, 2), text, box2
        return BoxClicks(None, 1), box1, text

    def hint(self) -> str:
        corner = "second" if self.pending is not None else "first"
        return f"Click the {corner} corner of speaker {self.next_speaker}'s box on the picture."


def draw_boxes(picture: Optional[Image.Image], box1: str, box2: str, auto: bool,
               pending: Optional[tuple[int, int]] = None) -> Optional[Image.Image]:
    """The picture with the speaker boxes (or the automatic halves) drawn on it."""
    if picture is None:
        return None
    out = picture.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    width = max(2, round(max(w, h) / 200))
    boxes: list[Optional[tuple[float, ...]]] = []
    if auto:
        scale = GenerationConfig().face_scale  # the official default halves (see media.frames.reference_masks)
        half = w // 2
        for offset in (0, half):
            boxes.append((half * scale + offset, h * scale, half * (1 - scale) + offset, h * (1 - scale)))
    else:
        for text in (box1, box2):
            try:
                boxes.append(parse_box(text, "speaker") if text and text.strip() else None)
            except InputError:
                boxes.append(None)
    for i, box in enumerate(boxes):
        if box is None:
            continue
        draw.rectangle(box, outline=BOX_COLOURS[i], width=width)
        draw.text((box[0] + 2 * width, box[1] + 2 * width), f"speaker {i + 1}", fill=BOX_COLOURS[i])
    if pending is not None:
        x, y = pending
        r = 3 * width
        draw.ellipse((x - r, y - r, x + r, y + r), outline="#ffd60a", width=width)
    return out


# ---- the job ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Form:
    """Every value of the form that describes a job (as the components give them)."""

    task: str = TASK_IMAGE
    image: Optional[str] = None
    video: Optional[str] = None
    speakers: str = ONE
    audio1: Optional[str] = None
    audio2: Optional[str] = None
    box_mode: str = BOXES_AUTO
    box1: str = ""
    box2: str = ""
    prompt: str = ""
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    size: int = 480
    preset: str = QUALITY
    steps: int = 40
    seed: int = 42
    shift: float = DEFAULT_SHIFT[480]
    text_guide_scale: float = 5.0
    audio_guide_scale: float = 4.0
    teacache: bool = False
    color_correction: float = 1.0
    length: str = STREAMING
    max_seconds: float = 0.0
    frame_num: int = 81
    motion_frame: int = 9
    text: str = ""  # speech from text: used instead of the speech uploads when given
    voice: str = DEFAULT_VOICE
    voice2: str = DEFAULT_VOICE2
    speed: float = 1.0
    vram: str = "auto"


FIELDS = tuple(f.name for f in dataclass_fields(Form))


def _number(value, what: str, cast=float):
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(f"Give a value for {what}.")
    try:
        number = cast(float(value)) if cast is int else cast(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise InputError(f"{what} must be a finite number, got {value!r}.")
    return number


def resolve_seed(seed) -> int:
    value = _number(seed, "the seed", int)
    return random.randrange(0, 2**31 - 1) if value == RANDOM_SEED else value


def vram_value(value) -> "float | str | None":
    """The page's VRAM field -> RuntimeOptions.vram: auto (also empty), none -> None, a number of
    GB -> float; anything else goes to the service as it is, which refuses it with its sentence."""
    text = str(value if value is not None else "").strip()
    if text.lower() in ("", "auto"):
        return "auto"
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def speech_text(form: Form) -> str:
    return (form.text or "").strip()


def title_of(form: Form) -> str:
    source = form.image if form.task == TASK_IMAGE else form.video
    speech = ("text",) if speech_text(form) else tuple(p for p in (form.audio1, form.audio2) if p)
    names = [Path(p).name for p in (source,) if p] + [Path(p).name for p in speech]
    return " + ".join(names) or "video"


def build_spec(form: Form, folder: JobFolder, options: UiOptions) -> tuple[JobSpec, dict]:
    """The JobSpec of a filled form, with the uploads copied into the job's folder, and the
    settings to show in the history. Raises InputError with one sentence for a bad form."""
    if form.task not in TASKS:
        raise InputError(f"Choose the task: {' or '.join(TASKS)}.")
    is_video = form.task == TASK_VIDEO
    source = form.video if is_video else form.image
    if not source:
        raise InputError("Upload a video to dub." if is_video else "Upload a portrait image.")
    if form.speakers not in SPEAKER_MODES:
        raise InputError(f"Choose the speakers: {', '.join(SPEAKER_MODES)}.")
    two = form.speakers != ONE
    text = speech_text(form)  # given: the speech is synthesised from it, the uploads are not used
    if not text and not form.audio1:
        raise InputError("Upload the speech of speaker 1, or write the words to speak.")
    if not text and two and not form.audio2:
        raise InputError("Upload the speech of speaker 2, or choose one speaker.")
    check_upload(source, "video to dub" if is_video else "image", options, video=is_video)
    if not text:
        check_upload(form.audio1, "speech of speaker 1", options, audio=True)
        if two:
            check_upload(form.audio2, "speech of speaker 2", options, audio=True)
    bbox1 = bbox2 = None
    if two and form.box_mode == BOXES_DRAWN:
        if not (form.box1 or "").strip() or not (form.box2 or "").strip():
            raise InputError("Draw a box for each speaker on the picture (two clicks each), "
                             "or choose the automatic halves.")
        bbox1, bbox2 = parse_box(form.box1, "speaker 1"), parse_box(form.box2, "speaker 2")
    size = _number(form.size, "the resolution", int)
    if form.preset not in PRESET_NAMES:
        raise InputError(f"Unknown preset {form.preset!r}; choose one of: {', '.join(PRESET_NAMES)}.")
    max_seconds = _number(form.max_seconds or 0, "the maximum length")
    seed = resolve_seed(form.seed)
    settings = {
        "preset": form.preset, "size": size, "steps": _number(form.steps, "the steps", int), "seed": seed,
        "shift": _number(form.shift, "the shift"),
        "text_guide_scale": _number(form.text_guide_scale, "the text guidance"),
        "audio_guide_scale": _number(form.audio_guide_scale, "the audio guidance"),
        "teacache": bool(form.teacache), "color_correction": _number(form.color_correction, "the colour correction"),
        "mode": "clip" if form.length == CLIP else "streaming",
        "frame_num": _number(form.frame_num, "the frames per window", int),
        "motion_frame": _number(form.motion_frame, "the motion frames", int),
    }
    if max_seconds < 0:
        raise InputError(f"The maximum length must be 0 (the whole speech) or a number of seconds, got {max_seconds:g}.")
    runtime = RuntimeOptions(model=options.model, weights=options.weights, device=options.device,
                             vram=vram_value(form.vram))
    speech: dict = {}
    if text:
        speech = {"text": text, "voice": (form.voice or "").strip() or DEFAULT_VOICE,
                  "voice2": (form.voice2 or "").strip() or DEFAULT_VOICE2, "speed": _number(form.speed, "the speed")}
    else:
        speech = {"audio": folder.add_input(form.audio1, "audio1"),
                  "audio2": folder.add_input(form.audio2, "audio2") if two else None,
                  "audio_type": ("add" if form.speakers == TWO_ADD else "para") if two else None}
    spec = JobSpec(
        output=str(folder.output),
        image=None if is_video else folder.add_input(source, "image"),
        video=folder.add_input(source, "video") if is_video else None,
        **speech,
        bbox1=bbox1, bbox2=bbox2,
        prompt=form.prompt or "", negative_prompt=form.negative_prompt or None,
        preset=PRESET_NAMES[form.preset],
        max_seconds=max_seconds or None,
        runtime=runtime,
        **{k: v for k, v in settings.items() if k != "preset"},
    )
    shown = {"task": "video dubbing" if is_video else "image-driven", "speakers": form.speakers,
             "prompt": form.prompt or "", **settings, "max_seconds": max_seconds or None, "model": options.model,
             "vram": "none" if runtime.vram is None else str(runtime.vram)}
    if text:
        voices = speech["voice"] + (f" / {speech['voice2']}" if SECOND_SPEAKER.search(text) else "")
        shown.update(speakers="from the text", speech=f"text, voice {voices}, speed {speech['speed']:g}")
    if two:
        shown["boxes"] = f"{box_text(bbox1)} / {box_text(bbox2)}" if bbox1 else "automatic halves"
    return spec, shown

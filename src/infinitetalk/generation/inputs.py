"""What the user asks for, checked and decoded before any model is loaded.

`GenerationRequest` is the plain description of a job (files, prompt, speakers, boxes);
`prepare_inputs(request, cfg)` validates everything a user can get wrong and decodes the cheap
parts (image or first video frame, speech tracks, size bucket, speaker masks) into
`PreparedInputs`, raising InputError/MediaError/AudioError with a sentence otherwise. The
pipeline then only runs models on prepared data, so bad input never costs a model load and
never leaves a partial output file.

`request_from_input_json(path)` reads the official `--input_json` format:

    {"prompt": "...", "cond_video": "image-or-video path",
     "cond_audio": {"person1": "a.wav", "person2": "b.wav"},   # person2 optional
     "audio_type": "para" | "add",                              # two speakers only
     "bbox": {"person1": [x_min, y_min, x_max, y_max], "person2": [...]}}   # optional

The official code indexes its masks as `mask[x_min:x_max, y_min:y_max]`, i.e. its "x" runs
along the rows (vertical) and "y" along the columns. Our boxes use x horizontally, so a JSON
box [a, b, c, d] becomes our (x_min, y_min, x_max, y_max) = (b, a, d, c). Relative paths are
taken from the current folder first, then from the JSON file's folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from PIL import Image, UnidentifiedImageError

from ..config import GenerationConfig
from ..errors import InputError, MediaError
from ..media.audio import SPEAKER_MODES, SpeakerTracks, load_speakers
from ..media.images import regular_file, sniff_svg, svg_error
from ..media.frames import (
    VideoFrameReader,
    choose_bucket,
    load_image,
    prepare_frame,
    reference_masks,
    size_buckets,
    validate_box,
)

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
Box = tuple[float, float, float, float]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
VAE_STRIDE = 8  # pixels per latent pixel


@dataclass(frozen=True)
class GenerationRequest:
    """One job, as the user describes it. Exactly one of `image` / `video`.

    `audio2` makes it a two-speaker job (`audio_type` 'para' or 'add'); `boxes` are pixel boxes
    (x_min, y_min, x_max, y_max), x horizontal, one per speaker, only for two speakers.
    `negative_prompt` None means the config's (official) negative prompt.
    `features` are precomputed wav2vec2 features, one float tensor [frames, layers, channels] per
    speaker (25 frames per second); they replace the encoding of the speech, and `audio` is then
    only the sound track of the MP4 (optional for `stream`).
    """

    audio: Optional[PathLike] = None
    image: Optional[PathLike] = None
    video: Optional[PathLike] = None
    audio2: Optional[PathLike] = None
    audio_type: str = "para"
    boxes: Optional[tuple[Optional[Box], Optional[Box]]] = None
    prompt: str = ""
    negative_prompt: Optional[str] = None
    features: Optional[tuple[torch.Tensor, ...]] = field(default=None, compare=False, repr=False)
    normalize_loudness: bool = True  # False for synthesised speech (media.tts), as the official TTS path

    @property
    def speakers(self) -> int:
        if self.features is not None:
            return len(self.features)
        return 2 if self.audio2 is not None else 1

    @property
    def source(self) -> Path:
        return Path(self.image if self.image is not None else self.video)

    def input_files(self) -> list[Path]:
        """Every input file (for checksums)."""
        return [Path(p) for p in (self.image, self.video, self.audio, self.audio2) if p is not None]


@dataclass
class PreparedInputs:
    """Validated, decoded inputs of one job (no model output yet).

    `reference` is the first conditioning frame (float32 [3, 1, H, W] in [-1, 1]; for a video its
    frame at t = 0), also the colour-correction target. `tracks` holds the arranged speaker
    waveforms and their sum (the output sound track). `masks` is the DiT's ref_target_masks
    [3, h, w] at latent resolution.
    """

    request: GenerationRequest
    is_video: bool
    src_hw: tuple[int, int]
    target_hw: tuple[int, int]
    reference: torch.Tensor
    tracks: Optional[SpeakerTracks]
    masks: torch.Tensor
    boxes: Optional[list[tuple[int, int, int, int]]] = None

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.target_hw[0] // VAE_STRIDE, self.target_hw[1] // VAE_STRIDE

    @property
    def audio_frames(self) -> int:
        if self.request.features is not None:
            return int(self.request.features[0].shape[0])
        return self.tracks.num_frames


def _is_image_file(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def _check_file(path: Optional[PathLike], what: str) -> Optional[Path]:
    if path is None:
        return None
    return regular_file(path, what)  # folders, FIFOs, devices and empty files named as such


def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def parse_box(text: Optional[str], who: str) -> Optional[Box]:
    """'x_min,y_min,x_max,y_max' -> a 4-tuple of floats (InputError otherwise)."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise InputError(f"The box of {who} must be four numbers x_min,y_min,x_max,y_max (x horizontal); got {text!r}.")
    return values  # type: ignore[return-value]


def _check_boxes(request: GenerationRequest) -> None:
    boxes = request.boxes
    if not boxes or all(b is None for b in boxes):
        return
    given = [b for b in boxes if b is not None]
    if request.speakers == 1:
        if len(given) > 1:
            raise InputError(
                "Two boxes were given but there is only one speaker: boxes place two speakers. "
                "Give --audio2 for the second speaker, or drop the boxes."
            )
        log.warning("a box is only used with two speakers; ignoring it for one speaker")
        return
    if len(given) != 2:
        raise InputError("With two speakers give a box for each (--bbox1 and --bbox2), or none (left/right halves).")


def prepare_inputs(request: GenerationRequest, cfg: GenerationConfig,
                   buckets: Optional[dict[str, tuple[int, int]]] = None) -> PreparedInputs:
    """Validate the request and decode its inputs (see module doc). No model is used.
    `buckets` replaces the size-bucket table of `cfg.size` ({ratio key: (h, w)})."""
    if (request.image is None) == (request.video is None):
        raise InputError("Give exactly one conditioning input: --image PATH (a portrait) or --video PATH (to dub).")
    if request.speakers == 2 and request.audio_type not in SPEAKER_MODES:
        raise InputError(f"audio type must be 'para' or 'add', got {request.audio_type!r}.")
    _check_boxes(request)
    source = _check_file(request.image if request.image is not None else request.video, "image" if request.image else "video")
    audio = _check_file(request.audio, "audio")
    audio2 = _check_file(request.audio2, "second audio")

    # conditioning frame
    if request.image is not None:
        if sniff_svg(source):
            raise svg_error(source, "--image")
        if not _is_image_file(source) and _looks_like_video(source):
            raise MediaError(f"{source} is a video, not an image: pass it with --video to dub it.")
        first = load_image(source)
        is_video = False
    else:
        if _is_image_file(source):
            raise MediaError(f"{source} is an image, not a video: pass it with --image.")
        with VideoFrameReader(source) as reader:
            first = reader.frame_at(0.0)
        is_video = True
    src_h, src_w = first.height, first.width
    if buckets is None:
        buckets = size_buckets(cfg.size, cfg.bucket_longest_side)
    target_hw = choose_bucket(src_h, src_w, buckets)
    reference = prepare_frame(first, target_hw)

    # boxes (checked against the source size) and speaker masks
    boxes = None
    if request.speakers == 2 and request.boxes and all(b is not None for b in request.boxes):
        boxes = [validate_box(b, src_w, src_h, f"speaker {i + 1}") for i, b in enumerate(request.boxes)]
    latent_hw = (target_hw[0] // VAE_STRIDE, target_hw[1] // VAE_STRIDE)
    masks = reference_masks(src_h, src_w, target_hw, latent_hw, request.speakers, boxes, cfg.face_scale)

    # speech
    if request.features is not None:
        _check_features(request.features)
    tracks = None
    if audio is not None:
        paths = [audio] + ([audio2] if audio2 is not None else [])
        tracks = load_speakers(paths, request.audio_type if len(paths) == 2 else "para",
                               normalize=request.normalize_loudness)
        if tracks.num_frames < 1:
            raise InputError("The speech is shorter than one video frame (40 ms); give a longer audio file.")
    elif request.features is None:
        raise InputError("Give the speech with --audio PATH.")
    return PreparedInputs(
        request=request,
        is_video=is_video,
        src_hw=(src_h, src_w),
        target_hw=target_hw,
        reference=reference,
        tracks=tracks,
        masks=masks,
        boxes=boxes,
    )


def _check_features(features) -> None:
    if not 1 <= len(features) <= 2:
        raise InputError(f"Give audio features for one or two speakers, got {len(features)}.")
    shapes = [tuple(f.shape) for f in features]
    if any(len(s) != 3 or s[0] < 1 for s in shapes) or len({s for s in shapes}) != 1:
        raise InputError(f"Audio features must be one [frames, layers, channels] tensor per speaker, all of one "
                         f"shape; got {shapes}.")


def features_checksum(features) -> str:
    """sha256 of precomputed audio features (their float32 bytes), for the resume key."""
    h = hashlib.sha256()
    for f in features:
        h.update(str(tuple(f.shape)).encode())
        h.update(f.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def boxes_from_official(bbox: dict) -> tuple[Box, ...]:
    """The official in-memory `bbox` dict ({name: [x_min, y_min, x_max, y_max]} with x along the
    ROWS, entries taken in dict order) -> our boxes (x horizontal), in the same order."""
    if not isinstance(bbox, dict) or not 1 <= len(bbox) <= 2:
        raise InputError("bbox must be a dict of one or two boxes, e.g. {'person1': [x0, y0, x1, y1], ...}.")
    return tuple(_json_box(value, str(key)) for key, value in bbox.items())


def _looks_like_video(path: Path) -> bool:
    import av

    try:
        with av.open(str(path)) as c:
            return bool(c.streams.video) and c.format.name not in ("image2", "png_pipe", "jpeg_pipe", "webp_pipe")
    except Exception:  # noqa: BLE001 - any failure means "not a video we can read"
        return False


def input_checksums(request: GenerationRequest) -> dict[str, str]:
    """{resolved path: sha256} of every input file (for the resume settings hash)."""
    return {str(p.resolve()): file_sha256(p) for p in request.input_files()}


# ---- official input JSON ----------------------------------------------------------------


def _json_path(value, base: Path, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise InputError(f"In the input JSON, {key} must be a file path string, got {value!r}.")
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = base / p
    return alt if alt.exists() else p


def _json_box(value, key: str) -> Box:
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(isinstance(v, (int, float)) for v in value):
        raise InputError(f"In the input JSON, bbox.{key} must be a list of four numbers, got {value!r}.")
    a, b, c, d = (float(v) for v in value)
    return (b, a, d, c)  # official rows/cols order -> our x horizontal


def read_input_json(path: PathLike) -> dict:
    """Parse the official input JSON into GenerationRequest keyword arguments (see module doc)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"The input JSON file {p} does not exist.")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{p} is not valid JSON ({err}). Fix the file; see the official examples/*.json format.") from err
    if not isinstance(data, dict):
        raise InputError(f"{p} must hold a JSON object with prompt, cond_video and cond_audio.")
    base = p.parent
    if "cond_video" not in data or "cond_audio" not in data:
        raise InputError(f"{p} needs the keys 'cond_video' (image or video path) and 'cond_audio' ({{'person1': path}}).")
    cond_audio = data["cond_audio"]
    if not isinstance(cond_audio, dict) or "person1" not in cond_audio or not set(cond_audio) <= {"person1", "person2"}:
        raise InputError(f"In {p}, cond_audio must be an object with 'person1' (and optionally 'person2') paths.")
    out: dict = {"audio": _json_path(cond_audio["person1"], base, "cond_audio.person1")}
    if "person2" in cond_audio:
        out["audio2"] = _json_path(cond_audio["person2"], base, "cond_audio.person2")
    cond = _json_path(data["cond_video"], base, "cond_video")
    if cond.exists() and not _is_image_file(cond):
        out["video"] = cond
    else:
        out["image"] = cond
    prompt = data.get("prompt", "")
    if not isinstance(prompt, str):
        raise InputError(f"In {p}, prompt must be a string.")
    out["prompt"] = prompt
    if "audio_type" in data:
        out["audio_type"] = str(data["audio_type"])
    if "bbox" in data:
        bbox = data["bbox"]
        if not isinstance(bbox, dict) or not set(bbox) <= {"person1", "person2"}:
            raise InputError(f"In {p}, bbox must be an object with 'person1'/'person2' boxes.")
        out["boxes"] = tuple(_json_box(bbox[k], k) if k in bbox else None for k in ("person1", "person2"))
    return out


def prompt_hash_material(request: GenerationRequest) -> dict:
    """The request fields that decide the output (paths excluded: files enter by checksum)."""
    return {
        "is_video": request.video is not None,
        "speakers": request.speakers,
        "audio_type": request.audio_type if request.speakers == 2 else None,
        "boxes": [list(b) if b is not None else None for b in request.boxes] if request.boxes else None,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        **({} if request.normalize_loudness else {"normalize_loudness": False}),
    }


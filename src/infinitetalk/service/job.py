"""The plain-data description of one job: what every front end (CLI, UI, HTTP API, batch) builds.

`JobSpec` holds the inputs, the generation settings (None = the preset's or the official
default) and the output path; `RuntimeOptions` the model choices (which weights, device, dtype,
speed and memory options). Both are frozen dataclasses of JSON-ready values, so a job can be
stored (server database, batch file) and rebuilt with `JobSpec.from_dict(spec.to_dict())`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from ..errors import InputError

Box = tuple[float, float, float, float]
Number = Union[int, float]

# JobSpec generation fields -> GenerationConfig fields
SETTING_FIELDS = {
    "size": "size",
    "mode": "mode",
    "steps": "sample_steps",
    "seed": "seed",
    "shift": "shift",
    "text_guide_scale": "text_guide_scale",
    "audio_guide_scale": "audio_guide_scale",
    "color_correction": "color_correction_strength",
    "frame_num": "frame_num",
    "motion_frame": "motion_frame",
    "teacache_thresh": "teacache_thresh",
    "use_apg": "use_apg",
    "apg_momentum": "apg_momentum",
    "apg_norm_threshold": "apg_norm_threshold",
}


@dataclass(frozen=True)
class RuntimeOptions:
    """How the models run. None means "the default for the device".

    model: "infinitetalk-14b" (official weights) or "tiny" (small random models, no files).
    weights: the weights folder (None: $INFINITETALK_WEIGHTS or ~/.cache/infinitetalk/weights).
    variant: "single" / "multi" adapter; None follows the speaker count.
    device: "cuda", "cuda:1", "cpu"; dtype: "bfloat16" / "float16" / "float32".
    fast: the fast GPU path (None: on for CUDA). fp8 / fp8_attention: see `InfiniteTalk.from_pretrained`.
    loras: (path, scale) pairs merged at load; a preset's own LoRA is added by the service.
    files: single-file overrides per component (official, ComfyUI/Kijai, fp8-scaled or GGUF files);
    `weights` may also be a ComfyUI `models/` folder (see `weights.locate`).
    vram: the VRAM budget (`runtime.offload_plan`): DiT blocks stream from host memory and the other
    models sit on the GPU only while they run when the budget needs it.
    """

    model: str = "infinitetalk-14b"
    weights: Optional[str] = None
    variant: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    fast: Optional[bool] = None
    fp8: bool = False
    fp8_attention: bool = False
    loras: tuple[tuple[str, float], ...] = ()
    files: tuple[tuple[str, str], ...] = ()  # (component, file): dit, adapter, t5, wav2vec2, vae, clip
    vram: Union[float, str, None] = "auto"  # GB the job may use on the GPU, "auto" (free memory) or None (all resident)

    def __post_init__(self) -> None:
        object.__setattr__(self, "loras", tuple((str(p), float(s)) for p, s in self.loras))
        object.__setattr__(self, "files", tuple((str(c), str(p)) for c, p in self.files))

    def with_(self, **changes: Any) -> "RuntimeOptions":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class JobSpec:
    """One job. Exactly one of `image` / `video`; `audio` (speaker 1) is required, `audio2` makes
    it a two-speaker job. Boxes are pixel boxes (x_min, y_min, x_max, y_max), x horizontal.
    `input_json` is the official input JSON; fields given here override it. `text` / `text_file`
    replace the audio by synthesised speech (voice, voice2, lang, speed; see `media.tts`).
    `max_seconds` cuts the video; `teacache` turns TeaCache on; other generation fields are
    those of `GenerationConfig` under the CLI's names (see SETTING_FIELDS).
    `resume` continues the unfinished job writing `output` (same settings and files required);
    `restart` discards such a job on purpose (without either, a job with finished windows is
    refused, never deleted). `official_sound` muxes the 16 kHz mono speech the model heard
    instead of the speech at its own rate and channels.
    """

    output: str
    audio: Optional[str] = None
    image: Optional[str] = None
    video: Optional[str] = None
    audio2: Optional[str] = None
    audio_type: Optional[str] = None
    bbox1: Optional[Box] = None
    bbox2: Optional[Box] = None
    prompt: Optional[str] = None
    negative_prompt: Optional[str] = None
    input_json: Optional[str] = None
    text: Optional[str] = None  # speech from text (Kokoro) instead of audio; (s1)/(s2) turns: two speakers
    text_file: Optional[str] = None
    voice: Optional[str] = None
    voice2: Optional[str] = None
    lang: Optional[str] = None
    speed: Optional[float] = None
    save_audio: Optional[str] = None  # keep the synthesised speech track here (.wav)
    preset: Optional[str] = None
    size: Optional[int] = None
    mode: Optional[str] = None
    steps: Optional[int] = None
    seed: Optional[int] = None
    shift: Optional[float] = None
    text_guide_scale: Optional[float] = None
    audio_guide_scale: Optional[float] = None
    color_correction: Optional[float] = None
    frame_num: Optional[int] = None
    motion_frame: Optional[int] = None
    teacache: bool = False
    teacache_thresh: Optional[float] = None
    use_apg: Optional[bool] = None
    apg_momentum: Optional[float] = None
    apg_norm_threshold: Optional[float] = None
    max_seconds: Optional[float] = None
    resume: bool = False
    restart: bool = False
    official_sound: bool = False
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)

    def __post_init__(self) -> None:
        if not isinstance(self.runtime, RuntimeOptions):
            raise TypeError("JobSpec.runtime must be a RuntimeOptions")
        for name in ("bbox1", "bbox2"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))

    def with_(self, **changes: Any) -> "JobSpec":
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict:
        """The GenerationConfig fields this job sets explicitly (None fields left out)."""
        out = {cfg: getattr(self, name) for name, cfg in SETTING_FIELDS.items() if getattr(self, name) is not None}
        if self.teacache:
            out["use_teacache"] = True
        return out

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["runtime"]["loras"] = [list(x) for x in self.runtime.loras]
        data["runtime"]["files"] = [list(x) for x in self.runtime.files]
        for name in ("bbox1", "bbox2"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "JobSpec":
        """Rebuild from `to_dict` output (or hand-written JSON); unknown keys are an InputError."""
        if not isinstance(data, dict):
            raise InputError("A job must be a JSON object of job fields.")
        data = dict(data)
        runtime = data.pop("runtime", None) or {}
        if isinstance(runtime, RuntimeOptions):
            runtime = dataclasses.asdict(runtime)
        known = {f.name for f in fields(cls)}
        rt_known = {f.name for f in fields(RuntimeOptions)}
        unknown = sorted(set(data) - known) + sorted(f"runtime.{k}" for k in set(runtime) - rt_known)
        if unknown:
            raise InputError(f"Unknown job field(s): {', '.join(unknown)}; see `infinitetalk generate --help`.")
        if "output" not in data or not data["output"]:
            raise InputError("A job needs an output path (output).")
        return cls(runtime=RuntimeOptions(**runtime), **data)

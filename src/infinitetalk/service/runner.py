"""`JobService`: the one entry every front end calls to check and run a job.

    service = JobService()                       # keeps loaded models between jobs
    prepared = service.check(spec)               # every input checked, nothing loaded
    result = service.run(spec, progress=print_event, cancel=token)

`check` resolves the preset (settings and LoRA file), the device, dtype and adapter variant,
decodes and validates every input, builds the resume key from the whole job description
(`resume_key`), and refuses a mismatching `resume` before any model loads. `run` then gets a
pipeline (reused when the model settings match the last job's), generates, and maps failures
to typed errors: out of GPU memory (while loading or generating) becomes `DeviceOutOfMemoryError`
with a sentence, a cancel becomes `JobCancelledError` (finished windows kept, the job resumable).
Exactly one of JobFinished / JobFailed / JobCancelled ends the event stream of a job.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..config import FPS, GenerationConfig
from ..devices import resolve_device
from ..errors import DeviceOutOfMemoryError, InfiniteTalkError, InputError, JobCancelledError
from ..progress import CancelToken, ProgressCallback, ProgressTracker
from ..generation.job_state import OutputLock
from ..runtime.offload import release_cached_memory
from .job import JobSpec
from .validate import check_variant

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}

OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass(frozen=True)
class ModelSettings:
    """Everything that decides which models are loaded (the cache key of loaded pipelines)."""

    model: str
    weights: Optional[str]
    variant: str
    device: str
    dtype: str
    fast: bool
    fp8: bool
    fp8_attention: bool
    loras: tuple[tuple[str, float], ...]
    files: tuple[tuple[str, str], ...] = ()
    vram: Union[float, str, None] = "auto"
    vram_size: int = 720  # the size bucket set the memory plan must fit

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class PreparedJob:
    """A checked job: the decoded inputs, the resolved settings and its resume key."""

    spec: JobSpec
    output: Path
    inputs: object  # generation.inputs.PreparedInputs
    config: GenerationConfig
    plan: object  # generation.windows.WindowPlan
    model: ModelSettings
    key: dict  # the resume key (see resume_key)
    notices: list = field(default_factory=list)  # what the job ignores or cuts (Notice events)


@dataclass(frozen=True)
class JobResult:
    output: Path
    frames: int
    duration_s: float
    windows: int
    seconds: float


def resolve_config(spec: JobSpec) -> GenerationConfig:
    """The GenerationConfig of a job: preset, then explicit fields, then the model's defaults."""
    from ..generation.components import config_for

    settings = spec.settings()
    if spec.max_seconds is not None:
        if not (isinstance(spec.max_seconds, (int, float)) and math.isfinite(spec.max_seconds) and spec.max_seconds > 0):
            raise InputError(f"max seconds must be a positive number of seconds, got {spec.max_seconds}.")
        settings["max_frames"] = max(1, int(spec.max_seconds * FPS + 1e-6))
    base = GenerationConfig.from_preset(spec.preset) if spec.preset else None
    return config_for(spec.runtime.model, base, **settings)


def check_layout(spec: JobSpec, world: int, branch_groups: Optional[int] = None) -> None:
    """Whether `world` ranks (and the forced `branch_groups`) can share this job: InputError if not.
    A front end asks this before it starts the ranks (`infinitetalk generate --gpus N`)."""
    if world <= 1 and not branch_groups:
        return
    from ..generation.guidance import branches_for
    from ..runtime.parallel import model_heads, plan_layout

    cfg = resolve_config(spec)
    plan_layout(world, len(branches_for(cfg.text_guide_scale)), model_heads(spec.runtime.model), cfg.latent_frames,
                branch_groups)


def build_request(spec: JobSpec):
    """The GenerationRequest of a job (input JSON first, explicit fields on top)."""
    from ..generation.inputs import GenerationRequest, read_input_json

    fields: dict = read_input_json(spec.input_json) if spec.input_json else {}
    if spec.image or spec.video:
        fields.pop("image", None)
        fields.pop("video", None)
        fields["image" if spec.image else "video"] = spec.image or spec.video
    for key in ("audio", "audio2", "prompt", "negative_prompt", "audio_type"):
        value = getattr(spec, key)
        if value is not None:
            fields[key] = value
    fields.update(_speech_fields(spec, fields))
    if spec.bbox1 is not None or spec.bbox2 is not None:
        fields["boxes"] = (spec.bbox1, spec.bbox2)
    if "audio" not in fields:
        raise InputError("Give the speech with --audio PATH or the words with --text (or cond_audio.person1 in "
                         "--input-json).")
    if "image" not in fields and "video" not in fields:
        raise InputError("Give a portrait with --image PATH or a video to dub with --video PATH.")
    if fields.get("image") and fields.get("video"):
        raise InputError("Give either an image or a video, not both.")
    return GenerationRequest(**fields)


SPEECH_FIELDS = ("text", "text_file", "voice", "voice2", "lang", "speed", "save_audio")


def _speech_fields(spec: JobSpec, fields: dict) -> dict:
    """text / text_file: synthesise the speech (media.tts) into ordinary audio keywords."""
    if spec.text is None and spec.text_file is None:
        given = [f for f in SPEECH_FIELDS if getattr(spec, f) is not None]
        if given:
            raise InputError(f"{', '.join('--' + g.replace('_', '-') for g in given)}: these options go with --text "
                             "or --text-file (speech from text).")
        return {}
    from ..media.tts import speech_request_fields

    if fields.get("audio") is not None or fields.get("audio2") is not None:
        raise InputError("Give the speech either with --audio or with --text / --text-file, not both.")
    opts = {f: getattr(spec, f) for f in SPEECH_FIELDS if getattr(spec, f) is not None}
    protect = {k: fields[k] for k in ("image", "video") if fields.get(k)}
    out = speech_request_fields({**opts, **protect}, weights=spec.runtime.weights,
                                device=str(resolve_device(spec.runtime.device)))
    return {"audio2": None, **{k: v for k, v in out.items() if k not in ("image", "video")}}


def _vram(value) -> Union[float, str, None]:
    if value is None or value == "auto":
        return value
    try:
        gb = float(value)
    except (TypeError, ValueError):
        raise InputError(f"The VRAM budget must be a number of GB or 'auto', got {value!r}.") from None
    if not (math.isfinite(gb) and gb > 0):
        raise InputError(f"The VRAM budget must be a positive number of GB, got {value!r}.")
    return gb


def resolve_model(spec: JobSpec, speakers: int, size: int = 720) -> ModelSettings:
    from ..generation.components import MODEL_NAMES, default_dtype

    rt = spec.runtime
    if rt.model not in MODEL_NAMES:
        raise InputError(f"Unknown model {rt.model!r}; choose one of: {', '.join(MODEL_NAMES)}.")
    variant = rt.variant or ("multi" if speakers == 2 else "single")
    if variant not in ("single", "multi"):
        raise InputError(f"Unknown adapter variant {variant!r}; use single or multi.")
    check_variant(variant, speakers)
    device = resolve_device(rt.device)
    if rt.dtype is not None and rt.dtype not in DTYPES:
        raise InputError(f"Unknown dtype {rt.dtype!r}; use one of: {', '.join(sorted(DTYPES))}.")
    dtype = DTYPES[rt.dtype] if rt.dtype else default_dtype(device)
    loras = []
    for path, scale in rt.loras:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InputError(f"The LoRA file {p} does not exist.")
        if not math.isfinite(scale):
            raise InputError(f"The LoRA scale of {p.name} must be a finite number, got {scale}.")
        loras.append((str(p.resolve()), float(scale)))
    if spec.preset and not loras and rt.model != "tiny":
        from ..weights.hub import preset_lora

        found = preset_lora(rt.weights, spec.preset)
        if found is not None:
            loras.append((str(found[0]), float(found[1])))
    if loras and rt.model == "tiny":
        raise InputError("LoRAs change the official 14B weights; the tiny random model takes none.")
    fast = (device.type == "cuda") if rt.fast is None else bool(rt.fast)
    dtype_name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    weights = str(Path(rt.weights).expanduser()) if rt.weights else None
    files = []
    for component, path in rt.files:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InputError(f"The {component} file {p} does not exist.")
        files.append((component, str(p.resolve())))
    if files and rt.model == "tiny":
        raise InputError("The tiny random model loads no files; drop the component file options or use the 14B model.")
    return ModelSettings(rt.model, weights, variant, str(device), dtype_name, fast, bool(rt.fp8),
                         bool(rt.fp8_attention), tuple(loras), tuple(sorted(files)), _vram(rt.vram), int(size))


def _is_hub_id(weights: Optional[str]) -> bool:
    from ..weights.hub import is_hub_id

    return weights is not None and is_hub_id(weights)


def component_files(settings: ModelSettings):
    """The files of every component (official layout, ComfyUI folder, overrides); see weights.locate."""
    from ..weights.locate import locate_components

    return locate_components(settings.weights, settings.variant, dict(settings.files))


def resume_key(inputs, cfg: GenerationConfig, model: ModelSettings, files=None) -> dict:
    """Everything that decides the video of a job, and nothing else (the output path, the
    weights folder's location, the progress display are not in it). Built in this one place;
    `InfiniteTalk.generate` uses the same `job_settings` for jobs started from Python.

    The model files enter by identity (`file_identity`: name and size, never their folder), so
    another DiT (GGUF, fp8-scaled) or LoRA changes the key and a moved weights folder does not.
    `files`: the located components when the caller has them (else located here)."""
    from ..generation.components import job_settings, runtime_settings

    runtime = runtime_settings(model.fp8, model.loras, model.fp8_attention, fast=model.fast)
    runtime["loras"] = [[Path(path).name, _size(Path(path)), scale] for path, scale in model.loras]
    if model.model != "tiny" and not _is_hub_id(model.weights):
        from ..weights.locate import COMPONENTS

        located = files if files is not None else component_files(model)
        runtime["files"] = {comp: file_identity(located.path(comp)) for comp in COMPONENTS}
    return job_settings(inputs, cfg, model.model, model.variant, torch.device(model.device), model.torch_dtype,
                        runtime)


def file_identity(path: Optional[Path]) -> Optional[list]:
    """A cheap identity of a component's file: [name, size]; of an official folder the names and
    sizes of its weight files; None when nothing was found. No folder path enters it."""
    from ..weights.locate import WEIGHT_EXTENSIONS

    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        return sorted([f.name, _size(f)] for f in path.iterdir()
                      if f.is_file() and f.name.lower().endswith(WEIGHT_EXTENSIONS))
    return [path.name, _size(path)]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


class JobService:
    """Checks and runs jobs; keeps up to `max_models` loaded pipelines for reuse.

    `loader(settings) -> InfiniteTalk` builds a pipeline (default: `InfiniteTalk.from_pretrained`).
    One job runs at a time per service (a lock); run one service per GPU.
    """

    def __init__(self, max_models: int = 1, loader: Optional[Callable[[ModelSettings], object]] = None,
                 parallel: Optional[object] = None):
        self.max_models = max(1, int(max_models))
        self.parallel = parallel  # runtime.parallel.ParallelContext: this process is one rank of a job
        self._loader = loader or self._load
        self._pipes: "OrderedDict[ModelSettings, object]" = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # pipelines built so far (for tests and metrics)

    # ---- checking ------------------------------------------------------------------------
    def check(self, spec: JobSpec) -> PreparedJob:
        """Validate and decode everything of `spec` without loading a model (typed errors):
        fields and ranges, paths (the output never an input), inputs, model choice, the job
        folder (lock, resume state verified, finished windows never discarded silently), and
        the output folder's writability and free space (see `service.validate`).

        When this process is one rank of a parallel job, the first rank checks (the output lock,
        the job folder and speech synthesis happen once) and the others receive its result."""
        ctx = self.parallel
        if ctx is None or ctx.world == 1:
            return self._check_here(spec)
        outcome = None
        if ctx.is_leader:
            try:
                outcome = ("ok", self._check_here(spec))
            except InfiniteTalkError as err:
                outcome = ("error", str(err))
                ctx.broadcast_object(outcome)
                raise
            except Exception as err:
                ctx.broadcast_object(("internal", f"{type(err).__name__}: {err}"))
                raise
        kind, value = ctx.broadcast_object(outcome)
        if kind == "error":
            raise InfiniteTalkError(value)
        if kind == "internal":
            raise RuntimeError(f"the first rank failed while checking the job: {value}")
        if ctx.is_leader:
            return value
        local = str(resolve_device(spec.runtime.device))  # this rank's own GPU
        return replace(value, model=replace(value.model, device=local))

    def _check_here(self, spec: JobSpec) -> PreparedJob:
        from ..generation.inputs import prepare_inputs
        from ..generation.job_state import JobDir, OutputLock
        from ..generation.pipeline import InfiniteTalk
        from . import validate

        if not spec.output:
            raise InputError("Give the output file with --output PATH (an .mp4).")
        validate.check_fields(spec)
        output = Path(spec.output).expanduser()
        request = build_request(spec)
        validate.check_output(output, validate.input_paths(spec, request))
        cfg = resolve_config(spec)
        inputs = prepare_inputs(request, cfg)
        model = resolve_model(spec, request.speakers, cfg.size)
        located = None
        if model.model != "tiny" and not _is_hub_id(model.weights):
            located = component_files(model).require()  # missing weights: the list and the download command, now
        key = resume_key(inputs, cfg, model, located)
        busy = OutputLock.holder(output)
        if busy:
            from ..errors import OutputBusyError

            raise OutputBusyError(busy)
        job = JobDir(output)
        job.check_start(key, spec.resume, spec.restart)
        plan = InfiniteTalk.plan(inputs, cfg)
        done_bytes = 0
        if spec.resume and job.exists():
            h, w = inputs.target_hw
            state = job.verify(plan, (3, cfg.motion_frame, h, w), model.device)
            done_bytes = sum(job.segment_path(i).stat().st_size for i in range(state.next_window)) if state else 0
        validate.check_storage(output, plan, inputs.target_hw, done_bytes)
        notes = validate.notices(spec, request, inputs, plan, cfg)
        return PreparedJob(spec, output, inputs, cfg, plan, model, key, notes)

    # ---- models --------------------------------------------------------------------------
    def _load(self, settings: ModelSettings):
        from ..generation.pipeline import InfiniteTalk

        files = component_files(settings) if settings.model != "tiny" and not _is_hub_id(settings.weights) else None
        return InfiniteTalk.from_pretrained(
            settings.weights, device=settings.device, dtype=settings.torch_dtype, variant=settings.variant,
            model=settings.model, fast=settings.fast, fp8=settings.fp8, loras=settings.loras,
            fp8_attention=settings.fp8_attention, files=files, vram_budget=settings.vram, vram_size=settings.vram_size,
            parallel=self.parallel,
        )

    def pipeline(self, settings: ModelSettings, tracker: Optional[ProgressTracker] = None):
        """The loaded pipeline for `settings` (built once, then reused while it stays cached)."""
        if settings in self._pipes:
            self._pipes.move_to_end(settings)
            return self._pipes[settings]
        while len(self._pipes) >= self.max_models:
            _, old = self._pipes.popitem(last=False)
            del old
            release_cached_memory()  # its GPU segments and pinned host arenas, not just back to PyTorch's caches
        tracker = tracker or ProgressTracker()
        with tracker.stage("load", f"loading {settings.model} ({settings.variant}) on {settings.device}"):
            pipe = self._loader(settings)
        self.loads += 1
        self._pipes[settings] = pipe
        return pipe

    def loaded(self) -> list[ModelSettings]:
        return list(self._pipes)

    def close(self) -> None:
        self._pipes.clear()
        release_cached_memory()

    # ---- running -------------------------------------------------------------------------
    def run(self, spec: JobSpec, progress: Optional[ProgressCallback] = None,
            cancel: Optional[CancelToken] = None, prepared: Optional[PreparedJob] = None) -> JobResult:
        """Check (unless `prepared` is given) and run one job; see the module doc."""
        tracker = ProgressTracker(progress, cancel)
        t0 = time.monotonic()
        try:
            with self._lock:
                job = prepared if prepared is not None else self.check(spec)
                if job.model.model == "tiny":
                    tracker.notice("the tiny model uses small RANDOM weights: the video is noise, not a face "
                                   "(for trying the tool and for tests)", level="warning")
                for note in job.notices:
                    tracker.notice(note, level="warning")
                if job.model.model != "tiny" and job.model not in self._pipes and not _is_hub_id(job.model.weights):
                    for note in component_files(job.model).notes:
                        tracker.notice(note)
                tracker.check_cancel()
                leader = self.parallel is None or self.parallel.is_leader  # the other ranks write nothing
                with (OutputLock(job.output) if leader else contextlib.nullcontext()) as lock:
                    fresh = job.model not in self._pipes
                    try:
                        pipe = self.pipeline(job.model, tracker)
                    except OUT_OF_MEMORY as err:
                        release_cached_memory()  # what the failed load had placed, GPU and pinned host
                        raise DeviceOutOfMemoryError(
                            "The GPU ran out of memory while loading the models; give a smaller VRAM budget with "
                            "--vram GB (DiT blocks then stream from host memory), add --fp8, or use --size 480."
                        ) from err
                    if fresh and getattr(pipe, "memory_plan", None) and pipe.memory_plan():
                        tracker.notice(pipe.memory_plan())
                    tracker.check_cancel()
                    try:
                        path = pipe.generate(job.output, inputs=job.inputs, config=job.config, progress=tracker,
                                             resume=spec.resume, cancel=cancel, settings=job.key,
                                             restart=spec.restart, lock=lock,
                                             sound="official" if spec.official_sound else "original")
                    except OUT_OF_MEMORY as err:
                        raise DeviceOutOfMemoryError(
                            "The GPU ran out of memory; use a smaller --size, fewer speakers, --fp8, or a GPU with "
                            "more memory (the finished windows are kept: add --resume to continue)."
                        ) from err
        except JobCancelledError as err:
            nxt = _finished_windows(Path(spec.output).expanduser())
            tracker.cancelled(str(err), nxt, resumable=nxt > 0)
            raise
        except InfiniteTalkError as err:
            tracker.failed(str(err), type(err).__name__)
            raise
        except Exception as err:
            tracker.failed(f"internal error: {type(err).__name__}: {err}", type(err).__name__)
            raise
        return JobResult(path, job.plan.total_frames, job.plan.duration_s, len(job.plan), time.monotonic() - t0)


def _finished_windows(output: Path) -> int:
    from ..generation.job_state import JobDir

    try:
        state = JobDir(output).load_state()
    except InfiniteTalkError:
        return 0
    return state.next_window if state is not None else 0


def run(spec: JobSpec, progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
        service: Optional[JobService] = None) -> JobResult:
    """Run one job with `service` (a fresh one, dropped after the job, when None)."""
    return (service or JobService()).run(spec, progress=progress, cancel=cancel)



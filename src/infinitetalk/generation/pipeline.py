"""`InfiniteTalk`: load the models once, then make talking videos of any length.

    from infinitetalk.generation.pipeline import InfiniteTalk
    pipe = InfiniteTalk.from_pretrained("~/weights")             # or model="tiny" (random)
    pipe.generate("out.mp4", image="face.png", audio="speech.wav", prompt="A woman talks.")
    for chunk in pipe.stream(image="face.png", audio="speech.wav"):   # frames as they are made
        chunk.frames                                               # uint8 [n, H, W, 3]

One-way flow (DESIGN.md): inputs are checked and decoded first (`generation.inputs`), then
speech -> wav2vec2 features and prompt -> umT5 (once per job); the window plan
(`generation.windows`) drives one window at a time: CLIP features and the image latent `y` of the
window's reference frame (recomputed only when that frame changes: once for an image, per
window for a dubbed video, whose reference is the source frame at the window's start time),
the motion latents (first window: the reference frame; later: the last `motion_frame` decoded
frames), the sampler (`generation.sampler`) with the DiT, the VAE decode, colour correction
towards the first reference frame, and the new frames go to the caller (`stream`) or into one
H.264 segment each plus the resume state (`generate`, see `generation.job_state`), which are
packet-copied with the AAC speech into the final MP4 at the end.

Random numbers follow the official loop for a seed: one generator seeded once; per window the
initial noise, then (windows after the first) the motion re-noising draws inside the sampler.
Host memory holds one window of frames at a time, so it does not grow with the video length.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
import contextlib
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ..config import FPS, GenerationConfig
from ..errors import InputError
from ..media.frames import VideoFrameReader, bucket_hw as _bucket_hw, prepare_frame
from ..media.segments import concat_segments, write_segment
from ..media.soundtrack import sound_track
from ..media.writer import to_uint8_frames
from ..progress import CancelToken, ProgressCallback, ProgressTracker
from ..runtime.host_memory import trim_host_heap
from .audio_windows import audio_for_window
from .color import match_and_blend_colors
from .guided_dit import GuidedDiT
from .conditioning import image_condition, motion_latent
from .guidance import Guidance
from .inputs import (
    GenerationRequest,
    PreparedInputs,
    boxes_from_official,
    prepare_inputs,
)
from .components import (
    CUSTOM_MODEL,
    MODEL_NAMES,
    Components,
    config_for,
    default_device,
    default_dtype,
    job_settings,
    offload_for,
    official_components,
    runtime_settings,
    tiny_components,
)
from .job_state import JobDir, JobState, OutputLock, file_digest
from .sampler import draw_window_noise, sample_window
from .windows import Window, WindowPlan, plan_windows

if TYPE_CHECKING:
    from ..weights.locate import ComponentFiles

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class WindowFrames:
    """What `stream` yields per window: the new frames and where they go in the video.

    frames: uint8 [n, H, W, 3]; index / total_windows: this window's number (0-based) and the
    plan's window count; out_start / out_end: frame range of the output video; fps: 25.
    video: with `stream(float_video=True)`, the same frames as float32 [3, n, H, W] in [-1, 1]
    (after colour correction, before the uint8 rounding), else None.
    """

    frames: np.ndarray
    index: int
    total_windows: int
    out_start: int
    out_end: int
    fps: int = FPS
    video: Optional[torch.Tensor] = None

    @property
    def start_s(self) -> float:
        return self.out_start / self.fps


@dataclass
class _WindowResult:
    window: Window
    frames: np.ndarray
    motion: torch.Tensor
    rng_state: torch.Tensor
    video: Optional[torch.Tensor] = None


class InfiniteTalk:
    """The InfiniteTalk generator. Build with `from_pretrained`; call `generate` or `stream`."""

    def __init__(self, components: Components, device: torch.device, dtype: torch.dtype,
                 size_buckets: Optional[dict] = None):
        self.components = components
        self.device = torch.device(device)
        self.dtype = dtype
        self.size_buckets = size_buckets  # {480: {key: (h, w)}, 720: {...}}; None: the official tables

    @classmethod
    def from_components(
        cls,
        *,
        dit: torch.nn.Module,
        vae: torch.nn.Module,
        clip: torch.nn.Module,
        text_encoder: Optional[object] = None,
        audio_encoder: Optional[torch.nn.Module] = None,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
        size_buckets: Optional[dict] = None,
        variant: str = "single",
        vae_chunk_latents: Optional[int] = 1,
    ) -> "InfiniteTalk":
        """A pipeline over models already in memory (the same generation code as `from_pretrained`).

        `text_encoder`: anything with `encode(list[str]) -> list[Tensor]` (a loaded umT5, or
        `PromptEmbeddings` of precomputed contexts); `audio_encoder`: a wav2vec2 encoder, or None
        when every job brings its `features`. `size_buckets`: {480: table, 720: table} where a
        table maps ratio keys to (h, w) or to the official `[[h, w], 1]` entries; None keeps the
        official ASPECT_RATIO_627 / ASPECT_RATIO_960.
        """
        tables = None
        if size_buckets is not None:
            tables = {int(size): {str(k): _bucket_hw(v) for k, v in table.items()} for size, table in size_buckets.items()}
        components = Components(dit, text_encoder, clip, vae, audio_encoder, name=CUSTOM_MODEL, variant=variant,
                                random=False, vae_chunk_latents=vae_chunk_latents)
        components.runtime = runtime_settings(False, ())
        return cls(components, torch.device(device), dtype, tables)

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: Optional[PathLike] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        variant: str = "single",
        model: str = "infinitetalk-14b",
        seed: int = 0,
        *,
        fast: Optional[bool] = None,
        fp8: bool = False,
        loras: Sequence[tuple[PathLike, float]] = (),
        fp8_attention: bool = False,
        files: Optional["ComponentFiles"] = None,
        vram_budget: Union[float, str, None] = "auto",
        vram_size: int = 720,
        parallel: Optional[object] = None,
    ) -> "InfiniteTalk":
        """Load every model.

        path_or_repo: the weights folder (official layout, see `weights.hub`; None: the default
        folder $INFINITETALK_WEIGHTS or ~/.cache/infinitetalk/weights), used as it is: missing files
        raise MissingWeightsError listing them with the `infinitetalk download` command. The hub id
        "MeiGen-AI/InfiniteTalk" (not an existing local path) fetches the missing files into the
        default folder first, as `infinitetalk download` does (HubError when the hub is unreachable).
        variant: "single" or "multi" (the adapter for one or two speakers).
        model: "infinitetalk-14b" (official weights) or "tiny" (small random models of every
        component built from `seed`, no files needed; for tests, the output is not a face).
        device: default cuda when available, else cpu; dtype: default bfloat16 on cuda, float32 on cpu.
        fast: the speed path (runtime.fast.FastOptions: cuDNN attention, float32 RoPE, compiled
        blocks; the VAE in bfloat16 with VAEFastOptions); None = on for CUDA, off on the CPU.
        fp8: the DiT's block linears in fp8 (e4m3, per-channel scales, fast accumulation on the
        fast path; half the weight memory of those layers).
        fp8_attention: the DiT's self-attention in fp8 through cuDNN (Hopper or later with
        `pip install 'infinitetalk[fp8]'`; bf16 elsewhere, with a warning): faster and less
        exact than bf16 (speed and error in benchmarks/results).
        loras: (file, scale) LoRAs merged into the DiT at load (e.g. lightx2v for preset 'fast').
        files: the file of each component (`weights.locate.locate_components`: a ComfyUI models/
        folder, single-file overrides); None = found in `path_or_repo` (official or ComfyUI layout).
        vram_budget: GB of VRAM the job may use (a number), "auto" (the GPU's free memory at start
        minus a margin; no offloading on the CPU), None (every model resident on `device`) or an
        `OffloadPlan` from `runtime.offload_plan.plan_offload` (for tools and tests).
        Under a budget the models are loaded on the host and `runtime.offload` streams DiT blocks
        and moves the other models onto the GPU only while they run (see `offload_plan`); a
        number on the CPU builds and applies the plan too. vram_size: the size bucket set (480 or
        720) the plan must fit (its largest bucket; default 720 fits every job).
        parallel: a `runtime.parallel.ParallelContext` (every rank of the job calls this): the
        ranks share each step; the text encoder, CLIP and wav2vec2 load and run on its first rank.
        Under a budget below a whole DiT per rank the plan may shard the DiT blocks over the ranks
        (`runtime.parallel.ParallelContext.shard_weights`; the job then runs as one branch group).
        """
        dev = torch.device(device) if device is not None else default_device()
        dt = dtype if dtype is not None else default_dtype(dev)
        if model not in MODEL_NAMES:
            raise InputError(f"Unknown model {model!r}; choose one of: {', '.join(MODEL_NAMES)}.")
        if variant not in ("single", "multi"):
            raise InputError(f"Unknown weights variant {variant!r}; use 'single' or 'multi'.")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError("The device 'cuda' was asked for but no CUDA GPU is available; use --device cpu.")
        use_fast = (dev.type == "cuda") if fast is None else bool(fast)
        loras = [(Path(p).expanduser(), float(scale)) for p, scale in loras]
        offload = offload_for(model, dev, dt, fp8, vram_budget, vram_size, parallel=parallel)
        place = torch.device("cpu") if offload is not None else dev
        encoders = parallel is None or parallel.is_leader  # the other ranks get the encoders' results
        if model == "tiny":
            if loras:
                raise InputError("LoRAs change the official 14B weights; the tiny random model takes none.")
            components = tiny_components(seed, place, dt, variant, fp8, encoders)
        else:
            components = official_components(path_or_repo, dev, dt, variant, fp8, loras, use_fast, files,
                                                  place, encoders)
        components.runtime = runtime_settings(fp8, loras, fp8_attention, fast=use_fast)
        if offload is not None:  # planned again from the loaded DiT's own bytes (GGUF blocks, fp8-scaled)
            offload = offload_for(model, dev, dt, fp8, vram_budget, vram_size, dit=components.dit, parallel=parallel)
            offload.prepare_dit(components.dit)
        if use_fast:
            from ..runtime.fast import FastOptions, make_fast

            options = FastOptions(compile_blocks=dev.type == "cuda", fp8_fast_accum=fp8, fp8_attention=fp8_attention)
            if offload is not None:
                options = options.replace(ffn_chunks=offload.plan.ffn_chunks)
            make_fast(components.dit, options)
            components.dit_fast = options
        elif fp8_attention:
            log.warning("fp8 attention is part of the fast path; with fast=False the self-attention stays in %s.", dt)
        if offload is not None:
            components.dit.ffn_chunks = offload.plan.ffn_chunks
            if offload.plan.vae_chunk_latents == 1:  # the budget needs the official one-latent VAE step
                components.vae_chunk_latents = 1
            offload.attach(components)
            components.offload = offload
        if parallel is not None:
            parallel.wrap_components(components, dev)
        trim_host_heap()  # the loaders' freed temporaries and packed-away host copies (runtime.host_memory)
        return cls(components, dev, dt)

    def memory_plan(self) -> Optional[str]:
        """The VRAM plan in words (what is resident, what streams, VRAM and host RAM), or None without one."""
        return self.components.offload.plan.describe() if self.components.offload is not None else None

    # ---- settings ------------------------------------------------------------------------
    def default_config(self, **settings) -> GenerationConfig:
        """The generation settings suited to this model (tiny: 128 px buckets)."""
        return config_for(self.components.name, None, **settings)

    def _config(self, config: Optional[GenerationConfig], settings: dict) -> GenerationConfig:
        return config_for(self.components.name, config, **settings)

    def prepare(self, config: Optional[GenerationConfig] = None, **request) -> tuple[PreparedInputs, GenerationConfig]:
        """Check and decode the inputs of a job (no video model runs); see `GenerationRequest` for the
        keys. `text=` (with voice=, voice2=, lang=, speed=, save_audio=, tts_weights=) is first
        synthesised into speech tracks by `media.tts.speech_request_fields`."""
        settings = {k: request.pop(k) for k in list(request) if k in GenerationConfig.__dataclass_fields__}
        if "text" in request or "text_file" in request:  # speech from text first (media.tts)
            from ..media.tts import speech_request_fields

            request = speech_request_fields(request, device=self.device)
        if "bbox" in request:  # the official in-memory dict ({name: [x_min, y_min, x_max, y_max]}, x = rows)
            request["boxes"] = boxes_from_official(request.pop("bbox"))
        if "features" in request and request["features"] is not None:
            request["features"] = tuple(request["features"])
        unknown = set(request) - set(GenerationRequest.__dataclass_fields__)
        if unknown:
            raise InputError(f"Unknown job argument(s): {', '.join(sorted(unknown))}.")
        if "audio" not in request and request.get("features") is None:
            raise InputError("Give the speech as audio=PATH (or the words as text=\"...\", or features=[...]).")
        cfg = self._config(config, settings)
        return self.prepare_request(GenerationRequest(**request), cfg), cfg

    def prepare_request(self, request: GenerationRequest, cfg: GenerationConfig) -> PreparedInputs:
        """`prepare_inputs` with this pipeline's size-bucket tables."""
        tables = self.size_buckets.get(cfg.size) if self.size_buckets is not None else None
        if self.size_buckets is not None and tables is None:
            raise InputError(f"This pipeline has no size-bucket table for size {cfg.size}.")
        return prepare_inputs(request, cfg, buckets=tables)

    @staticmethod
    def plan(inputs: PreparedInputs, cfg: GenerationConfig) -> WindowPlan:
        return plan_windows(inputs.audio_frames, cfg.frame_num, cfg.motion_frame, cfg.mode, cfg.max_frames)

    # ---- public generation -----------------------------------------------------------------
    def stream(
        self,
        inputs: Optional[PreparedInputs] = None,
        config: Optional[GenerationConfig] = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
        float_video: bool = False,
        **request,
    ) -> Iterator[WindowFrames]:
        """Yield each window's new frames as soon as it is made (see `WindowFrames`).

        Give the job as keywords (image= or video=, audio=, audio2=, audio_type=, boxes=,
        prompt=, negative_prompt=, plus any GenerationConfig field such as sample_steps=, seed=)
        or as `inputs` from `prepare` with its `config`.
        """
        if inputs is None:
            inputs, config = self.prepare(config, **request)
        elif config is None:
            config = self.default_config()
        plan = self.plan(inputs, config)
        tracker = ProgressTracker(progress, cancel)
        self._job_started(tracker, inputs, config, plan, 0)
        for result in self._run(inputs, config, plan, tracker, None, float_video=float_video):
            w = result.window
            yield WindowFrames(result.frames, w.index, len(plan), w.out_start, w.out_end, video=result.video)
            tracker.window_finished(w.index, len(plan), result.frames.shape[0], w.out_end)
        tracker.finished(None, plan.total_frames, plan.duration_s)

    def generate(
        self,
        output: PathLike,
        inputs: Optional[PreparedInputs] = None,
        config: Optional[GenerationConfig] = None,
        progress: Optional[ProgressCallback] = None,
        resume: bool = False,
        cancel: Optional[CancelToken] = None,
        settings: Optional[dict] = None,
        *,
        restart: bool = False,
        sound: str = "original",
        lock: Optional[OutputLock] = None,
        **request,
    ) -> Path:
        """Make the whole video into `output` (MP4, H.264 + AAC, 25 fps) and return its path.

        Job keywords as for `stream`. Finished windows are kept in `OUTPUT.job/`; after a crash
        or kill, the same call with `resume=True` continues from the last finished window and
        gives the same video as an uninterrupted run. The output appears (atomic rename) only
        when complete.

        `progress` gets typed events (`infinitetalk.progress`); a `ProgressTracker` may be passed
        instead to continue a job's event stream (the job service does). `cancel` (a CancelToken)
        stops the job at the next step or window boundary with JobCancelledError, finished
        windows kept. `settings` is the resume key (the job service builds it from the whole
        job description; by default it is built from the inputs, config and loaded models).
        Finished windows are never discarded silently: without `resume` that is an error unless
        `restart`. The job holds the output's `OutputLock` (`lock`: one the caller holds). `sound`:
        "original" (the speech at its own rate and channels) or "official" (the 16 kHz mono mix).
        """
        if inputs is None:
            inputs, config = self.prepare(config, **request)
        elif config is None:
            config = self.default_config()
        output = Path(output).expanduser()
        if output.is_dir():
            raise InputError(f"The output path {output} is a folder; give a file name such as {output / 'out.mp4'}.")
        if sound not in ("original", "official"):
            raise InputError(f"sound must be 'original' or 'official', not {sound!r}.")
        plan = self.plan(inputs, config)
        tracker = progress if isinstance(progress, ProgressTracker) else ProgressTracker(progress, cancel)
        par = self.components.parallel
        own_lock = lock is None and (par is None or par.is_leader)  # ranks other than the first write nothing
        with (OutputLock(output) if own_lock else contextlib.nullcontext()):
            self._generate_locked(output, inputs, config, plan, tracker, (resume, restart), settings, sound)
        tracker.finished(str(output), plan.total_frames, plan.duration_s)
        return output

    def _generate_locked(self, output: Path, inputs: PreparedInputs, config: GenerationConfig, plan: WindowPlan,
                         tracker: ProgressTracker, start: tuple[bool, bool], settings: Optional[dict], sound: str):
        job = JobDir(output)
        par = self.components.parallel
        if par is not None and not par.is_leader:  # the other ranks compute; only the first one writes
            for _ in self._run(inputs, config, plan, ProgressTracker(None, tracker.cancel), par.broadcast_object()):
                pass
            return output
        state = job.start(self._job_settings(inputs, config) if settings is None else settings, *start)
        if par is not None:
            par.broadcast_object(state)
        first = state.next_window if state is not None else 0
        self._job_started(tracker, inputs, config, plan, first)
        if state is not None:
            tracker.notice(f"all {len(plan)} windows were already made; assembling the video" if first >= len(plan)
                           else f"resuming at window {first + 1}/{len(plan)}")
        done = state or JobState(0, 0, torch.zeros(0), torch.zeros(0, dtype=torch.uint8))
        for result in self._run(inputs, config, plan, tracker, state):
            index, count = result.window.index, result.frames.shape[0]
            path = write_segment(job.segment_path(index), result.frames)
            done = JobState(index + 1, done.frames_written + count, result.motion, result.rng_state,
                            [*done.segments, (file_digest(path), int(count))])
            job.save_state(done)
            tracker.window_finished(index, len(plan), count, result.window.out_end, str(path))
        tracker.check_cancel()
        if inputs.tracks is None:
            raise InputError("Writing an MP4 needs the speech audio for its sound track: give audio=PATH.")
        with tracker.stage("write", f"writing {output}"):
            audio, rate = sound_track(inputs.tracks, official=sound == "official")
            concat_segments(job.segments(len(plan)), output, audio=audio, sample_rate=rate, temp_dir=job.root)
        job.remove()

    @staticmethod
    def _job_started(tracker: ProgressTracker, inputs: PreparedInputs, cfg: GenerationConfig, plan: WindowPlan,
                     first: int) -> None:
        h, w = inputs.target_hw
        tracker.job_started(windows=len(plan), frames=plan.total_frames, duration_s=plan.duration_s, width=w,
                            height=h, steps=cfg.sample_steps, seed=cfg.seed, first_window=first)

    # ---- internals -------------------------------------------------------------------------
    def _check_options(self, inputs: PreparedInputs, cfg: GenerationConfig) -> None:
        c = self.components  # official weights: the single adapter was not trained for two speakers
        if inputs.request.speakers == 2 and c.variant == "single" and c.name == "infinitetalk-14b":
            raise InputError("Two speakers need the multi-speaker adapter; load the pipeline with variant='multi'.")

    def _job_settings(self, inputs: PreparedInputs, cfg: GenerationConfig) -> dict:
        c = self.components
        return job_settings(inputs, cfg, c.name, c.variant, self.device, self.dtype, c.runtime)

    def _encode_job(self, inputs: PreparedInputs, cfg: GenerationConfig, tracker: ProgressTracker):
        c = self.components
        with tracker.stage("encode_audio", "encoding the speech (wav2vec2)"):
            # kept on the host in the DiT's dtype: the official loop casts each window to it anyway,
            # and bf16 halves the memory of long jobs
            if inputs.request.features is not None:
                features = [f.to(self.dtype) for f in inputs.request.features]
            else:
                with c.placed(c.audio_encoder):
                    features = [c.audio_encoder.encode(track).to(self.dtype) for track in inputs.tracks.speakers]
        with tracker.stage("encode_prompt", "encoding the prompt (umT5)"):
            negative = inputs.request.negative_prompt
            negative = cfg.negative_prompt if negative is None else negative
            with c.placed(getattr(c.text_encoder, "model", None)):
                context, context_null = c.text_encoder.encode([inputs.request.prompt, negative])
        return features, context.to(self.device), context_null.to(self.device)

    def _audio_for(self, features: Sequence[torch.Tensor], window: Window, frame_num: int) -> torch.Tensor:
        return audio_for_window(features, window).to(self.device)

    @torch.no_grad()
    def _run(
        self,
        inputs: PreparedInputs,
        cfg: GenerationConfig,
        plan: WindowPlan,
        tracker: ProgressTracker,
        state: Optional[JobState],
        float_video: bool = False,
    ) -> Iterator[_WindowResult]:
        c = self.components
        self._check_options(inputs, cfg)
        start = state.next_window if state is not None else 0
        if start >= len(plan):
            return
        if c.offload is not None:
            log.info("%s", c.offload.plan.describe())
        features, context, context_null = self._encode_job(inputs, cfg, tracker)
        generator = torch.Generator(device=self.device).manual_seed(int(cfg.seed))
        motion_frames = None
        if state is not None:
            generator.set_state(state.rng_state)
            motion_frames = state.motion
        masks = inputs.masks.to(self.device)
        reference = inputs.reference
        lat_h, lat_w = inputs.latent_hw
        latent_frames = cfg.latent_frames
        reader = VideoFrameReader(inputs.request.video) if inputs.is_video else None
        cached_cond, clip_fea, y = None, None, None
        branches = Guidance.from_config(cfg).branches
        try:
            for window in plan.windows[start:]:
                n = len(plan)
                tracker.window_started(window.index, n)
                if reader is not None and not window.is_first:
                    cond = prepare_frame(reader.frame_at(window.reference_time_s), inputs.target_hw)
                else:
                    cond = reference
                if cached_cond is None or not torch.equal(cached_cond, cond):
                    with c.placed(c.clip):
                        clip_fea = c.clip(cond[None].to(self.device)).to(self.dtype)
                    with c.placed(c.vae):
                        y = image_condition(c.vae, cond, cfg.frame_num, c.vae_chunk_latents, c.vae_fast).to(self.device)
                    cached_cond = cond
                source = cond if window.is_first else motion_frames
                with c.placed(c.vae):
                    motion = motion_latent(c.vae, source, c.vae_chunk_latents, c.vae_fast).to(self.device)
                audio = self._audio_for(features, window, cfg.frame_num)
                noise = draw_window_noise((16, latent_frames, lat_h, lat_w), generator, self.device)
                # text/CLIP keys and values are computed once per window, not per step
                make_denoiser = c.parallel.guided_dit if c.parallel is not None else GuidedDiT
                denoiser = make_denoiser(
                    c.dit, branches, context=context, context_null=context_null, clip_fea=clip_fea, y=y,
                    audio=audio, ref_target_masks=masks if audio.shape[0] == 2 else None,
                    cache_conditions=self._cache_conditions(),
                )
                modulation = c.dit.time_modulation if cfg.use_teacache else None
                latent = sample_window(
                    denoiser.predict_branch, noise, motion, window.motion_latent_frames, cfg, generator, tracker,
                    first_window=window.is_first, timestep_modulation=modulation,
                    step_fn=getattr(denoiser, "predict_step", None),
                )
                del denoiser  # its cached keys and values are not needed by the decode
                tiling = c.offload.plan.decode_tiling() if c.offload is not None else None
                with c.placed(c.vae):
                    video = c.vae.decode(latent[None], chunk_latents=c.vae_chunk_latents, fast=c.vae_fast,
                                         tiling=tiling)[0].float().cpu()
                del latent, noise
                if cfg.color_correction_strength > 0:
                    video = match_and_blend_colors(video, reference, cfg.color_correction_strength)
                motion_frames = video[:, -cfg.motion_frame :].clone()
                frames = to_uint8_frames(video[:, window.keep])
                kept = video[:, window.keep].clone() if float_video else None
                del video
                yield _WindowResult(window, frames, motion_frames, generator.get_state(), kept)
        except torch.cuda.OutOfMemoryError as err:
            raise self._out_of_memory(err) from err
        finally:
            if reader is not None:
                reader.close()

    def _cache_conditions(self) -> str:
        c = self.components
        if c.offload is not None and c.offload.plan.cache_conditions == "none":
            return "none"
        return c.dit_fast.cache_conditions if c.dit_fast is not None else "context"

    def _out_of_memory(self, err: Exception):
        from ..errors import DeviceOutOfMemoryError

        plan = self.components.offload.plan if self.components.offload is not None else None
        if plan is None:
            return DeviceOutOfMemoryError(
                f"The GPU ran out of memory ({str(err).splitlines()[0]}); give a VRAM budget such as --vram 16 "
                "(vram_budget=16) so models stream from host memory; finished windows are kept for --resume."
            )
        return DeviceOutOfMemoryError(
            f"The GPU ran out of memory under the {plan.budget / 2**30:.1f} GB plan ({str(err).splitlines()[0]}); "
            f"try {plan.smaller_options()}; finished windows are kept for --resume."
        )

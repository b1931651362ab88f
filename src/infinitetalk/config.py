"""Generation settings: one dataclass with the official defaults, plus named presets.

The defaults are those of the official command line (`generate_infinitetalk.py` and
`wan/configs/wan_multitalk_14B.py`): 81-frame windows with 9 motion frames, 40 sampling
steps, shift 7 at 480p / 11 at 720p, text guidance 5, audio guidance 4, colour correction 1.0,
TeaCache threshold 0.2, APG momentum -0.75 and norm threshold 55. Two deliberate product
choices differ from the official CLI and are marked below: the default mode is `streaming`
(the official CLI defaults to `clip`, but every official example passes `--mode streaming`),
and there is no frame cap by default (the official streaming cap is 1000 frames = 40 s).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

from infinitetalk.errors import InputError

FPS = 25
"""Video frame rate of every generated video (the audio features are made at 25 per second)."""

AUDIO_SAMPLE_RATE = 16000
"""Sample rate of the speech track fed to wav2vec2 and muxed into the output."""

DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people "
    "in the background, walking backwards"
)
"""The English negative prompt of the official MultiTalk/InfiniteTalk 14B config."""

DEFAULT_SHIFT = {480: 7.0, 720: 11.0}
"""Official flow-matching shift per size bucket when none is given."""

MODES = ("clip", "streaming")
SIZES = (480, 720)


@dataclass(frozen=True)
class GenerationConfig:
    """Everything that decides how a video is sampled (not what it shows).

    `shift=None` means the official default for `size` (see `resolved_shift`).
    `max_frames=None` means no cap in streaming mode; clip mode always makes one window.
    `bucket_longest_side` scales the size buckets so their longest side is that many pixels
    (the tiny test model uses 128); None keeps the official buckets.
    """

    size: int = 480
    mode: str = "streaming"  # official CLI default is "clip"; see module docstring
    frame_num: int = 81
    motion_frame: int = 9
    sample_steps: int = 40
    shift: Optional[float] = None
    text_guide_scale: float = 5.0
    audio_guide_scale: float = 4.0
    seed: int = 42
    color_correction_strength: float = 1.0
    max_frames: Optional[int] = None  # official streaming cap is 1000; see module docstring
    use_teacache: bool = False
    teacache_thresh: float = 0.2
    use_apg: bool = False
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 55.0
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    face_scale: float = 0.05
    bucket_longest_side: Optional[int] = None
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        self.validate()

    @property
    def resolved_shift(self) -> float:
        """The shift actually used: the given one, else 7 (480) or 11 (720)."""
        return float(self.shift) if self.shift is not None else DEFAULT_SHIFT[self.size]

    @property
    def two_pass_guidance(self) -> bool:
        """True when text guidance is 1: two model passes per step (cond, drop-audio)."""
        return math.isclose(self.text_guide_scale, 1.0)

    @property
    def motion_latent_frames(self) -> int:
        """Latent frames the `motion_frame` pixel frames encode to (9 -> 3)."""
        return 1 + (self.motion_frame - 1) // 4

    @property
    def latent_frames(self) -> int:
        """Latent frames of one window (81 -> 21)."""
        return (self.frame_num - 1) // 4 + 1

    def validate(self) -> None:
        """Raise InputError with a clear sentence when a setting is out of range."""
        if self.size not in SIZES:
            raise InputError(f"size must be 480 or 720, got {self.size!r}.")
        if self.mode not in MODES:
            raise InputError(f"mode must be 'clip' or 'streaming', got {self.mode!r}.")
        if self.frame_num < 5 or (self.frame_num - 1) % 4 != 0:
            raise InputError(f"--frame-num (frame_num) must be 4n+1 and at least 5, e.g. 81 (the official value); "
                             f"got {self.frame_num}.")
        if not 1 <= self.motion_frame < self.frame_num:
            raise InputError(f"--motion-frame (motion_frame) must be between 1 and --frame-num minus 1 "
                             f"({self.frame_num - 1} here), got {self.motion_frame}.")
        if self.sample_steps < 1:
            raise InputError(f"sample_steps must be at least 1, got {self.sample_steps}.")
        if self.shift is not None and not self.shift > 0:
            raise InputError(f"shift must be positive, got {self.shift}.")
        if not 0.0 <= self.color_correction_strength <= 1.0:
            raise InputError(f"color_correction_strength must be in [0, 1], got {self.color_correction_strength}.")
        if self.max_frames is not None and self.max_frames < 1:
            raise InputError(f"max_frames must be at least 1 (or None for no cap), got {self.max_frames}.")
        if not self.teacache_thresh >= 0:
            raise InputError(f"teacache_thresh must be >= 0, got {self.teacache_thresh}.")
        if not 0.0 <= self.face_scale < 0.5:
            raise InputError(f"face_scale must be in [0, 0.5), got {self.face_scale}.")
        if self.bucket_longest_side is not None and self.bucket_longest_side < 16:
            raise InputError(f"bucket_longest_side must be at least 16 pixels, got {self.bucket_longest_side}.")
        if not 0 <= self.seed < 2**63:
            raise InputError(f"seed must be from 0 up to 2**63-1, got {self.seed}.")
        for name in ("text_guide_scale", "audio_guide_scale", "apg_momentum", "apg_norm_threshold", "teacache_thresh",
                     "color_correction_strength"):
            if not math.isfinite(getattr(self, name)):
                raise InputError(f"{name} must be a finite number, got {getattr(self, name)}.")
        if self.shift is not None and not math.isfinite(self.shift):
            raise InputError(f"shift must be a finite number, got {self.shift}.")

    def with_(self, **changes: Any) -> "GenerationConfig":
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise InputError(f"unknown generation setting(s): {', '.join(sorted(unknown))}.")
        return replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GenerationConfig":
        """The preset `name` (see PRESETS) with `overrides` applied on top."""
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
        return cls().with_(**{**PRESETS[name]["settings"], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "about": "Official defaults: 40 steps, text guidance 5, audio guidance 4 (three model passes per step).",
        "settings": {},
    },
    "teacache": {
        "about": "Official defaults with TeaCache (threshold 0.2): skips model evaluations whose result barely changes (faster, slightly less exact).",
        "settings": {"use_teacache": True, "teacache_thresh": 0.2},
    },
    "fast": {
        "about": "lightx2v step-distillation LoRA merged at load: 4 steps, shift 2, text guidance 1, audio guidance 2 "
                 "(two model passes per step, far fewer model evaluations than the default). Works with fp8.",
        "settings": {"sample_steps": 4, "shift": 2.0, "text_guide_scale": 1.0, "audio_guide_scale": 2.0},
        "lora": {"repo": "Kijai/WanVideo_comfy",
                 "filename": "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors"},
        "lora_scale": 1.0,
    },
    "fusionx": {
        "about": "FusionX LoRA merged at load (official README recipe): 8 steps, shift 2, text guidance 1, "
                 "audio guidance 2 (two model passes per step). Works with fp8.",
        "settings": {"sample_steps": 8, "shift": 2.0, "text_guide_scale": 1.0, "audio_guide_scale": 2.0},
        "lora": {"repo": "vrgamedevgirl84/Wan14BT2VFusioniX",
                 "filename": "FusionX_LoRa/Wan2.1_I2V_14B_FusionX_LoRA.safetensors"},
        "lora_scale": 1.0,
    },
}
"""Named settings bundles (plain data): `about` for help texts, `settings` = GenerationConfig fields."""

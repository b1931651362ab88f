"""InfiniteTalk: talking videos of any length from a portrait (or a video) and speech.

    from infinitetalk import InfiniteTalk
    pipe = InfiniteTalk.from_pretrained("~/weights")          # or model="tiny" (random, no files)
    pipe.generate("talk.mp4", image="face.png", audio="speech.wav", prompt="A woman talks.")

Heavy modules load on first use, so `import infinitetalk` stays quick.
"""
from .errors import (
    AudioError,
    CheckpointError,
    DeviceOutOfMemoryError,
    HubError,
    InfiniteTalkError,
    InputError,
    MediaError,
    MissingWeightsError,
    ResumeError,
    WeightsError,
)
from .progress import ProgressCallback, ProgressEvent

__version__ = "0.1.0"

_LAZY = {
    "InfiniteTalk": ("generation.pipeline", "InfiniteTalk"),
    "GenerationConfig": ("config", "GenerationConfig"),
    "PRESETS": ("config", "PRESETS"),
    "load_dit": ("weights.dit_loader", "load_dit"),
    "load_vae": ("weights.vae_loader", "load_vae"),
    "load_clip_vision": ("weights.clip_loader", "load_clip_vision"),
    "load_text_encoder": ("weights.t5_loader", "load_text_encoder"),
    "load_audio_encoder": ("weights.audio_loader", "load_audio_encoder"),
    "load_speech": ("media.audio", "load_speech"),
    "FastOptions": ("runtime.fast", "FastOptions"),
    "SpeechRequest": ("media.tts", "SpeechRequest"),
    "synthesize_request": ("media.tts", "synthesize_request"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AudioError",
    "CheckpointError",
    "DeviceOutOfMemoryError",
    "HubError",
    "InfiniteTalkError",
    "InputError",
    "MediaError",
    "MissingWeightsError",
    "ProgressCallback",
    "ProgressEvent",
    "ResumeError",
    "WeightsError",
    "__version__",
    *_LAZY,
]

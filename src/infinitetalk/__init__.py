"""InfiniteTalk: talking videos of any length from a portrait (or a video) and speech."""
from .errors import (
    AudioError,
    CheckpointError,
    InfiniteTalkError,
    InputError,
    MediaError,
    MissingWeightsError,
    WeightsError,
)
from .progress import ProgressCallback, ProgressEvent

__version__ = "0.1.0"

__all__ = [
    "AudioError",
    "CheckpointError",
    "InfiniteTalkError",
    "InputError",
    "MediaError",
    "MissingWeightsError",
    "ProgressCallback",
    "ProgressEvent",
    "WeightsError",
    "__version__",
]

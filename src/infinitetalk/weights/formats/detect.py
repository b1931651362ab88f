"""Which model a weight file holds and in which layout, from its content (never its name).

`classify(keys)` looks at the tensor names only (marker tensors and key prefixes), after the
ComfyUI / Kijai prefixes are stripped. Results name the component (see COMPONENTS) and the
naming layout (`official`, `hf-t5`, `gguf-t5`, `hf-clip`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

COMPONENTS = ("dit", "adapter", "t5", "wav2vec2", "vae", "clip")
DESCRIPTIONS = {
    "dit": "a Wan2.1 DiT (diffusion model)",
    "adapter": "an InfiniteTalk audio adapter (model patch)",
    "dit+adapter": "a Wan2.1 DiT merged with the InfiniteTalk adapter",
    "t5": "a umT5 text encoder",
    "wav2vec2": "a wav2vec2 audio encoder",
    "vae": "a Wan VAE",
    "clip": "a CLIP vision encoder",
}
# the option of the CLI that takes each component's file
OPTIONS = {"dit": "--dit", "adapter": "--adapter", "t5": "--t5", "wav2vec2": "--audio-encoder", "vae": "--vae", "clip": "--clip"}

# prefixes ComfyUI / Kijai / diffusers single files put before the official names, longest first
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "first_stage_model.", "model.", "vae.")

_DIT = ("patch_embedding.weight", "head.head.weight")
_ADAPTER = ("audio_proj.proj1.weight",)
_T5 = {
    "official": ("token_embedding.weight", "blocks.0.attn.q.weight"),
    "hf-t5": ("encoder.block.0.layer.0.SelfAttention.q.weight",),
    "gguf-t5": ("enc.blk.0.attn_q.weight",),
}
_VAE = ("decoder.middle.0.residual.0.gamma",)
_CLIP = {"official": ("visual.transformer.0.attn.to_qkv.weight",), "hf-clip": ("vision_model.encoder.layers.0.self_attn.q_proj.weight",)}
_W2V_SUFFIX = "feature_extractor.conv_layers.0.conv.weight"


@dataclass(frozen=True)
class Detected:
    """What a key set holds: component ('dit', 'adapter', 'dit+adapter', 't5', ...), layout, prefix."""

    component: str
    layout: str = "official"
    prefix: str = ""

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.component]

    def provides(self, component: str) -> bool:
        """True when the file can serve as `component` (a merged DiT serves as DiT and as adapter)."""
        if self.component == "dit+adapter":
            return component in ("dit", "adapter")
        return self.component == component


def _has(keys: set[str], prefix: str, markers: Iterable[str]) -> bool:
    return all(prefix + m in keys for m in markers)


def classify(keys: Iterable[str]) -> Optional[Detected]:
    """The component of a key set, or None when it is none of the supported models."""
    keys = set(keys)
    for prefix in ("",) + PREFIXES:
        dit, adapter = _has(keys, prefix, _DIT), _has(keys, prefix, _ADAPTER)
        if dit and adapter:
            return Detected("dit+adapter", prefix=prefix)
        if dit:
            return Detected("dit", prefix=prefix)
        if adapter:
            return Detected("adapter", prefix=prefix)
        if _has(keys, prefix, _VAE):
            return Detected("vae", prefix=prefix)
        for layout, markers in _T5.items():
            if _has(keys, prefix, markers):
                return Detected("t5", layout, prefix)
        for layout, markers in _CLIP.items():
            if _has(keys, prefix, markers):
                return Detected("clip", layout, prefix)
    if any(k.endswith(_W2V_SUFFIX) for k in keys):
        return Detected("wav2vec2")
    return None


def wrong_component_message(path, detected: Optional[Detected], wanted: str) -> str:
    """One sentence: the file, what it holds, and what was needed."""
    want = DESCRIPTIONS[wanted]
    if detected is None:
        return (f"{path} holds none of the models infinitetalk loads (no marker tensor of a Wan DiT, "
                f"adapter, umT5, wav2vec2, VAE or CLIP), so it cannot be used as {want}.")
    option = OPTIONS.get(detected.component.split("+")[0], "")
    hint = f" (pass it with {option})" if option else ""
    return f"{path} holds {detected.description}{hint}, not {want}."

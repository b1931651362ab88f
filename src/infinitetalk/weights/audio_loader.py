"""Load a Hugging Face format wav2vec2 folder into `AudioEncoder` (or save one as such a folder).

Accepted folders (config.json + model.safetensors or pytorch_model.bin, optional
preprocessor_config.json):
  * TencentGameMate/chinese-wav2vec2-base, saved as `Wav2Vec2ForPreTraining`: encoder keys under
    `wav2vec2.`, plus `quantizer.*`, `project_q.*`, `project_hid.*` (unused, skipped), and the
    positional convolution's weight norm under the legacy names `weight_g` / `weight_v`;
  * facebook/wav2vec2-base-960h (`Wav2Vec2ForCTC`: `wav2vec2.*` + `lm_head.*`, skipped);
  * a bare `Wav2Vec2Model` save (keys without prefix).
Keys are renamed on the fly (no conversion step for the user) and loaded strictly through
`materialize`: a missing or misshaped encoder key is a CheckpointError naming it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from ..errors import CheckpointError, MissingWeightsError
from ..models.audio import AudioEncoder, AudioEncoderConfig
from .materialize import materialize, open_weights

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_ENCODER_PARTS = ("feature_extractor.", "feature_projection.", "encoder.", "masked_spec_embed", "adapter.")
_LEGACY_NORM = {
    "conv.weight_g": "conv.parametrizations.weight.original0",
    "conv.weight_v": "conv.parametrizations.weight.original1",
}


def _rename(key: str) -> Optional[str]:
    """File key -> AudioEncoder key (None drops the pre-training / CTC heads)."""
    if key.startswith("wav2vec2."):
        body = key[len("wav2vec2."):]
    elif key.startswith(_ENCODER_PARTS):
        body = key
    else:
        return None
    for old, new in _LEGACY_NORM.items():
        if body.endswith(old):
            body = body[: -len(old)] + new
    return "wav2vec2." + body


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable JSON file ({exc}); download the wav2vec2 folder again.") from exc


def read_audio_encoder_config(folder: os.PathLike | str) -> AudioEncoderConfig:
    """AudioEncoderConfig from a Hugging Face wav2vec2 folder's config.json (+ preprocessor_config.json)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise MissingWeightsError(
            f"No wav2vec2 config.json in {folder}. Point to the chinese-wav2vec2-base (or "
            "wav2vec2-base-960h) folder, or run `infinitetalk download`.",
            missing=[str(config_path)],
        )
    config = _read_json(config_path)
    if config.get("model_type", "wav2vec2") != "wav2vec2":
        raise CheckpointError(f"{config_path} describes a '{config.get('model_type')}' model, not wav2vec2.")
    pre_path = folder / "preprocessor_config.json"
    preprocessor = _read_json(pre_path) if pre_path.is_file() else None
    return AudioEncoderConfig.from_hf_dict(config, preprocessor)


def load_audio_encoder(
    folder: os.PathLike | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    attn_implementation: str = "sdpa",
    config_dir: Optional[os.PathLike | str] = None,
) -> AudioEncoder:
    """Build the encoder on the meta device and fill it tensor by tensor from the folder's weights.

    `folder` may also be one weight file (Kijai's `wav2vec2-chinese-base_fp16.safetensors`, found
    by content); its config.json / preprocessor_config.json then come from `config_dir` (default:
    the file's own folder)."""
    import dataclasses

    path = Path(folder)
    single = path.is_file()
    folder = Path(config_dir) if config_dir is not None else (path.parent if single else path)
    config = dataclasses.replace(read_audio_encoder_config(folder), attn_implementation=attn_implementation)
    if single:
        from .formats import float_weights, open_component, renamed

        source = renamed(float_weights(open_component(path, "wav2vec2")), _rename)
    else:
        source = _folder_weights(folder)
    with torch.device("meta"):
        model = AudioEncoder(config)
    materialize(
        model,
        source,
        device=device,
        dtype=dtype,
        ignore_unexpected=lambda k: k.endswith("masked_spec_embed"),
        what="wav2vec2 audio encoder",
    )
    model.requires_grad_(False)
    return model


def _folder_weights(folder: Path):
    files = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not files:
        raise MissingWeightsError(
            f"No wav2vec2 weights in {folder} (looked for {' or '.join(WEIGHT_FILES)}). "
            "For chinese-wav2vec2-base take model.safetensors from the repository's refs/pr/1.",
            missing=[str(folder / WEIGHT_FILES[0])],
        )
    return open_weights(files[:1], rename=_rename)


def save_audio_encoder_folder(model: AudioEncoder, folder: os.PathLike | str) -> Path:
    """Write `model` as a chinese-wav2vec2-base style folder (Wav2Vec2ForPreTraining keys, legacy
    weight_g/weight_v names, preprocessor_config.json), e.g. the tiny model for end-to-end tests."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = model.config.to_hf().to_dict()
    hf["architectures"] = ["Wav2Vec2ForPreTraining"]
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    pre = {
        "do_normalize": model.config.do_normalize,
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "padding_side": "right",
        "padding_value": 0,
        "return_attention_mask": False,
        "sampling_rate": model.config.sampling_rate,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    state = {}
    for key, value in model.state_dict().items():
        for new, old in ((v, k) for k, v in _LEGACY_NORM.items()):
            if key.endswith(new):
                key = key[: -len(new)] + old
        state[key] = value.detach().float().cpu().contiguous()
    save_file(state, str(folder / "model.safetensors"))
    return folder

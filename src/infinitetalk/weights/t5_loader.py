"""Load the umT5 text encoder (`models_t5_umt5-xxl-enc-bf16.pth`) and its tokenizer.

* `load_umt5_encoder`: builds `UMT5Encoder` on the meta device and fills it tensor by tensor from
  the official file (5.7B parameters; never two copies in RAM), in the requested dtype
  (bfloat16 by default, as the official pipeline runs it).
* `UMT5Tokenizer`: the `google/umt5-xxl` tokenizer from a Hugging Face format folder
  (transformers `AutoTokenizer`, local files only), with the official prompt cleaning,
  padding and truncation to `text_len` (512) and `</s>` appended.
* `ByteTokenizer` (`models.tokenizer`, with `clean_prompt`): without a tokenizer folder, tiny configurations use the
  offline byte-level tokenizer.
* `load_text_encoder`: both together as a `TextEncoder` (`encode(prompts) -> [Tensor[L_i, dim]]`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import CheckpointError, MissingWeightsError
from ..models.text import TextEncoder, UMT5Config, UMT5Encoder
from ..models.tokenizer import BYTE_OFFSET, ByteTokenizer, clean_prompt
from .materialize import materialize, open_weights

log = logging.getLogger(__name__)

class UMT5Tokenizer:
    """The umT5 tokenizer of a Hugging Face format folder; `__call__(texts) -> (ids, mask)` [B, text_len] int64."""

    def __init__(self, directory: os.PathLike | str, text_len: int = 512):
        path = Path(directory)
        if not path.is_dir():
            raise MissingWeightsError(
                f"umT5 tokenizer folder not found: {path}. It is the google/umt5-xxl folder of the "
                "Wan2.1-I2V-14B-480P download (infinitetalk download).",
                missing=[str(path)],
            )
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"The tokenizer in {path} could not be loaded ({exc}); its files are missing or damaged. "
                "Download google/umt5-xxl again."
            ) from exc
        self.text_len = text_len

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(
            [clean_prompt(t) for t in texts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return enc["input_ids"].long(), enc["attention_mask"].long()


def load_umt5_encoder(
    path: os.PathLike | str,
    config: Optional[UMT5Config] = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> UMT5Encoder:
    """Build the umT5 encoder from the official `.pth` or any umT5 file `open_t5_weights` reads.

    `config` defaults to the sizes read from the file (`infer_umt5_config`: umT5-XXL for the 14B
    release). Raises MissingWeightsError when the file is absent and CheckpointError (naming file
    and key) when it is damaged, incomplete or another model.
    """
    source = open_t5_weights(path)
    cfg = config or infer_umt5_config(source)
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    log.info("loading umT5 encoder from %s (%d layers, dim %d) as %s", path, cfg.num_layers, cfg.dim, dtype)
    materialize(model, source, device=device, dtype=dtype, what="umT5 text encoder")
    return model.requires_grad_(False)


def open_t5_weights(path: os.PathLike | str):
    """The umT5 weights of one file in the official names, whatever its layout: the official
    .pth, Kijai's bf16 safetensors, ComfyUI's HF-named fp16 / fp8-scaled files, city96's GGUF
    (found by content; fp8 and GGUF weights are dequantised at load)."""
    from .formats import float_weights, open_component

    if not Path(path).is_file():
        return open_weights([path])  # the not-found error of the official loader
    return float_weights(open_component(path, "t5"))


def infer_umt5_config(source, base: Optional[UMT5Config] = None) -> UMT5Config:
    """The umT5 sizes of a file, read from its tensor shapes (`base`, default umT5-XXL, for what
    the file lacks): vocabulary and width from the token embedding, attention and feed-forward
    widths, layer count, position buckets and heads (the relative-position table is
    [buckets, heads]). `text_len` is not stored in a file and stays at `base`'s (512)."""
    import dataclasses
    import re

    base = base or UMT5Config()
    shape = source.shape
    changes: dict = {}
    if "token_embedding.weight" in source:
        changes["vocab_size"], changes["dim"] = shape("token_embedding.weight")
    if "blocks.0.attn.q.weight" in source:
        changes["dim_attn"] = shape("blocks.0.attn.q.weight")[0]
    if "blocks.0.ffn.fc1.weight" in source:
        changes["dim_ffn"] = shape("blocks.0.ffn.fc1.weight")[0]
    blocks = {int(m.group(1)) for k in source.keys() if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        changes["num_layers"] = max(blocks) + 1
    for key, shared in (("pos_embedding.embedding.weight", True), ("blocks.0.pos_embedding.embedding.weight", False)):
        if key in source:
            changes["num_buckets"], changes["num_heads"] = shape(key)
            changes["shared_pos"] = shared
            break
    return dataclasses.replace(base, **{k: (int(v) if k != "shared_pos" else v) for k, v in changes.items()})


def load_tokenizer(directory: Optional[os.PathLike | str], config: UMT5Config) -> UMT5Tokenizer | ByteTokenizer:
    """The HF tokenizer of `directory`; without one, the byte tokenizer (tiny configs only)."""
    if directory is not None:
        return UMT5Tokenizer(directory, text_len=config.text_len)
    if config.vocab_size > 256 + BYTE_OFFSET:
        raise MissingWeightsError(
            "The umT5 encoder needs its tokenizer folder (google/umt5-xxl); none was given. "
            "Run `infinitetalk download` or pass the folder.",
            missing=["google/umt5-xxl"],
        )
    return ByteTokenizer(text_len=config.text_len, vocab_size=config.vocab_size)


def load_text_encoder(
    checkpoint: os.PathLike | str,
    tokenizer_dir: Optional[os.PathLike | str] = None,
    config: Optional[UMT5Config] = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> TextEncoder:
    """Tokenizer + encoder, ready for `encode(prompts)`. No tokenizer folder -> byte tokenizer (tiny only).
    `config` defaults to the sizes read from the file's tensor shapes (`infer_umt5_config`)."""
    cfg = config
    if cfg is None:  # only the headers are read; a missing file keeps XXL and fails at the load below
        cfg = infer_umt5_config(open_t5_weights(checkpoint)) if Path(checkpoint).is_file() else UMT5Config()
    tokenizer = load_tokenizer(tokenizer_dir, cfg)  # checked first: cheap, and fails before 11 GB are read
    return TextEncoder(tokenizer, load_umt5_encoder(checkpoint, cfg, device=device, dtype=dtype))

"""Load the umT5 text encoder (`models_t5_umt5-xxl-enc-bf16.pth`) and its tokenizer.

* `load_umt5_encoder`: builds `UMT5Encoder` on the meta device and fills it tensor by tensor from
  the official file (5.7B parameters; never two copies in RAM), in the requested dtype
  (bfloat16 by default, as the official pipeline runs it).
* `UMT5Tokenizer`: the `google/umt5-xxl` tokenizer from a Hugging Face format folder
  (transformers `AutoTokenizer`, local files only), with the official prompt cleaning,
  padding and truncation to `text_len` (512) and `</s>` appended.
* `ByteTokenizer`: an offline byte-level tokenizer for tiny test configurations, so that a tiny
  pipeline runs without any download. It is not a substitute for the real tokenizer.
* `load_text_encoder`: both together as a `TextEncoder` (`encode(prompts) -> [Tensor[L_i, dim]]`).

Prompt cleaning: the official code runs `ftfy.fix_text`, then HTML-unescapes twice, strips and
collapses whitespace. ftfy is not a dependency here; `clean_prompt` applies the parts of ftfy's
default fixes that change ordinary prompts (fullwidth ASCII and ideographic space to ASCII, curly
quotes to straight ones, Latin ligatures, line breaks, control characters, NFC). ftfy's
mojibake repair (text decoded with the wrong codec) is not reproduced.
"""
from __future__ import annotations

import html
import logging
import os
import re
import unicodedata
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import CheckpointError, MissingWeightsError
from ..models.text import TextEncoder, UMT5Config, UMT5Encoder
from .materialize import materialize, open_weights

log = logging.getLogger(__name__)

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BYTE_OFFSET = 3  # ByT5 convention: pad 0, </s> 1, unk 2, then the 256 byte values

_WIDTH_MAP = {0x3000: " "}
_WIDTH_MAP.update(
    {i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0) if unicodedata.normalize("NFKC", chr(i)) != chr(i)}
)
_LIGATURES = {i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFB00, 0xFB07)}
_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")
_LINE_BREAKS = re.compile("\r\n|[\r\u2028\u2029\u0085]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc]")
_SPACES = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """The official 'whitespace' cleaning (ftfy subset, double HTML unescape, whitespace collapse)."""
    text = _LINE_BREAKS.sub("\n", text)
    text = _CONTROL.sub("", text)
    text = text.translate(_WIDTH_MAP).translate(_LIGATURES)
    text = _DOUBLE_QUOTES.sub('"', _SINGLE_QUOTES.sub("'", text))
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return _SPACES.sub(" ", text).strip()


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


class ByteTokenizer:
    """Offline byte-level tokenizer for tiny models: UTF-8 bytes + 3, `</s>` appended, pad 0.

    Same output contract as `UMT5Tokenizer` (truncated to text_len - 1 tokens plus `</s>`,
    padded to text_len). With a vocabulary smaller than 259, byte values wrap around.
    """

    def __init__(self, text_len: int = 512, vocab_size: int = 256 + BYTE_OFFSET):
        if vocab_size <= BYTE_OFFSET:
            raise ValueError(f"ByteTokenizer needs a vocabulary larger than {BYTE_OFFSET}, got {vocab_size}")
        self.text_len = text_len
        self.vocab_size = vocab_size

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.vocab_size - BYTE_OFFSET
        ids = torch.full((len(texts), self.text_len), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(texts), self.text_len), dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [BYTE_OFFSET + b % span for b in clean_prompt(text).encode("utf-8")][: self.text_len - 1]
            tokens.append(EOS_ID)
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return ids, mask


def load_umt5_encoder(
    path: os.PathLike | str,
    config: Optional[UMT5Config] = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> UMT5Encoder:
    """Build the umT5 encoder from the official `.pth` or any umT5 file `open_t5_weights` reads.

    `config` defaults to umT5-XXL (the 14B release). Raises MissingWeightsError when the file is
    absent and CheckpointError (naming file and key) when it is damaged, incomplete or another model.
    """
    cfg = config or UMT5Config()
    source = open_t5_weights(path)
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
    """Tokenizer + encoder, ready for `encode(prompts)`. No tokenizer folder -> byte tokenizer (tiny only)."""
    cfg = config or UMT5Config()
    tokenizer = load_tokenizer(tokenizer_dir, cfg)  # checked first: cheap, and fails before 11 GB are read
    return TextEncoder(tokenizer, load_umt5_encoder(checkpoint, cfg, device=device, dtype=dtype))

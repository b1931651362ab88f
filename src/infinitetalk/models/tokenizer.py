"""Prompt text before the umT5 encoder: the official prompt cleaning and an offline byte tokenizer.

* `clean_prompt`: what the official code does to a prompt before tokenising it.
* `ByteTokenizer`: a byte-level tokenizer for tiny test configurations, so that a tiny
  pipeline runs without any download. It is not a substitute for the real tokenizer
  (`weights.t5_loader.UMT5Tokenizer`, read from the google/umt5-xxl folder).

Prompt cleaning: the official code runs `ftfy.fix_text`, then HTML-unescapes twice, strips and
collapses whitespace. ftfy is not a dependency here; `clean_prompt` applies the parts of ftfy's
default fixes that change ordinary prompts (fullwidth ASCII and ideographic space to ASCII, curly
quotes to straight ones, Latin ligatures, line breaks, control characters, NFC). ftfy's
mojibake repair (text decoded with the wrong codec) is not reproduced.
"""
from __future__ import annotations

import html
import re
import unicodedata
from typing import Sequence

import torch

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

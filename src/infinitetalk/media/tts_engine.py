"""Kokoro speech synthesis: text -> phonemes (offline G2P) -> 24 kHz waveform, chunk by chunk.

G2P, all without network access at run time:
  * English ('a' American, 'b' British) uses misaki's lexicon G2P (the one the official app gets
    through `KPipeline`) when the spaCy model `en_core_web_sm` is installed as a package; misaki
    would otherwise download it at run time, so without it English goes through espeak-ng with
    misaki's own espeak-to-Kokoro phoneme mapping (`EspeakFallback`, the path misaki uses for
    words outside its lexicon).
  * Spanish, French, Hindi, Italian, Brazilian Portuguese ('e', 'f', 'h', 'i', 'p') use espeak-ng
    through misaki's `EspeakG2P`, as `KPipeline` does. espeak-ng comes as a library inside the
    `espeakng-loader` wheel (a system espeak-ng works too).
Chunks follow `KPipeline`: sentences packed to at most 400 characters, each at most 510 phonemes
(Kokoro's context is 512 tokens with the two boundary tokens); a longer chunk is split again at a
comma or a space instead of being cut off.

Kokoro's vocoder draws noise; each chunk is synthesised under a forked RNG seeded from the chunk's
phonemes and the voice, so the same sentence in the same voice gives the same samples wherever it
appears (a resumed job re-synthesises identical audio) and no global RNG state changes.
"""
from __future__ import annotations

import logging
import re
import zlib
from types import SimpleNamespace
from typing import Callable, Iterator, Optional

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000
MAX_PHONEMES = 510
CHUNK_CHARS = 400
ESPEAK_LANGS = {"e": "es", "f": "fr-fr", "h": "hi", "i": "it", "p": "pt-br"}
LANGS = {"a": "American English", "b": "British English", "e": "Spanish", "f": "French", "h": "Hindi",
         "i": "Italian", "p": "Brazilian Portuguese"}
SPEED_RANGE = (0.25, 4.0)


def check_lang(lang: str) -> str:
    """A language code Kokoro voices speak here (InputError otherwise)."""
    code = str(lang).strip().lower()
    if code in LANGS:
        return code
    known = ", ".join(f"{k} ({v})" for k, v in LANGS.items())
    extra = " Japanese (j) and Mandarin (z) need dictionaries that are fetched at run time, so they are not offered." \
        if code in ("j", "z") else ""
    raise InputError(f"Unknown speech language '{lang}'; use one of {known}.{extra}")


def lang_for_voice(voice: str) -> str:
    """The language a voice name starts with (af_heart -> 'a'), 'a' when it is not one."""
    name = str(voice).rsplit("/", 1)[-1]
    return name[0] if name[:1] in LANGS and name[1:2] in ("f", "m") and name[2:3] == "_" else "a"


def check_speed(speed: float) -> float:
    try:
        value = float(speed)
    except (TypeError, ValueError):
        value = float("nan")
    if not SPEED_RANGE[0] <= value <= SPEED_RANGE[1]:
        raise InputError(f"The speech speed must be a number from {SPEED_RANGE[0]} to {SPEED_RANGE[1]}, got {speed!r}.")
    return value


def _spacy_english_model() -> bool:
    try:
        import spacy.util

        return bool(spacy.util.is_package("en_core_web_sm"))
    except ImportError:
        return False


def make_g2p(lang: str) -> tuple[Callable[[str], str], str]:
    """(text -> phoneme string, name of the G2P) for a language code (see module doc)."""
    lang = check_lang(lang)
    from misaki import espeak

    if lang in "ab":
        british = lang == "b"
        fallback = espeak.EspeakFallback(british=british)
        if _spacy_english_model():
            from misaki import en

            lexicon = en.G2P(trf=False, british=british, fallback=fallback, unk="")
            return (lambda text: lexicon(text)[0]), "misaki-lexicon"
        log.info("spaCy's en_core_web_sm is not installed: English phonemes come from espeak-ng")

        def english(text: str) -> str:
            ps, _ = fallback(SimpleNamespace(text=text))
            return ps or ""

        return english, "espeak-en"
    g2p = espeak.EspeakG2P(language=ESPEAK_LANGS[lang])
    return (lambda text: g2p(text)[0]), f"espeak-{ESPEAK_LANGS[lang]}"


def text_chunks(piece: str, limit: int = CHUNK_CHARS) -> list[str]:
    """Sentences of `piece` packed into chunks of at most `limit` characters (longer sentences alone)."""
    parts = re.split(r"([.!?…]+)", piece)
    sentences = ["".join(parts[i:i + 2]).strip() for i in range(0, len(parts), 2)]
    chunks: list[str] = []
    current = ""
    for sentence in (s for s in sentences if s):
        if current and len(current) + 1 + len(sentence) > limit:
            chunks.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}".strip()
    if current:
        chunks.append(current)
    return chunks


def _halves(text: str) -> Optional[tuple[str, str]]:
    """Split near the middle at a comma-like mark, else at a space (None: one word)."""
    mid = len(text) // 2
    for marks in (",;:—", " "):
        cuts = [i for i, c in enumerate(text) if c in marks]
        if cuts:
            cut = min(cuts, key=lambda i: abs(i - mid)) + 1
            left, right = text[:cut].strip(), text[cut:].strip()
            if left and right:
                return left, right
    return None


def phoneme_chunks(g2p: Callable[[str], str], text: str) -> Iterator[tuple[str, str]]:
    """(text, phonemes) chunks of at most MAX_PHONEMES phonemes, lines first (the official
    app's split on line breaks), then sentences, then commas or spaces."""
    for line in re.split(r"\n+", text.strip()):
        for chunk in text_chunks(line):
            stack = [chunk]
            while stack:
                part = stack.pop()
                ps = g2p(part).strip()
                if not ps:
                    continue
                if len(ps) > MAX_PHONEMES:
                    halves = _halves(part)
                    if halves is not None:
                        stack.extend(reversed(halves))
                        continue
                    log.warning("a word of %d phonemes is cut to %d: %.40s", len(ps), MAX_PHONEMES, part)
                    ps = ps[:MAX_PHONEMES]
                yield part, ps


class KokoroEngine:
    """A loaded Kokoro model and one language's G2P; `speak` turns phonemes into samples."""

    sample_rate = SAMPLE_RATE

    def __init__(self, model, lang: str):
        self.model = model
        self.lang = check_lang(lang)
        self.g2p, self.g2p_name = make_g2p(self.lang)

    @property
    def device(self):
        return self.model.device

    def chunks(self, text: str) -> Iterator[tuple[str, str]]:
        return phoneme_chunks(self.g2p, text)

    def speak(self, phonemes: str, voice, speed: float = 1.0, seed: int = 0) -> np.ndarray:
        """float32 mono samples at 24 kHz for one chunk of phonemes, in `voice` ([510, 1, 256])."""
        import torch

        ps = phonemes[:MAX_PHONEMES]
        style = voice[len(ps) - 1].to(self.device)
        key = zlib.crc32(ps.encode("utf-8")) ^ zlib.crc32(voice[:4].cpu().numpy().tobytes()) ^ int(seed)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(key & 0x7FFFFFFF)  # CPU and CUDA generators, restored on exit
            audio = self.model(ps, style, speed)
        return np.ascontiguousarray(audio.detach().float().cpu().numpy().reshape(-1), dtype=np.float32)

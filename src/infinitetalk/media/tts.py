"""Speech from text: a script -> one or two 24 kHz speaker tracks on disk, before the normal inputs.

`synthesize_request(SpeechRequest(text=...), weights, folder)` is the step a front end runs
before the usual input checks: it returns `SpeechFiles`, whose `request_fields()` are the
`GenerationRequest` keywords (audio, audio2, audio_type, normalize_loudness) of an ordinary job.

The text, as the official app reads it:
  * plain text is one speaker in `voice`;
  * a script whose turns start with `(s1)` / `(s2)` makes two speakers; each turn is spoken in
    its speaker's voice while the other speaker's track gets silence of the same length (the
    official app's arrangement, the same as `add` of the two turns); a script that only has
    `(s1)` turns is one speaker. Text before the first marker, an empty turn, or any other
    marker such as `(s3)` is refused with one sentence;
  * inside a turn, text is split at line breaks (the official `split_pattern=r'\\n+'`) and then
    into Kokoro-sized chunks (see `tts_engine`).
Synthesis runs chunk by chunk and appends each chunk to the WAV files at once (16-bit PCM at
24 kHz, as the official app writes them), so memory stays flat however long the script is.
Files are written under temporary names and renamed when complete.

Loudness: the official TTS path applies none (its 24 kHz files are reloaded at 16 kHz and used
as they are, while uploaded audio is normalised to -23 LUFS); `request_fields()` therefore sets
`normalize_loudness=False`, and the normal audio path only resamples the tracks to 16 kHz.

Without a `folder`, tracks go to a cache (`$INFINITETALK_SPEECH_CACHE`, default
~/.cache/infinitetalk/speech) under a key of everything that decides the samples, so running the
same command again (e.g. with --resume) reuses them; the cache keeps the newest 8 entries.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import InputError
from ..progress import ProgressCallback, ProgressTracker
from .tts_engine import SAMPLE_RATE, KokoroEngine, check_lang, check_speed, lang_for_voice

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
DEFAULT_VOICE = "af_heart"
DEFAULT_VOICE2 = "am_adam"
CACHE_ENTRIES = 8
MANIFEST = "speech.json"
MARKER = re.compile(r"\(\s*[sS]\s*(\d+)\s*\)")
SPEECH_KEYS = ("text", "text_file", "voice", "voice2", "lang", "speed", "save_audio", "tts_weights", "speech_folder")


@dataclass(frozen=True)
class SpeechRequest:
    """Speech to synthesise: `text` (plain, or a script with (s1)/(s2) turns), the voice of each
    speaker (a name in WEIGHTS/Kokoro-82M/voices or a .pt file), the G2P language (None: the
    first letter of `voice`, e.g. 'a' for af_heart) and the speaking speed."""

    text: str
    voice: str = DEFAULT_VOICE
    voice2: str = DEFAULT_VOICE2
    lang: Optional[str] = None
    speed: float = 1.0


@dataclass(frozen=True)
class Turn:
    speaker: int  # 1 or 2
    text: str


@dataclass(frozen=True)
class TurnTiming:
    """Where a turn lies in the tracks, in samples at 24 kHz."""

    speaker: int
    start: int
    samples: int


@dataclass(frozen=True)
class SpeechFiles:
    """The synthesised tracks: one per speaker (all the same length), and their mix."""

    tracks: tuple[Path, ...]
    mix: Path
    turns: tuple[TurnTiming, ...]
    sample_rate: int = SAMPLE_RATE
    info: dict = field(default_factory=dict)

    @property
    def speakers(self) -> int:
        return len(self.tracks)

    @property
    def num_samples(self) -> int:
        return sum(t.samples for t in self.turns)

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate

    def request_fields(self) -> dict:
        """GenerationRequest keywords for these tracks (already arranged: 'para' keeps them)."""
        fields = {"audio": self.tracks[0], "normalize_loudness": False}
        if self.speakers == 2:
            fields.update(audio2=self.tracks[1], audio_type="para")
        return fields


def read_text_file(path: PathLike) -> str:
    """The UTF-8 text of a --text-file (InputError when missing or not text)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"The text file {p} does not exist. Check the path.")
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"The text file {p} is not UTF-8 text ({exc.reason}); save it as UTF-8.") from exc


def parse_script(text: str) -> list[Turn]:
    """Plain text -> one turn of speaker 1; a (s1)/(s2) script -> its turns (see module doc)."""
    text = (text or "").strip()
    if not text:
        raise InputError("The text to speak is empty; give the words with --text \"...\" or a non-empty --text-file.")
    parts = MARKER.split(text)
    if len(parts) == 1:
        return [Turn(1, text)]
    if parts[0].strip():
        raise InputError(
            f"The script has text before its first (s1)/(s2) marker ({parts[0].strip()[:40]!r}); start every "
            "turn with (s1) or (s2), or use no markers for one speaker."
        )
    turns = []
    for number, (speaker, words) in enumerate(zip(parts[1::2], parts[2::2]), start=1):
        if speaker not in ("1", "2"):
            raise InputError(f"The script uses the marker (s{int(speaker)}); only (s1) and (s2) are supported (two speakers).")
        if not words.strip():
            raise InputError(f"Turn {number} of the script, (s{speaker}), has no words; remove the marker or add its text.")
        turns.append(Turn(int(speaker), words.strip()))
    return turns


def script_speakers(turns: list[Turn]) -> int:
    return 2 if any(t.speaker == 2 for t in turns) else 1


# ---- streaming WAV tracks ------------------------------------------------------------------


def _pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


class _TrackWriter:
    """Appends chunks to one WAV per speaker (plus the mix for two speakers) under temporary names."""

    def __init__(self, folder: Path, speakers: int, rate: int = SAMPLE_RATE):
        self.final = [folder / f"speaker{i + 1}.wav" for i in range(speakers)]
        if speakers == 2:
            self.final.append(folder / "mix.wav")
        self.temp = [p.with_name(f".{p.name}.partial") for p in self.final]
        self.files = []
        for path in self.temp:
            handle = wave.open(str(path), "wb")
            handle.setnchannels(1)
            handle.setsampwidth(2)
            handle.setframerate(rate)
            self.files.append(handle)
        self.speakers = speakers
        self.samples = 0

    def write(self, speaker: int, audio: np.ndarray) -> None:
        data = _pcm16(audio)
        silence = bytes(len(data))
        for i in range(self.speakers):
            self.files[i].writeframesraw(data if i + 1 == speaker else silence)
        if self.speakers == 2:
            self.files[2].writeframesraw(data)
        self.samples += audio.shape[0]

    def close(self, keep: bool) -> list[Path]:
        for handle in self.files:
            handle.close()  # also patches the header sizes
        if not keep:
            for path in self.temp:
                path.unlink(missing_ok=True)
            return []
        for temp, final in zip(self.temp, self.final):
            os.replace(temp, final)
        return self.final


# ---- the step before the normal inputs ------------------------------------------------------


def default_speech_cache() -> Path:
    env = os.environ.get("INFINITETALK_SPEECH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "infinitetalk" / "speech"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class SpeechPlan:
    """A checked SpeechRequest: turns, language, speed, the weights layout and voice files."""

    turns: tuple[Turn, ...]
    lang: str
    speed: float
    layout: object  # weights.tts_loader.TTSLayout
    voices: dict  # speaker -> voice file

    @property
    def speakers(self) -> int:
        return script_speakers(list(self.turns))

    def key(self, g2p_name: str) -> str:
        """sha256 of everything that decides the samples."""
        from .. import __version__

        model = self.layout.model.stat()
        material = {
            "package": __version__,
            "model": [model.st_size, model.st_mtime_ns],
            "config": _sha256(self.layout.config),
            "voices": {str(k): _sha256(v) for k, v in self.voices.items()},
            "lang": self.lang, "speed": self.speed, "g2p": g2p_name,
            "turns": [[t.speaker, t.text] for t in self.turns],
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()


def plan_speech(request: SpeechRequest, weights: Optional[PathLike] = None) -> SpeechPlan:
    """Check a SpeechRequest without loading a model: script, language, speed, weights, voices.
    Every problem raises one InputError / MissingWeightsError sentence."""
    from ..weights.tts_loader import kokoro_missing, locate_tts_weights

    turns = parse_script(request.text)
    lang = check_lang(request.lang) if request.lang else lang_for_voice(request.voice)
    speed = check_speed(request.speed)
    layout = locate_tts_weights(weights)
    voices = {1: layout.voice_path(request.voice)}
    if script_speakers(turns) == 2:
        voices[2] = layout.voice_path(request.voice2)
    problem = kokoro_missing()  # last: importing kokoro (and spaCy) takes seconds
    if problem:
        raise InputError(problem)
    return SpeechPlan(tuple(turns), lang, speed, layout, voices)


def load_engine(plan: SpeechPlan, device=None) -> KokoroEngine:
    """The Kokoro model of the plan's weights folder with the plan's G2P."""
    import torch

    from ..weights.tts_loader import load_kokoro

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return KokoroEngine(load_kokoro(plan.layout, dev), plan.lang)


def _read_manifest(folder: Path) -> Optional[SpeechFiles]:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = SpeechFiles(
            tracks=tuple(folder / name for name in data["tracks"]), mix=folder / data["mix"],
            turns=tuple(TurnTiming(*t) for t in data["turns"]), sample_rate=int(data["sample_rate"]),
            info=data.get("info", {}),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if all(p.is_file() for p in (*files.tracks, files.mix)) else None


def _prune_cache(cache: Path, keep: Path) -> None:
    entries = sorted((p for p in cache.iterdir() if p.is_dir() and p != keep), key=lambda p: p.stat().st_mtime)
    for old in entries[: max(0, len(entries) - (CACHE_ENTRIES - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def synthesize_request(
    request: SpeechRequest,
    weights: Optional[PathLike] = None,
    folder: Optional[PathLike] = None,
    device=None,
    progress: Optional[ProgressCallback] = None,
    engine: Optional[KokoroEngine] = None,
) -> SpeechFiles:
    """Synthesise `request` into WAV tracks in `folder` (default: the speech cache) and return them.

    `weights`: the weights folder holding Kokoro-82M/ (default $INFINITETALK_WEIGHTS or
    ~/.cache/infinitetalk/weights); `engine`: an already loaded KokoroEngine to reuse. Progress
    events have stage "speech", one per turn.
    """
    from ..weights.tts_loader import load_voice

    plan = plan_speech(request, weights)
    if engine is not None and engine.lang != plan.lang:
        raise InputError(f"The loaded speech engine speaks '{engine.lang}', the request asks for '{plan.lang}'.")
    engine = engine or load_engine(plan, device)
    key = plan.key(engine.g2p_name)
    cache = None
    if folder is None:
        cache = default_speech_cache()
        target = cache / key[:24]
    else:
        target = Path(folder).expanduser()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create the speech folder {target}: {exc}.") from exc
    found = _read_manifest(target)
    if found is not None and found.info.get("key") == key:
        log.info("reusing the speech synthesised before in %s", target)
        return found

    voices = {speaker: load_voice(path) for speaker, path in plan.voices.items()}
    tracker = ProgressTracker(progress)
    writer = _TrackWriter(target, plan.speakers)
    timings = []
    ok = False
    try:
        for index, turn in enumerate(plan.turns):
            start = writer.samples
            for _, phonemes in engine.chunks(turn.text):
                writer.write(turn.speaker, engine.speak(phonemes, voices[turn.speaker], plan.speed))
            timings.append(TurnTiming(turn.speaker, start, writer.samples - start))
            if writer.samples == start:
                log.warning("turn %d (s%d) gave no phonemes and no sound: %.40s", index + 1, turn.speaker, turn.text)
            tracker.notice(f"speech turn {index + 1}/{len(plan.turns)}: {writer.samples / SAMPLE_RATE:.1f} s")
        if writer.samples == 0:
            raise InputError("The text has no speakable words (no phonemes came out of it); give words to speak.")
        ok = True
    finally:
        paths = writer.close(keep=ok)
    info = {"key": key, "g2p": engine.g2p_name, "lang": plan.lang, "speed": plan.speed}
    files = SpeechFiles(tuple(paths[: plan.speakers]), paths[-1], tuple(timings), SAMPLE_RATE, info)
    manifest = {"tracks": [p.name for p in files.tracks], "mix": files.mix.name, "sample_rate": SAMPLE_RATE,
                "turns": [[t.speaker, t.start, t.samples] for t in timings], "info": info}
    temp = target / f".{MANIFEST}.partial"
    temp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(temp, target / MANIFEST)
    if cache is not None:
        _prune_cache(cache, target)
    return files


def save_speech(files: SpeechFiles, path: PathLike, protect: tuple = ()) -> Path:
    """Copy the speech track (the mix, 24 kHz WAV) to `path` atomically; never onto an input."""
    dest = Path(path).expanduser()
    if dest.suffix.lower() != ".wav":
        raise InputError(f"--save-audio writes a WAV file; give a name ending in .wav (got {dest.name}).")
    if dest.is_dir() or not dest.parent.is_dir():
        raise InputError(f"--save-audio {dest}: give a file name inside an existing folder.")
    for other in protect:
        if other is not None and Path(other).expanduser().exists() and dest.exists() \
                and os.path.samefile(Path(other).expanduser(), dest):
            raise InputError(f"--save-audio {dest} is one of the inputs; choose another file name.")
    temp = dest.with_name(f".{dest.name}.partial")
    shutil.copyfile(files.mix, temp)
    os.replace(temp, dest)
    return dest


def speech_request_fields(request: dict, weights: Optional[PathLike] = None, device=None,
                          progress: Optional[ProgressCallback] = None) -> dict:
    """Replace the text keys of a job's keywords (text= or text_file=, voice=, voice2=, lang=,
    speed=, save_audio=, tts_weights=, speech_folder=) by the synthesised audio's keywords.
    Used by `InfiniteTalk.prepare`; a job without text keys is returned unchanged."""
    if not any(k in request for k in ("text", "text_file")):
        return dict(request)
    job = dict(request)
    opts = {k: job.pop(k) for k in SPEECH_KEYS if k in job}
    if job.get("audio") is not None or job.get("audio2") is not None:
        raise InputError("Give the speech either as audio= files or as text=, not both.")
    if opts.get("text") is not None and opts.get("text_file") is not None:
        raise InputError("Give the words either as text= or as text_file=, not both.")
    text = opts["text"] if opts.get("text") is not None else read_text_file(opts["text_file"])
    speech = SpeechRequest(
        text=text, voice=opts.get("voice") or DEFAULT_VOICE, voice2=opts.get("voice2") or DEFAULT_VOICE2,
        lang=opts.get("lang"), speed=opts.get("speed", 1.0) if opts.get("speed") is not None else 1.0,
    )
    if opts.get("save_audio") is not None:  # a bad name fails before minutes of synthesis
        save = Path(opts["save_audio"]).expanduser()
        if save.suffix.lower() != ".wav" or save.is_dir() or not save.parent.is_dir():
            raise InputError(f"--save-audio {save}: give a .wav file name inside an existing folder.")
    files = synthesize_request(speech, opts.get("tts_weights", weights), opts.get("speech_folder"), device, progress)
    if opts.get("save_audio") is not None:
        protect = (opts.get("text_file"), job.get("image"), job.get("video"))
        save_speech(files, opts["save_audio"], protect)
    job.update(files.request_fields())
    return job

"""Speech from text (Kokoro) without the real weights.

A weights folder is made here the way `infinitetalk download --tts` leaves it (config.json,
kokoro-v1_0.pth, voices/*.pt), but the checkpoint holds the random initial weights of the
`kokoro` package's own KModel built from a small config (the real classes and vocabulary, fewer
and narrower layers, short phoneme durations: the sound is noise). Everything after that is the
real path: the loader, misaki's espeak-ng G2P (offline), the turn-by-turn WAV writer, the 16 kHz
audio path and the CLI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("kokoro", reason="the optional 'tts' extra (kokoro) is not installed")

from infinitetalk.cli import main  # noqa: E402
from infinitetalk.errors import InputError, MissingWeightsError  # noqa: E402
from infinitetalk.media.audio import arrange_speakers, load_speech  # noqa: E402
from infinitetalk.media.tts import (  # noqa: E402
    SpeechRequest,
    parse_script,
    synthesize_request,
)
from infinitetalk.media.tts_engine import KokoroEngine  # noqa: E402
from infinitetalk.weights.tts_loader import (  # noqa: E402
    COMPONENTS,
    KOKORO_DIR,
    load_kokoro,
    locate_tts_weights,
    verify_file,
)

REPO = Path(__file__).resolve().parents[1]

# The published Kokoro-82M vocabulary (phoneme -> token id).
VOCAB = {";": 1, ":": 2, ",": 3, ".": 4, "!": 5, "?": 6, "—": 9, "…": 10, "\"": 11, "(": 12, ")": 13, "“": 14,
         "”": 15, " ": 16, "\u0303": 17, "ʣ": 18, "ʥ": 19, "ʦ": 20, "ʨ": 21, "ᵝ": 22, "\uab67": 23, "A": 24, "I": 25,
         "O": 31, "Q": 33, "S": 35, "T": 36, "W": 39, "Y": 41, "ᵊ": 42, "a": 43, "b": 44, "c": 45, "d": 46, "e": 47,
         "f": 48, "h": 50, "i": 51, "j": 52, "k": 53, "l": 54, "m": 55, "n": 56, "o": 57, "p": 58, "q": 59, "r": 60,
         "s": 61, "t": 62, "u": 63, "v": 64, "w": 65, "x": 66, "y": 67, "z": 68, "ɑ": 69, "ɐ": 70, "ɒ": 71, "æ": 72,
         "β": 75, "ɔ": 76, "ɕ": 77, "ç": 78, "ɖ": 80, "ð": 81, "ʤ": 82, "ə": 83, "ɚ": 85, "ɛ": 86, "ɜ": 87, "ɟ": 90,
         "ɡ": 92, "ɥ": 99, "ɨ": 101, "ɪ": 102, "ʝ": 103, "ɯ": 110, "ɰ": 111, "ŋ": 112, "ɳ": 113, "ɲ": 114, "ɴ": 115,
         "ø": 116, "ɸ": 118, "θ": 119, "œ": 120, "ɹ": 123, "ɾ": 125, "ɻ": 126, "ʁ": 128, "ɽ": 129, "ʂ": 130, "ʃ": 131,
         "ʈ": 132, "ʧ": 133, "ʊ": 135, "ʋ": 136, "ʌ": 138, "ɣ": 139, "ɤ": 140, "χ": 142, "ʎ": 143, "ʒ": 147, "ʔ": 148,
         "ˈ": 156, "ˌ": 157, "ː": 158, "ʰ": 162, "ʲ": 164, "↓": 169, "→": 171, "↗": 172, "↘": 173, "ᵻ": 177}

# Kokoro-82M's config.json with smaller sizes where the classes allow it (the decoder's 512/1024
# channels are fixed in the code); max_dur 2 keeps every phoneme at one or two 25 ms frames.
TINY_CONFIG = {
    "istftnet": {"upsample_kernel_sizes": [20, 12], "upsample_rates": [10, 6], "gen_istft_hop_size": 5,
                 "gen_istft_n_fft": 20, "resblock_dilation_sizes": [[1, 3, 5]], "resblock_kernel_sizes": [3],
                 "upsample_initial_channel": 512},
    "dim_in": 64, "dropout": 0.2, "hidden_dim": 512, "max_conv_dim": 512, "max_dur": 2, "multispeaker": True,
    "n_layer": 1, "n_mels": 80, "n_token": 178, "style_dim": 128, "text_encoder_kernel_size": 5,
    "plbert": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 512,
               "num_hidden_layers": 1, "dropout": 0.1},
    "vocab": VOCAB,
}
VOICES = ("af_heart", "am_adam", "bf_emma")


def make_tts_weights(root: Path) -> Path:
    """A Kokoro-82M folder with random weights, laid out as the download leaves it."""
    from kokoro import KModel

    folder = root / KOKORO_DIR
    (folder / "voices").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG, ensure_ascii=False), encoding="utf-8")
    torch.save({}, folder / "empty.pth")
    torch.manual_seed(1234)
    model = KModel(repo_id="hexgrad/Kokoro-82M", config=TINY_CONFIG, model=str(folder / "empty.pth"))
    (folder / "empty.pth").unlink()
    # as in the published file: one state dict per part, keys with DataParallel's "module." prefix
    torch.save({part: {f"module.{k}": v for k, v in getattr(model, part).state_dict().items()} for part in COMPONENTS},
               folder / "kokoro-v1_0.pth")
    gen = torch.Generator().manual_seed(7)
    for name in VOICES:
        torch.save(torch.randn(510, 1, 256, generator=gen) * 0.15, folder / "voices" / f"{name}.pt")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_tts_weights(tmp_path_factory.mktemp("tts_weights"))


@pytest.fixture(scope="module")
def engine(weights) -> KokoroEngine:
    return KokoroEngine(load_kokoro(locate_tts_weights(weights)), "a")


@pytest.fixture(autouse=True)
def _speech_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INFINITETALK_SPEECH_CACHE", str(tmp_path / "speech_cache"))


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return data, w.getframerate()


# ---- script parsing -----------------------------------------------------------------------


def test_script_turns_and_plain_text():
    assert [(t.speaker, t.text) for t in parse_script("Hello there.\nSecond line.")] == [(1, "Hello there.\nSecond line.")]
    turns = parse_script("(s1) Hi, I am one.\n(s2) And I am two. (S1)Back to one.")
    assert [(t.speaker, t.text) for t in turns] == [(1, "Hi, I am one."), (2, "And I am two."), (1, "Back to one.")]


@pytest.mark.parametrize("text, words", [
    ("   \n ", "empty"),
    ("(s1) Hello. (s3) Who am I?", "(s3)"),
    ("Intro words (s1) Hello.", "before its first"),
    ("(s1) Hello. (s2)", "no words"),
])
def test_bad_scripts_are_one_sentence(text, words):
    with pytest.raises(InputError) as info:
        parse_script(text)
    message = str(info.value)
    assert words in message and "\n" not in message and message.endswith(".")


# ---- synthesis ----------------------------------------------------------------------------


def test_two_speakers_turn_by_turn_equal_add(weights, engine, tmp_path):
    script = "(s1) Hi there.\n(s2) Hello!"
    files = synthesize_request(SpeechRequest(script, "af_heart", "am_adam"), weights, tmp_path / "duo", engine=engine)
    assert files.speakers == 2 and [t.speaker for t in files.turns] == [1, 2]
    t1, rate = read_wav(files.tracks[0])
    t2, _ = read_wav(files.tracks[1])
    mix, _ = read_wav(files.mix)
    assert rate == 24000 and t1.shape == t2.shape == mix.shape == (files.num_samples,)
    one, two = files.turns
    assert one.start == 0 and two.start == one.samples and one.samples > 1200 and two.samples > 600
    # each turn is sound on its speaker's track and exact silence on the other's
    assert np.all(t2[: one.samples] == 0) and np.abs(t1[: one.samples]).max() > 0
    assert np.all(t1[one.samples:] == 0) and np.abs(t2[one.samples:]).max() > 0
    assert np.array_equal(mix.astype(np.int32), t1.astype(np.int32) + t2)

    # each turn alone (one speaker, its voice) has the same samples, and `add` of the two
    # single-speaker tracks is the script's arrangement
    alone1 = synthesize_request(SpeechRequest("Hi there.", "af_heart"), weights, tmp_path / "a", engine=engine)
    alone2 = synthesize_request(SpeechRequest("Hello!", "am_adam"), weights, tmp_path / "b", engine=engine)
    a1, _ = read_wav(alone1.tracks[0])
    a2, _ = read_wav(alone2.tracks[0])
    assert (a1.shape[0], a2.shape[0]) == (one.samples, two.samples)
    added = arrange_speakers([a1.astype(np.float32), a2.astype(np.float32)], "add", sample_rate=24000)
    assert np.array_equal(added.speakers[0], t1.astype(np.float32))
    assert np.array_equal(added.speakers[1], t2.astype(np.float32))

    # the normal audio path: 16 kHz, no loudness normalisation (as the official TTS path)
    fields = files.request_fields()
    assert fields["audio_type"] == "para" and fields["normalize_loudness"] is False
    s1 = load_speech(fields["audio"], normalize=False)
    assert s1.sample_rate == 16000 and abs(s1.num_samples - files.num_samples * 2 / 3) <= 1


@pytest.mark.slow
def test_long_script_is_written_turn_by_turn_with_flat_memory(weights, engine, tmp_path):
    """A long two-speaker script (hundreds of two-word turns) through the real path (G2P, the
    random-weights Kokoro, the WAV writer): every turn is on disk when the next one starts, and the
    peak of the Python allocations (tracemalloc; numpy arrays included) of a 4N-turn script is
    that of an N-turn one, far below what holding the extra turns' speech would take.

    Peak RSS (psutil) is printed but not bounded: at this scale it moves by 13-40 MB between turns
    whatever the length (glibc trimming the heap top after the decoder's 13 MB buffers; measured),
    far more than the few MB of speech the comparison has to resolve."""
    import tracemalloc

    psutil = pytest.importorskip("psutil")
    words = ("Hi there.", "Good day.", "Yes indeed.", "Well done.", "Not now.", "See you.")
    process = psutil.Process()

    def run(turns: int, name: str) -> tuple:
        script = "\n".join(f"(s{1 + i % 2}) {words[i % len(words)]}" for i in range(turns))
        folder = tmp_path / name
        partial = folder / ".speaker1.wav.partial"
        on_disk = [0] * turns
        rss = [process.memory_info().rss, 0]
        count = [0]

        def each_turn(_event) -> None:  # one Notice per finished turn; allocates nothing that grows
            on_disk[count[0]] = partial.stat().st_size
            rss[1] = max(rss[1], process.memory_info().rss)
            count[0] += 1

        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        try:
            files = synthesize_request(SpeechRequest(script, "af_heart", "am_adam"), weights, folder,
                                       engine=engine, progress=each_turn)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert count[0] == turns and len(files.turns) == turns and files.speakers == 2
        for size, turn in zip(on_disk, files.turns):  # written as it went (less at most one write buffer)
            assert size >= 44 + 2 * (turn.start + turn.samples) - 8192
        return files.num_samples, peak, rss[1] - rss[0]

    run(4, "warm")  # G2P, lexicon and allocator caches
    n = 50
    short, long = run(n, "short"), run(4 * n, "long")
    extra_speech = 4 * (long[0] - short[0])  # float32 bytes of the 3N extra turns' speech (one track)
    print(f"{n} turns: Python peak {short[1] / 1e3:.0f} kB, RSS growth {short[2] / 1e6:.1f} MB; {4 * n} turns: "
          f"{long[1] / 1e3:.0f} kB, {long[2] / 1e6:.1f} MB; speech of the extra turns {extra_speech / 1e6:.1f} MB")
    assert long[0] > 3.5 * short[0]
    assert long[1] - short[1] <= 0.1 * extra_speech


def test_text_is_split_at_line_breaks_then_sentences(engine):
    chunks = [text for text, _ in engine.chunks("Good morning.\n\nGood night. Sleep well!\nBye")]
    assert chunks == ["Good morning.", "Good night. Sleep well!", "Bye"]
    long = " ".join(["This sentence is rather long, and it goes on."] * 30)  # 1,400 characters, one line
    parts = list(engine.chunks(long))
    assert len(parts) > 3 and all(len(ps) <= 510 for _, ps in parts)
    assert " ".join(text for text, _ in parts) == long


def test_bad_requests_before_any_model(weights, tmp_path):
    with pytest.raises(InputError, match="Unknown voice 'zz_nobody'.*af_heart, am_adam, bf_emma"):
        synthesize_request(SpeechRequest("Hello.", "zz_nobody"), weights, tmp_path / "x")
    with pytest.raises(InputError, match="Unknown speech language 'q'"):
        synthesize_request(SpeechRequest("Hello.", lang="q"), weights, tmp_path / "x")
    with pytest.raises(InputError, match="speed"):
        synthesize_request(SpeechRequest("Hello.", speed=0), weights, tmp_path / "x")
    with pytest.raises(MissingWeightsError, match="infinitetalk download --tts --dir"):
        synthesize_request(SpeechRequest("Hello."), tmp_path / "no_weights", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_verify_file_checks_size_and_sha(tmp_path):
    import hashlib

    path = tmp_path / "f.bin"
    path.write_bytes(b"kokoro")
    assert verify_file(path, 6, hashlib.sha256(b"kokoro").hexdigest())
    assert not verify_file(path, 6, hashlib.sha256(b"other!").hexdigest())
    assert not verify_file(path, 7)
    blob = hashlib.sha1(b"blob 6\0kokoro").hexdigest()  # git's id of the same bytes
    assert verify_file(path, 6, None, blob) and not verify_file(path, 6, None, "0" * 40)


# ---- the command --------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "infinitetalk.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_bad_text_exits_2_with_one_sentence(weights, tmp_path, media_dir, capsys):
    base = ["generate", "--model", "tiny", "--image", str(media_dir / "portrait.png"), "--weights", str(weights),
            "--output", str(tmp_path / "out.mp4")]
    done = _cli(*base, "--text", "(s1) Hi. (s3) Who?")  # the real command in its own process
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert lines == ["error: The script uses the marker (s3); only (s1) and (s2) are supported (two speakers)."]
    for extra, words in ((["--text", ""], "is empty"), (["--text", "Hi.", "--voice", "nobody"], "Unknown voice"),
                         (["--text", "Hi.", "--save-audio", str(tmp_path / "s.mp3")], ".wav file name"),
                         (["--audio", str(media_dir / "speech.mp3"), "--save-audio", str(tmp_path / "s.wav")],
                          "go with --text")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and err[0].startswith("error: "), err
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "s.wav").exists()


def test_cli_text_to_video_with_saved_speech(weights, tmp_path, media_dir):
    from test_e2e_tiny import check_video

    from PIL import Image

    image = media_dir / "portrait.png"
    script = tmp_path / "script.txt"
    script.write_text("(s1) Hi.\n(s2) Hello there.\n", encoding="utf-8")
    out, speech = tmp_path / "duo.mp4", tmp_path / "duo.wav"
    code = main(["generate", "--model", "tiny", "--image", str(image), "--text-file", str(script),
                 "--voice", "af_heart", "--voice2", "am_adam", "--weights", str(weights), "--steps", "2",
                 "--save-audio", str(speech), "--output", str(out), "--quiet"])
    assert code == 0
    mix, rate = read_wav(speech)
    assert rate == 24000
    with Image.open(image) as im:
        info = check_video(out, (im.height, im.width))
    assert abs(info["audio_s"] - mix.shape[0] / rate) < 0.05


@pytest.mark.slow
def test_cli_text_with_two_ranks_synthesises_once(weights, tmp_path, media_dir):
    """--text with --gpus 2 (two CPU ranks): the first rank checks the job and synthesises the
    speech, the other receives the checked job; one video, one saved speech track."""
    out, speech = tmp_path / "ranks.mp4", tmp_path / "ranks.wav"
    done = _cli("generate", "--model", "tiny", "--gpus", "2", "--device", "cpu", "--image", str(media_dir / "portrait.png"),
                "--text", "Hello there. Nice to meet you.", "--weights", str(weights), "--steps", "1",
                "--max-seconds", "0.5", "--save-audio", str(speech), "--output", str(out))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.count("wrote ") == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "speech_cache") == ["ranks.mp4", "ranks.wav"]
    assert read_wav(speech)[1] == 24000


# ---- download through a local hub ---------------------------------------------------------


class _FakeHub:
    """A local HTTP server answering the two hub requests the download makes: the model info
    (files with sizes and checksums) and file downloads (HEAD + GET with the hub's headers)."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, folder: Path, corrupt_once: str):
        import hashlib
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.served: list[str] = []
        self.corrupt_once = {corrupt_once}
        hub = self

        def sibling(name: str, data: bytes) -> dict:
            if name.endswith(".json"):  # small files are plain git blobs, the rest LFS
                return {"rfilename": name, "size": len(data),
                        "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
            return {"rfilename": name, "size": len(data), "blobId": "f" * 40,
                    "lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}

        info = {"id": "hexgrad/Kokoro-82M", "modelId": "hexgrad/Kokoro-82M", "sha": self.COMMIT, "private": False,
                "siblings": [sibling(n, d) for n, d in files.items()] + [{"rfilename": "README.md", "size": 3}]}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _file(self, head: bool):
                path = self.path.split("?")[0]
                if path.startswith("/api/models/hexgrad/Kokoro-82M"):
                    body = json.dumps(info).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body if not head else b"")
                    return
                prefix = f"/hexgrad/Kokoro-82M/resolve/{hub.COMMIT}/"
                name = path[len(prefix):] if path.startswith(prefix) else None
                if name not in files:
                    self.send_error(404)
                    return
                data = files[name]
                if not head and name in hub.corrupt_once:  # a damaged transfer of the right size
                    hub.corrupt_once.discard(name)
                    data = bytes(len(data))
                self.send_response(200)
                self.send_header("X-Repo-Commit", hub.COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(files[name]).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    hub.served.append(name)
                    self.wfile.write(data)

            def do_HEAD(self):
                self._file(True)

            def do_GET(self):
                self._file(False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_download_tts_checks_every_file(weights, tmp_path):
    from infinitetalk.errors import HubError
    from infinitetalk.weights.tts_loader import download_tts_weights

    source = weights / KOKORO_DIR
    with _FakeHub(source, corrupt_once="kokoro-v1_0.pth") as hub:
        layout = download_tts_weights(tmp_path, log_fn=lambda m: None, endpoint=hub.url)
        assert layout.voices() == sorted(VOICES)
        assert hub.served.count("kokoro-v1_0.pth") == 2  # the damaged copy was caught and fetched again
        for name in ("config.json", "kokoro-v1_0.pth", "voices/am_adam.pt"):
            assert (layout.folder / name).read_bytes() == (source / name).read_bytes()
        assert not (layout.folder / "README.md").exists()
        served = len(hub.served)
        download_tts_weights(tmp_path, log_fn=lambda m: None, endpoint=hub.url)  # complete: nothing again
        assert len(hub.served) == served
    with pytest.raises(HubError, match="Could not download hexgrad/Kokoro-82M.*run the same command again"):
        download_tts_weights(tmp_path / "other", log_fn=lambda m: None, endpoint="http://127.0.0.1:9")


def test_python_text_request_gives_unnormalised_16k_tracks(weights, media_dir):
    from infinitetalk import InfiniteTalk
    from infinitetalk.media.audio_decode import decode_audio

    pipe = InfiniteTalk.from_pretrained(model="tiny", device="cpu")
    inputs, _ = pipe.prepare(image=media_dir / "portrait.png", text="(s2) Hi.", voice2="am_adam", tts_weights=weights)
    request = inputs.request
    assert request.speakers == 2 and request.normalize_loudness is False
    assert inputs.tracks.sample_rate == 16000 and not inputs.tracks.speakers[0].any()  # (s2) only: speaker 1 silent
    assert np.array_equal(inputs.tracks.speakers[1], decode_audio(request.audio2))  # resampled, no gain
    with pytest.raises(InputError, match="not both"):
        pipe.prepare(image=media_dir / "portrait.png", text="Hi.", audio=media_dir / "speech.mp3", tts_weights=weights)

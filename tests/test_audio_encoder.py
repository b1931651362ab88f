"""wav2vec2 features: parity/audio, loading HF folders, long-audio segmentation and memory."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import wave

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import report
from infinitetalk.errors import CheckpointError, MissingWeightsError
from infinitetalk.media.audio import load_speech
from infinitetalk.models.audio import AudioEncoderConfig, normalize_waveform
from infinitetalk.runtime.tiny_models import tiny_audio_encoder
from infinitetalk.weights.audio_loader import load_audio_encoder, save_audio_encoder_folder


@pytest.fixture(scope="module")
def fixture_encoder(parity_dir):
    return load_audio_encoder(parity_dir / "audio" / "encoder")


def test_parity_embedding_from_waveform(parity_dir, fixture_encoder):
    wave = load_file(str(parity_dir / "audio" / "waveform_16k.safetensors"))["waveform"]
    expected = load_file(str(parity_dir / "audio" / "embedding_from_waveform.safetensors"))["embedding"]
    got = fixture_encoder.encode(wave.numpy())
    report("audio/embedding_from_waveform", got, expected)


def test_parity_embedding_from_file(parity_dir, fixture_encoder):
    case = json.loads((parity_dir / "audio" / "case.json").read_text())
    ref = load_file(str(parity_dir / "audio" / "embedding.safetensors"))
    speech = load_speech(parity_dir / "audio" / "input.wav")
    assert speech.num_frames == case["frames"]
    values = normalize_waveform(speech.waveform)
    report("audio/dbg_input_values", torch.from_numpy(values)[None], ref["dbg_input_values"])
    conv = fixture_encoder.conv_features(torch.from_numpy(values)[None])
    report("audio/dbg_conv_features", conv.transpose(1, 2), ref["dbg_conv_features"])
    report("audio/dbg_interpolated_features", fixture_encoder.interpolate(conv, case["frames"]), ref["dbg_interpolated_features"])
    got = fixture_encoder.encode(speech.waveform)
    assert list(got.shape) == case["embedding_shape"]
    report("audio/embedding", got, ref["embedding"])


def test_chunked_conv_equals_whole(parity_dir, fixture_encoder):
    """Above whole_conv_max_s the conv stack runs in chunks with global GroupNorm statistics."""
    wave = load_file(str(parity_dir / "audio" / "waveform_16k.safetensors"))["waveform"].numpy()
    whole = fixture_encoder.encode(wave)
    chunked = fixture_encoder.encode(wave, whole_conv_max_s=0.5, conv_chunk_s=0.3)
    report("audio/chunked_conv_vs_whole", chunked, whole, rel_tol=1e-5)


def test_segmented_long_audio(media_dir):
    """Long clips: windows of whole_attention_max_s with context; at/below the threshold: whole clip."""
    enc = tiny_audio_encoder(seed=3)
    wave = load_speech(media_dir / "talking_458px_25fps.mp4").waveform  # 15 s
    whole = enc.encode(wave)
    assert whole.shape == (375, 2, 32)
    same = enc.encode(wave, whole_attention_max_s=15.0)
    assert torch.equal(same, whole)
    seg = enc.encode(wave, whole_attention_max_s=6.0, context_s=2.0)
    assert seg.shape == whole.shape and torch.isfinite(seg).all()
    # frames with >= 2 s context on each side stay close to the whole-clip result
    rel = ((seg - whole).norm(dim=(1, 2)) / whole.norm(dim=(1, 2))).max().item()
    print(f"[audio] segmented (6 s windows, 2 s context) vs whole 15 s clip: max per-frame rel L2 = {rel:.3e}")
    assert rel < 0.5


def test_folder_round_trip_with_legacy_names(tmp_path):
    enc = tiny_audio_encoder(seed=7)
    folder = save_audio_encoder_folder(enc, tmp_path / "w2v")
    keys = load_file(str(folder / "model.safetensors")).keys()
    assert any(k.endswith("pos_conv_embed.conv.weight_g") for k in keys)
    assert all(k.startswith("wav2vec2.") for k in keys)
    loaded = load_audio_encoder(folder)
    x = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    assert torch.equal(loaded.encode(x), enc.encode(x))


def test_ctc_layout_and_pretraining_heads_are_skipped(tmp_path):
    """facebook/wav2vec2-base-960h style (lm_head.*) and pre-training heads load; encoder keys are strict."""
    enc = tiny_audio_encoder(seed=1)
    folder = save_audio_encoder_folder(enc, tmp_path / "ctc")
    state = load_file(str(folder / "model.safetensors"))
    state["lm_head.weight"] = torch.zeros(32, 32)
    state["quantizer.codevectors"] = torch.zeros(1, 32, 16)
    state["wav2vec2.masked_spec_embed"] = torch.zeros(32)
    save_file(state, str(folder / "model.safetensors"))
    load_audio_encoder(folder)
    del state["wav2vec2.encoder.layers.0.attention.k_proj.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="k_proj.weight"):
        load_audio_encoder(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(MissingWeightsError, match="config.json"):
        load_audio_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    with pytest.raises(MissingWeightsError, match="model.safetensors"):
        load_audio_encoder(tmp_path)


def test_real_size_config_builds_on_meta():
    from infinitetalk.models.audio import AudioEncoder

    with torch.device("meta"):
        enc = AudioEncoder(AudioEncoderConfig.base())
    n = sum(p.numel() for p in enc.parameters())
    assert 90e6 < n < 100e6  # wav2vec2-base: ~94M parameters without heads
    assert enc.config.receptive_field == 400 and enc.config.total_stride == 320


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, threading, time
    import numpy as np, torch
    torch.set_num_threads(2)
    mode, path = sys.argv[1], sys.argv[2]
    from infinitetalk.media.audio import load_speech
    from infinitetalk.runtime.tiny_models import tiny_audio_encoder
    from infinitetalk.models.audio import AudioEncoderConfig
    def now():  # current resident set in MB
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() / 2**20
    peak = [0.0]
    stop = threading.Event()
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], now())
            time.sleep(0.002)
    threading.Thread(target=sample, daemon=True).start()
    def rss():  # peak RSS sampled while the call ran
        stop.set(); time.sleep(0.01)
        return max(peak[0], now())
    if mode == "decode":
        base = now(); peak[0] = base; t = time.process_time()
        s = load_speech(path)
        out = dict(seconds=s.duration_s, base_mb=base, peak_mb=rss(), cpu_s=time.process_time() - t)
    else:
        cfg = AudioEncoderConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, conv_dim=(64,) * 7)
        enc = tiny_audio_encoder(seed=0, config=cfg)
        rng = np.random.default_rng(0)
        x = (rng.standard_normal(600 * 16000).astype(np.float32) * 0.1)
        base = now(); peak[0] = base; t = time.process_time()
        e = enc.encode(x)
        out = dict(seconds=600.0, frames=e.shape[0], base_mb=base, peak_mb=rss(), cpu_s=time.process_time() - t,
                   output_mb=e.numel() * 4 / 2**20)
    print(json.dumps(out))
    """
)


def _run_memory(mode: str, path: str = "-") -> dict:
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, mode, path], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ten_minute_audio_bounded_memory(tmp_path):
    """Decode a 10-minute 44.1 kHz stereo WAV and encode 10 minutes; peak RSS growth is bounded."""
    path = tmp_path / "long.wav"
    rng = np.random.default_rng(0)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(44100)
        t = np.arange(44100 * 10) / 44100
        for minute_block in range(60):  # 60 x 10 s
            tone = 0.2 * np.sin(2 * np.pi * (180 + minute_block) * t) + 0.02 * rng.standard_normal(t.shape)
            pcm = (np.stack([tone, 0.8 * tone], axis=1) * 32767).astype("<i2")
            w.writeframes(pcm.tobytes())
    dec = _run_memory("decode", str(path))
    grow = dec["peak_mb"] - dec["base_mb"]
    # the source as float32 stereo alone would be 202 MB; the 16 kHz output is 37 MB
    print(f"[memory] decode 10 min 44.1 kHz stereo WAV (RSS sampled every 2 ms): peak RSS {dec['peak_mb']:.0f} MB, growth {grow:.0f} MB, "
          f"CPU {dec['cpu_s']:.1f} s")
    assert abs(dec["seconds"] - 600.0) < 0.04
    # output 37 MB + resampler/loudness chunk buffers and allocator slack; a whole-file decode
    # (202 MB float32 stereo source + librosa/pyloudnorm copies) needs well over 500 MB
    assert grow < 200

    enc = _run_memory("encode")
    grow = enc["peak_mb"] - enc["base_mb"]
    print(f"[memory] encode 10 min (conv 64 ch, hidden 64, 2 layers): {enc['frames']} frames, peak RSS "
          f"{enc['peak_mb']:.0f} MB, growth {grow:.0f} MB (output {enc['output_mb']:.1f} MB), CPU {enc['cpu_s']:.1f} s")
    assert enc["frames"] == 15000
    # whole-clip would hold the first conv output (64 x 1.92M floats = 469 MB) twice and 15000^2 attention
    assert grow < 300


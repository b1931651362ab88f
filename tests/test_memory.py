"""Host memory does not grow with the video length: peak RSS of a 3-window and a 12-window
tiny run (separate processes) must agree within 30 MB, and within the 12-window run the RSS
after window 3 and after every later window must agree within 8 MB.

Keeping the frames would cost 72 x 64 x 128 x 3 bytes = 1.8 MB per window as uint8 (7 MB as
the float32 the VAE returns): 16 / 64 MB over nine windows. The peak margin is wider because the
speech preprocessing (decoded waveform, wav2vec2 convolution features of the whole clip) is
proportional to the audio length by design: +26 s of audio gave +13 MB peak for the tiny model.

The children run with MALLOC_MMAP_THRESHOLD_=65536: glibc otherwise raises its mmap threshold
after large frees and keeps later large blocks (the VAE's transient im2col buffers) in the heap,
which moves the peak by +-40 MB from run to run without any memory being held. With a fixed
threshold, large blocks go back to the system when freed, so the peak measures what the program
actually holds; frames kept by mistake would still count in full.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from test_e2e_tiny import check_video, image_hw, write_wav

PEAK_MARGIN_MB = 30.0
STEADY_MARGIN_MB = 8.0

_CHILD = """
import json, resource, sys
import psutil
from infinitetalk.generation.pipeline import InfiniteTalk
image, audio, output = sys.argv[1:4]
proc = psutil.Process()
after_window = []
def on_event(event):
    if event.kind == "window_finished":
        after_window.append(proc.memory_info().rss / 2**20)
pipe = InfiniteTalk.from_pretrained(model="tiny", device="cpu")
pipe.generate(output, image=image, audio=audio, sample_steps=1, progress=on_event)
def peak_mb():
    # VmHWM: peak RSS of this process image. ru_maxrss is not used: Linux keeps it across
    # execve, so a child forked from a big pytest process would report the parent's size.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
peak = peak_mb()
print("RESULT", json.dumps({"peak": peak, "after_window": after_window}))
"""


def _measure(image, audio, output) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(image), str(audio), str(output)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_peak_rss_flat_in_video_length(media_dir, tmp_path):
    from infinitetalk.media.audio_decode import decode_audio

    speech = decode_audio(media_dir / "speech_44k_stereo.wav", 16000)
    long = np.tile(speech, 4)[: int(34.9 * 16000)]  # 872 frames -> 12 windows
    short = long[: int(8.8 * 16000)]  # 220 frames -> 3 windows
    image = media_dir / "portrait.png"
    a3 = write_wav(tmp_path / "a3.wav", short, 16000)
    a12 = write_wav(tmp_path / "a12.wav", long, 16000)
    r3 = _measure(image, a3, tmp_path / "v3.mp4")
    r12 = _measure(image, a12, tmp_path / "v12.mp4")
    peak3, peak12 = r3["peak"], r12["peak"]
    steady = r12["after_window"]
    assert len(r3["after_window"]) == 3 and len(steady) == 12
    print(f"[memory] peak RSS: 3 windows {peak3:.1f} MB, 12 windows {peak12:.1f} MB, growth {peak12 - peak3:+.1f} MB "
          f"(margin {PEAK_MARGIN_MB} MB)")
    print(f"[memory] RSS after windows 3 / 6 / 9 / 12 of the long run: {steady[2]:.1f} / {steady[5]:.1f} / "
          f"{steady[8]:.1f} / {steady[11]:.1f} MB (margin {STEADY_MARGIN_MB} MB)")
    check_video(tmp_path / "v12.mp4", image_hw(image), expect_frames=872)
    assert peak12 - peak3 < PEAK_MARGIN_MB
    assert max(steady[2:]) - steady[2] < STEADY_MARGIN_MB

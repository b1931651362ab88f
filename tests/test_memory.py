"""Host memory does not grow with the video length: in one 9-window tiny run (a separate
process), the peak RSS at the end may exceed the peak reached by window 3 by at most 20 MB, and
the RSS after window 3 and after every later window must agree within 8 MB.

Keeping the frames would cost 72 x 64 x 128 x 3 bytes = 1.8 MB per window as uint8 (7 MB as
the float32 the VAE returns): 11 / 42 MB over the six windows after the third. Both peaks are
taken in the same run, so the speech preprocessing (decoded waveform, wav2vec2 features of the
whole clip, proportional to the audio length by design) is in both.

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
import pytest

from test_e2e_tiny import check_video, image_hw, write_wav

PEAK_MARGIN_MB = 20.0
STEADY_MARGIN_MB = 8.0

_CHILD = """
import json, resource, sys
import psutil
from infinitetalk.generation.pipeline import InfiniteTalk
image, audio, output = sys.argv[1:4]
proc = psutil.Process()
after_window, peak_after = [], []
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
def on_event(event):
    if event.kind == "window_finished":
        after_window.append(proc.memory_info().rss / 2**20)
        peak_after.append(peak_mb())
pipe = InfiniteTalk.from_pretrained(model="tiny", device="cpu")
pipe.generate(output, image=image, audio=audio, sample_steps=1, progress=on_event)
print("RESULT", json.dumps({"peak": peak_mb(), "peak_after": peak_after, "after_window": after_window}))
"""


def _measure(image, audio, output) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(image), str(audio), str(output)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_peak_rss_flat_in_video_length(media_dir, tmp_path):
    from infinitetalk.media.audio_decode import decode_audio

    speech = decode_audio(media_dir / "speech_44k_stereo.wav", 16000)
    long = np.tile(speech, 3)[: int(26.2 * 16000)]  # 655 frames -> 9 windows
    image = media_dir / "portrait.png"
    audio = write_wav(tmp_path / "a9.wav", long, 16000)
    run = _measure(image, audio, tmp_path / "v9.mp4")
    steady, peaks = run["after_window"], run["peak_after"]
    assert len(steady) == 9
    print(f"[memory] peak RSS: by window 3 {peaks[2]:.1f} MB, at the end {run['peak']:.1f} MB, growth "
          f"{run['peak'] - peaks[2]:+.1f} MB (margin {PEAK_MARGIN_MB} MB)")
    print(f"[memory] RSS after windows 3 / 6 / 9: {steady[2]:.1f} / {steady[5]:.1f} / {steady[8]:.1f} MB "
          f"(margin {STEADY_MARGIN_MB} MB)")
    check_video(tmp_path / "v9.mp4", image_hw(image), expect_frames=655)
    assert run["peak"] - peaks[2] < PEAK_MARGIN_MB
    assert max(steady[2:]) - steady[2] < STEADY_MARGIN_MB

"""Fault suite, inputs: every bad request is one sentence with exit 2 before any model loads, and
every good but unusual input is decoded as a viewer shows it.

Inputs are generated here (images in every Pillow mode, audio in the sample formats and rates
PyAV writes, containers with odd streams, arguments at and past their limits, special files);
each case runs `infinitetalk generate` in-process (`infinitetalk.cli.main`), or the job
service's `check` for accepted inputs, hashes the inputs before and after, and checks that
nothing is left in the output folder. Totals are printed at the end (see tests/faults.py).
"""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from faults import Inputs, png_header_only, run_cli, verdict, write_audio, write_video, write_wav
from infinitetalk.generation.job_state import OutputLock
from infinitetalk.service import JobService, JobSpec, RuntimeOptions


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    img = np.zeros((64, 96, 3), np.uint8)
    img[:32, :48] = 255
    img[32:, 48:] = (200, 40, 40)
    Image.fromarray(img).save(d / "face.png")
    write_wav(d / "speech.wav", 1.0)
    write_wav(d / "speech2.wav", 1.2, freq=300)
    write_wav(d / "long.wav", 6.0)
    return d


def _tiny(*args):
    return ["--model", "tiny", "--steps", "1", *args]


def _cases(b, d):
    img, wav, wav2 = b / "face.png", b / "speech.wav", b / "speech2.wav"
    out = d / "out.mp4"
    std = ["--image", img, "--audio", wav, "--output", out]
    nan_wav = write_audio(d / "nan.wav", "pcm_f32le", "flt", 16000,
                          samples=np.where(np.arange(16000) == 9000, np.nan, 0.1).astype(np.float32)[None])
    inf_wav = write_audio(d / "inf.wav", "pcm_f64le", "dbl", 22050,
                          samples=np.where(np.arange(22050) == 100, np.inf, 0.1).astype(np.float32)[None])
    (d / "text.png").write_text("not an image")
    (d / "pic.svg").write_text('<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>')
    png_header_only(d / "bomb.png", 20000, 20000)
    png_header_only(d / "huge.png", 200000, 200000)
    Image.new("L", (1, 65000), 128).save(d / "strip.png")
    Image.new("L", (12000, 1), 128).save(d / "band.png")
    cut = (b / "face.png").read_bytes()
    (d / "cut.png").write_bytes(cut[: len(cut) // 2])
    (d / "empty.wav").write_bytes(b"")
    os.mkfifo(d / "fifo.wav")
    os.mkfifo(d / "fifo.png")
    write_video(d / "silent.mp4", frames=5)
    write_audio(d / "audio_only.m4a", "aac", "fltp", 16000)
    job = d / "held.mp4.job"
    job.mkdir()
    write_wav(job / "inside.wav", 1.0)
    link = d / "link.mp4"
    link.symlink_to(wav)
    (d / "afolder.mp4").mkdir()
    return {
        # arguments at and past their limits
        "steps_0": (_tiny(*std, "--steps", "0"), "--steps"),
        "steps_huge": (_tiny(*std, "--steps", "1000000"), "--steps"),
        "seed_negative": (_tiny(*std, "--seed", "-1"), "--seed"),
        "seed_2_63": (_tiny(*std, "--seed", str(2**63)), "--seed"),
        "text_scale_nan": (_tiny(*std, "--text-guide-scale", "nan"), "finite"),
        "text_scale_inf": (_tiny(*std, "--text-guide-scale", "inf"), "finite"),
        "audio_scale_neg_inf": (_tiny(*std, "--audio-guide-scale", "-inf"), "finite"),
        "audio_scale_negative": (_tiny(*std, "--audio-guide-scale", "-1"), "--audio-guide-scale"),
        "shift_zero": (_tiny(*std, "--shift", "0"), "--shift"),
        "shift_nan": (_tiny(*std, "--shift", "nan"), "finite"),
        "color_1_5": (_tiny(*std, "--color-correction", "1.5"), "--color-correction"),
        "color_nan": (_tiny(*std, "--color-correction", "nan"), "finite"),
        "max_seconds_inf": (_tiny(*std, "--max-seconds", "inf"), "finite"),
        "max_seconds_zero": (_tiny(*std, "--max-seconds", "0"), "--max-seconds"),
        "max_seconds_nan": (_tiny(*std, "--max-seconds", "nan"), "finite"),
        "bbox_nan": (_tiny(*std, "--audio2", wav2, "--bbox1", "nan,0,10,10", "--bbox2", "10,0,20,10"), "finite"),
        "bbox_inf": (_tiny(*std, "--audio2", wav2, "--bbox1", "0,0,inf,10", "--bbox2", "10,0,20,10"), "finite"),
        "bbox_negative": (_tiny(*std, "--audio2", wav2, "--bbox1", "-10,0,50,50", "--bbox2", "50,0,96,64"),
                          "not inside"),
        "bbox_three_numbers": (_tiny(*std, "--audio2", wav2, "--bbox1", "0,0,10", "--bbox2", "10,0,20,10"),
                               "four numbers"),
        "size_1000": (_tiny(*std, "--size", "1000"), "--size"),
        "steps_not_int": (_tiny(*std, "--steps", "1.5"), "--steps"),
        "device_bogus": (_tiny(*std, "--device", "bogus"), "device"),
        "device_cuda_index": (_tiny(*std, "--device", "cuda:abc"), "device"),
        "variant_single_two_speakers": (_tiny(*std, "--audio2", wav2, "--variant", "single"), "multi"),
        "resume_and_restart": (_tiny(*std, "--resume", "--restart"), "--restart"),
        # outputs
        "output_wav_suffix": (_tiny("--image", img, "--audio", wav, "--output", d / "out.wav"), ".mp4"),
        "output_is_image": (_tiny("--image", d / "img_copy.png", "--audio", wav, "--output", d / "img_copy.png"),
                            "is the input"),
        "output_symlink_to_audio": (_tiny("--image", img, "--audio", wav, "--output", link), "is the input"),
        "output_is_folder": (_tiny("--image", img, "--audio", wav, "--output", d / "afolder.mp4"), "folder"),
        "input_inside_job_folder": (_tiny("--image", img, "--audio", job / "inside.wav", "--output", d / "held.mp4"),
                                    "job folder"),
        "output_not_writable": (_tiny("--image", img, "--audio", wav, "--output", "/sys/talk.mp4"), "cannot be written"),
        "output_in_proc": (_tiny("--image", img, "--audio", wav, "--output", "/proc/talk.mp4"), "cannot be written"),
        "output_parent_is_file": (_tiny("--image", img, "--audio", wav, "--output", img / "x.mp4"), "is a file"),
        # files
        "image_is_text": (_tiny("--image", d / "text.png", "--audio", wav, "--output", out), "not an image"),
        "image_svg": (_tiny("--image", d / "pic.svg", "--audio", wav, "--output", out), "svg"),
        "video_svg": (_tiny("--video", d / "pic.svg", "--audio", wav, "--output", out), "svg"),
        "image_bomb_20000": (_tiny("--image", d / "bomb.png", "--audio", wav, "--output", out), "megapixels"),
        "image_bomb_200000": (_tiny("--image", d / "huge.png", "--audio", wav, "--output", out), "megapixels"),
        "image_strip_1x65000": (_tiny("--image", d / "strip.png", "--audio", wav, "--output", out), "a side"),
        "image_band_12000x1": (_tiny("--image", d / "band.png", "--audio", wav, "--output", out), "8:1"),
        "image_truncated": (_tiny("--image", d / "cut.png", "--audio", wav, "--output", out), "truncated"),
        "image_fifo": (_tiny("--image", d / "fifo.png", "--audio", wav, "--output", out), "pipe"),
        "audio_fifo": (_tiny("--image", img, "--audio", d / "fifo.wav", "--output", out), "pipe"),
        "audio_dev_zero": (_tiny("--image", img, "--audio", "/dev/zero", "--output", out), "device"),
        "audio_empty": (_tiny("--image", img, "--audio", d / "empty.wav", "--output", out), "empty"),
        "audio_nan_samples": (_tiny("--image", img, "--audio", nan_wav, "--output", out), "nan"),
        "audio_inf_samples": (_tiny("--image", img, "--audio", inf_wav, "--output", out), "infinite"),
        "audio_is_silent_video": (_tiny("--image", img, "--audio", d / "silent.mp4", "--output", out), "no audio"),
        "video_is_audio_only": (_tiny("--video", d / "audio_only.m4a", "--audio", wav, "--output", out), "no video"),
        "audio_folder": (_tiny("--image", img, "--audio", d, "--output", out), "folder"),
        "image_is_video": (_tiny("--image", d / "silent.mp4", "--audio", wav, "--output", out), "--video"),
        "video_is_image": (_tiny("--video", img, "--audio", wav, "--output", out), "--image"),
    }



@pytest.fixture(scope="module")
def cases(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("cases")
    (d / "img_copy.png").write_bytes((base / "face.png").read_bytes())
    return d, _cases(base, d)


def test_bad_requests_are_one_sentence(cases, base, tally):
    d, table = cases
    keep = {p.name for p in d.iterdir()}
    failures = []
    for name, (args, phrase) in table.items():
        inputs = Inputs(*(a for a in args if hasattr(a, "is_file")), base / "face.png", base / "speech.wav")
        rc, err, tb = run_cli(args)
        try:
            verdict(tally, name, rc, err, tb, inputs, folder=d, keep=keep, expect="error", phrase=phrase)
        except AssertionError as exc:
            failures.append(str(exc))
    assert (d / "held.mp4.job" / "inside.wav").is_file()
    assert not failures, "\n".join(failures)


def test_unwritable_folder_reason_names_the_cause(tmp_path):
    """A folder that exists but takes no new files (/proc: ENOENT as root) is not 'no such file'."""
    import errno

    from infinitetalk.service.validate import _probe_reason

    assert "does not accept new files" in _probe_reason(tmp_path, OSError(errno.ENOENT, "No such file or directory"))
    assert "not writable" in _probe_reason(tmp_path, OSError(errno.EACCES, "Permission denied"))
    assert "read-only" in _probe_reason(tmp_path, OSError(errno.EROFS, "Read-only file system"))


def test_busy_output_is_refused(base, tmp_path, tally):
    out = tmp_path / "busy.mp4"
    inputs = Inputs(base / "face.png", base / "speech.wav")
    with OutputLock(out):
        keep = {p.name for p in tmp_path.iterdir()}
        rc, err, tb = run_cli(_tiny("--image", base / "face.png", "--audio", base / "speech.wav", "--output", out))
        assert (out.parent / "busy.mp4.job" / "lock").read_text().split()[0] == str(os.getpid())
        verdict(tally, "busy_output", rc, err, tb, inputs, folder=tmp_path, keep=keep, expect="error",
                phrase=f"pid {os.getpid()}")
    assert list(tmp_path.iterdir()) == [], "the released lock left files"


# ---- accepted inputs: decoded as displayed -----------------------------------------------------

IMAGE_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I",
               "I;16", "I;16B", "I;16L", "F"]


def _mode_image(mode: str) -> Image.Image:
    gray = np.full((48, 64), 0.6)
    if mode.startswith("I;16"):
        return Image.frombytes(mode, (64, 48), np.full((48, 64), 39321, ">u2" if mode == "I;16B" else "<u2").tobytes())
    if mode == "I":
        return Image.fromarray(np.full((48, 64), 39321, np.int32))
    if mode == "F":
        return Image.fromarray(gray.astype(np.float32))
    rgb = Image.fromarray(np.full((48, 64, 3), 153, np.uint8))
    return rgb.convert("LA").convert("La") if mode == "La" else rgb.convert(mode)


def _check(spec: JobSpec):
    return JobService().check(spec)


def _spec(tmp, **kw) -> JobSpec:
    return JobSpec(output=str(tmp / "o.mp4"), runtime=RuntimeOptions(model="tiny"), **kw)


def _saved(image: Image.Image, folder, mode: str):
    fmt = {"CMYK": "tiff", "YCbCr": "jpeg", "LAB": "tiff", "HSV": "tiff", "I": "tiff", "F": "tiff", "La": "tiff",
           "RGBa": "tiff", "RGBX": "tiff", "PA": "png", "I;16B": "tiff", "I;16L": "tiff", "1": "bmp"}.get(mode, "png")
    path = folder / f"mode_{mode.replace(';', '_')}.{fmt}"
    try:
        image.save(path)
    except (OSError, ValueError, KeyError):
        path = None
    return path


def test_every_pillow_mode_decodes_by_its_range(base, tmp_path, tally):
    """Saved where Pillow can write the mode, else checked in memory; 60% gray must stay ~153."""
    from infinitetalk.media.images import to_rgb

    for mode in IMAGE_MODES:
        tally.tried += 1
        image = _mode_image(mode)
        path = _saved(image, tmp_path, mode)
        if path is not None:
            inputs = Inputs(path)
            prepared = _check(_spec(tmp_path, image=str(path), audio=str(base / "speech.wav")))
            pixels = (prepared.inputs.reference[:, 0] + 1) * 127.5
            assert inputs.lost() == []
        else:
            pixels = torch.from_numpy(np.asarray(to_rgb(image), dtype=np.float32)).permute(2, 0, 1)
        tolerance = 10 if mode == "1" else 4  # mode 1 is dithered: its mean keeps the gray level
        assert abs(float(pixels.mean()) - 153.0) < tolerance, (mode, float(pixels.mean()))
        tally.accepted += 1


def test_exif_orientation_is_applied(base, tmp_path, tally):
    stored = np.zeros((120, 60, 3), np.uint8)  # stored portrait 60x120, top band white
    stored[:20] = 255
    for orientation, hw in ((6, (60, 120)), (8, (60, 120)), (3, (120, 60)), (1, (120, 60))):
        tally.tried += 1
        path = tmp_path / f"phone_{orientation}.jpg"
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(stored).save(path, exif=exif, quality=95)
        prepared = _check(_spec(tmp_path, image=str(path), audio=str(base / "speech.wav")))
        assert prepared.inputs.src_hw == hw, (orientation, prepared.inputs.src_hw)
        ref = prepared.inputs.reference[:, 0].mean(0)  # [H, W] in [-1, 1]
        bright = {6: ref[:, -ref.shape[1] // 8:], 8: ref[:, : ref.shape[1] // 8], 3: ref[-ref.shape[0] // 8:],
                  1: ref[: ref.shape[0] // 8]}[orientation]
        assert float(bright.mean()) > 0.5, f"orientation {orientation}: the white band is not where it is displayed"
        tally.accepted += 1


# where the stored top-left white quarter of `write_video` is displayed: the display matrix
# rotates counterclockwise by its angle (FFmpeg's -display_rotation, PyAV's VideoFrame.rotation)
ROTATED_WHITE = {90: "bottom-left", -90: "top-right", 180: "bottom-right"}


def _quadrant_means(ref: torch.Tensor) -> dict:
    h, w = ref.shape
    return {"top-left": float(ref[: h // 2, : w // 2].mean()), "top-right": float(ref[: h // 2, w // 2:].mean()),
            "bottom-left": float(ref[h // 2:, : w // 2].mean()), "bottom-right": float(ref[h // 2:, w // 2:].mean())}


def test_video_rotation_is_applied(base, tmp_path, tally):
    for rotation, white in ROTATED_WHITE.items():
        tally.tried += 1
        path = write_video(tmp_path / f"rot{rotation}.mp4", frames=4, size=(96, 64), rotation=rotation)
        prepared = _check(_spec(tmp_path, video=str(path), audio=str(base / "speech.wav")))
        assert prepared.inputs.src_hw == ((64, 96) if rotation == 180 else (96, 64)), prepared.inputs.src_hw
        quadrants = _quadrant_means(prepared.inputs.reference[:, 0].mean(0))  # first frame, [H, W] in [-1, 1]
        assert quadrants[white] > 0.5, f"rotation {rotation}: the white quarter is not {white}: {quadrants}"
        assert all(v < 0 for k, v in quadrants.items() if k != white), f"rotation {rotation}: {quadrants}"
        tally.accepted += 1


AUDIO_FORMATS = [  # (codec, sample format, rate, layout, container suffix)
    ("pcm_u8", "u8", 8000, "mono", "wav"), ("pcm_s16le", "s16", 11025, "stereo", "wav"),
    ("pcm_s24le", "s32", 22050, "mono", "wav"), ("pcm_s32le", "s32", 44100, "stereo", "wav"),
    ("pcm_f32le", "flt", 48000, "mono", "wav"), ("pcm_f64le", "dbl", 96000, "stereo", "wav"),
    ("flac", "s16", 32000, "mono", "flac"), ("flac", "s32", 44100, "stereo", "flac"),
    ("aac", "fltp", 44100, "stereo", "m4a"), ("aac", "fltp", 24000, "mono", "m4a"),
    ("libopus", "flt", 48000, "stereo", "ogg"), ("libmp3lame", "fltp", 44100, "stereo", "mp3"),
    ("pcm_s16le", "s16", 16000, "mono", "mkv"),
]


@pytest.mark.parametrize("codec,fmt,rate,layout,suffix", AUDIO_FORMATS)
def test_audio_formats_decode(codec, fmt, rate, layout, suffix, base, tmp_path, tally):
    import av

    tally.tried += 1
    path = tmp_path / f"a_{codec}_{rate}.{suffix}"
    try:
        write_audio(path, codec, fmt, rate, layout, seconds=1.0)
    except (av.error.FFmpegError, ValueError) as exc:
        tally.tried -= 1
        pytest.skip(f"this PyAV build cannot write {codec}/{fmt}: {exc}")
    prepared = _check(_spec(tmp_path, image=str(base / "face.png"), audio=str(path)))
    seconds = prepared.inputs.tracks.duration_s
    assert 0.95 <= seconds <= 1.1, seconds
    assert np.isfinite(prepared.inputs.tracks.mix).all()
    tally.accepted += 1


def test_odd_containers(base, tmp_path, tally):
    """A video with its own sound used as the speech; a two-video-stream file; an mkv with sound."""
    tally.tried += 3
    talking = write_video(tmp_path / "talking.mp4", frames=30, audio=True)
    prepared = _check(_spec(tmp_path, video=str(talking), audio=str(talking)))
    assert prepared.inputs.is_video and prepared.inputs.tracks.num_frames >= 28
    import av

    two = tmp_path / "two_streams.mkv"
    with av.open(str(two), "w") as out:
        streams = [out.add_stream("libx264", rate=25) for _ in range(2)]
        for s, (w, h) in zip(streams, ((64, 48), (32, 32))):
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(3):
            for s in streams:
                f = av.VideoFrame.from_ndarray(np.full((s.height, s.width, 3), 90, np.uint8), format="rgb24")
                f.pts = i
                out.mux(s.encode(f))
        for s in streams:
            out.mux(s.encode(None))
    prepared = _check(_spec(tmp_path, video=str(two), audio=str(base / "speech.wav")))
    assert prepared.inputs.src_hw == (48, 64)
    sound = write_audio(tmp_path / "speech.mka", "pcm_s16le", "s16", 44100, "stereo", container="matroska")
    prepared = _check(_spec(tmp_path, image=str(base / "face.png"), audio=str(sound)))
    assert prepared.inputs.tracks.sample_rate == 16000
    tally.accepted += 3


def test_notices_say_what_is_ignored_or_cut(base, tmp_path, tally):
    tally.tried += 2
    prepared = _check(_spec(tmp_path, image=str(base / "face.png"), audio=str(base / "speech.wav"), audio_type="add"))
    assert any("--audio-type add" in n and "ignored" in n for n in prepared.notices), prepared.notices
    prepared = _check(_spec(tmp_path, image=str(base / "face.png"), audio=str(base / "long.wav"), mode="clip",
                            frame_num=21))
    assert any("clip mode" in n and "not used" in n for n in prepared.notices), prepared.notices
    tally.accepted += 2


def test_special_file_kinds_are_named(tmp_path):
    from infinitetalk.errors import InputError
    from infinitetalk.media.images import regular_file

    os.mkfifo(tmp_path / "p")
    for path, word in ((tmp_path / "p", "pipe"), ("/dev/zero", "device"), (tmp_path, "folder")):
        with pytest.raises(InputError, match=word):
            regular_file(path, "audio")
    assert stat.S_ISFIFO(os.stat(tmp_path / "p").st_mode)

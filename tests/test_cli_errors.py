"""Bad input never gives a traceback or a partial output file, and exits with code 2.

Each case runs the real command in-process (the inputs are checked before any model is built,
so these are fast); one case runs it as a subprocess to check the exit code and the absence of
a traceback as a user sees them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infinitetalk.cli import main
from infinitetalk.media.segments import write_segment


def _run(args: list[str], capsys) -> tuple[int, str]:
    rc = main(["generate", *args])
    err = capsys.readouterr().err
    return rc, err


def _assert_clean_failure(rc: int, err: str, out_dir: Path, *phrases: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: ") or "\nerror: " in err, err
    for phrase in phrases:
        assert phrase.lower() in err.lower(), err
    leftovers = [p.name for p in out_dir.iterdir() if p.name.startswith(("out", ".out"))]
    assert leftovers == [], leftovers


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "notimage.png").write_text("this is text, not a picture")
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "garbage.wav").write_bytes(os.urandom(4096))
    (tmp_path / "bad.json").write_text("{'prompt': not json")
    import numpy as np

    write_segment(tmp_path / "silent_video.mp4", np.zeros((5, 32, 32, 3), dtype=np.uint8))
    return tmp_path


def _cases(media: Path, bad: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    img, speech = str(media / "portrait.png"), str(media / "speech.mp3")
    return {
        "not_an_image": (["--image", str(bad / "notimage.png"), "--audio", speech], ("not an image",)),
        "empty_audio": (["--image", img, "--audio", str(bad / "empty.wav")], ("empty",)),
        "unreadable_audio": (["--image", img, "--audio", str(bad / "garbage.wav")], ("audio",)),
        "video_without_audio": (["--image", img, "--audio", str(bad / "silent_video.mp4")], ("no audio stream",)),
        "missing_audio": (["--image", img, "--audio", str(bad / "nope.wav")], ("does not exist",)),
        "missing_image": (["--image", str(bad / "nope.png"), "--audio", speech], ("does not exist",)),
        "box_outside": (["--image", img, "--audio", speech, "--audio2", speech, "--bbox1", "0,0,10,10",
                         "--bbox2", "0,0,99999,10"], ("not inside",)),
        "two_boxes_one_speaker": (["--image", img, "--audio", speech, "--bbox1", "0,0,10,10", "--bbox2", "10,0,20,10"],
                                  ("only one speaker",)),
        "one_box_two_speakers": (["--image", img, "--audio", speech, "--audio2", speech, "--bbox1", "0,0,10,10"],
                                 ("box for each",)),
        "malformed_box": (["--image", img, "--audio", speech, "--audio2", speech, "--bbox1", "0,0,10",
                           "--bbox2", "1,1,2,2"], ("four numbers",)),
        "invalid_json": (["--input-json", str(bad / "bad.json")], ("not valid json",)),
        "image_as_video": (["--video", img, "--audio", speech], ("is an image",)),
        "video_as_image": (["--image", str(media / "talking_458px_25fps.mp4"), "--audio", speech], ("is a video",)),
        "no_audio_given": (["--image", img], ("--audio",)),
        "missing_lora": (["--image", img, "--audio", speech, "--lora", str(bad / "nope.safetensors:0.5")],
                         ("does not exist",)),
        "bad_lora_scale": (["--image", img, "--audio", speech, "--lora", str(bad / "bad.json") + ":half"],
                           ("must be a number",)),
    }


CASE_NAMES = list(_cases(Path("."), Path(".")))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_is_a_clean_error(case, media_dir, bad_files, capsys):
    args, phrases = _cases(media_dir, bad_files)[case]
    out_dir = bad_files / "outdir"
    out_dir.mkdir()
    rc, err = _run(["--model", "tiny", *args, "--output", str(out_dir / "out.mp4")], capsys)
    _assert_clean_failure(rc, err, out_dir, *phrases)


def test_missing_weights_names_files_and_command(media_dir, tmp_path, capsys):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    weights = tmp_path / "no_weights_here"
    rc, err = _run(["--image", str(media_dir / "portrait.png"), "--audio", str(media_dir / "speech.mp3"),
                    "--weights", str(weights), "--output", str(out_dir / "out.mp4")], capsys)
    _assert_clean_failure(rc, err, out_dir, "missing", "infinitetalk download --variant single --dir", "Wan2.1_VAE.pth")


def test_missing_weights_subprocess_exit_code(media_dir, tmp_path):
    out = tmp_path / "out.mp4"
    env = dict(os.environ, INFINITETALK_WEIGHTS=str(tmp_path / "empty_weights"))
    proc = subprocess.run(
        [sys.executable, "-m", "infinitetalk.cli", "generate", "--image", str(media_dir / "portrait.png"),
         "--audio", str(media_dir / "speech.mp3"), "--output", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "infinitetalk download" in proc.stderr
    assert not out.exists()


def test_input_json_relative_paths_and_official_bbox(media_dir, tmp_path, capsys):
    """Official JSON (bbox with x on rows) runs end to end; relative paths resolve next to the JSON."""
    import shutil

    for name in ("two_people.png", "speaker1.wav", "speaker2.wav"):
        shutil.copy(media_dir / name, tmp_path / name)
    spec = {
        "prompt": "Two people talk.",
        "cond_video": "two_people.png",
        "cond_audio": {"person1": "speaker1.wav", "person2": "speaker2.wav"},
        "audio_type": "para",
        "bbox": {"person1": [0, 0, 1440, 1280], "person2": [0, 1280, 1440, 2560]},
    }
    (tmp_path / "job.json").write_text(json.dumps(spec))
    out = tmp_path / "json.mp4"
    rc = main(["generate", "--model", "tiny", "--steps", "1", "--mode", "clip", "--input-json",
               str(tmp_path / "job.json"), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert out.is_file()


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--model tiny" in text and "--resume" in text


def test_info_runs(capsys, tmp_path):
    rc = main(["info", "--weights", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "torch" in out and "weights single" in out and "missing" in out


def test_download_unreachable_hub_is_a_clean_error(tmp_path):
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0", HF_HUB_ETAG_TIMEOUT="2",
               HF_HUB_DOWNLOAD_TIMEOUT="2")  # nothing listens on the discard port
    proc = subprocess.run([sys.executable, "-m", "infinitetalk.cli", "download", "--dir", str(tmp_path / "w")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Could not download" in proc.stderr


def test_preset_lora_missing_names_the_download_command(media_dir, tmp_path, capsys):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    rc, err = _run(["--image", str(media_dir / "portrait.png"), "--audio", str(media_dir / "speech.mp3"),
                    "--preset", "fast", "--weights", str(tmp_path / "w"), "--output", str(out_dir / "out.mp4")], capsys)
    _assert_clean_failure(rc, err, out_dir, "infinitetalk download --lora fast", "lightx2v")

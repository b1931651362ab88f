"""What the command shows: log lines when stderr is a file (one per window, start and end, every
warning in one format), the rich live display on a terminal, --version, the example files the
help names, and an internal error as one line with the traceback in a log file (exit code 1).

Tiny jobs with 9-frame windows (motion_frame 1) keep it cheap.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from infinitetalk import __version__
from infinitetalk.cli import GENERATE_EXAMPLES, main
from infinitetalk.console import LogLines, RichDisplay
from infinitetalk.service import JobService, JobSpec, RuntimeOptions

from test_e2e_tiny import cut_wav

REPO = Path(__file__).resolve().parents[1]
SHORT = ["--steps", "1", "--frame-num", "9", "--motion-frame", "1"]
START = re.compile(r"^\d+ frames \(\d+\.\d\d s\) at \d+x\d+, \d+ window\(s\) of \d+ steps, seed \d+")
WINDOW = re.compile(r"^window \d+/\d+ done: \d+ frames so far, .* elapsed \d\d:\d\d  eta (\d\d:\d\d|--:--)$")
WARNING = re.compile(r"^warning: [^\n]+$")


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"infinitetalk {__version__}"


def test_help_names_only_files_that_exist():
    named = re.findall(r"examples/[\w./-]+", GENERATE_EXAMPLES)
    assert named, GENERATE_EXAMPLES
    for path in named:
        assert (REPO / path).is_file(), f"the help names {path}, which does not exist"


def test_log_file_lines_and_one_warning_format(tmp_path, capsys, monkeypatch):
    """The example JSON on the tiny model, with stderr not a terminal: the start line, one line
    per window, "wrote" once; three warnings (tiny model, box for one speaker, fp8 attention off
    the fast path) all in the one log format."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "example.mp4"
    rc = main(["generate", "--model", "tiny", "--input-json", "examples/single.json", "--max-seconds", "0.6",
               "--bbox1", "0,0,100,100", "--fp8-attention", *SHORT, "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    lines = err.splitlines()
    print(err)
    assert START.match(lines[0] if not lines[0].startswith("warning") else next(
        ln for ln in lines if not ln.startswith("warning"))), err
    windows = [ln for ln in lines if ln.startswith("window ")]
    assert len(windows) == 2 and all(WINDOW.match(ln) for ln in windows), err
    assert lines[-1].startswith(f"wrote {out} (15 frames, 0.60 s) in ") and err.count("wrote ") == 1
    warnings = [ln for ln in lines if not (START.match(ln) or WINDOW.match(ln) or ln.startswith("wrote "))]
    assert len(warnings) == 3 and all(WARNING.match(ln) for ln in warnings), warnings
    assert "RANDOM" in err and "box" in err and "fp8 attention" in err
    assert "step" not in err.replace("steps, seed", "") and "WARNING" not in err and "note:" not in err
    assert out.is_file()


def test_rich_display_on_a_terminal(media_dir, tmp_path):
    """The same events on a (forced) terminal: bars per window and per step with elapsed / ETA,
    and the window lines above them; the log renderer gets exactly one line per window."""
    audio = cut_wav(media_dir, tmp_path, 0.6)
    spec = JobSpec(output=str(tmp_path / "tty.mp4"), image=str(media_dir / "portrait.png"), audio=str(audio),
                   steps=2, frame_num=9, motion_frame=1, runtime=RuntimeOptions(model="tiny", device="cpu"))
    screen, log_file = io.StringIO(), io.StringIO()
    display = RichDisplay(Console(file=screen, force_terminal=True, width=110, highlight=False))
    lines = LogLines(log_file)

    def both(event):
        display(event)
        lines(event)

    JobService().run(spec, progress=both)
    display.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "window 2/2" in text and "2/2" in text and "elapsed" in text and "eta" in text
    assert "window 1/2 done" in text and "window 2/2 done" in text and f"wrote {spec.output}" in text
    logged = log_file.getvalue().splitlines()
    assert len(logged) == 4 and START.match(logged[0]) and logged[-1].startswith("wrote "), logged


def test_internal_error_is_one_line_with_a_log_file(media_dir, tmp_path, capsys, monkeypatch):
    """A bug (here: a failure injected into the model loader, since no real bug is known) prints
    one short line naming a log file with the traceback, exit code 1, and leaves no output."""
    def broken_loader(settings):
        raise RuntimeError("loader exploded\nsecond line")

    monkeypatch.setattr(JobService, "_load", staticmethod(broken_loader))
    out = tmp_path / "out.mp4"
    rc = main(["generate", "--model", "tiny", "--quiet", "--image", str(media_dir / "portrait.png"),
               "--audio", str(cut_wav(media_dir, tmp_path, 0.5)), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    match = re.match(r"internal error, please report it: RuntimeError: loader exploded second line "
                     r"\(details in (.+\.log)\)$", err.strip())
    assert match, err
    log = Path(match.group(1))
    try:
        text = log.read_text()
        assert "Traceback" in text and "broken_loader" in text and "command: infinitetalk generate" in text
    finally:
        log.unlink()
    assert not out.exists()

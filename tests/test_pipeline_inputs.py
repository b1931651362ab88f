"""Input checking and decoding before any model runs, the official input JSON, and the job state."""
from __future__ import annotations

import json

import pytest
import torch

from infinitetalk.config import GenerationConfig
from infinitetalk.errors import InputError, ResumeError
from infinitetalk.generation.inputs import GenerationRequest, parse_box, prepare_inputs, read_input_json
from infinitetalk.generation.job_state import JobDir, JobState, file_digest
from infinitetalk.generation.components import config_for


def test_official_json_bbox_rows_become_our_x_horizontal(tmp_path, media_dir):
    spec = {
        "prompt": "p",
        "cond_video": str(media_dir / "two_people.png"),
        "cond_audio": {"person1": str(media_dir / "speaker1.wav"), "person2": str(media_dir / "speaker2.wav")},
        "audio_type": "add",
        "bbox": {"person1": [10, 20, 300, 400], "person2": [11, 21, 301, 401]},
    }
    (tmp_path / "a.json").write_text(json.dumps(spec))
    fields = read_input_json(tmp_path / "a.json")
    assert fields["image"] == media_dir / "two_people.png"
    assert fields["audio_type"] == "add"
    # official [x_min(row), y_min(col), x_max, y_max] -> ours (x=col, y=row)
    assert fields["boxes"] == ((20.0, 10.0, 400.0, 300.0), (21.0, 11.0, 401.0, 301.0))


def test_json_video_condition_and_missing_keys(tmp_path, media_dir):
    (tmp_path / "v.json").write_text(json.dumps({"cond_video": str(media_dir / "talking_458px_25fps.mp4"),
                                                 "cond_audio": {"person1": str(media_dir / "speech.mp3")}}))
    fields = read_input_json(tmp_path / "v.json")
    assert "video" in fields and "image" not in fields and fields["prompt"] == ""
    (tmp_path / "bad.json").write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(InputError, match="cond_video"):
        read_input_json(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text(json.dumps({"cond_video": "a.png", "cond_audio": {"person3": "x"}}))
    with pytest.raises(InputError, match="person1"):
        read_input_json(tmp_path / "bad2.json")


def test_parse_box():
    assert parse_box("1, 2,3,4", "s") == (1.0, 2.0, 3.0, 4.0)
    assert parse_box(None, "s") is None
    with pytest.raises(InputError, match="four numbers"):
        parse_box("1,2,x,4", "s")


def test_prepare_inputs_bucket_masks_and_tracks(media_dir):
    cfg = config_for("tiny")
    src = media_dir / "two_people.png"
    req = GenerationRequest(audio=media_dir / "speaker1.wav", audio2=media_dir / "speaker2.wav", image=src,
                            audio_type="add", boxes=((0, 0, 1280, 1440), (1280, 0, 2560, 1440)))
    prepared = prepare_inputs(req, cfg)
    h, w = prepared.target_hw
    assert max(h, w) == 128 and h % 16 == 0 and w % 16 == 0
    assert prepared.reference.shape == (3, 1, h, w)
    assert -1.0 <= prepared.reference.min() and prepared.reference.max() <= 1.0
    assert prepared.masks.shape == (3, h // 8, w // 8)
    # left half is speaker 1, right half speaker 2, no background inside the boxes
    assert prepared.masks[0, :, : w // 16].min() == 1 and prepared.masks[1, :, : w // 16].max() == 0
    assert prepared.masks[1, :, w // 16 :].min() == 1 and prepared.masks[2].sum() == 0
    # 'add': speaker 2 starts after speaker 1; the sum is the sound track
    s1, s2 = prepared.tracks.speakers
    assert len(s1) == len(s2) == len(prepared.tracks.mix)
    assert prepared.audio_frames == int(len(s1) / 16000 * 25)
    assert torch.equal(torch.from_numpy(prepared.tracks.mix), torch.from_numpy(s1 + s2))


def test_tiny_config_defaults():
    cfg = config_for("tiny")
    assert cfg.bucket_longest_side == 128 and cfg.sample_steps == 40
    assert config_for("tiny", GenerationConfig(sample_steps=3)).bucket_longest_side == 128
    assert config_for("infinitetalk-14b").sample_steps == 40
    with pytest.raises(InputError):
        config_for("nope")


def _state(n: int, job=None) -> JobState:
    segments = [(file_digest(job.segment_path(i)), 81) for i in range(n)] if job is not None else []
    return JobState(n, 81 * n, torch.randn(3, 9, 8, 8), torch.Generator().manual_seed(n).get_state(), segments)


def test_job_dir_resume_and_mismatch(tmp_path):
    out = tmp_path / "video.mp4"
    job = JobDir(out)
    assert job.root == tmp_path / "video.mp4.job"
    assert job.start({"seed": 1}, resume=False) is None
    for i in range(3):
        job.segment_path(i).write_bytes(b"seg")
    job.save_state(_state(2, job))  # windows 0, 1 finished; segment 2 was killed before its state
    state = JobDir(out).start({"seed": 1}, resume=True)
    assert state.next_window == 2 and state.frames_written == 162
    assert not job.segment_path(2).exists() and job.segment_path(1).exists()
    with pytest.raises(ResumeError, match="seed"):
        JobDir(out).start({"seed": 2}, resume=True)
    with pytest.raises(ResumeError, match="--restart"):  # finished windows are never discarded silently
        JobDir(out).start({"seed": 2}, resume=False)
    assert job.segment_path(0).exists()
    assert JobDir(out).start({"seed": 2}, resume=False, restart=True) is None  # on purpose: clears the folder
    assert not job.segment_path(0).exists()


def test_job_state_round_trip(tmp_path):
    job = JobDir(tmp_path / "o.mp4")
    job.start({}, resume=False)
    st = _state(4)
    job.save_state(st)
    back = job.load_state()
    assert back.next_window == 4 and torch.equal(back.motion, st.motion) and torch.equal(back.rng_state, st.rng_state)

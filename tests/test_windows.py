"""Window planner: official streaming arithmetic, cut to the audio, short audio, clip mode, fixture starts."""
import json

import pytest

from infinitetalk.errors import InputError
from infinitetalk.generation.windows import plan_windows


def _assemble(plan):
    """Output frame index -> (window, frame within window), checking the pieces tile the video."""
    covered = []
    for w in plan:
        frames = list(range(w.keep.start, w.keep.stop))
        assert [w.start + j for j in frames] == list(range(w.out_start, w.out_end))
        covered += list(range(w.out_start, w.out_end))
    assert covered == list(range(plan.total_frames))


@pytest.mark.parametrize("audio_frames", [1, 10, 80, 81, 82, 153, 154, 200, 1000, 1234])
def test_tiles_output_and_cuts_to_audio(audio_frames):
    plan = plan_windows(audio_frames)
    assert plan.total_frames == audio_frames
    _assemble(plan)
    assert plan[0].is_first and plan[0].keep.start == 0 and plan[0].motion_frames == 1
    assert plan[-1].is_last and sum(w.is_last for w in plan) == 1
    for w in plan.windows[1:]:
        assert w.keep.start == 9 and w.motion_frames == 9 and w.motion_latent_frames == 3
        assert w.start == 72 * w.index and w.end - w.start == 81
        assert w.reference_time_s == pytest.approx(w.start / 25)
    for w in plan.windows[:-1]:
        assert w.end < audio_frames and not w.needs_padding and w.new_frames == (81 if w.is_first else 72)


def test_official_last_window_rule():
    # Official: after window k, s += 72; the next window is last when s + 81 >= len.
    plan = plan_windows(200)
    assert [w.start for w in plan] == [0, 72, 144]
    assert plan[-1].needs_padding and plan[-1].end == 225
    assert plan_windows(153)[-1].start == 72 and len(plan_windows(153)) == 2
    assert len(plan_windows(154)) == 3


def test_short_audio_single_window():
    plan = plan_windows(30)
    assert len(plan) == 1 and plan.total_frames == 30
    w = plan[0]
    assert w.keep == slice(0, 30) and w.needs_padding and w.is_last


def test_clip_mode_and_cap():
    plan = plan_windows(500, mode="clip")
    assert len(plan) == 1 and plan.total_frames == 81 and not plan[0].needs_padding
    capped = plan_windows(1000, mode="streaming", max_frames=250)
    assert capped.total_frames == 250 and capped[-1].out_end == 250
    assert [w.start for w in capped] == [0, 72, 144, 216]
    assert not capped[-1].needs_padding  # the cap, not the audio, ends it
    assert plan_windows(1000, max_frames=50).total_frames == 50 and len(plan_windows(1000, max_frames=50)) == 1


def test_invalid():
    with pytest.raises(InputError):
        plan_windows(0)
    with pytest.raises(InputError):
        plan_windows(100, frame_num=80)
    with pytest.raises(InputError):
        plan_windows(100, motion_frame=81)
    with pytest.raises(InputError):
        plan_windows(100, mode="loop")


def test_matches_fixture_chunk_starts(parity_dir):
    """Chunk starts and padding of the official loop recorded in parity/window/window.json."""
    info = json.loads((parity_dir / "window" / "window.json").read_text())
    plan = plan_windows(info["F"], frame_num=info["clip_length"], motion_frame=info["motion_frame"],
                        max_frames=info["max_frames_num"])
    by_start = {w.start: w for w in plan}
    loop_cases = [c for c in info["cases"].values() if c["audio_start_idx"] % (info["clip_length"] - info["motion_frame"]) == 0]
    assert loop_cases
    for case in loop_cases:
        w = by_start[case["audio_start_idx"]]
        padded = case["flip_extension_miss_length"] > 0
        assert w.needs_padding == padded
        if padded:
            assert case["flip_extension_miss_length"] == w.end - info["F"] + 3
    assert plan[-1].start == max(c["audio_start_idx"] for c in loop_cases)

"""Conditioning frames: buckets, resize + centre crop, video frames by time, reference masks."""
import json
import math

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from infinitetalk.errors import InputError, MediaError
from infinitetalk.media.frames import (
    ASPECT_RATIO_627, ASPECT_RATIO_960, VideoFrameReader, choose_bucket, load_image, prepare_frame,
    reference_masks, size_buckets,
)
from infinitetalk.media.writer import VideoWriter


def test_bucket_tables():
    assert len(ASPECT_RATIO_627) == 15 and len(ASPECT_RATIO_960) == 21
    for table in (ASPECT_RATIO_627, ASPECT_RATIO_960):
        for key, (h, w) in table.items():
            assert h % 64 == 0 and w % 64 == 0 and abs(h / w - float(key)) < 0.1
    assert choose_bucket(1000, 1000, size_buckets(480)) == (640, 640)
    assert choose_bucket(1920, 1080, size_buckets(720)) == (1280, 704)
    assert choose_bucket(1080, 1920, size_buckets(480)) == (448, 896)


def test_tiny_buckets():
    for size in (480, 720):
        tiny = size_buckets(size, longest_side=128)
        assert tiny.keys() == size_buckets(size).keys()
        for h, w in tiny.values():
            assert max(h, w) == 128 and h % 16 == 0 and w % 16 == 0 and min(h, w) >= 16


def _official_prepare(image, target):
    """Written-out official resize_and_centercrop + normalisation."""
    th, tw = target
    scale = max(th / image.height, tw / image.width)
    fh, fw = math.ceil(scale * image.height), math.ceil(scale * image.width)
    arr = torch.from_numpy(np.array(image.resize((fw, fh), resample=Image.BILINEAR)))[None].permute(0, 3, 1, 2)
    top, left = int(round((fh - th) / 2.0)), int(round((fw - tw) / 2.0))
    arr = arr[:, :, top:top + th, left:left + tw][:, :, None]
    return ((arr / 255 - 0.5) * 2)[0]


@pytest.mark.parametrize("name", ["portrait.png", "two_people.png"])
def test_prepare_real_images(media_dir, name):
    image = load_image(media_dir / name)
    target = choose_bucket(image.height, image.width, size_buckets(480))
    x = prepare_frame(image, target)
    assert x.shape == (3, 1, *target) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    assert torch.equal(x, _official_prepare(image, target))
    tiny = prepare_frame(image, choose_bucket(image.height, image.width, size_buckets(480, 128)))
    assert max(tiny.shape[-2:]) == 128


def test_load_errors(tmp_path, media_dir):
    with pytest.raises(MediaError):
        load_image(tmp_path / "missing.png")
    with pytest.raises(MediaError):
        load_image(media_dir / "speaker1.wav")
    with pytest.raises(MediaError):
        VideoFrameReader(media_dir / "speaker1.wav")  # no video stream


def test_video_frames_by_time(media_dir):
    path = media_dir / "talking_458px_25fps.mp4"
    with av.open(str(path)) as c:
        all_frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with VideoFrameReader(path) as reader:
        assert (reader.width, reader.height) == (458, 458)
        for s in [0, 72, 144, 216, 288, 360, 374, 500, 100, 3, 360, 361]:  # forward, past the end, back, jump
            got = np.asarray(reader.frame_at(s / 25))
            assert np.array_equal(got, all_frames[min(s, len(all_frames) - 1)]), s


def test_video_30fps_maps_by_time(tmp_path):
    path = tmp_path / "count30.mp4"
    frames = np.zeros((45, 32, 32, 3), dtype=np.uint8)
    for i in range(45):
        frames[i] = 5 * i
    with VideoWriter(path, 32, 32, fps=30, crf=0) as w:
        w.append(frames)
    with VideoFrameReader(path) as reader:
        assert reader.fps == pytest.approx(30)
        for k in [0, 7, 12, 25, 36, 80]:
            value = np.asarray(reader.frame_at(k / 25)).mean()
            expected = min(int(k / 25 * 30 + 1e-6), 44)
            assert round(value / 5) == expected, (k, value)


def test_reference_masks_match_fixtures(parity_dir):
    """The DiT fixtures' ref_target_masks were built by the official pipeline (recipe in each json)."""
    cases = sorted((parity_dir / "dit" / "cases").glob("*.json"))
    assert cases
    for case in cases:
        recipe = json.loads(case.read_text())["ref_target_masks_recipe"]
        expected = load_file(str(case.with_suffix(".safetensors")))["ref_target_masks"]
        got = reference_masks(*recipe["src_hw"], tuple(recipe["target_hw"]), tuple(recipe["latent_hw"]),
                              speakers=recipe["human_number"], face_scale=recipe["face_scale"])
        print(f"[parity] {case.stem} ref_target_masks: mismatching cells {int((got != expected).sum())}")
        assert torch.equal(got, expected)


def test_reference_masks_boxes():
    # left speaker in the left third, right speaker in the right third; x is horizontal
    m = reference_masks(300, 600, (64, 128), (8, 16), 2, boxes=[(0, 0, 200, 300), (400, 0, 600, 300)])
    assert m.shape == (3, 8, 16)
    assert m[0, :, :4].all() and not m[0, :, 8:].any()
    assert m[1, :, 12:].all() and not m[1, :, :8].any()
    assert torch.equal(m[2], 1 - ((m[0] + m[1]) > 0).float())
    assert torch.equal(reference_masks(300, 600, (64, 128), (8, 16), 1), torch.ones(3, 8, 16))
    with pytest.raises(InputError):
        reference_masks(300, 600, (64, 128), (8, 16), 2, boxes=[(0, 0, 700, 300), (400, 0, 600, 300)])
    with pytest.raises(InputError):
        reference_masks(300, 600, (64, 128), (8, 16), 2, boxes=[(0, 0, 200, 300)])
    with pytest.raises(InputError):
        reference_masks(300, 600, (64, 128), (8, 16), 2, boxes=[(50, 0, 20, 300), (400, 0, 600, 300)])

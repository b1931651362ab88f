"""Conditioning pixels: load an image or a video frame, pick the size bucket, resize and crop.

Official recipe (`wan/multitalk.py`): choose the bucket whose h/w key is closest to the source
h/w (first one wins ties); resize with Pillow BILINEAR by the larger of the two scale factors
(new size = ceil(scale * size)) so both sides cover the bucket; centre-crop (torchvision rule:
offset = int(round((size - crop) / 2))); pixels /255, then (x - 0.5) * 2 into [-1, 1].
The per-speaker reference masks (`reference_masks`) follow the same resize-and-crop, with
nearest interpolation, then nearest down to latent resolution and a > 0 threshold.
Boxes are (x_min, y_min, x_max, y_max) in source pixels with x horizontal.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from infinitetalk.errors import InputError, MediaError

from .buckets import ASPECT_RATIO_627, ASPECT_RATIO_960, choose_bucket, size_buckets  # noqa: F401 (re-exported)
from .images import check_pixels, load_image, regular_file, sniff_svg, svg_error  # noqa: F401 (load_image re-exported)

PathLike = Union[str, Path]

def bucket_hw(value) -> tuple[int, int]:
    """(h, w) of a bucket entry: (h, w) or the official [[h, w], 1]."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], (list, tuple)):
        value = value[0]
    h, w = (int(v) for v in value)
    return h, w


def _cover_size(src_h: int, src_w: int, target_h: int, target_w: int) -> tuple[int, int]:
    scale = max(target_h / src_h, target_w / src_w)
    return math.ceil(scale * src_h), math.ceil(scale * src_w)


def _center_crop(x: torch.Tensor, target_h: int, target_w: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top = int(round((h - target_h) / 2.0))
    left = int(round((w - target_w) / 2.0))
    return x[..., top : top + target_h, left : left + target_w]


def resize_and_center_crop(image: Image.Image, target_hw: tuple[int, int]) -> torch.Tensor:
    """Pillow-bilinear cover resize then centre crop -> uint8 tensor [3, H, W]."""
    target_h, target_w = target_hw
    new_h, new_w = _cover_size(image.height, image.width, target_h, target_w)
    resized = np.asarray(image.convert("RGB").resize((new_w, new_h), resample=Image.BILINEAR))
    return _center_crop(torch.from_numpy(resized.copy()).permute(2, 0, 1), target_h, target_w).contiguous()


def to_model_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] -> float32 [3, 1, H, W] in [-1, 1] (official (x/255 - 0.5) * 2)."""
    return ((pixels / 255 - 0.5) * 2)[:, None]


def prepare_frame(image: Image.Image, target_hw: tuple[int, int]) -> torch.Tensor:
    """An RGB frame as the model's conditioning pixels: float32 [3, 1, H, W] in [-1, 1]."""
    return to_model_pixels(resize_and_center_crop(image, target_hw))


class VideoFrameReader:
    """Frames of a video by time, decoded forward with PyAV (seeks only when going back or far).

    `frame_at(t)` returns the last frame whose time is <= t (+ half a millisecond), the first frame
    before the start, the last frame past the end, as displayed: the display matrix (rotate tag)
    of the stream is applied, so `width`/`height` are the displayed sizes. Use as a context
    manager or call close().
    """

    _SEEK_AHEAD_S = 5.0

    def __init__(self, path: PathLike):
        self.path = regular_file(path, "video", MediaError)
        if sniff_svg(self.path):
            raise svg_error(self.path, "--image")
        try:
            self._container = av.open(str(self.path))
        except (av.error.FFmpegError, OSError) as err:
            raise MediaError(f"{self.path} cannot be opened as a video ({err}).") from err
        fmt = self._container.format.name
        if not self._container.streams.video:
            self._container.close()
            raise MediaError(f"{self.path} has no video stream.")
        if fmt == "image2" or fmt.endswith("_pipe"):
            self._container.close()
            raise MediaError(f"{self.path} is an image, not a video: pass it with --image.")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        tb = self._stream.time_base
        self._start = float(self._stream.start_time * tb) if self._stream.start_time is not None else 0.0
        self.fps = float(self._stream.average_rate) if self._stream.average_rate else 25.0
        width, height = self._stream.codec_context.width, self._stream.codec_context.height
        try:
            check_pixels(width, height, self.path, "video")
        except MediaError:
            self._container.close()
            raise
        self.width, self.height = width, height  # set to the displayed size by the first frame
        self._frames = None
        self._current = None  # (time, PIL image) of the last decoded frame
        self._pending = None  # a decoded frame past the last request
        self._exhausted = False
        try:
            self._restart(0.0)
            first = self._next()
        except av.error.FFmpegError as err:
            self._container.close()
            raise MediaError(f"{self.path}: the video cannot be decoded ({err}).") from err
        except MediaError:
            self._container.close()
            raise
        if first is not None:
            self._pending = first
            self.width, self.height = first[1].width, first[1].height

    def _time(self, frame: av.VideoFrame) -> float:
        return (frame.time if frame.time is not None else 0.0) - self._start

    def _restart(self, t: float) -> None:
        if self._frames is not None:  # the freshly opened container needs no seek
            offset = int((max(0.0, t) + self._start) / self._stream.time_base)
            self._container.seek(offset, stream=self._stream, backward=True, any_frame=False)
        self._frames = self._container.decode(self._stream)
        self._current = None
        self._pending = None
        self._exhausted = False

    def _next(self):
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        if self._exhausted:
            return None
        try:
            frame = next(self._frames)
        except StopIteration:
            self._exhausted = True
            return None
        except av.error.FFmpegError as err:
            raise MediaError(f"{self.path}: the video cannot be decoded ({err}).") from err
        return self._time(frame), displayed(frame)

    def frame_at(self, t: float) -> Image.Image:
        """The frame shown at `t` seconds from the start of the video, as an RGB Pillow image."""
        target = t + 5e-4
        if self._current is not None and target < self._current[0]:
            self._restart(t - 1.0)
        elif self._current is not None and t - self._current[0] > self._SEEK_AHEAD_S:
            self._restart(t)
        while True:
            item = self._next()
            if item is None:
                break
            if item[0] > target:
                if self._current is None:
                    self._current = item
                else:
                    self._pending = item
                break
            self._current = item
        if self._current is None:
            raise MediaError(f"{self.path} contains no decodable video frame.")
        return self._current[1]

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "VideoFrameReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_ROTATIONS = {90: Image.Transpose.ROTATE_90, -90: Image.Transpose.ROTATE_270, 270: Image.Transpose.ROTATE_270,
              180: Image.Transpose.ROTATE_180, -180: Image.Transpose.ROTATE_180}


def displayed(frame: av.VideoFrame) -> Image.Image:
    """A decoded frame as a viewer shows it: RGB with its display matrix applied (a rotation,
    then a mirror when the matrix flips, as FFmpeg's autorotate does)."""
    image = frame.to_image()
    rotation, flip = display_transform(frame)
    if rotation:
        if rotation in _ROTATIONS:
            image = image.transpose(_ROTATIONS[rotation])  # exact for quarter turns
        else:
            image = image.rotate(rotation, resample=Image.BILINEAR, expand=True)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def display_transform(frame: av.VideoFrame) -> tuple[int, bool]:
    """(counter-clockwise rotation in degrees, mirrored after it) of a frame's display matrix."""
    for side in frame.side_data:
        if str(getattr(side, "type", "")).upper().endswith("DISPLAYMATRIX"):
            m = np.frombuffer(bytes(side), dtype="<i4").astype(np.float64)
            if m.size < 5:
                break
            flip = m[0] * m[4] - m[1] * m[3] < 0
            if flip:  # the mirror negated the first column; undo it to read the rotation
                m[0], m[3] = -m[0], -m[3]
            s0, s1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
            if s0 == 0 or s1 == 0:
                break
            rotation = -math.degrees(math.atan2(m[1] / s1, m[0] / s0))
            return int(round(rotation)), bool(flip)
    return int(round(frame.rotation or 0)), False


def validate_box(box: Sequence[float], src_w: int, src_h: int, who: str = "speaker") -> tuple[int, int, int, int]:
    """Check a pixel box (x_min, y_min, x_max, y_max) against the image size; return it as ints."""
    if len(box) != 4:
        raise InputError(f"The box of {who} must have 4 numbers x_min,y_min,x_max,y_max, got {list(box)}.")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        raise InputError(f"The box of {who} must be four finite pixel numbers x_min,y_min,x_max,y_max, got {list(box)}.")
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= src_w and 0 <= y0 < y1 <= src_h):
        raise InputError(
            f"The box of {who} ({x0},{y0},{x1},{y1}) is not inside the {src_w}x{src_h} image: it needs "
            f"0 <= x_min < x_max <= {src_w} and 0 <= y_min < y_max <= {src_h} (x is horizontal)."
        )
    return x0, y0, x1, y1


def _mask_resize_and_crop(masks: torch.Tensor, target_hw: tuple[int, int]) -> torch.Tensor:
    target_h, target_w = target_hw
    new_h, new_w = _cover_size(masks.shape[-2], masks.shape[-1], target_h, target_w)
    resized = F.interpolate(masks[None], size=(new_h, new_w), mode="nearest")[0]
    return _center_crop(resized, target_h, target_w)


def reference_masks(
    src_h: int,
    src_w: int,
    target_hw: tuple[int, int],
    latent_hw: tuple[int, int],
    speakers: int = 1,
    boxes: Optional[Sequence[Sequence[float]]] = None,
    face_scale: float = 0.05,
) -> torch.Tensor:
    """The DiT's `ref_target_masks` [3, lat_h, lat_w] float32 (speaker 1, speaker 2, background).

    One speaker: all ones. Two speakers: the given pixel boxes, or without boxes the official
    default halves (rows [face_scale*h, (1-face_scale)*h), columns of the left / right half
    shrunk by face_scale); background = where no speaker is.
    """
    if speakers == 1:
        masks = torch.ones(3, src_h, src_w)
    elif speakers == 2:
        human = []
        if boxes is not None:
            if len(boxes) != 2:
                raise InputError(f"Two speakers need two boxes (one each), got {len(boxes)}.")
            for i, box in enumerate(boxes):
                x0, y0, x1, y1 = validate_box(box, src_w, src_h, f"speaker {i + 1}")
                m = torch.zeros(src_h, src_w)
                m[y0:y1, x0:x1] = 1
                human.append(m)
        else:
            r0, r1 = int(src_h * face_scale), int(src_h * (1 - face_scale))
            half = src_w // 2
            for offset in (0, half):
                m = torch.zeros(src_h, src_w)
                m[r0:r1, int(half * face_scale + offset) : int(half * (1 - face_scale) + offset)] = 1
                human.append(m)
        covered = human[0] + human[1]
        background = torch.where(covered > 0, 0.0, 1.0)
        masks = torch.stack([*human, background])
    else:
        raise InputError(f"InfiniteTalk supports 1 or 2 speakers, got {speakers}.")
    masks = _mask_resize_and_crop(masks, target_hw)
    masks = F.interpolate(masks[None], size=tuple(latent_hw), mode="nearest")[0]
    return (masks > 0).float()

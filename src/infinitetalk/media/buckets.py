"""The official size buckets (pure data and arithmetic, no media libraries): `size_buckets`
gives the bucket set of 480 or 720, `choose_bucket` the bucket of a source's aspect ratio."""
from __future__ import annotations

from typing import Optional

from ..errors import InputError

ASPECT_RATIO_627: dict[str, tuple[int, int]] = {
    "0.26": (320, 1216), "0.38": (384, 1024), "0.50": (448, 896), "0.67": (512, 768),
    "0.82": (576, 704), "1.00": (640, 640), "1.22": (704, 576), "1.50": (768, 512),
    "1.86": (832, 448), "2.00": (896, 448), "2.50": (960, 384), "2.83": (1088, 384),
    "3.60": (1152, 320), "3.80": (1216, 320), "4.00": (1280, 320),
}
"""Official 480-class buckets: h/w ratio key -> (height, width)."""

ASPECT_RATIO_960: dict[str, tuple[int, int]] = {
    "0.22": (448, 2048), "0.29": (512, 1792), "0.36": (576, 1600), "0.45": (640, 1408),
    "0.55": (704, 1280), "0.63": (768, 1216), "0.76": (832, 1088), "0.88": (896, 1024),
    "1.00": (960, 960), "1.14": (1024, 896), "1.31": (1088, 832), "1.50": (1152, 768),
    "1.58": (1216, 768), "1.82": (1280, 704), "1.91": (1344, 704), "2.20": (1408, 640),
    "2.30": (1472, 640), "2.67": (1536, 576), "2.89": (1664, 576), "3.62": (1856, 512),
    "3.75": (1920, 512),
}
"""Official 720-class buckets: h/w ratio key -> (height, width)."""


def size_buckets(size: int, longest_side: Optional[int] = None, multiple: int = 16) -> dict[str, tuple[int, int]]:
    """The bucket set of `size` (480 or 720). With `longest_side`, every bucket is scaled so its
    longest side is that many pixels, sides rounded to a multiple of `multiple` (VAE stride 8 x
    patch 2), keys unchanged (used by the tiny model)."""
    if size == 480:
        buckets = ASPECT_RATIO_627
    elif size == 720:
        buckets = ASPECT_RATIO_960
    else:
        raise InputError(f"size must be 480 or 720, got {size!r}.")
    if longest_side is None:
        return dict(buckets)
    scaled = {}
    for key, (h, w) in buckets.items():
        factor = longest_side / max(h, w)
        scaled[key] = tuple(max(multiple, int(round(side * factor / multiple)) * multiple) for side in (h, w))
    return scaled


def choose_bucket(src_h: int, src_w: int, buckets: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(height, width) of the bucket whose ratio key is closest to src_h / src_w."""
    ratio = src_h / src_w
    key = min(buckets, key=lambda k: abs(float(k) - ratio))
    return buckets[key]

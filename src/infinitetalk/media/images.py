"""Opening user images and media files safely: regular files only, our own pixel limits, the
orientation a viewer shows, and every Pillow mode converted to 8-bit RGB by its real range.

* `regular_file(path, what)`: refuses folders, FIFOs, devices (`/dev/zero`) and sockets with a
  sentence before anything opens them (opening a FIFO would block, a device never ends).
* `load_image(path)`: reads the header first and refuses images over `MAX_IMAGE_PIXELS` or
  more elongated than `MAX_ASPECT` (the cover resize of a 1x65000 strip would need gigabytes)
  before any pixel is decoded (decode-bomb safe; Pillow's own bomb check is mapped to the same
  sentence); applies the EXIF orientation (`ImageOps.exif_transpose`), so a phone photo stored
  sideways comes out as it is displayed; converts by `to_rgb`.
* `to_rgb(image)`: 16-bit and 32-bit integer images (I;16*, I) are scaled by their bit depth,
  float images (F) by their range, palette/alpha/CMYK/YCbCr/LAB/HSV through Pillow's own
  conversions. Alpha is dropped like the official `convert("RGB")`.
* `sniff_svg(path)`: vector images (SVG) are named as such; Pillow and the bundled FFmpeg read
  raster images only.
"""
from __future__ import annotations

import stat
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from ..errors import InputError, MediaError

PathLike = Union[str, Path]

MAX_IMAGE_PIXELS = 40_000_000
"""Largest source image we decode (40 megapixels: above 8K UHD); the model sees at most 1.5 MP."""

MAX_IMAGE_SIDE = 16384
"""Longest side of a source image or video frame, in pixels."""

MAX_ASPECT = 8.0
"""Most elongated source accepted (long side / short side); the widest size bucket is 4:1."""


def regular_file(path: PathLike, what: str, error: type = InputError) -> Path:
    """`path` as a Path when it is an existing, non-empty regular file (`error`, an InputError
    class, otherwise)."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise error(f"The {what} file {p} does not exist. Check the path.") from None
    except OSError as err:
        raise error(f"The {what} file {p} cannot be read ({err.strerror or err}).") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"The {what} path {p} is a folder; give a file.")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise error(f"The {what} path {p} is {kind}, not a regular file; save the {what} to a file and "
                         "give that file.")
    if st.st_size == 0:
        raise error(f"The {what} file {p} is empty (0 bytes).")
    return p


def sniff_svg(path: PathLike) -> bool:
    """True when the file starts like an SVG document (XML with an <svg> element)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith(b"<svg") or (text.startswith((b"<?xml", b"<!doctype svg", b"<!--")) and b"<svg" in text)


def svg_error(path: PathLike, flag: str) -> MediaError:
    return MediaError(f"{path} is an SVG (vector) image, which cannot be read; export it as a PNG or JPEG and "
                      f"pass that with {flag}.")


def check_pixels(width: int, height: int, source: PathLike, kind: str = "image") -> None:
    """Refuse sizes past our limits (MediaError naming the limit)."""
    if width < 1 or height < 1:
        raise MediaError(f"{source} has no pixels ({width}x{height}); give a real {kind}.")
    if width * height > MAX_IMAGE_PIXELS or max(width, height) > MAX_IMAGE_SIDE:
        raise MediaError(
            f"{source} is {width}x{height} pixels, over the limit of {MAX_IMAGE_PIXELS // 1_000_000} megapixels "
            f"and {MAX_IMAGE_SIDE} pixels a side; scale it down (the model uses at most 1280 pixels a side)."
        )
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_ASPECT:
        raise MediaError(
            f"{source} is {width}x{height} pixels, {aspect:.0f}:1, more elongated than the {MAX_ASPECT:.0f}:1 limit "
            "(the widest video shape is 4:1); crop it to the person first."
        )


def _scale_to_uint8(arr: np.ndarray, top: float) -> np.ndarray:
    scaled = np.clip(arr.astype(np.float64) * (255.0 / top), 0, 255)
    return np.round(scaled).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB, high bit depths scaled by their range (see module doc)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(image)
        if mode == "I":  # 32-bit ints: a 16-bit PNG/TIFF usually, else a true 32-bit range
            top = 65535.0 if arr.max(initial=0) > 255 else 255.0
            if arr.max(initial=0) > 65535:
                top = float(arr.max())
        else:
            top = 65535.0
        return Image.fromarray(_scale_to_uint8(arr, top), "L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = 1.0 if arr.max(initial=0) <= 1.0 else (255.0 if arr.max() <= 255.0 else float(arr.max()))
        return Image.fromarray(_scale_to_uint8(np.maximum(arr, 0), top), "L").convert("RGB")
    if mode == "LAB":
        srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
        return ImageCms.applyTransform(image, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    if mode in ("P", "PA") and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")
    if mode == "La":  # premultiplied alpha: Pillow converts it through LA only
        image = image.convert("LA")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise MediaError(f"images of Pillow mode {mode} cannot be converted to RGB ({err}); save it as an "
                         "8-bit RGB PNG.") from None


def open_image(path: PathLike) -> Image.Image:
    """Open (header only) and check the size limits; the caller loads. MediaError otherwise."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError:
        raise MediaError(
            f"{path} has more than {MAX_IMAGE_PIXELS // 1_000_000} megapixels, over our limit; scale it down "
            "(the model uses at most 1280 pixels a side)."
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise MediaError(f"{path} is not an image Pillow can read ({err}). Use a PNG, JPEG or WebP file.") from None
    try:
        check_pixels(image.width, image.height, path)
    except MediaError:
        image.close()
        raise
    return image


def load_image(path: PathLike) -> Image.Image:
    """Open an image file as displayed (EXIF orientation applied), converted to 8-bit RGB."""
    path = regular_file(path, "image", MediaError)
    if sniff_svg(path):
        raise svg_error(path, "--image")
    image = open_image(path)
    try:
        with image, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            upright = ImageOps.exif_transpose(image)
            check_pixels(upright.width, upright.height, path)
            return to_rgb(upright)
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
        raise MediaError(f"{path} is a damaged or truncated image ({err}); export it again as PNG or JPEG.") from None
    except MemoryError:
        raise MediaError(f"{path} is too large to decode in the memory available; scale it down.") from None

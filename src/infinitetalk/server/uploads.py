"""Multipart uploads streamed to disk with limits checked as the bytes arrive, content sniffed.

Files go to fixed names in the job's staging folder (`image.png`, `audio.wav`, ...: the client's
file name is never used). Each file part is sniffed from its first bytes (the file name and the
part's Content-Type are not trusted), its byte size is capped while it streams, an image's pixel
count is checked as soon as its header has arrived, and audio seconds / video frames when the
part ends, before the rest of the upload is read. Any failure raises `Problem` (4xx).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import Limits
from .security import Problem

log = logging.getLogger(__name__)

FILE_FIELDS = {"image": "image", "video": "video", "audio": "audio", "audio2": "audio"}
TEXT_FIELDS = ("settings", "webhook_url")
EXPECTED = {"image": "an image (PNG, JPEG or WebP)", "video": "a video (MP4, MOV, MKV/WebM or AVI)",
            "audio": "an audio file (WAV, MP3, FLAC, Ogg, AAC/M4A) or a video with sound"}
DRAIN_BYTES = 16 * 2**20  # after a rejection, read at most this much more so the client sees the answer


def sniff(head: bytes) -> Optional[tuple[str, str]]:
    """(kind, extension) from a file's first bytes; kind: image, audio or media (audio and/or video)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image", "jpg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image", "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio", "wav"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "media", "avi"
    if head.startswith(b"fLaC"):
        return "audio", "flac"
    if head.startswith(b"OggS"):
        return "audio", "ogg"
    if head.startswith(b"ID3"):
        return "audio", "mp3"
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:
        return "audio", ("aac" if (head[1] & 0x06) == 0 else "mp3")
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "media", ("m4a" if brand.startswith(b"M4A") else "mov" if brand == b"qt  " else "mp4")
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "media", "mkv"
    return None


def accepts(field_kind: str, kind: str) -> bool:
    return kind in {"image": ("image",), "video": ("media",), "audio": ("audio", "media")}[field_kind]


def image_pixels(path: Path) -> Optional[int]:
    """Pixels of a (possibly partial) image file once its header is readable, else None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.width * im.height
    except Exception:  # noqa: BLE001 - header not complete yet
        return None


def check_image(path: Path, limits: Limits, name: str) -> None:
    from PIL import Image

    pixels = image_pixels(path)
    if pixels is None:
        raise Problem(422, f"The {name} upload is not a readable image (damaged or truncated).")
    if pixels > limits.max_image_pixels:
        raise Problem(413, f"The {name} has {pixels} pixels; this server takes at most {limits.max_image_pixels}.")
    try:
        with Image.open(path) as im:
            im.load()
    except Exception:  # noqa: BLE001 - PIL raises many types for damaged data
        raise Problem(422, f"The {name} upload is a damaged or truncated image; send the whole file.") from None


def check_media(path: Path, limits: Limits, name: str, field_kind: str) -> None:
    """Audio seconds / video frames from the container (counted from packets if not stored)."""
    import av

    try:
        with av.open(str(path)) as c:
            if field_kind == "audio":
                if not c.streams.audio:
                    raise Problem(422, f"The {name} upload has no audio stream.")
                s = c.streams.audio[0]
                seconds = float(s.duration * s.time_base) if s.duration else (c.duration or 0) / 1e6
                if not seconds:
                    seconds = sum(float(p.duration * p.time_base) for p in c.demux(s) if p.duration)
                if seconds > limits.max_audio_seconds:
                    raise Problem(413, f"The {name} is {seconds:.1f} s long; this server takes at most "
                                       f"{limits.max_audio_seconds:g} s.")
            else:
                if not c.streams.video:
                    raise Problem(422, f"The {name} upload has no video stream.")
                s = c.streams.video[0]
                frames = s.frames
                if not frames:
                    frames = 0
                    for packet in c.demux(s):
                        frames += packet.size > 0
                        if frames > limits.max_video_frames:
                            break
                if frames > limits.max_video_frames:
                    raise Problem(413, f"The {name} has {frames} frames; this server takes at most "
                                       f"{limits.max_video_frames}.")
    except Problem:
        raise
    except Exception:  # noqa: BLE001 - FFmpeg errors of every kind mean "cannot read it"
        raise Problem(422, f"The {name} upload cannot be read as media (damaged or truncated).") from None


@dataclass
class _Part:
    name: str = ""
    filename: Optional[str] = None
    headers: dict = field(default_factory=dict)
    field_name: bytes = b""
    value: bytes = b""
    size: int = 0
    head: bytes = b""
    kind: Optional[tuple[str, str]] = None
    path: Optional[Path] = None
    fh: object = None
    pixels_checked: bool = False
    buffer: bytearray = field(default_factory=bytearray)


class FormCollector:
    """python-multipart callbacks writing file parts under `folder` (see module doc)."""

    def __init__(self, folder: Path, limits: Limits):
        self.folder, self.limits = folder, limits
        self.files: dict[str, Path] = {}
        self.texts: dict[str, str] = {}
        self.ended = False
        self._part = _Part()

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._hfield, "on_header_value": self._hvalue,
                "on_header_end": self._hend, "on_headers_finished": self._headers_done, "on_part_data": self._data,
                "on_part_end": self._end, "on_end": self._all_done}

    def close(self) -> None:
        if self._part.fh is not None:
            self._part.fh.close()
            self._part.fh = None

    def _begin(self) -> None:
        self._part = _Part()

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._part.field_name += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._part.value += data[start:end]

    def _hend(self) -> None:
        p = self._part
        p.headers[p.field_name.decode("latin-1").lower()] = p.value.decode("latin-1")
        p.field_name, p.value = b"", b""

    def _headers_done(self) -> None:
        from python_multipart.multipart import parse_options_header

        p = self._part
        disp, opts = parse_options_header(p.headers.get("content-disposition", ""))
        p.name = (opts.get(b"name") or b"").decode("utf-8", "replace")
        p.filename = opts.get(b"filename", b"").decode("utf-8", "replace") if b"filename" in opts else None
        if disp != b"form-data" or not p.name:
            raise Problem(400, "Every multipart part needs a Content-Disposition: form-data header with a name.")
        if p.name in self.files or p.name in self.texts:
            raise Problem(422, f"The form field {p.name!r} is given twice; give each field once.")
        if p.name not in FILE_FIELDS and p.name not in TEXT_FIELDS:
            raise Problem(422, f"Unknown form field {p.name!r}; use image, video, audio, audio2, settings and "
                               "webhook_url.")
        if p.name in TEXT_FIELDS and p.filename is not None:
            raise Problem(422, f"The form field {p.name!r} is text, not a file.")

    def _data(self, data: bytes, start: int, end: int) -> None:
        p = self._part
        chunk = data[start:end]
        p.size += len(chunk)
        if p.name in TEXT_FIELDS:
            if p.size > self.limits.max_field_bytes:
                raise Problem(413, f"The {p.name} field is larger than {self.limits.max_field_bytes} bytes.")
            p.buffer += chunk
            return
        if p.size > self.limits.max_file_bytes:
            raise Problem(413, f"The {p.name} upload is larger than this server's limit of "
                               f"{self.limits.max_file_bytes / 2**20:g} MiB.")
        if p.kind is None:
            p.head += chunk[: max(0, 16 - len(p.head))]
            if len(p.head) < 16:
                p.buffer += chunk  # held until 16 bytes allow sniffing
                return
            self._open(p)
            chunk = bytes(p.buffer) + chunk
            p.buffer = bytearray()
        p.fh.write(chunk)
        if p.kind[0] == "image" and not p.pixels_checked:
            p.fh.flush()
            pixels = image_pixels(p.path)
            if pixels is not None:
                p.pixels_checked = True
                if pixels > self.limits.max_image_pixels:
                    raise Problem(413, f"The {p.name} has {pixels} pixels; this server takes at most "
                                       f"{self.limits.max_image_pixels}.")

    def _open(self, p: _Part) -> None:
        field_kind = FILE_FIELDS[p.name]
        p.kind = sniff(p.head)
        if p.kind is None or not accepts(field_kind, p.kind[0]):
            raise Problem(415, f"The {p.name} upload is not {EXPECTED[field_kind]}; its content was checked, "
                               "not its file name.")
        self.folder.mkdir(parents=True, exist_ok=True)
        p.path = self.folder / f"{p.name}.{p.kind[1]}"
        p.fh = open(p.path, "wb")

    def _end(self) -> None:
        p = self._part
        if p.name in TEXT_FIELDS:
            try:
                self.texts[p.name] = bytes(p.buffer).decode("utf-8")
            except UnicodeDecodeError:
                raise Problem(422, f"The {p.name} field is not UTF-8 text.") from None
            return
        if p.kind is None:
            if not p.size:
                raise Problem(422, f"The {p.name} upload is empty.")
            self._open(p)  # fewer than 16 bytes: sniff what there is (and refuse it below)
            p.fh.write(bytes(p.buffer))
        p.fh.close()
        p.fh = None
        field_kind = FILE_FIELDS[p.name]
        if field_kind == "image":
            check_image(p.path, self.limits, p.name)
        else:
            check_media(p.path, self.limits, p.name, field_kind)
        self.files[p.name] = p.path

    def _all_done(self) -> None:
        self.ended = True


async def read_multipart(request, folder: Path, limits: Limits) -> FormCollector:
    """Stream a multipart/form-data body into `folder`; raise Problem on the first violation."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    boundary = opts.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise Problem(415, "Send the job as multipart/form-data (files and a settings field) or as JSON.")
    length = request.headers.get("content-length")
    cap = 4 * limits.max_file_bytes + 2 * limits.max_field_bytes + 2**20
    if length is not None and length.isdigit() and int(length) > cap:
        raise Problem(413, f"The upload is larger than this server's limit of {limits.max_file_bytes / 2**20:g} MiB "
                           "per file.")
    collector = FormCollector(folder, limits)
    parser = MultipartParser(boundary, collector.callbacks())
    stream = request.stream()
    try:
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
    except Problem:
        collector.close()
        drained = 0
        async for chunk in stream:  # let the client finish sending, so it reads the answer
            drained += len(chunk)
            if drained > DRAIN_BYTES:
                break
        raise
    except Exception as err:  # noqa: BLE001 - malformed multipart or a client that went away
        collector.close()
        name = type(err).__name__
        if name == "ClientDisconnect":
            raise Problem(400, "The client closed the connection before the upload was complete.") from None
        raise Problem(400, "The multipart body is malformed; send it as multipart/form-data.") from None
    collector.close()
    if not collector.ended:
        raise Problem(400, "The upload ended before the multipart body was complete (truncated request).")
    return collector

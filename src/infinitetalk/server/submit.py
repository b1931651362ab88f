"""From a request's settings and files to a checked, storable job description.

Settings use the CLI's field names (= JobSpec fields: steps, seed, prompt, preset, size, ...);
the model options variant, dtype, fast, fp8, fp8_attention and vram (a number of GB, "auto" or
"none", as `generate --vram`) may be given at the top level or in "runtime". The output path,
resume, weights, device and LoRA files are the server's business. Input files are uploads, or
server-side paths inside --allow-dir (resolved, links included). Speech from text: `text` (a
(s1)/(s2) script makes two speakers), `voice`, `voice2` (Kokoro voice names), `lang` and `speed`
instead of the audio; the text is synthesised when the job is checked (the server's weights
folder holds Kokoro-82M). Files named by the client (text_file, save_audio) are not taken.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from ..errors import InfiniteTalkError
from .config import ServerConfig
from .security import Problem

MEDIA_FIELDS = ("image", "video", "audio", "audio2")
RUNTIME_FIELDS = ("variant", "dtype", "fast", "fp8", "fp8_attention", "vram")
SERVER_FIELDS = ("output", "resume", "restart", "input_json", "runtime", "save_audio")
VOICE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _spec_types() -> dict[str, str]:
    from ..service import JobSpec

    return {f.name: str(f.type) for f in fields(JobSpec)}


def _check_type(name: str, value: Any, annotation: str) -> Any:
    def bad(what: str) -> Problem:
        return Problem(422, f"The setting {name} must be {what}, got {json.dumps(value)[:40]}.")

    if value is None:
        return None
    if "Box" in annotation:
        if (not isinstance(value, (list, tuple)) or len(value) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in value)):
            raise bad("four numbers [x_min, y_min, x_max, y_max]")
        return [float(v) for v in value]
    if "bool" in annotation:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif "int" in annotation:
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("a whole number")
    elif "float" in annotation:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise bad("a number")
        value = float(value)
    elif "str" in annotation:
        if not isinstance(value, str):
            raise bad("text")
    return value


def check_vram(value: Any) -> Any:
    """vram: a positive number of GB, "auto" or "none" (every model resident) -> RuntimeOptions.vram."""
    if isinstance(value, str) and value.strip().lower() in ("auto", "none"):
        return "auto" if value.strip().lower() == "auto" else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    raise Problem(422, f"The setting vram must be a positive number of GB, \"auto\" or \"none\", got "
                       f"{json.dumps(value)[:40]}.")


def check_voice(name: str, value: Any) -> Any:
    if value is not None and (not isinstance(value, str) or not VOICE_NAME.match(value)):
        raise Problem(422, f"The setting {name} must be a voice name such as af_heart (voices in the server's "
                           "Kokoro-82M folder; voice files are not taken).")
    return value


def parse_settings(text: Optional[str]) -> dict:
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        raise Problem(422, "The settings field is not valid JSON; send an object such as {\"steps\": 8}.") from None
    if not isinstance(data, dict):
        raise Problem(422, "The settings must be a JSON object of job fields, such as {\"steps\": 8}.")
    return data


def allowed_path(value: Any, name: str, allow_dir: Optional[Path]) -> str:
    """A server-side input path, only inside --allow-dir (after resolving links and '..')."""
    if allow_dir is None:
        raise Problem(403, f"This server takes no server-side paths ({name}); upload the file instead.")
    if not isinstance(value, str) or not value or "\x00" in value:
        raise Problem(422, f"The setting {name} must be a path inside the allowed folder.")
    root = allow_dir.resolve()
    path = (root / value).resolve()  # relative paths are taken inside the folder
    if not path.is_relative_to(root):
        raise Problem(403, f"The path given as {name} is outside the folder this server allows.")
    if not path.is_file():
        raise Problem(422, f"The file given as {name} does not exist in the allowed folder.")
    return str(path)


def check_webhook_url(url: Optional[str]) -> Optional[str]:
    if url is None or url == "":
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2000:
        raise Problem(422, "The webhook_url must be an http:// or https:// URL.")
    return url


def build_spec(settings: dict, files: dict[str, Path], folder: Path, config: ServerConfig) -> dict:
    """The stored job dict: uploads as paths relative to the job folder, paths checked, types checked."""
    types = _spec_types()
    data: dict[str, Any] = {}
    runtime: dict[str, Any] = {}
    nested = settings.get("runtime", {})
    if not isinstance(nested, dict):
        raise Problem(422, "The setting runtime must be an object such as {\"fp8\": true}.")
    flat = {k: v for k, v in settings.items() if k != "runtime"}
    for key, value in list(flat.items()) + [(k, v) for k, v in nested.items()]:
        if key == "model":
            if value not in (None, config.model):
                raise Problem(422, f"This server runs the model {config.model}; it cannot run {value!r}.")
            continue
        if key == "vram":
            if value is not None:
                runtime[key] = check_vram(value)
            continue
        if key in RUNTIME_FIELDS:
            runtime[key] = _check_type(key, value, {"variant": "str", "dtype": "str"}.get(key, "bool"))
            continue
        if key == "text_file":
            raise Problem(422, "The server takes the words as the setting text, not as a file name; send text.")
        if key in SERVER_FIELDS or key not in types or key in ("weights", "device", "loras"):
            known = sorted(set(types) - set(SERVER_FIELDS)) + list(RUNTIME_FIELDS)
            if key in SERVER_FIELDS or key in ("weights", "device", "loras"):
                raise Problem(422, f"The setting {key} is decided by the server; leave it out.")
            raise Problem(422, f"Unknown setting {key!r}; use job fields such as {', '.join(known[:12])}, ...")
        if key in ("voice", "voice2"):
            value = check_voice(key, value)
        if key in MEDIA_FIELDS:
            if key in files:
                raise Problem(422, f"The {key} is both uploaded and given as a path; give it once.")
            data[key] = allowed_path(value, key, config.allow_dir)
            continue
        data[key] = _check_type(key, value, types[key])
    for name, path in files.items():
        data[name] = str(path.relative_to(folder))
    if data.get("image") and data.get("video"):
        raise Problem(422, "Give either an image or a video, not both.")
    if not data.get("image") and not data.get("video"):
        raise Problem(422, "A job needs an image or a video (upload one, or give its path).")
    if data.get("text") is not None and (data.get("audio") or data.get("audio2")):
        raise Problem(422, "Give the speech either as audio or as text, not both.")
    if not data.get("audio") and data.get("text") is None:
        raise Problem(422, "A job needs the speech as audio (upload one, or give its path) or the words to speak "
                           "as the setting text.")
    runtime["model"] = config.model
    data["runtime"] = {k: v for k, v in runtime.items() if v is not None or k == "vram"}
    data["output"] = "output.mp4"
    return data


def check_job(data: dict, folder: Path, config: ServerConfig) -> str:
    """Run every input check of the job service (nothing loaded); return the job's model key.
    Raises Problem 422 with the service's sentence for bad inputs."""
    from ..service import JobService, JobSpec

    spec = dict(data)
    for name in MEDIA_FIELDS:
        if spec.get(name) and not os.path.isabs(spec[name]):
            spec[name] = str(folder / spec[name])
    spec["output"] = str(folder / "output.mp4")
    runtime = dict(spec["runtime"], weights=config.weights, device=config.devices[0] if config.devices else None)
    spec["runtime"] = runtime
    try:
        prepared = JobService().check(JobSpec.from_dict(spec))
    except InfiniteTalkError as err:  # a multi-line message (missing files, then the command) on one line
        raise Problem(422, " ".join(str(err).split())) from None
    m = prepared.model
    return json.dumps({"model": m.model, "variant": m.variant, "dtype": m.dtype, "fast": m.fast, "fp8": m.fp8,
                       "fp8_attention": m.fp8_attention, "loras": [list(x) for x in m.loras], "vram": m.vram},
                      sort_keys=True)

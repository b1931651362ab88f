"""Job lists for `infinitetalk batch`: a folder, a CSV, a JSON-lines file or the official input JSON as a list.

    read_jobs(path, defaults, output_dir) -> JobList(jobs=[BatchJob...], problems=[BatchProblem...])

- a folder: each image or video paired with the audio file of the same stem (`anna.png` +
  `anna.wav`); `anna.txt`, when present, is that job's prompt. Output: `OUTPUT_DIR/anna.mp4`.
- `*.csv`: a header row of field names, one job per row; `*.jsonl`: one JSON object per line.
  Names are the JobSpec fields (image, video, audio, audio2, prompt, seed, steps, frame_num, ...),
  the runtime options (model, device, dtype, variant, fp8, lora, dit, t5, vae, ...), `name` and
  `output` (the file name, relative to the output folder); CLI spellings (`frame-num`) work too.
  Empty cells keep the defaults. Lines starting with `#` and empty lines are skipped.
- `*.json`: a list of official input objects (prompt, cond_video, cond_audio, audio_type, bbox),
  each of which may also carry the fields above; a single object is one job.

Relative input paths are relative to the file's (or folder's) location. Every job starts from
`defaults` (the command's generate options) and its own fields win. A problem of one line is a
`BatchProblem` with its place ("jobs.csv line 4"); a problem of the whole file (unreadable, an
unknown column) is an InputError.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import InfiniteTalkError, InputError
from .job import JobSpec, RuntimeOptions

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"}
AUDIO_SUFFIXES = {".wav", ".mp3", ".m4a", ".flac", ".ogg", ".opus", ".aac"}
LIST_SUFFIXES = (".csv", ".jsonl", ".json")

# fields a job line may not set: the batch decides them
RESERVED = {"resume", "restart", "runtime"}
SPEC_FIELDS = {f.name for f in fields(JobSpec)} - RESERVED - {"output"}
RUNTIME_FIELDS = {f.name for f in fields(RuntimeOptions)} - {"loras", "files"}
COMPONENTS = {"dit": "dit", "adapter": "adapter", "t5": "t5", "audio_encoder": "wav2vec2", "wav2vec2": "wav2vec2",
              "vae": "vae", "clip": "clip"}
ALIASES = {"lora": "loras", "bbox": "bbox", "cond_video": "cond_video", "cond_audio": "cond_audio"}
PATH_FIELDS = {"image", "video", "audio", "audio2", "input_json", "text_file", "weights", "cond_video"}
KNOWN = SPEC_FIELDS | RUNTIME_FIELDS | set(COMPONENTS) | {"name", "output", "loras", "lora", "cond_video",
                                                           "cond_audio", "bbox"}
# fields that come as a set: a job giving one of them drops the defaults of the others
EXCLUSIVE = ({"image", "video"}, {"audio", "audio2", "text", "text_file"})
FROM_INPUT_JSON = ("image", "video", "audio", "audio2", "prompt", "audio_type", "bbox1", "bbox2")


@dataclass(frozen=True)
class BatchJob:
    """One job of the list: its name, where it came from ("jobs.csv line 3") and its JobSpec."""

    name: str
    where: str
    spec: JobSpec


@dataclass(frozen=True)
class BatchProblem:
    """A job line that cannot run: where it is and the sentence saying why."""

    where: str
    message: str
    name: str = ""


@dataclass
class JobList:
    source: Path
    jobs: list[BatchJob] = field(default_factory=list)
    problems: list[BatchProblem] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # every line's place, in the list's order


def read_jobs(path: str | Path, defaults: JobSpec, output_dir: Optional[str | Path] = None) -> JobList:
    """The jobs of a folder or list file (see the module doc); `output_dir` default: `outputs/` beside it."""
    src = Path(path).expanduser()
    if not src.exists():
        raise InputError(f"The jobs {src} do not exist; give a folder of images and audio, a .csv, .jsonl or .json file.")
    base = src if src.is_dir() else src.parent
    out_dir = Path(output_dir).expanduser() if output_dir else base / "outputs"
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"The output folder {out_dir} is a file; give a folder with --output-dir DIR.")
    if src.is_dir():
        records = _folder_records(src)
    elif src.suffix.lower() == ".csv":
        records = _csv_records(src)
    elif src.suffix.lower() == ".jsonl":
        records = _jsonl_records(src)
    elif src.suffix.lower() == ".json":
        records = _json_records(src)
    else:
        raise InputError(f"{src.name} is not a job list; give a folder, a .csv, a .jsonl or a .json file.")
    result = JobList(src)
    outputs: dict[Path, str] = {}
    for where, record in records:
        result.order.append(where)
        if isinstance(record, BatchProblem):
            result.problems.append(record)
            continue
        try:
            job = _job(where, record, defaults, base, out_dir)
        except InfiniteTalkError as err:
            result.problems.append(BatchProblem(where, str(err), str(record.get("name") or "")))
            continue
        out = Path(job.spec.output).resolve()
        if out in outputs:
            result.problems.append(BatchProblem(where, f"its output {out.name} is also written by {outputs[out]}; give "
                                                       "each job its own name or output.", job.name))
            continue
        outputs[out] = where
        result.jobs.append(job)
    if not result.jobs and not result.problems:
        raise InputError(f"{src} holds no jobs; a folder needs images or videos with audio files of the same name.")
    return result


# ---- sources ---------------------------------------------------------------------------------

Record = dict[str, Any]


def _folder_records(folder: Path) -> Iterator[tuple[str, Record | BatchProblem]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    by_stem: dict[str, list[Path]] = {}
    for p in files:
        by_stem.setdefault(p.stem, []).append(p)
    for stem, group in sorted(by_stem.items()):
        visuals = [p for p in group if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES]
        audios = [p for p in group if p.suffix.lower() in AUDIO_SUFFIXES]
        if not visuals and not audios:
            continue
        where = visuals[0].name if visuals else audios[0].name
        if len(visuals) > 1 or len(audios) > 1:
            names = ", ".join(p.name for p in visuals + audios)
            yield where, BatchProblem(where, f"{names} share one name; keep one image or video and one audio file "
                                             f"per name.", stem)
        elif not audios:
            yield where, BatchProblem(where, f"{where} has no audio file of the same name (e.g. {stem}.wav).", stem)
        elif not visuals:
            yield where, BatchProblem(where, f"{where} has no image or video of the same name (e.g. {stem}.png).", stem)
        else:
            visual = visuals[0]
            key = "image" if visual.suffix.lower() in IMAGE_SUFFIXES else "video"
            record: Record = {"name": stem, key: str(visual), "audio": str(audios[0])}
            prompt = folder / f"{stem}.txt"
            if prompt.is_file():
                record["prompt"] = prompt.read_text(encoding="utf-8").strip()
            yield where, record


def _csv_records(path: Path) -> Iterator[tuple[str, Record | BatchProblem]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"The job list {path} cannot be read as UTF-8 text ({err}).") from err
    try:
        dialect = csv.Sniffer().sniff(text.split("\n", 1)[0] or ",", delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(text.splitlines(keepends=True), dialect)
    header: Optional[list[str]] = None
    line = 0
    for row in reader:
        start, line = line + 1, reader.line_num
        if not any(cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = [_key(c) for c in row]
            unknown = [c for c in header if c not in KNOWN]
            if unknown:
                raise InputError(f"{path.name} line {start}: unknown column(s) {', '.join(unknown)}; columns are job "
                                 f"fields such as image, video, audio, audio2, prompt, seed, steps, output.")
            if len(set(header)) != len(header):
                raise InputError(f"{path.name} line {start}: a column name appears twice.")
            continue
        where = f"{path.name} line {start}"
        if len(row) > len(header):
            yield where, BatchProblem(where, f"{len(row)} cells but the header has {len(header)} columns.")
            continue
        yield where, {k: v.strip() for k, v in zip(header, row) if v.strip() != ""}
    if header is None:
        raise InputError(f"{path.name} has no header row; the first row names the columns (image, audio, ...).")


def _jsonl_records(path: Path) -> Iterator[tuple[str, Record | BatchProblem]]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"The job list {path} cannot be read as UTF-8 text ({err}).") from err
    for number, text in enumerate(lines, 1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        where = f"{path.name} line {number}"
        try:
            record = json.loads(text)
        except ValueError as err:
            yield where, BatchProblem(where, f"not valid JSON ({err}).")
            continue
        yield where, record if isinstance(record, dict) else BatchProblem(where, "a line must be one JSON object.")


def _json_records(path: Path) -> Iterator[tuple[str, Record | BatchProblem]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{path.name} is not valid JSON ({err}).") from err
    items = data if isinstance(data, list) else [data]
    for number, item in enumerate(items, 1):
        where = f"{path.name} item {number}"
        yield where, item if isinstance(item, dict) else BatchProblem(where, "each item must be a JSON object.")


# ---- one record -> one JobSpec ----------------------------------------------------------------


def _key(name: str) -> str:
    key = str(name).strip().lower().lstrip("-").replace("-", "_")
    return ALIASES.get(key, key)


def apply_fields(spec: JobSpec, record: Record, base: Path) -> JobSpec:
    """`spec` with the job fields of `record` (names as in a job line; relative paths from `base`)."""
    record = {_key(k): v for k, v in record.items() if v is not None}
    unknown = sorted(k for k in record if k not in KNOWN)
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(unknown)}; see `infinitetalk batch --help`.")
    record = _official(record, base)
    spec_changes: dict[str, Any] = {}
    rt_changes: dict[str, Any] = {}
    files = dict(spec.runtime.files)
    for key, value in record.items():
        if key in ("name", "output"):
            continue
        if key == "loras":
            rt_changes["loras"] = tuple(_loras(value, base))
        elif key in COMPONENTS:
            files[COMPONENTS[key]] = str(_path(value, base))
        elif key in RUNTIME_FIELDS:
            rt_changes[key] = _convert(key, value, base)
        else:
            spec_changes[key] = _convert(key, value, base)
    for group in EXCLUSIVE:
        if group & set(spec_changes):
            spec_changes.update({k: None for k in group if k not in spec_changes})
    if spec_changes.get("input_json"):
        spec_changes.update({k: None for k in FROM_INPUT_JSON if k not in spec_changes})
    if files:
        rt_changes["files"] = tuple(sorted(files.items()))
    return spec.with_(**spec_changes, runtime=spec.runtime.with_(**rt_changes))


def _job(where: str, record: Record, defaults: JobSpec, base: Path, out_dir: Path) -> BatchJob:
    record = {_key(k): v for k, v in record.items() if v is not None}
    spec = apply_fields(defaults, record, base)
    name = str(record.get("name") or "").strip() or _default_name(spec, where)
    output = Path(str(record["output"])).expanduser() if record.get("output") else Path(_safe(name) + ".mp4")
    if not output.suffix:
        output = output.with_suffix(".mp4")
    output = output if output.is_absolute() else out_dir / output
    spec = spec.with_(output=str(output))
    if spec.save_audio and not Path(spec.save_audio).is_absolute():
        spec = spec.with_(save_audio=str(out_dir / spec.save_audio))
    inputs = {Path(p).resolve() for p in (spec.image, spec.video, spec.audio, spec.audio2) if p}
    if output.resolve() in inputs:
        raise InputError(f"its output {output} is one of its inputs; give another output name or --output-dir.")
    return BatchJob(name, where, spec)


def _official(record: Record, base: Path) -> Record:
    """The official input keys (cond_video, cond_audio, bbox) as job fields."""
    out = dict(record)
    if "cond_video" in out:
        cond = str(out.pop("cond_video"))
        out["video" if Path(cond).suffix.lower() in VIDEO_SUFFIXES else "image"] = cond
    if "cond_audio" in out:
        audio = out.pop("cond_audio")
        if not isinstance(audio, dict) or "person1" not in audio or not set(audio) <= {"person1", "person2"}:
            raise InputError("cond_audio must be an object with 'person1' (and optionally 'person2') paths.")
        out["audio"] = audio["person1"]
        if "person2" in audio:
            out["audio2"] = audio["person2"]
    if "bbox" in out:
        bbox = out.pop("bbox")
        if not isinstance(bbox, dict) or not set(bbox) <= {"person1", "person2"}:
            raise InputError("bbox must be an object with 'person1'/'person2' boxes.")
        for person, key in (("person1", "bbox1"), ("person2", "bbox2")):
            if person in bbox:
                out[key] = bbox[person]
    return out


@functools.lru_cache(maxsize=1)
def _hints() -> dict[str, Any]:
    return {**typing.get_type_hints(JobSpec), **typing.get_type_hints(RuntimeOptions)}


def _convert(key: str, value: Any, base: Path) -> Any:
    """A cell or JSON value as the field's type (InputError with the field's name otherwise)."""
    hint = _hints()[key]
    kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if key in PATH_FIELDS:
        return str(_path(value, base))
    if key in ("bbox1", "bbox2"):
        from ..generation.inputs import parse_box

        text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        return parse_box(text, "speaker 1" if key == "bbox1" else "speaker 2")
    if key == "vram":
        return None if str(value).strip().lower() in ("none", "off") else (
            "auto" if str(value).strip().lower() == "auto" else _number(key, value, float))
    if kind is bool:
        return _bool(key, value)
    if kind is int:
        return _number(key, value, int)
    if kind is float:
        return _number(key, value, float)
    if isinstance(value, (dict, list)):
        raise InputError(f"{key} must be text, got {json.dumps(value)[:40]}.")
    return str(value)


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on", "y"):
        return True
    if text in ("0", "false", "no", "off", "n"):
        return False
    raise InputError(f"{key} must be true or false, got {value!r}.")


def _number(key: str, value: Any, kind: type) -> Any:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value) if kind is float else (int(value) if isinstance(value, int) else int(str(value), 10))
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise InputError(f"{key} must be {what}, got {value!r}.") from None
    if kind is float and not math.isfinite(number):
        raise InputError(f"{key} must be a finite number, got {value!r}.")
    return number


def _path(value: Any, base: Path) -> Path:
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise InputError(f"a path must be text, got {value!r}.")
    p = Path(str(value).strip()).expanduser()
    return p if p.is_absolute() else base / p


def _loras(value: Any, base: Path) -> list[tuple[str, float]]:
    """`file[:scale]` entries, separated by `;` in a cell, or a JSON list of them / of [file, scale]."""
    items = value if isinstance(value, list) else [v for v in str(value).split(";") if v.strip()]
    out = []
    for item in items:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            path, scale = item
        else:
            path, sep, scale = str(item).strip().rpartition(":")
            if not sep or not path or "/" in scale or "\\" in scale:
                path, scale = str(item).strip(), 1.0
        out.append((str(_path(path, base)), _number("lora scale", scale, float)))
    return out


def _default_name(spec: JobSpec, where: str) -> str:
    visual = spec.image or spec.video
    audio = spec.audio
    if visual and audio and Path(audio).stem != Path(visual).stem:
        return f"{Path(visual).stem}_{Path(audio).stem}"
    if visual:
        return Path(visual).stem
    return where.replace(" ", "_")


def _safe(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_.()" else "_" for c in name).strip("._")
    return keep or "job"


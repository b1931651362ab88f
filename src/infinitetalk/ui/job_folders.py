"""Where the page keeps its jobs: one folder per job under the jobs folder (`--output-dir`).

    JOBS/20250101-120000-portrait-3f2a/
      job.json            {"title", "created", "windows", "settings", "spec"}: the JobSpec and what the page showed
      inputs/audio/speech.wav, inputs/image/portrait.jpg, ...   copies of the uploads (stable for a resume)
      portrait.mp4        the finished video (appears when the job completes)
      portrait.mp4.job/   the service's resumable state while the job is unfinished (see generation.job_state)
      preview/            copies of the finished windows' segments and the preview MP4s built from them

The uploads are copied because the job's resume key holds their checksums and Gradio's upload
cache is cleaned; a folder whose video is absent but whose state exists is an interrupted job.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ..errors import InfiniteTalkError, InputError
from ..service import JobSpec

log = logging.getLogger(__name__)

RECORD = "job.json"


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return slug[:32] or "video"


@dataclass(frozen=True)
class JobFolder:
    root: Path

    @property
    def id(self) -> str:
        return self.root.name

    @property
    def record_file(self) -> Path:
        return self.root / RECORD

    @property
    def preview_dir(self) -> Path:
        return self.root / "preview"

    def video_name(self) -> str:
        return self.root.name.split("-", 2)[-1].rsplit("-", 1)[0] + ".mp4"

    @property
    def output(self) -> Path:
        return self.root / self.video_name()

    def add_input(self, source: str | os.PathLike, role: str) -> str:
        """Copy an upload into inputs/ROLE/ (keeping its name, so messages name the user's file)."""
        src = Path(source)
        target = self.root / "inputs" / role / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(src, target)
        except OSError as err:
            raise InputError(f"The upload {src.name} cannot be read ({err.strerror or err}); upload it again.") from err
        return str(target)

    def upload_names(self, sentence: str) -> str:
        """A message about the copies in inputs/ names the uploads as the user knows them (their file
        names), i.e. the sentence the CLI prints for those files given by name."""
        return re.sub(re.escape(str(self.root / "inputs")) + r"/[^/\s]+/", "", sentence)

    def write_record(self, spec: JobSpec, title: str, settings: dict, windows: int) -> None:
        data = {"title": title, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "windows": windows,
                "settings": settings, "spec": spec.to_dict()}
        temp = self.record_file.with_name(f".{RECORD}.tmp")
        temp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(temp, self.record_file)

    def read_record(self) -> dict:
        try:
            data = json.loads(self.record_file.read_text(encoding="utf-8"))
            data["spec"] = JobSpec.from_dict(data["spec"])
        except (OSError, ValueError, KeyError, TypeError, InfiniteTalkError) as err:
            raise InputError(f"The job {self.id} cannot be read ({err}); start it again from the form.") from err
        return data

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def new_job_folder(jobs_dir: Path, name_hint: str) -> JobFolder:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(jobs_dir) / f"{stamp}-{_slug(Path(name_hint).stem)}-{uuid.uuid4().hex[:4]}"
    try:
        root.mkdir(parents=True)
    except OSError as err:
        raise InputError(f"Cannot create the job folder {root} ({err.strerror or err}); "
                         "start the page with another --output-dir.") from err
    return JobFolder(root)


@dataclass(frozen=True)
class InterruptedJob:
    folder: JobFolder
    title: str
    created: str
    windows_done: int
    windows: int

    @property
    def label(self) -> str:
        return f"{self.created}  {self.title}  ({self.windows_done}/{self.windows} windows done)"


def interrupted_jobs(jobs_dir: Path, busy: Iterable[str] = ()) -> list[InterruptedJob]:
    """Unfinished jobs in `jobs_dir` (newest first) that no worker is running now."""
    from ..generation.job_state import JobDir

    busy = set(busy)
    found = []
    root = Path(jobs_dir)
    if not root.is_dir():
        return []
    for path in sorted(root.iterdir(), reverse=True):
        folder = JobFolder(path)
        if folder.id in busy or not folder.record_file.is_file():
            continue
        try:
            record = folder.read_record()
        except InputError as err:
            log.warning("skipping %s: %s", path, err)
            continue
        output = Path(record["spec"].output)
        job_dir = JobDir(output)
        if output.exists() or not job_dir.exists():
            continue
        try:
            state = job_dir.load_state()
        except InfiniteTalkError:
            continue
        found.append(InterruptedJob(folder, record.get("title", folder.id), record.get("created", ""),
                                    state.next_window if state else 0, int(record.get("windows", 0))))
    return found


def find_job(jobs_dir: Path, job_id: Optional[str]) -> JobFolder:
    if not job_id:
        raise InputError("Choose an interrupted job in the list first.")
    folder = JobFolder(Path(jobs_dir) / Path(job_id).name)
    if not folder.record_file.is_file():
        raise InputError(f"The job {job_id} is no longer in {jobs_dir}; refresh the list.")
    return folder

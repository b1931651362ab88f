"""Kokoro-82M (text to speech) inside the weights folder: locate, download, load.

The layout is the one the official app reads (`weights/Kokoro-82M`, fetched there with
`huggingface-cli download hexgrad/Kokoro-82M --local-dir weights/Kokoro-82M`):

    WEIGHTS/Kokoro-82M/
      config.json          architecture sizes and the phoneme vocabulary
      kokoro-v1_0.pth      the model ({"bert": ..., "predictor": ..., "decoder": ...} state dicts)
      voices/NAME.pt       one voice per file: float32 [510, 1, 256] style vectors (af_heart, am_adam, ...)

`locate_tts_weights` raises MissingWeightsError listing what is absent with the download command
(`infinitetalk download --tts`). `download_tts_weights` fetches the files pinned to one hub commit
(resumable: the hub client continues partial files and skips complete ones) and checks every file
against the hub's checksum (sha256 for LFS files, the git blob id for small ones). `load_kokoro`
builds the `kokoro` package's own `KModel` from the local files only (no hub access) and checks
that the checkpoint filled every parameter; `load_voice` reads one voice file.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from ..errors import CheckpointError, HubError, InputError, MissingWeightsError
from .hub import default_weights_dir

log = logging.getLogger(__name__)

KOKORO_REPO = "hexgrad/Kokoro-82M"
KOKORO_DIR = "Kokoro-82M"
KOKORO_CONFIG = "config.json"
KOKORO_MODEL = "kokoro-v1_0.pth"
VOICES_DIR = "voices"
VOICE_SHAPE = (510, 1, 256)
COMPONENTS = ("bert", "bert_encoder", "predictor", "text_encoder", "decoder")
TTS_DOWNLOAD_HINT = "infinitetalk download --tts"

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class TTSLayout:
    """Paths of the Kokoro files inside one weights folder."""

    root: Path

    @property
    def folder(self) -> Path:
        return self.root / KOKORO_DIR

    @property
    def config(self) -> Path:
        return self.folder / KOKORO_CONFIG

    @property
    def model(self) -> Path:
        return self.folder / KOKORO_MODEL

    @property
    def voices_dir(self) -> Path:
        return self.folder / VOICES_DIR

    def voices(self) -> list[str]:
        """Names of the voices present (sorted)."""
        if not self.voices_dir.is_dir():
            return []
        return sorted(p.stem for p in self.voices_dir.glob("*.pt") if p.stat().st_size > 0)

    def missing_files(self) -> list[Path]:
        missing = [f for f in (self.config, self.model) if not f.is_file() or f.stat().st_size == 0]
        if not self.voices():
            missing.append(self.voices_dir / "af_heart.pt")
        return missing

    def voice_path(self, voice: str) -> Path:
        """The file of `voice`: a name from voices/ or the path of a .pt file.

        Raises InputError naming the voices present when there is no such voice."""
        given = Path(str(voice)).expanduser()
        if given.suffix == ".pt" or given.parent != Path("."):
            if given.is_file():
                return given
            raise InputError(f"The voice file {given} does not exist; give a voice name such as af_heart or a .pt file.")
        path = self.voices_dir / f"{voice}.pt"
        if path.is_file():
            return path
        present = self.voices()
        shown = ", ".join(present[:60]) if present else "none"
        raise InputError(f"Unknown voice '{voice}'; the voices in {self.voices_dir} are: {shown}.")


def tts_download_command(root: Path) -> str:
    return f"{TTS_DOWNLOAD_HINT} --dir {root}"


def locate_tts_weights(root: Optional[PathLike] = None) -> TTSLayout:
    """The layout of a complete Kokoro folder, or MissingWeightsError with the download command."""
    layout = TTSLayout(Path(root).expanduser() if root else default_weights_dir())
    missing = layout.missing_files()
    if missing:
        shown = "\n  ".join(str(m) for m in missing)
        raise MissingWeightsError(
            f"Text-to-speech weights (Kokoro-82M) not found in {layout.root} ({len(missing)} file(s) missing):\n"
            f"  {shown}\nFetch them with:  {tts_download_command(layout.root)}\n"
            "or point --weights at a folder that has Kokoro-82M/ (or give the speech as --audio PATH).",
            missing=[str(m) for m in missing],
        )
    return layout


# ---- download ------------------------------------------------------------------------------


def _wanted(name: str) -> bool:
    return name in (KOKORO_CONFIG, KOKORO_MODEL) or (name.startswith(f"{VOICES_DIR}/") and name.endswith(".pt"))


def file_digest(path: Path, algorithm: str, git_blob: bool = False) -> str:
    """Hex digest of a file; with `git_blob`, the git object id (sha1 of 'blob SIZE\\0' + bytes)."""
    h = hashlib.new(algorithm)
    if git_blob:
        h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(path: Path, size: Optional[int], sha256: Optional[str] = None, blob_id: Optional[str] = None) -> bool:
    """Whether `path` has the expected size and checksum (sha256 for LFS files, else git blob id)."""
    if not path.is_file() or (size is not None and path.stat().st_size != size):
        return False
    if sha256:
        return file_digest(path, "sha256") == sha256
    if blob_id:
        return file_digest(path, "sha1", git_blob=True) == blob_id
    return True


def download_tts_weights(
    root: Optional[PathLike] = None,
    log_fn: Callable[[str], None] = log.info,
    endpoint: Optional[str] = None,
    revision: Optional[str] = None,
) -> TTSLayout:
    """Fetch config, model and every voice of Kokoro-82M into WEIGHTS/Kokoro-82M (resumable,
    checksummed) and return the layout. A file that fails its checksum is removed and fetched
    once more; failing again raises HubError."""
    from huggingface_hub import HfApi, hf_hub_download

    root_path = Path(root).expanduser() if root else default_weights_dir()
    layout = TTSLayout(root_path)
    try:
        layout.folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create the weights folder {layout.folder}: {exc}. Choose another with --dir.") from exc

    def hub_failure(exc: Exception) -> HubError:
        return HubError(
            f"Could not download {KOKORO_REPO} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Check the internet connection (or HF_ENDPOINT / HF_TOKEN), then run the same command again: "
            "finished files are kept and partial ones resume. Without a connection, copy an existing "
            f"Kokoro-82M folder to {layout.folder}."
        )

    try:
        info = HfApi(endpoint=endpoint).model_info(KOKORO_REPO, revision=revision, files_metadata=True)
    except Exception as exc:  # network, auth: one sentence for the user
        raise hub_failure(exc) from exc
    files = [s for s in (info.siblings or []) if _wanted(s.rfilename)]
    if not any(s.rfilename == KOKORO_MODEL for s in files):
        raise HubError(f"{KOKORO_REPO} at {info.sha} has no {KOKORO_MODEL}; this version cannot use it.")
    log_fn(f"downloading {KOKORO_REPO}@{info.sha[:10]} ({len(files)} files) -> {layout.folder}")
    for sibling in files:
        name = sibling.rfilename
        target = layout.folder / name
        sha256 = sibling.lfs.sha256 if sibling.lfs is not None else None
        size = sibling.lfs.size if sibling.lfs is not None else sibling.size
        for attempt in (1, 2):
            if verify_file(target, size, sha256, sibling.blob_id):
                break
            if target.exists():
                log_fn(f"{name}: checksum mismatch, fetching it again")
                target.unlink()
            try:
                hf_hub_download(KOKORO_REPO, name, revision=info.sha, local_dir=layout.folder, endpoint=endpoint)
            except Exception as exc:
                raise hub_failure(exc) from exc
        else:
            if not verify_file(target, size, sha256, sibling.blob_id):
                target.unlink(missing_ok=True)
                raise HubError(
                    f"{target} does not match its checksum on the hub after two downloads; check the disk and "
                    f"the connection, then run `{tts_download_command(root_path)}` again."
                )
    return locate_tts_weights(root_path)


# ---- loading -------------------------------------------------------------------------------


def kokoro_missing() -> Optional[str]:
    """None when the `kokoro` package imports, else the sentence that says how to install it."""
    try:
        import kokoro  # noqa: F401
    except ImportError as exc:
        return (f"Speech from text needs the optional package kokoro ({exc}); install it with "
                "pip install 'infinitetalk[tts]'.")
    return None


def load_kokoro(layout: TTSLayout, device="cpu"):
    """Build `kokoro.KModel` from the local config and checkpoint (eval mode, on `device`).

    Raises CheckpointError when the file is unreadable or leaves parameters unfilled."""
    import json

    import torch

    problem = kokoro_missing()
    if problem:
        raise InputError(problem)
    from kokoro import KModel

    try:
        config = json.loads(layout.config.read_text(encoding="utf-8"))
        checkpoint = torch.load(layout.model, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        raise CheckpointError(
            f"The Kokoro files in {layout.folder} cannot be read ({exc}); fetch them again with "
            f"{tts_download_command(layout.root)}."
        ) from exc
    if not isinstance(checkpoint, dict) or not set(COMPONENTS) <= set(checkpoint):
        raise CheckpointError(
            f"{layout.model} is not a Kokoro checkpoint (it needs the parts {', '.join(COMPONENTS)}); "
            f"fetch it again with {tts_download_command(layout.root)}."
        )
    try:
        with warnings.catch_warnings():  # torch's notes on Kokoro's weight_norm / 1-layer LSTM dropout
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            model = KModel(repo_id=KOKORO_REPO, config=config, model=str(layout.model))
    except (KeyError, TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise CheckpointError(f"{layout.model} does not fit {layout.config} ({type(exc).__name__}: {exc}).") from exc
    for part in COMPONENTS:  # KModel falls back to a non-strict load; make a short file an error
        want = set(getattr(model, part).state_dict())
        have = {k[7:] if k.startswith("module.") else k for k in checkpoint[part]}
        if want - have:
            raise CheckpointError(
                f"{layout.model} lacks {len(want - have)} weight(s) of '{part}' (e.g. {sorted(want - have)[0]}); "
                f"fetch it again with {tts_download_command(layout.root)}."
            )
    return model.to(device).eval()


def load_voice(path: Path):
    """One voice file -> float32 tensor [510, 1, 256] (CheckpointError when it is not a voice)."""
    import torch

    try:
        pack = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
        raise CheckpointError(f"The voice file {path} cannot be read ({exc}); fetch the voices again.") from exc
    if not isinstance(pack, torch.Tensor) or tuple(pack.shape) != VOICE_SHAPE:
        shape = tuple(pack.shape) if isinstance(pack, torch.Tensor) else type(pack).__name__
        raise CheckpointError(f"{path} is not a Kokoro voice (expected a tensor {VOICE_SHAPE}, got {shape}).")
    return pack.float()

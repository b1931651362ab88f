"""Where the official weights live, and fetching them from the Hugging Face hub.

The on-disk layout is the one the official README produces, so a folder made by
`huggingface-cli download ...` for the official repo works unchanged:

    WEIGHTS/
      Wan2.1-I2V-14B-480P/      config.json, diffusion_pytorch_model-0000N-of-00007.safetensors,
                                diffusion_pytorch_model.safetensors.index.json, Wan2.1_VAE.pth,
                                models_t5_umt5-xxl-enc-bf16.pth,
                                models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth,
                                google/umt5-xxl/ (tokenizer)
      chinese-wav2vec2-base/    config.json, preprocessor_config.json, model.safetensors (refs/pr/1)
      InfiniteTalk/single/infinitetalk.safetensors   (and/or multi/infinitetalk.safetensors)

`locate_weights` checks that every needed file is there and otherwise raises one
MissingWeightsError listing them with the exact `infinitetalk download` command.
`download_weights` fetches only the needed files (resumable: the hub client continues partial
files and skips complete ones).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import HubError, InputError, MissingWeightsError

log = logging.getLogger(__name__)

WAN_REPO = "Wan-AI/Wan2.1-I2V-14B-480P"
INFINITETALK_REPO = "MeiGen-AI/InfiniteTalk"
WAV2VEC_REPO = "TencentGameMate/chinese-wav2vec2-base"
WAV2VEC_SAFETENSORS_REVISION = "refs/pr/1"

WAN_DIR = "Wan2.1-I2V-14B-480P"
WAV2VEC_DIR = "chinese-wav2vec2-base"
INFINITETALK_DIR = "InfiniteTalk"

VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
T5_TOKENIZER_DIR = "google/umt5-xxl"
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
VARIANTS = ("single", "multi")


def default_weights_dir() -> Path:
    """$INFINITETALK_WEIGHTS, else ~/.cache/infinitetalk/weights."""
    env = os.environ.get("INFINITETALK_WEIGHTS")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "infinitetalk" / "weights"


@dataclass(frozen=True)
class WeightsLayout:
    """Paths of every official file inside one weights folder."""

    root: Path
    variant: str = "single"

    @property
    def dit_dir(self) -> Path:
        return self.root / WAN_DIR

    @property
    def adapter(self) -> Path:
        return self.root / INFINITETALK_DIR / self.variant / "infinitetalk.safetensors"

    @property
    def vae(self) -> Path:
        return self.dit_dir / VAE_FILE

    @property
    def t5(self) -> Path:
        return self.dit_dir / T5_FILE

    @property
    def t5_tokenizer(self) -> Path:
        return self.dit_dir / T5_TOKENIZER_DIR

    @property
    def clip(self) -> Path:
        return self.dit_dir / CLIP_FILE

    @property
    def wav2vec(self) -> Path:
        return self.root / WAV2VEC_DIR

    def required_files(self) -> list[Path]:
        """Every file that must exist (the DiT shards are read from the index when present)."""
        files = [
            self.dit_dir / "config.json",
            self.adapter,
            self.vae,
            self.t5,
            self.clip,
            self.t5_tokenizer / "tokenizer_config.json",
            self.wav2vec / "config.json",
            self.wav2vec / "preprocessor_config.json",
        ]
        files += _dit_shards(self.dit_dir)
        if not any((self.wav2vec / name).exists() for name in ("model.safetensors", "pytorch_model.bin")):
            files.append(self.wav2vec / "model.safetensors")
        return files

    def missing_files(self) -> list[Path]:
        return [f for f in self.required_files() if not f.exists() or f.stat().st_size == 0]


def _dit_shards(dit_dir: Path) -> list[Path]:
    index = dit_dir / DIT_INDEX
    if index.exists():
        import json

        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise InputError(f"{index} is not a valid shard index ({exc}); download it again.") from exc
        return sorted({dit_dir / name for name in weight_map.values()})
    if (dit_dir / "diffusion_pytorch_model.safetensors").exists():
        return [dit_dir / "diffusion_pytorch_model.safetensors"]
    return [index]


def download_command(root: Path, variant: str) -> str:
    return f"infinitetalk download --variant {variant} --dir {root}"


def locate_weights(root: Optional[os.PathLike | str] = None, variant: str = "single") -> WeightsLayout:
    """Return the layout of a complete weights folder, or raise MissingWeightsError listing the
    missing files and the command that fetches them."""
    if variant not in VARIANTS:
        raise InputError(f"Unknown weights variant '{variant}'; use one of {', '.join(VARIANTS)}.")
    layout = WeightsLayout(Path(root).expanduser() if root else default_weights_dir(), variant)
    missing = layout.missing_files()
    if missing:
        shown = "\n  ".join(str(m) for m in missing[:12])
        more = f"\n  ... and {len(missing) - 12} more" if len(missing) > 12 else ""
        raise MissingWeightsError(
            f"Model weights not found in {layout.root} ({len(missing)} file(s) missing):\n  {shown}{more}\n"
            f"Fetch them with:  {download_command(layout.root, variant)}\n"
            "or point --weights at a folder that has them (or try the small random model with --model tiny).",
            missing=[str(m) for m in missing],
        )
    return layout


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(value: os.PathLike | str) -> bool:
    """True for "org/name" that is not an existing local path (the diffusers convention)."""
    text = str(value)
    return bool(HUB_ID.match(text)) and not Path(text).expanduser().exists()


def resolve_weights(path_or_repo: Optional[os.PathLike | str] = None, variant: str = "single",
                    log_fn: Callable[[str], None] = log.warning) -> WeightsLayout:
    """The complete weights folder of `path_or_repo`: a local folder is used as it is
    (`locate_weights`); the hub id of the official release ("MeiGen-AI/InfiniteTalk") means the
    default weights folder, where the missing files are fetched first as `infinitetalk download`
    does. Another hub id is an InputError (its files would not have the official layout)."""
    if path_or_repo is None or not is_hub_id(path_or_repo):
        return locate_weights(path_or_repo, variant)
    if str(path_or_repo).lower() != INFINITETALK_REPO.lower():
        raise InputError(
            f"{path_or_repo} is not a local folder, and the only hub id understood is {INFINITETALK_REPO} "
            "(the official weights); give a weights folder in the official layout instead."
        )
    root = default_weights_dir()
    if WeightsLayout(root, variant).missing_files():
        log_fn(f"{INFINITETALK_REPO}: fetching the missing {variant} weights into {root} (about 80 GB, resumable; "
               f"the same as `{download_command(root, variant)}`)")
        return download_weights(root, variant, log_fn=log.info)
    return locate_weights(root, variant)


@dataclass(frozen=True)
class DownloadItem:
    repo: str
    patterns: tuple[str, ...]
    local_dir: str
    revision: Optional[str] = None


def download_plan(variant: str = "single") -> list[DownloadItem]:
    """The hub files needed for one variant, as (repo, patterns, folder) items."""
    if variant not in VARIANTS:
        raise InputError(f"Unknown weights variant '{variant}'; use one of {', '.join(VARIANTS)}.")
    return [
        DownloadItem(
            WAN_REPO,
            ("config.json", "diffusion_pytorch_model*", VAE_FILE, T5_FILE, CLIP_FILE, f"{T5_TOKENIZER_DIR}/*"),
            WAN_DIR,
        ),
        DownloadItem(INFINITETALK_REPO, (f"{variant}/infinitetalk.safetensors",), INFINITETALK_DIR),
        DownloadItem(WAV2VEC_REPO, ("config.json", "preprocessor_config.json"), WAV2VEC_DIR),
        DownloadItem(WAV2VEC_REPO, ("model.safetensors",), WAV2VEC_DIR, WAV2VEC_SAFETENSORS_REVISION),
    ]


def download_weights(
    root: Optional[os.PathLike | str] = None,
    variant: str = "single",
    log_fn: Callable[[str], None] = log.info,
    endpoint: Optional[str] = None,
) -> WeightsLayout:
    """Fetch the official files of `variant` into `root` (resumable) and return the layout.
    `endpoint` overrides the hub address (default: HF_ENDPOINT or huggingface.co)."""
    from huggingface_hub import snapshot_download

    root_path = Path(root).expanduser() if root else default_weights_dir()
    try:
        root_path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create the weights folder {root_path}: {exc}. Choose another with --dir.") from exc
    for item in download_plan(variant):
        log_fn(f"downloading {item.repo} ({', '.join(item.patterns)}) -> {root_path / item.local_dir}")
        try:
            snapshot_download(
                item.repo,
                revision=item.revision,
                local_dir=root_path / item.local_dir,
                allow_patterns=list(item.patterns),
                endpoint=endpoint,
            )
        except Exception as exc:  # network, auth, disk: all end in one sentence for the user
            raise HubError(
                f"Could not download {item.repo} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
                "Check the internet connection (or HF_ENDPOINT / HF_TOKEN), then run the same command again: "
                "finished files are kept and partial ones resume. Without a connection, copy an existing "
                f"weights folder and pass it with --weights (expected layout: {root_path}/{item.local_dir})."
            ) from exc
    return locate_weights(root_path, variant)


LORA_DIR = "loras"


def preset_lora(root: Optional[os.PathLike | str], preset: str) -> Optional[tuple[Path, float]]:
    """(path, scale) of the LoRA a preset needs inside the weights folder, or None when the
    preset needs none. Raises MissingWeightsError with the download command when it is absent."""
    from ..config import PRESETS

    spec = PRESETS.get(preset, {}).get("lora")
    if not spec:
        return None
    root_path = Path(root).expanduser() if root and not is_hub_id(root) else default_weights_dir()
    path = root_path / LORA_DIR / Path(spec["filename"]).name
    if not path.is_file():
        raise MissingWeightsError(
            f"The '{preset}' preset needs the LoRA {path.name}, which is not in {path.parent}.\n"
            f"Fetch it with:  infinitetalk download --lora {preset} --dir {root_path}\n"
            "or give your copy with --lora PATH[:SCALE].",
            missing=[str(path)],
        )
    return path, float(PRESETS[preset].get("lora_scale", 1.0))


def download_preset_lora(
    root: Optional[os.PathLike | str], preset: str, endpoint: Optional[str] = None
) -> Path:
    """Fetch the LoRA file of `preset` into WEIGHTS/loras/ (resumable) and return its path."""
    from huggingface_hub import hf_hub_download

    from ..config import PRESETS

    spec = PRESETS.get(preset, {}).get("lora")
    if not spec:
        names = ", ".join(k for k, v in PRESETS.items() if v.get("lora"))
        raise InputError(f"The preset '{preset}' uses no LoRA; presets with one: {names}.")
    root_path = Path(root).expanduser() if root else default_weights_dir()
    target = root_path / LORA_DIR
    try:
        target.mkdir(parents=True, exist_ok=True)
        fetched = Path(hf_hub_download(spec["repo"], spec["filename"], local_dir=target, endpoint=endpoint))
    except Exception as exc:
        raise HubError(
            f"Could not download {spec['filename']} from {spec['repo']} ({type(exc).__name__}: {exc}). "
            "Check the connection and run the same command again, or copy the file into "
            f"{target} yourself."
        ) from exc
    final = target / Path(spec["filename"]).name
    if fetched != final:  # the hub keeps the repo's sub-folders; presets look in loras/ directly
        fetched.replace(final)
    return final

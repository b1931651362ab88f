"""Which file serves each component: the official layout, a ComfyUI `models/` folder, overrides.

`locate_components(root, variant, overrides)` is a pure look-up (headers are read, no tensor
data, no network): for each component (dit, adapter, t5, wav2vec2, vae, clip) it takes
1. the file given as an override (`--dit FILE`, ...), checked by content;
2. the official file of `weights.hub.WeightsLayout` when present;
3. else the files of the ComfyUI folders (diffusion_models/, unet/, model_patches/,
   text_encoders/, clip/, audio_encoders/, vae/, clip_vision/; `root` itself or `root/models`),
   identified by content; when several fit, the best is chosen and the reason kept in `notes`.
Extras a single file lacks (the umT5 tokenizer, the wav2vec2 config.json) are looked for beside
it and in the default weights folder; `ComponentFiles.fetch_extras` gets them from the hub.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from ..errors import InputError, MissingWeightsError
from .formats import COMPONENTS, DESCRIPTIONS, OPTIONS, FileInfo, inspect_file
from .hub import (
    T5_TOKENIZER_DIR, VARIANTS, WAN_DIR, WAN_REPO, WAV2VEC_DIR, WAV2VEC_REPO, WeightsLayout, default_weights_dir,
    download_command,
)

log = logging.getLogger(__name__)

WEIGHT_EXTENSIONS = (".safetensors", ".sft", ".gguf", ".pth", ".pt", ".bin", ".ckpt")
"""Files looked at in the ComfyUI folders (each one is then identified by its content)."""
COMFY_DIRS = {
    "dit": ("diffusion_models", "unet"),
    "adapter": ("model_patches", "diffusion_models", "unet"),
    "t5": ("text_encoders", "clip"),
    "wav2vec2": ("audio_encoders", "wav2vec2"),
    "vae": ("vae",),
    "clip": ("clip_vision",),
}
LORA_DIRS = ("loras",)
# one download per missing component for a ComfyUI-style folder: (repo, file, sub-folder)
COMFY_DOWNLOADS = {
    "dit": ("city96/Wan2.1-I2V-14B-480P-gguf", "wan2.1-i2v-14b-480p-Q8_0.gguf", "diffusion_models"),
    "adapter": ("Kijai/WanVideo_comfy", "InfiniteTalk/Wan2_1-InfiniTetalk-Single_fp16.safetensors", "model_patches"),
    "t5": ("Comfy-Org/Wan_2.1_ComfyUI_repackaged", "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders"),
    "wav2vec2": ("Kijai/wav2vec2_safetensors", "wav2vec2-chinese-base_fp16.safetensors", "audio_encoders"),
    "vae": ("Comfy-Org/Wan_2.1_ComfyUI_repackaged", "split_files/vae/wan_2.1_vae.safetensors", "vae"),
    "clip": ("Comfy-Org/Wan_2.1_ComfyUI_repackaged", "split_files/clip_vision/clip_vision_h.safetensors", "clip_vision"),
}
OVERRIDE_NAMES = {"dit": "dit", "adapter": "adapter", "t5": "t5", "audio_encoder": "wav2vec2", "wav2vec2": "wav2vec2",
                  "vae": "vae", "clip": "clip"}


@dataclass(frozen=True)
class ComponentFiles:
    """The file (or official folder) of every component, None where nothing was found.

    dit: an official Wan DiT folder or one file; audio_encoder: an HF wav2vec2 folder or one file;
    t5_tokenizer / audio_config: folders for what single files lack (None: from the hub).
    notes: the choices made among several candidates, with their reasons; origin: per component,
    'override', 'official' or 'comfyui'."""

    root: Optional[Path] = None
    variant: str = "single"
    dit: Optional[Path] = None
    adapter: Optional[Path] = None
    t5: Optional[Path] = None
    t5_tokenizer: Optional[Path] = None
    wav2vec2: Optional[Path] = None
    audio_config: Optional[Path] = None
    vae: Optional[Path] = None
    clip: Optional[Path] = None
    loras: Optional[Path] = None
    notes: tuple[str, ...] = ()
    origin: Mapping[str, str] = field(default_factory=dict)
    info: Mapping[str, FileInfo] = field(default_factory=dict)

    def path(self, component: str) -> Optional[Path]:
        return getattr(self, component)

    def missing(self) -> list[str]:
        """Components without a file (the adapter is not missing when the DiT file holds it)."""
        out = []
        for comp in COMPONENTS:
            if self.path(comp) is not None:
                continue
            if comp == "adapter" and self._dit_has_adapter():
                continue
            out.append(comp)
        return out

    def _dit_has_adapter(self) -> bool:
        info = self.info.get("dit")
        return info is not None and info.component == "dit+adapter"

    def download_commands(self) -> list[str]:
        """Commands that fetch only the missing components."""
        missing = self.missing()
        if not missing:
            return []
        root = self.root or default_weights_dir()
        if not looks_comfy(root):
            return [download_command(root, self.variant)]
        return [_comfy_command(root, comp) for comp in missing]

    def require(self) -> "ComponentFiles":
        """self, or MissingWeightsError naming each missing component and the commands that fetch them."""
        missing = self.missing()
        if not missing:
            return self
        root = self.root or default_weights_dir()
        if not looks_comfy(root) and "override" not in self.origin.values():
            from .hub import locate_weights

            locate_weights(root, self.variant)  # the official layout's message: every missing file + the command
        lines = "\n  ".join(f"{c}: {DESCRIPTIONS[c]} (give one with {OPTIONS[c]} FILE)" for c in missing)
        commands = "\n  ".join(self.download_commands())
        raise MissingWeightsError(
            f"Model weights not found in {root} for {len(missing)} component(s):\n  {lines}\n"
            f"Fetch them with:\n  {commands}\nor try the small random model with --model tiny.",
            missing=missing,
        )

    def fetch_extras(self, endpoint: Optional[str] = None) -> "ComponentFiles":
        """Fill in the umT5 tokenizer and the wav2vec2 config from the hub when no folder has them
        (small files, into the default weights folder)."""
        from ..errors import HubError

        changes = {}
        cache = default_weights_dir()
        try:
            if self.t5_tokenizer is None and self.t5 is not None:
                from huggingface_hub import snapshot_download

                snapshot_download(WAN_REPO, local_dir=cache / WAN_DIR, allow_patterns=[f"{T5_TOKENIZER_DIR}/*"], endpoint=endpoint)
                changes["t5_tokenizer"] = cache / WAN_DIR / T5_TOKENIZER_DIR
            if self.audio_config is None and self.wav2vec2 is not None and self.wav2vec2.is_file():
                from huggingface_hub import snapshot_download

                snapshot_download(WAV2VEC_REPO, local_dir=cache / WAV2VEC_DIR,
                                  allow_patterns=["config.json", "preprocessor_config.json"], endpoint=endpoint)
                changes["audio_config"] = cache / WAV2VEC_DIR
        except Exception as exc:
            raise HubError(
                f"Could not fetch the umT5 tokenizer / wav2vec2 config from the Hugging Face hub ({type(exc).__name__}: {exc}); "
                "check the connection, or put google/umt5-xxl and the chinese-wav2vec2-base config.json beside the files."
            ) from exc
        return dataclasses.replace(self, **changes) if changes else self


def looks_comfy(root: Path) -> bool:
    """True when `root` (or `root/models`) has any of the ComfyUI model folders."""
    return any((base / d).is_dir() for base in _comfy_bases(root) for dirs in COMFY_DIRS.values() for d in dirs)


def _comfy_bases(root: Path) -> list[Path]:
    return [root / "models", root] if (root / "models").is_dir() else [root]


def _comfy_command(root: Path, component: str) -> str:
    repo, name, sub = COMFY_DOWNLOADS[component]
    base = _comfy_bases(root)[0]
    return f"hf download {repo} {name} --local-dir {base / sub}"


def _candidates(root: Path, component: str) -> list[Path]:
    found: dict[Path, None] = {}
    for base in _comfy_bases(root):
        for sub in COMFY_DIRS[component]:
            folder = base / sub
            if folder.is_dir():
                for path in sorted(folder.rglob("*")):
                    if path.is_file() and path.name.lower().endswith(WEIGHT_EXTENSIONS):
                        found[path] = None
    return list(found)


def _rank(info: FileInfo, component: str, variant: str) -> tuple:
    """Sort key, best first: the right model kind, full size, precision, then the name."""
    name = info.path.name.lower()
    other_variant = "multi" if variant == "single" else "single"
    variant_match = (variant in name) - (other_variant in name) if component == "adapter" else 0
    separate = 1 if info.component == component else 0  # a DiT-only file beats a merged one for the DiT
    return (-variant_match, -separate, -info.bits, name)


def _reason(best: FileInfo, others: list[FileInfo], component: str, variant: str) -> str:
    why = [f"{best.quant}"]
    if component == "adapter" and variant in best.path.name.lower():
        why.append(f"the name says '{variant}' (single- and multi-speaker adapters look alike inside)")
    if others and best.bits > max(o.bits for o in others):
        why.append("the highest precision")
    listed = ", ".join(f"{o.path.name} ({o.quant})" for o in others[:4])
    return (f"{component}: several files fit; chose {best.path} ({'; '.join(why)}) over {listed}; "
            f"pass {OPTIONS[component]} FILE to pick another.")


def _check_override(component: str, path: Path) -> FileInfo:
    if not path.exists():
        raise MissingWeightsError(f"The {component} file given with {OPTIONS[component]} does not exist: {path}.", missing=[str(path)])
    if path.is_dir():
        return FileInfo(path, None, "folder", "official", 16.0)
    info = inspect_file(path)
    if info.error:
        raise InputError(f"{OPTIONS[component]} {path}: {info.error}")
    if info.detected is None or not info.detected.provides(component):
        what = info.detected.description if info.detected else "no model infinitetalk knows"
        raise InputError(f"{OPTIONS[component]} {path} holds {what}, not {DESCRIPTIONS[component]}.")
    return info


def _official(layout: WeightsLayout, component: str) -> Optional[Path]:
    if component == "dit":
        return layout.dit_dir if (layout.dit_dir / "config.json").is_file() and any(layout.dit_dir.glob("diffusion_pytorch_model*.safetensors")) else None
    path = {"adapter": layout.adapter, "t5": layout.t5, "vae": layout.vae, "clip": layout.clip}.get(component)
    if component == "wav2vec2":
        folder = layout.wav2vec
        ok = (folder / "config.json").is_file() and any((folder / n).is_file() for n in ("model.safetensors", "pytorch_model.bin"))
        return folder if ok else None
    return path if path is not None and path.is_file() and path.stat().st_size > 0 else None


def locate_components(
    root: Optional[os.PathLike | str] = None,
    variant: str = "single",
    overrides: Optional[Mapping[str, Optional[os.PathLike | str]]] = None,
) -> ComponentFiles:
    """Find every component's file (see the module docstring). Raises InputError for an override
    that is of the wrong component; never raises for what is missing (see `missing()`/`require()`)."""
    if variant not in ("single", "multi"):
        raise InputError(f"Unknown weights variant '{variant}'; use 'single' or 'multi'.")
    root_path = Path(root).expanduser() if root else default_weights_dir()
    given = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in OVERRIDE_NAMES:
            raise ValueError(f"unknown component override {key!r}")
        given[OVERRIDE_NAMES[key]] = Path(value).expanduser()
    layout = WeightsLayout(root_path, variant)
    found: dict[str, Optional[Path]] = {}
    origin: dict[str, str] = {}
    infos: dict[str, FileInfo] = {}
    notes: list[str] = []
    for comp in COMPONENTS:
        if comp in given:
            infos[comp] = _check_override(comp, given[comp])
            found[comp], origin[comp] = given[comp], "override"
            continue
        official = _official(layout, comp)
        if official is not None:
            found[comp], origin[comp] = official, "official"
            continue
        if comp == "adapter" and "dit" in infos and infos["dit"].component == "dit+adapter":
            continue  # the DiT file carries the adapter
        fits = [i for i in (inspect_file(p) for p in _candidates(root_path, comp)) if i.detected and i.detected.provides(comp)]
        if not fits:
            found[comp] = None
            continue
        fits.sort(key=lambda i: _rank(i, comp, variant))
        best = fits[0]
        if len(fits) > 1:
            notes.append(_reason(best, fits[1:], comp, variant))
        found[comp], origin[comp], infos[comp] = best.path, "comfyui", best
    tokenizer = _tokenizer_folder(root_path, layout)
    audio_config = None
    w2v = found.get("wav2vec2")
    if w2v is not None and w2v.is_file():
        audio_config = next((f for f in (w2v.parent, layout.wav2vec, default_weights_dir() / WAV2VEC_DIR) if (f / "config.json").is_file()), None)
    loras = next((b / d for b in _comfy_bases(root_path) for d in LORA_DIRS if (b / d).is_dir()), None)
    files = ComponentFiles(
        root=root_path, variant=variant, t5_tokenizer=tokenizer, audio_config=audio_config, loras=loras,
        notes=tuple(notes), origin=origin, info=infos, **{c: found.get(c) for c in COMPONENTS},
    )
    for note in notes:
        log.info(note)
    return files


def _tokenizer_folder(root: Path, layout: WeightsLayout) -> Optional[Path]:
    for folder in (layout.t5_tokenizer, default_weights_dir() / WAN_DIR / T5_TOKENIZER_DIR):
        if (folder / "tokenizer_config.json").is_file():
            return folder
    for base in _comfy_bases(root):
        for sub in COMFY_DIRS["t5"]:
            folder = base / sub
            if folder.is_dir():
                for hit in sorted(folder.rglob("tokenizer_config.json")):
                    return hit.parent
    return None


def describe(files: ComponentFiles) -> list[str]:
    """Lines for `infinitetalk info`: found / missing per component, then the commands for the missing."""
    lines = []
    for comp in COMPONENTS:
        path = files.path(comp)
        if path is None and comp == "adapter" and files._dit_has_adapter():
            lines.append(f"  {comp:8s} in the DiT file")
            continue
        if path is None:
            lines.append(f"  {comp:8s} MISSING ({DESCRIPTIONS[comp]}; {OPTIONS[comp]} FILE)")
            continue
        info = files.info.get(comp)
        kind = f"{info.quant}" if info is not None else "official"
        lines.append(f"  {comp:8s} {path} [{kind}, {files.origin.get(comp, '?')}]")
    if files.t5 is not None:
        lines.append(f"  tokenizer {files.t5_tokenizer or 'google/umt5-xxl from the hub on first use'}")
    if files.wav2vec2 is not None and files.wav2vec2.is_file():
        lines.append(f"  wav2vec2 config {files.audio_config or 'chinese-wav2vec2-base config from the hub on first use'}")
    lines += [f"  note: {n}" for n in files.notes]
    commands = files.download_commands()
    if commands:
        lines.append("  fetch the missing parts with:")
        lines += [f"    {c}" for c in commands]
    return lines


def official_layout_lines(files: ComponentFiles) -> list[str]:
    """Lines for `infinitetalk info`: the official layout of the checked folder per variant, only
    where that layout is what is missing; none for a ComfyUI folder or when every component was
    found (`describe` already names the download for the missing parts only)."""
    from ..errors import InfiniteTalkError

    root = files.root
    if root is None or not files.missing() or looks_comfy(root):
        return []
    lines = []
    for variant in VARIANTS:
        try:
            missing = WeightsLayout(root, variant).missing_files()
        except InfiniteTalkError as err:
            lines.append(f"weights {variant:6s} in {root}: unreadable ({err})")
            continue
        if not missing:
            lines.append(f"weights {variant:6s} in {root}: complete")
        else:
            lines.append(f"weights {variant:6s} in {root}: {len(missing)} file(s) missing, e.g. {missing[0]} "
                         f"({download_command(root, variant)})")
    return lines

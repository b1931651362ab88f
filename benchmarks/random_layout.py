#!/usr/bin/env python
"""Write a complete weights folder in the OFFICIAL download layout, filled with RANDOM weights.

The folder is what `infinitetalk download` fetches (see `weights/hub.py`) and what
`--weights DIR` reads through `weights/locate.py` and the loaders, so a GPU machine without
internet can run the real pipeline end to end (speed, memory, offload) on real-size files:

    python benchmarks/random_layout.py --out /tmp/w14              # real 14B sizes, about 53 GB
    infinitetalk generate --weights /tmp/w14 --vram 8 --image portrait.png --audio speech.wav \\
        --preset fast --output out.mp4

`--scale tiny` writes the same file names, folders, formats and key names with the small configs
of `runtime/tiny_models.py` (tested on the CPU by tests/test_random_layout.py); `--dry-run`
prints every file and its size, computed from the configs' shapes (nothing is allocated).

    WEIGHTS/Wan2.1-I2V-14B-480P/  config.json (real: the official 14B file), 7 DiT shards
        diffusion_pytorch_model-0000N-of-00007.safetensors + their index json (bf16: the release
        has float32, which would not fit a 64 GB disk), Wan2.1_VAE.pth (float32),
        models_t5_umt5-xxl-enc-bf16.pth (bf16), models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth
        (float32, the visual tower only: every `visual.*` key incl. the unused last block, post_norm
        and head; the text tower, which no loader reads, is left out), google/umt5-xxl/ (tokenizer)
    WEIGHTS/chinese-wav2vec2-base/  config.json, preprocessor_config.json, model.safetensors
    WEIGHTS/InfiniteTalk/single/infinitetalk.safetensors  (and/or multi/: the same random adapter)
    WEIGHTS/loras/  the LoRA of every preset that uses one (`fast`: lightx2v), kijai key format,
        rank 32, on the block linear layers (bf16)

The tokenizer in google/umt5-xxl/ is NOT the real umT5 vocabulary: it is a small valid Hugging
Face tokenizer (byte-level, 259 ids: <pad> 0, </s> 1, <unk> 2, then the 256 bytes; `</s>` appended)
written with the `tokenizers` library, so `AutoTokenizer` reads it offline. Every video made from
these files shows noise: the weights are random.

Random init (seeded, made on `--device` in the file's dtype): the DiT through
`bench_dit.build_random_model` (linear/conv N(0, 1/fan_in), biases N(0, 0.02^2), modulation
N(0, 1/dim), norm weights 1 + N(0, 0.1^2), so activations stay realistic); umT5, CLIP, VAE and the
LoRAs by the same rule per tensor (VAE `gamma` as a norm weight; LoRA up-projections scaled so the
merged delta is about 10% of the weight); wav2vec2 from its own constructor under a fixed seed.
Host memory: the DiT is written shard by shard (one shard, about 5 GB, on the host at a time),
the umT5 .pth (11.4 GB) is the largest file held whole. Real scale on the CPU needs about 40 GB
of RAM for the DiT (it is built whole, as in bench_dit).

Exit codes: 0 done; 2 the output folder exists and is not empty (never overwritten) or the disk
is too small.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_dit import build_random_model  # noqa: E402
from infinitetalk.config import PRESETS  # noqa: E402
from infinitetalk.models.audio import AudioEncoder, AudioEncoderConfig  # noqa: E402
from infinitetalk.models.dit import InfiniteTalkDiT, WanDiTConfig  # noqa: E402
from infinitetalk.models.image import CLIPVisionConfig, CLIPVisionEncoder  # noqa: E402
from infinitetalk.models.text import UMT5Config, UMT5Encoder  # noqa: E402
from infinitetalk.models.vae import WanVAE, WanVAEConfig  # noqa: E402
from infinitetalk.runtime.tiny_models import TinyConfigs, tiny_audio_encoder, tiny_audio_encoder_config  # noqa: E402
from infinitetalk.weights import hub  # noqa: E402

OFFICIAL_14B_JSON = {  # config.json of Wan2.1-I2V-14B-480P as released (tests/test_dit_params.py)
    "_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 5120, "eps": 1e-06, "ffn_dim": 13824,
    "freq_dim": 256, "in_dim": 36, "model_type": "i2v", "num_heads": 40, "num_layers": 40, "out_dim": 16,
    "text_len": 512,
}
DIT_SHARDS = 7  # as the release: diffusion_pytorch_model-0000N-of-00007.safetensors
ADAPTER_PARTS = ("audio_proj.", ".audio_cross_attn.", ".norm_x.")
LORA_RANK = 32
LORA_MODULES = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
CLIP_HEAD_DIM = {"real": 1024, "tiny": 64}  # open-clip ViT-H/14 projects to 1024
BF16, F32 = torch.bfloat16, torch.float32


@dataclass(frozen=True)
class Scale:
    """The configs of one scale (widths paired as the pipeline needs) and the DiT config.json."""

    name: str
    dit: WanDiTConfig
    dit_json: dict
    text: UMT5Config
    clip: CLIPVisionConfig
    vae: WanVAEConfig
    audio: AudioEncoderConfig


def scale_configs(name: str) -> Scale:
    if name == "real":
        return Scale(name, WanDiTConfig.infinitetalk_14b(), dict(OFFICIAL_14B_JSON), UMT5Config(), CLIPVisionConfig(),
                     WanVAEConfig(), AudioEncoderConfig.base())
    tiny = TinyConfigs.default()
    # text_len 512 on both sides: the loaders read umT5 without a text_len (the release's 512), so the
    # DiT must accept prompts of up to 512 tokens, as the real one does
    dit = tiny.dit.replace(text_len=512)
    dit_json = dict(dit.to_json_dict(), _diffusers_version="0.30.0")
    return Scale(name, dit, dit_json, dataclasses.replace(tiny.text, text_len=512), tiny.clip, tiny.vae,
                 tiny_audio_encoder_config())


# ---- shapes (no memory) -----------------------------------------------------------------------


def _meta_shapes(cls, cfg) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = cls(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def is_adapter(key: str) -> bool:
    return key.startswith(ADAPTER_PARTS[0]) or any(p in key for p in ADAPTER_PARTS[1:])


def clip_shapes(scale: Scale) -> dict[str, tuple[int, ...]]:
    """Every `visual.*` key of the official file: all blocks (the last is unused), post_norm, head."""
    full = dataclasses.replace(scale.clip, num_used_layers=scale.clip.num_layers)
    shapes = _meta_shapes(CLIPVisionEncoder, full)
    shapes["post_norm.weight"] = shapes["post_norm.bias"] = (full.dim,)
    shapes["head"] = (full.dim, CLIP_HEAD_DIM[scale.name])
    return {f"visual.{k}": v for k, v in shapes.items()}


def lora_shapes(cfg: WanDiTConfig, rank: int = LORA_RANK) -> dict[str, tuple[int, ...]]:
    """kijai-format LoRA keys (`diffusion_model.<module>.lora_down/up.weight`, `.alpha`)."""
    dims = {"ffn.0": (cfg.dim, cfg.ffn_dim), "ffn.2": (cfg.ffn_dim, cfg.dim)}
    out = {}
    for i in range(cfg.num_layers):
        for mod in LORA_MODULES:
            d_in, d_out = dims.get(mod, (cfg.dim, cfg.dim))
            base = f"diffusion_model.blocks.{i}.{mod}"
            out[f"{base}.lora_down.weight"] = (rank, d_in)
            out[f"{base}.lora_up.weight"] = (d_out, rank)
            out[f"{base}.alpha"] = ()
    return out


def shard_groups(keys: list[str], shapes: dict, itemsize: int, n: int) -> list[list[str]]:
    """`keys` in order cut into `n` contiguous groups of about equal bytes (none empty)."""
    sizes = [math.prod(shapes[k]) * itemsize for k in keys]
    target = sum(sizes) / n
    groups: list[list[str]] = [[] for _ in range(n)]
    done, g = 0, 0
    for i, (key, size) in enumerate(zip(keys, sizes)):
        left_keys, left_groups = len(keys) - i, n - g
        if groups[g] and g < n - 1 and (done + size / 2 > target * (g + 1) or left_keys <= left_groups - 1):
            g += 1
        groups[g].append(key)
        done += size
    if any(not grp for grp in groups):
        raise ValueError(f"{len(keys)} keys cannot fill {n} shards")
    return groups


def preset_loras() -> list[str]:
    return sorted({Path(p["lora"]["filename"]).name for p in PRESETS.values() if p.get("lora")})


@dataclass(frozen=True)
class Planned:
    path: str  # relative to the weights folder
    params: int
    nbytes: int


def _nbytes(shapes: dict, dtype: torch.dtype) -> tuple[int, int]:
    n = sum(math.prod(s) for s in shapes.values())
    return n, n * torch.empty((), dtype=dtype).element_size()


def plan_files(scale: Scale, variants: list[str], loras: bool) -> list[Planned]:
    """Every tensor file and its size (tensor bytes; headers and json files are not counted)."""
    wan, files = hub.WAN_DIR, []
    dit = _meta_shapes(InfiniteTalkDiT, scale.dit)
    base = [k for k in dit if not is_adapter(k)]
    for i, group in enumerate(shard_groups(base, dit, 2, DIT_SHARDS)):
        files.append(Planned(f"{wan}/{_shard_name(i)}", *_nbytes({k: dit[k] for k in group}, BF16)))
    adapter = {k: v for k, v in dit.items() if is_adapter(k)}
    for variant in variants:
        files.append(Planned(f"{hub.INFINITETALK_DIR}/{variant}/infinitetalk.safetensors", *_nbytes(adapter, BF16)))
    files.append(Planned(f"{wan}/{hub.T5_FILE}", *_nbytes(_meta_shapes(UMT5Encoder, scale.text), BF16)))
    files.append(Planned(f"{wan}/{hub.CLIP_FILE}", *_nbytes(clip_shapes(scale), F32)))
    files.append(Planned(f"{wan}/{hub.VAE_FILE}", *_nbytes(_meta_shapes(WanVAE, scale.vae), F32)))
    files.append(Planned(f"{hub.WAV2VEC_DIR}/model.safetensors", *_nbytes(_meta_shapes(AudioEncoder, scale.audio), F32)))
    if loras:
        for name in preset_loras():
            files.append(Planned(f"{hub.LORA_DIR}/{name}", *_nbytes(lora_shapes(scale.dit), BF16)))
    return files


def _shard_name(i: int) -> str:
    return f"diffusion_pytorch_model-{i + 1:05d}-of-{DIT_SHARDS:05d}.safetensors"


# ---- random tensors -----------------------------------------------------------------------------


@torch.no_grad()
def fill_(name: str, tensor: torch.Tensor, gen: torch.Generator, dim: int) -> torch.Tensor:
    """bench_dit.build_random_model's rule for one tensor, plus VAE `gamma` [C, 1, 1, 1] as a norm weight."""
    if "modulation" in name:
        return tensor.normal_(0.0, dim**-0.5, generator=gen)
    if name.endswith("gamma") or (tensor.dim() == 1 and "norm" in name and name.endswith("weight")):
        return tensor.normal_(1.0, 0.1, generator=gen)
    if tensor.dim() <= 1:
        return tensor.normal_(0.0, 0.02, generator=gen)
    return tensor.normal_(0.0, math.prod(tensor.shape[1:]) ** -0.5, generator=gen)


def random_state(shapes: dict, device: torch.device, dtype: torch.dtype, seed: int, dim: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, host tensor) one at a time, made on `device` in `dtype`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for key, shape in shapes.items():
        yield key, fill_(key, torch.empty(shape, device=device, dtype=dtype), gen, dim).cpu()


def random_lora(shapes: dict, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Down N(0, 1/fan_in), up N(0, 0.01/rank), alpha = rank: a merged delta of about 0.1/sqrt(fan_in)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith(".alpha"):
            out[key] = torch.tensor(float(LORA_RANK), dtype=BF16)
            continue
        std = shape[1] ** -0.5 if key.endswith("lora_down.weight") else 0.1 / math.sqrt(LORA_RANK)
        out[key] = torch.empty(shape, device=device, dtype=BF16).normal_(0.0, std, generator=gen).cpu()
    return out


# ---- writers ------------------------------------------------------------------------------------


class Writer:
    """Writes files under `root`, printing each one's size and time, and keeps the totals."""

    def __init__(self, root: Path):
        self.root, self.total, self.start = root, 0, time.perf_counter()

    def write(self, rel: str, save: Callable[[Path], None]) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        save(path)
        size = path.stat().st_size
        self.total += size
        print(f"  {rel:76s} {size / 1e6:11.1f} MB {time.perf_counter() - t0:7.1f} s", flush=True)

    def folder(self, rel: str, save: Callable[[Path], None]) -> None:
        """A folder written by a library (tokenizer, wav2vec2): every file in it is reported."""
        path = self.root / rel
        t0 = time.perf_counter()
        save(path)
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            self.total += f.stat().st_size
            print(f"  {str(f.relative_to(self.root)):76s} {f.stat().st_size / 1e6:11.1f} MB", flush=True)
        print(f"  ({rel}: {time.perf_counter() - t0:.1f} s)", flush=True)


def _safetensors(state: dict) -> Callable[[Path], None]:
    from safetensors.torch import save_file

    return lambda path: save_file(state, str(path), metadata={"format": "pt"})


def _pth(state: dict) -> Callable[[Path], None]:
    return lambda path: torch.save(state, path)


def _json(data: dict) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(data, indent=2) + "\n")


def write_dit(w: Writer, scale: Scale, device: torch.device, seed: int, variants: list[str]) -> None:
    """config.json, 7 shards + index (one shard on the host at a time), the adapter per variant."""
    wan = hub.WAN_DIR
    w.write(f"{wan}/config.json", _json(scale.dit_json))
    model = build_random_model(scale.dit, device, BF16, seed=seed)
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    base = [k for k in state if not is_adapter(k)]
    weight_map, total = {}, 0
    for i, group in enumerate(shard_groups(base, shapes, 2, DIT_SHARDS)):
        part = {k: state[k].detach().to("cpu").contiguous() for k in group}
        total += sum(v.numel() * v.element_size() for v in part.values())
        w.write(f"{wan}/{_shard_name(i)}", _safetensors(part))
        weight_map.update({k: _shard_name(i) for k in group})
        del part
    w.write(f"{wan}/{hub.DIT_INDEX}", _json({"metadata": {"total_size": total}, "weight_map": weight_map}))
    adapter = {k: v.detach().to("cpu").contiguous() for k, v in state.items() if is_adapter(k)}
    for variant in variants:
        w.write(f"{hub.INFINITETALK_DIR}/{variant}/infinitetalk.safetensors", _safetensors(adapter))
    del model, state, adapter
    _free(device)


def write_encoders(w: Writer, scale: Scale, device: torch.device, seed: int) -> None:
    """umT5 (.pth, bf16) + tokenizer folder, CLIP (.pth, visual tower, float32), VAE (.pth, float32)."""
    wan = hub.WAN_DIR
    t5 = dict(random_state(_meta_shapes(UMT5Encoder, scale.text), device, BF16, seed + 1, scale.text.dim))
    w.write(f"{wan}/{hub.T5_FILE}", _pth(t5))
    del t5
    _free(device)
    w.folder(f"{wan}/{hub.T5_TOKENIZER_DIR}", write_tokenizer)
    clip = dict(random_state(clip_shapes(scale), device, F32, seed + 2, scale.clip.dim))
    w.write(f"{wan}/{hub.CLIP_FILE}", _pth(clip))
    vae = dict(random_state(_meta_shapes(WanVAE, scale.vae), device, F32, seed + 3, scale.vae.dim))
    w.write(f"{wan}/{hub.VAE_FILE}", _pth(vae))
    del clip, vae
    _free(device)


def write_tokenizer(folder: Path) -> None:
    """A byte-level Hugging Face tokenizer (NOT the umT5 vocabulary): 259 ids, </s> appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))


def write_audio(w: Writer, scale: Scale, seed: int) -> None:
    from infinitetalk.weights.audio_loader import save_audio_encoder_folder

    model = tiny_audio_encoder(seed=seed + 4, config=scale.audio)  # any config: its constructor's init, seeded
    w.folder(hub.WAV2VEC_DIR, lambda folder: save_audio_encoder_folder(model, folder))


def write_loras(w: Writer, scale: Scale, device: torch.device, seed: int) -> None:
    for i, name in enumerate(preset_loras()):
        w.write(f"{hub.LORA_DIR}/{name}", _safetensors(random_lora(lora_shapes(scale.dit), device, seed + 10 + i)))


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="the weights folder to create (must be absent or empty)")
    parser.add_argument("--scale", choices=("real", "tiny"), default="real", help="real 14B sizes (default) or tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the random tensors are made (default cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=("single", "multi", "both"), default="single",
                        help="adapter file(s) to write (both: the same random adapter twice)")
    parser.add_argument("--no-loras", action="store_true", help="leave out the preset LoRAs (loras/)")
    parser.add_argument("--dry-run", action="store_true", help="print the files and sizes only (nothing allocated)")
    args = parser.parse_args(argv)
    scale = scale_configs(args.scale)
    variants = ["single", "multi"] if args.variant == "both" else [args.variant]
    planned = plan_files(scale, variants, not args.no_loras)
    planned_bytes = sum(p.nbytes for p in planned)
    if args.dry_run:
        print(f"{args.scale} scale: files under {args.out} (tensor bytes; json, tokenizer and headers not counted)")
        for p in planned:
            print(f"  {p.path:76s} {p.params:>15,} params {p.nbytes / 1e6:11.1f} MB")
        dit = sum(p.params for p in planned if "diffusion_pytorch_model" in p.path)
        adapter = next(p.params for p in planned if p.path.endswith("infinitetalk.safetensors"))
        print(f"  DiT {dit:,} params + adapter {adapter:,} = {dit + adapter:,}")
        print(f"  total {planned_bytes / 1e9:.2f} GB")
        return 0
    out = args.out.expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"{out} exists and is not empty; give a new or empty folder with --out (nothing is overwritten).", file=sys.stderr)
        return 2
    probe = next(p for p in [out, *out.parents] if p.exists())
    free = shutil.disk_usage(probe).free
    if free < planned_bytes * 1.01:
        print(f"{probe} has {free / 1e9:.1f} GB free but the {args.scale} layout needs {planned_bytes / 1e9:.1f} GB; "
              "choose another --out.", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    out.mkdir(parents=True, exist_ok=True)
    print(f"writing the {args.scale} random weights layout to {out} on {device} ({planned_bytes / 1e9:.2f} GB of tensors)", flush=True)
    w = Writer(out)
    write_dit(w, scale, device, args.seed, variants)
    write_encoders(w, scale, device, args.seed)
    write_audio(w, scale, args.seed)
    if not args.no_loras:
        write_loras(w, scale, device, args.seed)
    missing = [v for v in variants if hub.WeightsLayout(out, v).missing_files()]
    if missing:
        raise RuntimeError(f"the written layout is incomplete for {missing}: {hub.WeightsLayout(out, missing[0]).missing_files()}")
    print(f"total {w.total / 1e9:.3f} GB in {time.perf_counter() - w.start:.1f} s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

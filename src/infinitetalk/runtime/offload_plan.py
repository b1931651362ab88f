"""Plan how a job fits a VRAM budget: what stays on the GPU, what streams, what is chunked or tiled.

`plan_offload(models, budget_bytes, ...)` is a pure function: from the configs of the five
models (`OffloadModels`, parameter bytes counted on the meta device), the size bucket, the
dtype / fp8, the speakers and guidance passes it returns an `OffloadPlan` that
`runtime.offload.Offloader` carries out. Nothing is loaded and no device is touched.

Memory is accounted per phase of a job; the GPU holds, in every phase, the DiT's non-block
parameters and its resident blocks, and in the sampling phase (when any block streams) two block
slots (the streamer allocates them for the first block and releases them when another model runs):
* "text": + umT5 parameters and activations (or nothing when umT5 runs on the CPU);
* "audio", "clip": + wav2vec2 / CLIP parameters and `ENCODER_ACTIVATION_FRACTION` of them;
* "encode": + VAE parameters + the encode's activations (the window's conditioning video: the
  reference frame and zeros, and the motion frames);
* "sampling": + the cached text/CLIP keys and values + one DiT forward's activations;
* "vae": + VAE parameters + the decode's activations (whole frames, or tiles with `DecodeTiling`).
The VAE runs `vae_chunk_latents` latent frames (4 x that many video frames, plus 2 causal cache
frames) per step: 4 (`VAEFastOptions.chunk_latents`, fewer launches) or 1 (the official step, a
third of the activation memory).
The knobs that cost time are switched on only where a phase needs them, cheapest first:
umT5 on the CPU (text phase), one latent frame per VAE step and then the tiled decode with the
largest tile that fits (`VAE_TILES`: larger tiles recompute less halo and run fewer tile shapes;
encode and vae phases), FFN chunks and then uncached conditions (sampling phase); every byte left
then holds resident DiT blocks. A fraction
`RESERVE_FRACTION` of the budget stays free for allocator rounding and kernel workspaces.

Activation model of one DiT forward (B samples of L tokens, width d, FFN width f, s bytes per
element of the DiT dtype, c FFN chunks), the larger of its two phases:
* attention: B L d (6 s + 8): the residual stream, the modulated input, q, k, v and the attention
  output in the dtype, plus the float32 RoPE input and output of one of q / k;
* FFN: B (L d (2 s + 8) + ceil(L / c) (f (2 s + q) + d s)): the residual stream, its float32
  copy in the gated residual, the float32 norm output, the concatenated output (c > 1), and per
  chunk the hidden and GELU activations (plus their fp8 codes, q = 1 byte, with fp8) and the
  chunk's output;
plus the float32 head output and its unpatchified copy, B L p 4 * 2 (p = patch volume x
output channels), and with two speakers the routing map's q/k copy B L d s.
Host memory: streamed blocks are held pinned when `host_ram_bytes` allows (else they stream
from a memory-mapped file), plus the host copies of every model that is not GPU-resident.

Several ranks (`shards` = W > 1, the ranks of one parallel job): a whole DiT per rank when it fits
(every block resident); else, when it fits with the streamed blocks split over the ranks (each
rank keeps ceil(block / W) bytes of every streamed block on its GPU, plus the two full slots the
blocks are gathered into), a sharded plan (`OffloadPlan.shards` = W, as many blocks resident as
fit); else every rank streams from its own host memory as one process would.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

GiB = 1024**3
RESERVE_FRACTION = 0.06
"""Share of the budget kept free for allocator rounding, cuBLAS/cuDNN workspaces and fragmentation."""
ENCODER_ACTIVATION_FRACTION = 0.5
"""Activation allowance of a wav2vec2 or CLIP call, as a share of its parameter bytes (chunked audio, 257 tokens)."""
HOST_MARGIN_BYTES = 4 * GiB
"""Host memory left to the rest of the process and the OS when deciding pinned vs memory-mapped."""
PINNED_ARENA_BYTES = GiB
"""The host arena slab of the pinned store (`runtime.block_store.ARENA_BYTES`): a power of two, 1 GiB."""
PROCESS_HOST_BYTES = 2 * GiB
"""Host memory of the process beside the models' bytes (Python, PyTorch, the CUDA context, frames and
audio), counted in `host_bytes`: a round figure above what the 14B jobs measured (`benchmarks/NOTES.md`, v21)."""
PLACER_ARENA_BYTES = 128 * 1024**2
"""The host arena slab of a model moved onto the GPU per call (`runtime.offload.ModulePlacer`): small,
so the last arena's power-of-two rounding wastes little (umT5's 2 GiB embedding gets its own)."""
FFN_CHUNK_CHOICES = (1, 2, 4, 8, 16)
VAE_TILES = (128, 64, 32)
"""Latent pixels per tile side the tiled VAE decode may use, largest first (32: the `DecodeTiling` default).
The halo work of the tiled levels at 720x1280 is 1.65x the untiled work with 32, 1.30x with 64
(`DecodeTiling.overhead`); a larger tile needs more memory (one step over its area), so the plan takes
the largest that fits."""
VAE_STEP_ACTIVATIONS = 32.2
"""VAE memory per latent frame of a step, in full-resolution activations of the first level's width c (4 video
frames of about 8 live tensors each: input, float32 norm, padded conv input, conv output, residual, caches)."""
VAE_DECODE_FIXED = 25.0
"""Decode memory of a step besides its frames, in the same units (the 2 causal cache frames of every level and
the wider activations of the upsampling stages)."""
VAE_ENCODE_FIXED = 20.1
"""Encode memory of a step besides its frames, in the same units."""
VAE_TILED_WHOLE_STAGES = 12.2
"""Tiled decode: the stages before the split (run on whole frames), in the same units per frame pixel."""
# The four constants bound the peak live bytes of the code as it runs, traced on the meta device
# (`runtime.memory_trace`) for the reference and the fast VAE path (the fast path's norm + SiLU run
# eagerly in float32, which holds more than its compiled kernel): decode 56.8-57.0 units with one
# latent frame per step and 153.1 with four, encode 52.1 and 148.8, at 256x448 to 1920x512; the
# whole-frame stages of the tiled decode 12.12 at 1920x512 (where they, not the tile, set the peak).
# tests/test_offload_plan.py traces them again and checks every VAE term against the trace.
VAE_CHOICES = ((0, 4), (0, 1), *((tile, 1) for tile in VAE_TILES))
"""(decode tile in latent pixels, 0 = whole frames; latent frames per VAE step), cheapest first."""


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of `module` (works on the meta device)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


@dataclass(frozen=True)
class OffloadModels:
    """Parameter bytes of the five models as the pipeline holds them, and the DiT sizes the plan needs.

    Build with `from_configs` (counted on the meta device in the dtypes the pipeline loads:
    DiT and umT5 in `dtype`, fp8 block linears as e4m3 + float32 scales, CLIP in float16 on a
    GPU, the VAE in bfloat16 on the fast path, wav2vec2 in float32).
    Once the DiT is loaded, `with_dit(dit)` replaces its sizes by the bytes it really holds (a
    GGUF Q4_K DiT is about a quarter of bf16).
    """

    dit_config: object
    dit_fixed: int
    dit_block: int
    text_encoder: int
    clip: int
    vae: int
    audio_encoder: int
    dtype_bytes: int
    vae_dtype_bytes: int
    vae_dim: int
    text_dim: int
    text_ffn: int
    text_len: int
    fp8: bool
    longest_side: Optional[int] = None
    vae_tile_halo: int = 6  # latent pixels of halo around a tile of the tiled decode (`WanVAE.decoder.tiling_split`)

    @property
    def num_blocks(self) -> int:
        return self.dit_config.num_layers

    @property
    def dit_total(self) -> int:
        return self.dit_fixed + self.num_blocks * self.dit_block

    @property
    def total(self) -> int:
        return self.dit_total + self.text_encoder + self.clip + self.vae + self.audio_encoder

    @classmethod
    def from_configs(
        cls,
        dit_config,
        text_config,
        clip_config,
        vae_config,
        audio_config,
        *,
        dtype: torch.dtype = torch.bfloat16,
        fp8: bool = False,
        clip_dtype: torch.dtype = torch.float16,
        vae_dtype: torch.dtype = torch.bfloat16,
        longest_side: Optional[int] = None,
    ) -> "OffloadModels":
        from ..models.audio import AudioEncoder
        from ..models.dit import InfiniteTalkDiT, WanAttentionBlock
        from ..models.image import CLIPVisionEncoder
        from ..models.text import UMT5Encoder
        from ..models.vae import WanVAE
        from ..quant.fp8 import is_dit_fp8_layer, quantize_module

        with torch.device("meta"):
            block = WanAttentionBlock(dit_config).to(dtype)
            dit = InfiniteTalkDiT(dit_config.replace(num_layers=0)).to(dtype)
            text = UMT5Encoder(text_config).to(dtype)
            clip = CLIPVisionEncoder(clip_config).to(clip_dtype)
            vae = WanVAE(vae_config).to(vae_dtype)
            audio = AudioEncoder(audio_config).float()
        if fp8:
            holder = torch.nn.Module()
            holder.blocks = torch.nn.ModuleList([block])
            quantize_module(holder, lambda name, _m: is_dit_fp8_layer(name))
        return cls(
            dit_config=dit_config, dit_fixed=module_bytes(dit), dit_block=module_bytes(block),
            text_encoder=module_bytes(text), clip=module_bytes(clip), vae=module_bytes(vae),
            audio_encoder=module_bytes(audio), dtype_bytes=_dtype_bytes(dtype), vae_dtype_bytes=_dtype_bytes(vae_dtype),
            vae_dim=vae_config.dim * vae_config.dim_mult[0], text_dim=text_config.dim, text_ffn=text_config.dim_ffn,
            text_len=dit_config.text_len, fp8=fp8, longest_side=longest_side, vae_tile_halo=_latent_halo(vae),
        )

    def with_dit(self, dit: torch.nn.Module) -> "OffloadModels":
        """These sizes with the DiT's bytes as `dit` holds them: a loaded (or meta) model whose layers
        keep their storage, GGUF blocks (`GGUFLinear`, uint8), fp8-scaled or LoRA deltas, which the
        configs alone size as `dtype` / fp8. `dit_block` is the largest block (the slots must hold
        it; mixed GGUF files differ per block), `dit_fixed` everything outside the blocks."""
        blocks = [module_bytes(block) for block in dit.blocks]
        return dataclasses.replace(
            self, dit_config=dit.config, dit_block=max(blocks, default=0), dit_fixed=module_bytes(dit) - sum(blocks),
        )

    @classmethod
    def infinitetalk_14b(cls, dtype: torch.dtype = torch.bfloat16, fp8: bool = False) -> "OffloadModels":
        """The released models as the GPU pipeline loads them."""
        from ..models.audio import AudioEncoderConfig
        from ..models.dit import WanDiTConfig
        from ..models.image import CLIPVisionConfig
        from ..models.text import UMT5Config
        from ..models.vae import WanVAEConfig

        vae_dtype = torch.bfloat16 if dtype != torch.float32 else torch.float32
        clip_dtype = torch.float16 if dtype != torch.float32 else torch.float32
        return cls.from_configs(
            WanDiTConfig.infinitetalk_14b(), UMT5Config(), CLIPVisionConfig(), WanVAEConfig(), AudioEncoderConfig.base(),
            dtype=dtype, fp8=fp8, clip_dtype=clip_dtype, vae_dtype=vae_dtype,
        )

    @classmethod
    def tiny(cls, dtype: torch.dtype = torch.float32, fp8: bool = False) -> "OffloadModels":
        """The tiny random models (`runtime.tiny_models`), VAE and wav2vec2 in float32 as they are built."""
        from .tiny_models import TINY_LONGEST_SIDE, TinyConfigs, tiny_audio_encoder_config

        cfgs = TinyConfigs.default()
        return cls.from_configs(
            cfgs.dit, cfgs.text, cfgs.clip, cfgs.vae, tiny_audio_encoder_config(), dtype=dtype, fp8=fp8,
            clip_dtype=dtype, vae_dtype=torch.float32, longest_side=TINY_LONGEST_SIDE,
        )


def largest_bucket(size: int, longest_side: Optional[int] = None) -> tuple[int, int]:
    """(height, width) of the bucket with the most pixels in the `size` set: every job of that size fits."""
    from ..media.buckets import size_buckets

    return max(size_buckets(size, longest_side).values(), key=lambda hw: (hw[0] * hw[1], hw))


def dit_tokens(dit_config, height: int, width: int, frame_num: int = 81, vae_stride: tuple[int, int] = (4, 8)) -> int:
    """Tokens of one DiT sample for a `frame_num`-frame window of height x width pixels."""
    pt, ph, pw = dit_config.patch_size
    frames = (frame_num - 1) // vae_stride[0] + 1
    return (frames // pt) * (height // vae_stride[1] // ph) * (width // vae_stride[1] // pw)


def dit_activation_bytes(models: OffloadModels, tokens: int, *, batch: int = 1, ffn_chunks: int = 1, speakers: int = 1) -> int:
    """Peak activation bytes of one DiT forward (see the module docstring for the model)."""
    cfg = models.dit_config
    s, d, f, n = models.dtype_bytes, cfg.dim, cfg.ffn_dim, tokens
    attention = n * d * (6 * s + 8)
    chunk = math.ceil(n / ffn_chunks)
    ffn = n * d * (2 * s + 8) + chunk * (f * (2 * s + (1 if models.fp8 else 0)) + d * s)
    head = n * math.prod(cfg.patch_size) * cfg.out_dim * 4 * 2
    routing = n * d * s if speakers == 2 else 0
    return batch * (max(attention, ffn) + head + routing)


def conditions_bytes(models: OffloadModels, prompts: int, cached: bool, speakers: int = 1, frames: int = 21) -> int:
    """Cached text/CLIP keys and values of every block for `prompts` distinct prompts, plus audio tokens."""
    from ..models.dit import CLIP_TOKENS

    cfg = models.dit_config
    audio_tokens = prompts * frames * speakers * cfg.context_tokens * cfg.output_dim * models.dtype_bytes
    if not cached:
        return 0
    per_block = (CLIP_TOKENS + cfg.text_len) * 2 * cfg.dim * models.dtype_bytes
    return prompts * cfg.num_layers * per_block + audio_tokens


def vae_step_frames(chunk_latents: int) -> int:
    """Video frames one VAE step holds at full resolution: 4 per latent frame + 2 causal cache frames."""
    return 4 * chunk_latents + 2


def _latent_halo(vae) -> int:
    """Latent pixels of halo the tiled decode adds around a tile core of this VAE."""
    _split, factor, halo = vae.decoder.tiling_split()
    return -(-halo // factor)


def vae_tile_pixels(models: OffloadModels, height: int, width: int, tile: int = VAE_TILES[-1]) -> int:
    """Pixels of the largest tile (core and halos) the tiled decode cuts a height x width frame into,
    with cores of `tile` latent pixels."""
    from ..models.vae import DecodeTiling

    tiling = DecodeTiling(tile)

    def extent(pixels: int) -> int:
        return 8 * max(stop - start for _, _, start, stop in tiling.spans(pixels // 8, models.vae_tile_halo))

    return extent(height) * extent(width)


def vae_decode_bytes(models: OffloadModels, height: int, width: int, frame_num: int = 81, tile: int = 0,
                     chunk_latents: int = 1) -> int:
    """Decode peak: the float32 output video, plus `VAE_DECODE_FIXED + VAE_STEP_ACTIVATIONS x chunk`
    full-resolution activations (width c) of one step over the frame. Tiled, the split-resolution
    output of the whole window is kept (2c channels at 1/16 of the pixels, 1 + 2 (T - 1) frames), and
    on top of it the larger of the whole-frame stages (`VAE_TILED_WHOLE_STAGES`) and one step over
    the largest tile (`vae_tile_pixels`; `tile` latent pixels per core side, 0 = untiled)."""
    out = 3 * frame_num * height * width * 4
    c, s = models.vae_dim, models.vae_dtype_bytes
    step = VAE_DECODE_FIXED + VAE_STEP_ACTIVATIONS * chunk_latents
    area = height * width
    if not tile:
        return out + math.ceil(step * c * area * s)
    latents = (frame_num - 1) // 4 + 1
    kept = 2 * c * (1 + 2 * (latents - 1)) * area // 16 * s
    return out + kept + math.ceil(max(VAE_TILED_WHOLE_STAGES * area, step * vae_tile_pixels(models, height, width, tile)) * c * s)


def vae_encode_bytes(models: OffloadModels, height: int, width: int, frame_num: int = 81, chunk_latents: int = 1) -> int:
    """Encode peak (the window's conditioning video): the float32 input video, plus
    `VAE_ENCODE_FIXED + VAE_STEP_ACTIVATIONS x chunk` full-resolution activations (width c) of one step."""
    c, s = models.vae_dim, models.vae_dtype_bytes
    step = VAE_ENCODE_FIXED + VAE_STEP_ACTIVATIONS * chunk_latents
    return 3 * frame_num * height * width * 4 + math.ceil(step * c * height * width * s)


def pinned_arena_bytes(streamed_bytes: int) -> int:
    """Pinned host memory for `streamed_bytes` of packed blocks: whole arena slabs
    (`runtime.block_store.ARENA_BYTES`, a power of two the pinned allocator does not round up)."""
    return -(-streamed_bytes // PINNED_ARENA_BYTES) * PINNED_ARENA_BYTES


def placed_bytes(parameter_bytes: int) -> int:
    """Host memory of a model moved onto the GPU per call (`runtime.offload.ModulePlacer`): whole
    `PLACER_ARENA_BYTES` arenas (the last one rounded up to a power of two, at most an arena)."""
    return -(-parameter_bytes // PLACER_ARENA_BYTES) * PLACER_ARENA_BYTES


def encoder_activation_bytes(parameter_bytes: int) -> int:
    """Activation allowance of one wav2vec2 or CLIP call."""
    return int(parameter_bytes * ENCODER_ACTIVATION_FRACTION)


def text_activation_bytes(models: OffloadModels, prompts: int = 2) -> int:
    """umT5 activations of encoding `prompts` prompts: per token the FFN's two hidden tensors and four dim-wide ones."""
    return prompts * models.text_len * (2 * models.text_ffn + 4 * models.text_dim) * models.dtype_bytes


@dataclass(frozen=True)
class OffloadPlan:
    """What runs where under a VRAM budget (bytes throughout). Made by `plan_offload`."""

    budget: int
    size: int
    height: int
    width: int
    tokens: int
    fp8: bool
    speakers: int
    passes: int
    num_blocks: int
    resident_blocks: int
    dit_fixed: int
    block_bytes: int
    ffn_chunks: int
    cache_conditions: str  # "context" (text/CLIP keys and values cached, resident) or "none"
    vae_tile: int  # latent pixels per core side of the tiled decode, 0 = whole frames
    text_encoder: str  # "resident", "gpu" (moved on while it runs) or "cpu" (runs on the host)
    encoders_resident: bool  # CLIP, wav2vec2 and the VAE stay on the GPU (else moved on while they run)
    host_store: str  # "pinned", "mmap" or "none" (nothing streams)
    phases: dict = field(default_factory=dict)
    host_bytes: int = 0
    pinned_bytes: int = 0
    reserve: int = 0
    shards: int = 1  # > 1: the streamed blocks are split over this many ranks (host_store "shards")
    vae_chunk_latents: int = 4  # latent frames per VAE encode / decode step (at most; 1: the official step)

    @property
    def streamed_blocks(self) -> int:
        return self.num_blocks - self.resident_blocks

    @property
    def streams(self) -> bool:
        return self.streamed_blocks > 0

    @property
    def slot_bytes(self) -> int:
        return 2 * self.block_bytes if self.streams else 0

    @property
    def sharded(self) -> bool:
        return self.shards > 1 and self.streams

    @property
    def shard_bytes(self) -> int:
        """Bytes of the streamed blocks each rank keeps on its GPU (0 unless sharded)."""
        return self.streamed_blocks * math.ceil(self.block_bytes / self.shards) if self.sharded else 0

    @property
    def vram_bytes(self) -> int:
        """Planned peak of the allocator: the largest phase."""
        return max(self.phases.values())

    @property
    def offloads(self) -> bool:
        """True when anything leaves the GPU (streamed blocks or models moved on per call)."""
        return self.streams or not self.encoders_resident or self.text_encoder != "resident"

    @property
    def vae_tiling(self) -> bool:
        return self.vae_tile > 0

    def decode_tiling(self):
        """The `DecodeTiling` to pass to `WanVAE.decode`, or None."""
        from ..models.vae import DecodeTiling

        return DecodeTiling(self.vae_tile) if self.vae_tile else None

    def describe(self) -> str:
        """A few lines for logs and `infinitetalk info --vram`."""
        def gb(n: int) -> str:
            return f"{n / GiB:.2f} GB"

        lines = [
            f"VRAM plan for a budget of {gb(self.budget)} at {self.size}p (largest bucket {self.width}x{self.height}, "
            f"{self.tokens} tokens), {'fp8' if self.fp8 else 'no fp8'}, {self.speakers} speaker(s), {self.passes}-pass guidance:",
            *([f"  DiT blocks sharded over {self.shards} ranks, gathered block by block through two slots "
               f"({gb(self.shard_bytes)} of shards per rank)"] if self.sharded else []),
            f"  DiT: {self.resident_blocks}/{self.num_blocks} blocks resident, {self.streamed_blocks} streamed "
            f"({gb(self.block_bytes)} each{', two slots' if self.streams else ''}) from {self.store_text()}; "
            f"non-block parameters {gb(self.dit_fixed)} resident",
            f"  FFN chunks {self.ffn_chunks}; text/CLIP keys and values {'cached' if self.cache_conditions != 'none' else 'recomputed per step'}; "
f"VAE {self.vae_chunk_latents} latent frame{'s' if self.vae_chunk_latents != 1 else ''} per step, "
            f"decode {f'tiled ({self.vae_tile} latent px tiles)' if self.vae_tile else 'whole frames'}",
            f"  umT5 {self.text_encoder_text()}; CLIP, wav2vec2, VAE "
            f"{'resident' if self.encoders_resident else 'on the GPU only while they run'}",
            "  peak per phase: " + ", ".join(f"{k} {gb(v)}" for k, v in self.phases.items()),
            f"  will use up to {gb(self.vram_bytes)} of VRAM ({gb(self.reserve)} kept free) and {gb(self.host_bytes)} "
            f"of host RAM ({gb(self.pinned_bytes)} pinned, {gb(PROCESS_HOST_BYTES)} for the process itself)",
        ]
        return "\n".join(lines)

    def store_text(self) -> str:
        streamed = gb_text(self.streamed_blocks * self.block_bytes)
        return {"pinned": f"pinned host memory ({streamed})", "none": "nowhere",
                "mmap": f"a memory-mapped file ({streamed} on disk; not enough host RAM to pin)",
                "shards": f"the {self.shards} ranks' GPUs (1/{self.shards} of each block per rank)"}[self.host_store]

    def text_encoder_text(self) -> str:
        return {"resident": "resident", "gpu": "on the GPU only while it runs", "cpu": "runs on the CPU"}[self.text_encoder]

    def smaller_options(self) -> str:
        """The sentence part an out-of-memory error uses: what to try next."""
        smaller = max(1.0, math.floor(self.budget * 0.75 / GiB))
        tips = [f"--vram {smaller:g} (a smaller budget streams more and leaves more room)"]
        if not self.fp8:
            tips.append("--fp8")
        if self.size == 720:
            tips.append("--size 480")
        return ", or ".join(tips)


def gb_text(n: int) -> str:
    return f"{n / GiB:.2f} GB"


def _fits(phases: dict, budget_left: int) -> bool:
    return all(v <= budget_left for v in phases.values())


def plan_offload(
    models: OffloadModels,
    budget_bytes: int,
    *,
    size: int = 480,
    speakers: int = 1,
    passes: int = 3,
    frame_num: int = 81,
    host_ram_bytes: Optional[int] = None,
    batch: int = 1,
    shards: int = 1,
) -> OffloadPlan:
    """The plan for a job of `size` (480/720: its largest bucket) under `budget_bytes` of VRAM.

    passes: model passes per step (3: cond / drop_text / uncond, two distinct prompts; 2: cond /
    drop_audio, one prompt). batch: samples per DiT forward (1 unless guidance branches are
    batched). host_ram_bytes: host memory available (None: unlimited, pinned). shards: the ranks
    the DiT blocks may be split over (the ranks of a parallel job; 1: never), used only when a
    whole DiT does not fit (see the module docstring). Raises `DeviceOutOfMemoryError` naming the
    smallest budget that fits when none of the knobs suffices.
    """
    from ..errors import DeviceOutOfMemoryError, InputError

    if speakers not in (1, 2):
        raise InputError(f"speakers must be 1 or 2, got {speakers}.")
    if passes not in (2, 3):
        raise InputError(f"passes must be 2 or 3, got {passes}.")
    budget = int(budget_bytes)
    reserve = int(budget * RESERVE_FRACTION)
    usable = budget - reserve
    height, width = largest_bucket(size, models.longest_side)
    tokens = dit_tokens(models.dit_config, height, width, frame_num)
    latent_frames = (frame_num - 1) // 4 + 1
    prompts = 2 if passes == 3 else 1
    n, b = models.num_blocks, models.dit_block

    def phases(resident: int, text: str, encoders_resident: bool, tile: int, chunks: int, cache: str,
               split: int = 1, vae_chunks: int = 1) -> dict:
        # streamed blocks: nothing on this GPU (host memory), or ceil(b / split) each (split over the ranks)
        shards = (n - resident) * math.ceil(b / split) if split > 1 else 0
        dit = models.dit_fixed + resident * b + shards
        slots = 2 * b if resident < n else 0  # allocated by the first block, released when another model runs
        if split > 1:  # sharded: the slots stay (the ranks gather in lockstep), in every phase
            dit, slots = dit + slots, 0
        enc = models.clip + models.audio_encoder + models.vae if encoders_resident else 0
        t5 = models.text_encoder if text == "resident" else 0
        base = dit + enc + t5
        return {
            "text": base + (models.text_encoder if text == "gpu" else 0)
            + (text_activation_bytes(models) if text != "cpu" else 0),
            "audio": base + (0 if encoders_resident else models.audio_encoder) + encoder_activation_bytes(models.audio_encoder),
            "clip": base + (0 if encoders_resident else models.clip) + encoder_activation_bytes(models.clip),
            "encode": base + (0 if encoders_resident else models.vae)
            + vae_encode_bytes(models, height, width, frame_num, vae_chunks),
            "sampling": base + slots + conditions_bytes(models, prompts, cache != "none", speakers, latent_frames)
            + dit_activation_bytes(models, tokens, batch=batch, ffn_chunks=chunks, speakers=speakers),
            "vae": base + (0 if encoders_resident else models.vae)
            + vae_decode_bytes(models, height, width, frame_num, tile, vae_chunks),
        }

    def first_fit(resident: int, encoders_resident: bool, text_choices, split: int = 1,
                  vae_choices=VAE_CHOICES) -> Optional[tuple]:
        for text in text_choices:
            for tile, vae_chunks in vae_choices:
                for chunks in FFN_CHUNK_CHOICES:
                    for cache in ("context", "none"):
                        if _fits(phases(resident, text, encoders_resident, tile, chunks, cache, split, vae_chunks), usable):
                            return text, tile, chunks, cache, vae_chunks
        return None

    def most_resident(choice: tuple, split: int) -> int:
        text, tile, chunks, cache, vae_chunks = choice
        resident = 0
        while resident < n and _fits(phases(resident + 1, text, False, tile, chunks, cache, split, vae_chunks), usable):
            resident += 1
        return resident

    # everything resident when it fits (with the full VAE step: streaming costs less than a slower VAE),
    # else models per call and as many DiT blocks as fit
    choice = first_fit(n, True, ("resident",), vae_choices=VAE_CHOICES[:1])
    encoders_resident = choice is not None
    if choice is None:
        choice = first_fit(0, False, ("gpu", "cpu"))
    if choice is None:
        need = min_budget(models, size=size, speakers=speakers, passes=passes, frame_num=frame_num, batch=batch)
        raise DeviceOutOfMemoryError(
            f"A {size}p job needs at least {need / GiB:.1f} GB of VRAM with every block streamed, more than the "
            f"budget of {budget / GiB:.1f} GB; give --vram {math.ceil(need / GiB * 10) / 10:g} or more"
            + (", use --fp8" if not models.fp8 else "") + (", or --size 480" if size == 720 else "") + "."
        )
    resident = n if encoders_resident else most_resident(choice, 1)
    split = 1
    if resident < n and shards > 1:  # no whole DiT per rank: split the streamed blocks over the ranks if that fits
        sharded = first_fit(0, False, ("gpu", "cpu"), shards)
        if sharded is not None:
            choice, split = sharded, shards
            resident = most_resident(choice, split)
            if resident == n:  # the knobs the split needed leave room for a whole DiT after all
                split = 1
    text, tile, chunks, cache, vae_chunks = choice
    final = phases(resident, text, encoders_resident, tile, chunks, cache, split, vae_chunks)
    streamed_bytes = (n - resident) * b if split == 1 else 0
    host_models = {"resident": 0, "cpu": models.text_encoder, "gpu": placed_bytes(models.text_encoder)}[text] + (
        0 if encoders_resident else sum(placed_bytes(n) for n in (models.clip, models.audio_encoder, models.vae))
    )
    if split > 1:
        store = "shards"
    elif streamed_bytes == 0:
        store = "none"
    elif host_ram_bytes is None or pinned_arena_bytes(streamed_bytes) + host_models + HOST_MARGIN_BYTES <= host_ram_bytes:
        store = "pinned"
    else:
        store = "mmap"
    pinned = pinned_arena_bytes(streamed_bytes) if store == "pinned" else 0
    return OffloadPlan(
        budget=budget, size=size, height=height, width=width, tokens=tokens, fp8=models.fp8, speakers=speakers,
        passes=passes, num_blocks=n, resident_blocks=resident, dit_fixed=models.dit_fixed, block_bytes=b,
        ffn_chunks=chunks, cache_conditions=cache, vae_tile=tile, text_encoder=text,
        encoders_resident=encoders_resident, host_store=store, phases=final,
        host_bytes=host_models + pinned + PROCESS_HOST_BYTES, pinned_bytes=pinned, reserve=reserve, shards=split,
        vae_chunk_latents=vae_chunks,
    )


def min_budget(models: OffloadModels, *, size: int = 480, speakers: int = 1, passes: int = 3, frame_num: int = 81,
               batch: int = 1) -> int:
    """The smallest budget (bytes) a plan exists for: every knob on, every block streamed, umT5 on the CPU."""
    height, width = largest_bucket(size, models.longest_side)
    tokens = dit_tokens(models.dit_config, height, width, frame_num)
    b = models.dit_block
    dit = models.dit_fixed
    slots = 2 * b if models.num_blocks else 0
    need = max(
        dit + models.audio_encoder + encoder_activation_bytes(models.audio_encoder),
        dit + models.clip + encoder_activation_bytes(models.clip),
        dit + slots + conditions_bytes(models, 2 if passes == 3 else 1, False, speakers, (frame_num - 1) // 4 + 1)
        + dit_activation_bytes(models, tokens, batch=batch, ffn_chunks=FFN_CHUNK_CHOICES[-1], speakers=speakers),
        dit + models.vae + vae_decode_bytes(models, height, width, frame_num, VAE_TILES[-1]),
        dit + models.vae + vae_encode_bytes(models, height, width, frame_num),
    )
    return math.ceil(need / (1 - RESERVE_FRACTION)) + 1

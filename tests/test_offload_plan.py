"""The VRAM planner (`runtime.offload_plan`): exact byte counts of the 14B models and plans for 4-140 GB.

Every number the planner uses is recomputed here from the config fields by hand (parameter
shapes of the official checkpoint, the documented activation model), not through its helpers.
"""
from __future__ import annotations

import math

import pytest
import torch

from infinitetalk.errors import DeviceOutOfMemoryError
from infinitetalk.models.dit import WanDiTConfig
from infinitetalk.runtime.block_store import ARENA_BYTES
from infinitetalk.runtime.offload_plan import (
    ENCODER_ACTIVATION_FRACTION,
    GiB,
    HOST_MARGIN_BYTES,
    RESERVE_FRACTION,
    VAE_TILES,
    PLACER_ARENA_BYTES,
    PROCESS_HOST_BYTES,
    OffloadModels,
    min_budget,
    plan_offload,
    vae_encode_bytes,
    vae_step_frames,
)

CFG = WanDiTConfig.infinitetalk_14b()
D, F, OD = CFG.dim, CFG.ffn_dim, CFG.output_dim


def _linears() -> list[tuple[int, int]]:
    """(out, in) of every linear layer of one block (all with bias)."""
    return [(D, D)] * 4 + [(D, D)] * 6 + [(F, D), (D, F)] + [(D, D), (2 * D, OD), (D, D)]


def block_bytes(fp8: bool) -> int:
    norms = 6 * D + 2 * D + 2 * D + 3 * D + 2 * D  # modulation, self q/k norms, norm3, cross q/k/k_img norms, norm_x
    if fp8:
        return sum(o * i + 4 * o + 2 * o for o, i in _linears()) + 2 * norms
    return 2 * (sum(o * i + o for o, i in _linears()) + norms)


def fixed_params() -> int:
    c, p = CFG.clip_dim, math.prod(CFG.patch_size)
    aw, vs, al, ac, idim, ct = CFG.audio_window, CFG.vae_scale, CFG.audio_layers, CFG.audio_channels, CFG.intermediate_dim, CFG.context_tokens
    return (
        CFG.in_dim * D * p + D  # patch embedding
        + CFG.text_dim * D + D + D * D + D  # text embedding
        + CFG.freq_dim * D + D + D * D + D  # time embedding
        + D * 6 * D + 6 * D  # time projection
        + D * p * CFG.out_dim + p * CFG.out_dim + 2 * D  # head linear + head modulation
        + 2 * c + c * c + c + c * D + D + 2 * D  # img_emb
        + aw * al * ac * idim + idim + (aw + vs - 1) * al * ac * idim + idim + idim * idim + idim
        + idim * ct * OD + ct * OD + 2 * OD  # audio_proj
    )


@pytest.fixture(scope="module")
def models():
    return {fp8: OffloadModels.infinitetalk_14b(torch.bfloat16, fp8) for fp8 in (False, True)}


def test_parameter_bytes_are_exact(models):
    assert fixed_params() + CFG.num_layers * block_bytes(False) // 2 == 18_882_046_784  # the release's count
    bf16, fp8 = models[False], models[True]
    assert bf16.dit_block == block_bytes(False) and fp8.dit_block == block_bytes(True)
    assert bf16.dit_fixed == fp8.dit_fixed == 2 * fixed_params()
    # umT5-XXL: embedding, 24 layers (two norms, q/k/v/o, own relative-position table, gated FFN), final norm
    t5 = 256384 * 4096 + 24 * (2 * 4096 + 4 * 4096 * 4096 + 32 * 64 + 3 * 4096 * 10240) + 4096
    assert bf16.text_encoder == 2 * t5 == 2 * 5_680_910_336
    assert bf16.clip == 2 * 611_086_080  # ViT-H/14, 31 blocks used, float16
    assert bf16.vae == 2 * 126_892_531  # bfloat16 on the fast path
    assert bf16.audio_encoder % 4 == 0 and 90e6 < bf16.audio_encoder / 4 < 100e6  # wav2vec2-base in float32


def _tokens(size: int) -> tuple[int, int, int]:
    h, w = {480: (1088, 384), 720: (1920, 512)}[size]  # the largest bucket of each set (418k / 983k pixels)
    return h, w, 21 * (h // 16) * (w // 16)


def _phases(m: OffloadModels, plan, size: int) -> dict:
    """Every phase's bytes from the plan's choices, by the documented model."""
    h, w, n = _tokens(size)
    s, b = 2, m.dit_block
    streamed = plan.resident_blocks < CFG.num_layers
    base = m.dit_fixed + plan.resident_blocks * b
    slots = 2 * b if streamed else 0  # the sampling phase only: released while another model runs
    if plan.encoders_resident:
        base += m.clip + m.audio_encoder + m.vae
    if plan.text_encoder == "resident":
        base += m.text_encoder
    per_call = 0 if plan.encoders_resident else 1
    prompts = 2 if plan.passes == 3 else 1
    cond = 0
    if plan.cache_conditions != "none":
        cond = prompts * CFG.num_layers * (257 + 512) * 2 * D * s + prompts * 21 * plan.speakers * 32 * OD * s
    chunk = math.ceil(n / plan.ffn_chunks)
    act = max(n * D * (6 * s + 8), n * D * (2 * s + 8) + chunk * (F * (2 * s + (1 if m.fp8 else 0)) + D * s))
    act += n * 4 * 16 * 4 * 2 + (n * D * s if plan.speakers == 2 else 0)
    out = 3 * 81 * h * w * 4
    step = 25.0 + 32.2 * plan.vae_chunk_latents  # VAE_DECODE_FIXED + VAE_STEP_ACTIVATIONS per latent frame
    if plan.vae_tile:
        # latent cores of plan.vae_tile with 6 latent pixels of halo (cores of 32: 44 x 38 latent pixels at most)
        tile = _tile_extent(h // 8, plan.vae_tile) * _tile_extent(w // 8, plan.vae_tile) * 64
        kept = 2 * 96 * (1 + 2 * 20) * h * w // 16 * 2  # split-resolution output of the 21 latent frames
        vae = out + kept + math.ceil(max(12.2 * h * w, step * tile) * 96 * 2)
    else:
        vae = out + math.ceil(step * 96 * h * w * 2)
    encode = 3 * 81 * h * w * 4 + math.ceil((20.1 + 32.2 * plan.vae_chunk_latents) * 96 * h * w * 2)
    text = {"resident": 0, "gpu": m.text_encoder, "cpu": 0}[plan.text_encoder]
    text_act = 0 if plan.text_encoder == "cpu" else 2 * 512 * (2 * 10240 + 4 * 4096) * s
    return {
        "text": base + text + text_act,
        "audio": base + per_call * m.audio_encoder + int(m.audio_encoder * ENCODER_ACTIVATION_FRACTION),
        "clip": base + per_call * m.clip + int(m.clip * ENCODER_ACTIVATION_FRACTION),
        "encode": base + per_call * m.vae + encode,
        "sampling": base + slots + cond + act,
        "vae": base + per_call * m.vae + vae,
    }


def _tile_extent(length: int, tile: int, halo: int = 6) -> int:
    """Latent pixels of the widest tile window (core and halos) along an axis of `length` latent pixels."""
    widest = 0
    for start in range(0, length, tile):
        stop = min(start + tile, length)
        widest = max(widest, min(length, stop + halo) - max(0, start - halo))
    return widest


def test_tile_extent_of_the_32_tiles():
    assert (_tile_extent(48, 32), _tile_extent(136, 32)) == (38, 44)  # 480p's largest bucket
    assert (_tile_extent(64, 64), _tile_extent(240, 64)) == (64, 76)


BUDGETS = [4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 32, 40, 48, 64, 80, 96, 120, 140]


@pytest.mark.parametrize("size", [480, 720])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("speakers,passes", [(1, 3), (2, 2)])
def test_plans_for_every_budget(models, size, fp8, speakers, passes):
    m = models[fp8]
    previous = None
    floor = min_budget(m, size=size, speakers=speakers, passes=passes)
    for gb in BUDGETS:
        budget = gb * GiB
        if budget < floor:
            with pytest.raises(DeviceOutOfMemoryError, match=r"--vram \d"):
                plan_offload(m, budget, size=size, speakers=speakers, passes=passes)
            continue
        plan = plan_offload(m, budget, size=size, speakers=speakers, passes=passes)
        usable = budget - int(budget * RESERVE_FRACTION)
        assert plan.tokens == _tokens(size)[2] and plan.block_bytes == block_bytes(fp8)
        assert plan.phases == _phases(m, plan, size)
        assert plan.vram_bytes <= usable
        if 0 < plan.resident_blocks < CFG.num_layers or plan.resident_blocks == 0 and not plan.encoders_resident:
            # one more resident block would not fit: the plan keeps as many as the budget allows
            bigger = max(_phases(m, _with(plan, resident_blocks=plan.resident_blocks + 1), size).values())
            assert bigger > usable or plan.resident_blocks == CFG.num_layers
        if previous is not None:  # more memory never means more chunking, tiling or CPU work
            order = ("cpu", "gpu", "resident")
            assert order.index(plan.text_encoder) >= order.index(previous.text_encoder)
            knobs = ("text_encoder", "ffn_chunks", "vae_tiling", "vae_chunk_latents", "cache_conditions", "encoders_resident")
            if all(getattr(plan, k) == getattr(previous, k) for k in knobs):
                assert plan.resident_blocks >= previous.resident_blocks
            assert plan.ffn_chunks <= previous.ffn_chunks
            assert not (plan.vae_tiling and not previous.vae_tiling)
            assert not previous.vae_tile or not plan.vae_tile or plan.vae_tile >= previous.vae_tile  # larger tiles
            assert plan.vae_chunk_latents >= previous.vae_chunk_latents
        previous = plan
        assert f"{plan.resident_blocks}/40 blocks resident" in plan.describe()
    assert previous is not None and previous.encoders_resident and previous.resident_blocks == 40  # 140 GB


def _with(plan, **changes):
    import dataclasses

    return dataclasses.replace(plan, **changes)


@pytest.mark.parametrize("size,fp8,target", [(480, True, 6), (480, False, 8), (720, True, 12), (720, False, 16)])
def test_issue_targets_have_a_plan(models, size, fp8, target):
    for speakers in (1, 2):
        plan = plan_offload(models[fp8], target * GiB, size=size, speakers=speakers, passes=2)
        assert plan.streams and plan.vram_bytes <= target * GiB


def test_host_memory_pinned_or_mapped(models):
    m = models[False]
    plan = plan_offload(m, 16 * GiB, size=480)
    streamed = plan.streamed_blocks * m.dit_block
    assert plan.text_encoder == "gpu" and not plan.encoders_resident
    # the per-call models in whole 128 MiB arenas (runtime.offload.ModulePlacer)
    host_models = sum(math.ceil(n / PLACER_ARENA_BYTES) * PLACER_ARENA_BYTES
                      for n in (m.clip, m.audio_encoder, m.vae, m.text_encoder))
    assert PLACER_ARENA_BYTES == 128 * 2**20
    pinned = math.ceil(streamed / GiB) * GiB  # whole 1 GiB arenas (runtime.block_store.ARENA_BYTES)
    assert ARENA_BYTES == GiB
    assert plan.host_store == "pinned" and plan.pinned_bytes == pinned and pinned - streamed < GiB
    assert plan.host_bytes == pinned + host_models + PROCESS_HOST_BYTES
    # the issue's bound: host RAM at most the weights' size + 4 GB
    assert plan.host_bytes <= m.total + 4 * GiB
    enough = plan_offload(m, 16 * GiB, size=480, host_ram_bytes=pinned + host_models + HOST_MARGIN_BYTES)
    assert enough.host_store == "pinned"
    short = plan_offload(m, 16 * GiB, size=480, host_ram_bytes=pinned + host_models + HOST_MARGIN_BYTES - 1)
    assert short.host_store == "mmap" and short.pinned_bytes == 0 and short.host_bytes == host_models + PROCESS_HOST_BYTES
    assert "memory-mapped file" in short.describe()


def test_everything_resident_needs_no_streaming(models):
    plan = plan_offload(models[True], 140 * GiB, size=720)
    assert not plan.offloads and plan.host_store == "none" and plan.slot_bytes == 0


def test_out_of_memory_sentence_names_a_budget(models):
    with pytest.raises(DeviceOutOfMemoryError) as err:
        plan_offload(models[False], 4 * GiB, size=720)
    text = str(err.value)
    assert text.count(".") >= 1 and "--vram" in text and "--fp8" in text and "--size 480" in text
    plan = plan_offload(models[False], 24 * GiB, size=720)
    assert "--vram 18" in plan.smaller_options() and "--fp8" in plan.smaller_options()


def _gguf_14b(qtype: str):
    """The 14B DiT on the meta device as a GGUF file loads it: block linears keep `qtype` blocks."""
    from infinitetalk.models.dit import InfiniteTalkDiT
    from infinitetalk.quant.fp8 import is_dit_fp8_layer
    from infinitetalk.quant.gguf_linear import replace_with_gguf

    with torch.device("meta"):
        dit = InfiniteTalkDiT(CFG)
    layers = {n: qtype for n, m in dit.named_modules() if type(m) is torch.nn.Linear and is_dit_fp8_layer(n)}
    replace_with_gguf(dit, layers)
    return dit.to(torch.bfloat16)  # GGUFLinear keeps its uint8 blocks through the cast


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_plan_of_a_gguf_dit_uses_its_stored_block_bytes(models, qtype):
    from infinitetalk.quant.gguf_dequant import GGML_BLOCKS

    values, nbytes = GGML_BLOCKS[qtype]
    norms = 6 * D + 2 * D + 2 * D + 3 * D + 2 * D
    by_hand = sum(o * i // values * nbytes + 2 * o for o, i in _linears()) + 2 * norms  # blocks + bf16 biases, norms
    bf16 = models[False]
    gguf = bf16.with_dit(_gguf_14b(qtype))
    assert gguf.dit_block == by_hand < bf16.dit_block and gguf.dit_fixed == bf16.dit_fixed
    assert bf16.with_dit(_gguf_14b("BF16")) == bf16  # float types stay nn.Linear: the configs' numbers
    print(f"{qtype}: block {gguf.dit_block / 2**20:.1f} MiB vs bf16 {bf16.dit_block / 2**20:.1f} MiB")
    more = []
    for gb in (8, 16, 24, 40):
        a, b = plan_offload(bf16, gb * GiB, size=480), plan_offload(gguf, gb * GiB, size=480)
        assert b.block_bytes == by_hand and b.phases == _phases(gguf, b, 480)
        assert b.resident_blocks >= a.resident_blocks and b.vram_bytes <= gb * GiB
        more.append(b.resident_blocks - a.resident_blocks)
    assert max(more) > 0, more  # the smaller blocks leave room for more resident ones
    assert min_budget(gguf, size=720) <= min_budget(bf16, size=720)  # (the VAE encode, not the DiT, sets the floor)


def test_info_prints_the_plan(capsys):
    from infinitetalk.cli import main

    assert main(["info", "--vram", "8", "--size", "480", "--fp8"]) == 0
    out = capsys.readouterr().out
    assert "VRAM plan for a budget of 8.00 GB at 480p" in out and "blocks resident" in out and "host RAM" in out
    assert main(["info", "--vram", "6", "--size", "720"]) == 2
    err = capsys.readouterr().err
    assert "error: A 720p job needs at least" in err and "--vram" in err and "Traceback" not in err


def test_vae_step_model_covers_the_measured_encode(models):
    """Measured on nvidia-h100-x1 (benchmarks/results/2026-12-07_h100_057d57f_offload_480_fp8_8-6_window_oom.*):
    the window's conditioning encode at 480p (1088x384) with 4 latent frames per VAE step held 5.3 GiB of
    activations and asked for 1.2 GiB more (one 96-channel, 18-frame activation) when the 8 GB cap stopped it,
    a phase the plans of that run did not have. The model must cover at least that, and a 6 GB plan must
    then take the one-latent step (a third of the activations)."""
    m = models[True]
    h, w = 1088, 384
    assert vae_encode_bytes(m, h, w, 81, chunk_latents=4) >= (5.3 + 1.2) * GiB
    assert vae_step_frames(4) == 18 and 96 * 18 * h * w * 2 >= 1.2 * GiB  # the activation the GPU asked for
    plan = plan_offload(m, 6 * GiB, size=480, speakers=2, passes=2)
    assert plan.vae_chunk_latents == 1 and plan.phases["encode"] <= 6 * GiB * (1 - RESERVE_FRACTION)
    assert plan_offload(m, 140 * GiB, size=480).vae_chunk_latents == 4  # room: the full VAE step


def _vae_traces(vae, height: int, width: int, fast, tiles, frame_num: int = 81) -> dict:
    """Peak live bytes of the VAE's encode / decode as the code runs them, traced on the meta device."""
    from infinitetalk.models.vae import DecodeTiling
    from infinitetalk.runtime.memory_trace import peak_live_bytes

    z, latents = vae.config.z_dim, (frame_num - 1) // 4 + 1

    def video():
        return torch.empty(1, 3, frame_num, height, width, device="meta")

    def latent():
        return torch.empty(1, z, latents, height // 8, width // 8, device="meta")

    traces = {  # (operation, latent frames per step, decode tile: 0 = whole frames) -> bytes
        ("encode", 1, 0): peak_live_bytes(lambda: vae.encode(video(), chunk_latents=1, fast=fast)),
        ("encode", 4, 0): peak_live_bytes(lambda: vae.encode(video(), chunk_latents=4, fast=fast)),
        ("decode", 1, 0): peak_live_bytes(lambda: vae.decode(latent(), chunk_latents=1, fast=fast)),
        ("decode", 4, 0): peak_live_bytes(lambda: vae.decode(latent(), chunk_latents=4, fast=fast)),
    }
    for tile in tiles:
        traces["decode", 1, tile] = peak_live_bytes(
            lambda: vae.decode(latent(), chunk_latents=1, fast=fast, tiling=DecodeTiling(tile)))
    return traces


@pytest.mark.parametrize("which", ["14b", "tiny"])
def test_vae_terms_bound_the_traced_peak(which):
    """The plan's VAE encode / decode terms hold what the code holds (every storage an operator makes,
    traced on the meta device, `runtime.memory_trace`), and not much more. On an H100 the 480p decode
    with one latent frame per step ran out of memory under a 6 GB cap where the old model (5 live
    activations per frame) planned 2.6 GiB; the trace gives 4.0-4.6 GiB."""
    from infinitetalk.models.vae import DecodeTiling, VAEFastOptions, WanVAE
    from infinitetalk.runtime.memory_trace import peak_live_bytes
    from infinitetalk.runtime.offload_plan import largest_bucket, vae_decode_bytes
    from infinitetalk.runtime.tiny_models import TINY_LONGEST_SIDE, TinyConfigs

    if which == "14b":
        from infinitetalk.models.vae import WanVAEConfig

        models, config, side = OffloadModels.infinitetalk_14b(torch.bfloat16, False), WanVAEConfig(), None
        paths = [VAEFastOptions(norm_act="fused")]  # the GPU path (its float32 norm eagerly: an upper bound)
    else:
        models, config, side = OffloadModels.tiny(torch.float32), TinyConfigs.default().vae, TINY_LONGEST_SIDE
        paths = [None, VAEFastOptions(norm_act="fused", channels_last=False)]
    dtype = torch.bfloat16 if models.vae_dtype_bytes == 2 else torch.float32
    with torch.device("meta"):
        vae = WanVAE(config).to(dtype)
    assert models.vae_tile_halo * 2 == vae.decoder.tiling_split()[2]  # 6 latent pixels (12 at the split)
    height, width = largest_bucket(480, side)
    tiles = VAE_TILES if which == "14b" else (4, 8)  # the tiny bucket is 16 x 16 latent pixels
    for fast in paths:
        for (op, chunk, tile), traced in _vae_traces(vae, height, width, fast, tiles).items():
            if op == "encode":
                planned = vae_encode_bytes(models, height, width, 81, chunk_latents=chunk)
            else:
                planned = vae_decode_bytes(models, height, width, 81, tile=tile, chunk_latents=chunk)
            assert traced <= planned, (op, chunk, tile, fast, traced / GiB, planned / GiB)
            if which == "14b":  # the bf16 GPU path the constants follow (float32 VAEs hold relatively less)
                assert planned <= 1.25 * traced, (op, chunk, tile, fast, traced / GiB, planned / GiB)
    if which == "14b":  # 720p: the whole-frame stages of the tiled decode set its peak with small tiles
        height, width = largest_bucket(720, side)
        latent = torch.empty(1, config.z_dim, 21, height // 8, width // 8, device="meta")
        for tile in (VAE_TILES[0], VAE_TILES[-1]):
            traced = peak_live_bytes(lambda: vae.decode(latent, chunk_latents=1, fast=paths[0], tiling=DecodeTiling(tile)))
            planned = vae_decode_bytes(models, height, width, 81, tile=tile, chunk_latents=1)
            assert traced <= planned <= 1.25 * traced, (720, tile, traced / GiB, planned / GiB)

"""GPU tests of `runtime.offload` (marked `gpu`, skipped without CUDA): the streamed 14B forward
equals the resident one bit for bit (bf16 compiled fast path, fp8 eager), the streamed forward
stays within two block slots of memory, per-call placement, and the tiny pipeline under a budget.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from infinitetalk.models.dit import WanDiTConfig
from infinitetalk.quant.fp8 import quantize_dit
from infinitetalk.generation.guided_dit import GuidedDiT
from infinitetalk.runtime.fast import FastOptions, make_fast
from infinitetalk.runtime.offload import BlockStreamer, ModulePlacer
from infinitetalk.runtime.offload_plan import GiB, OffloadModels, plan_offload

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(cfg: WanDiTConfig, speakers: int, frames: int = 5, hw: tuple[int, int] = (80, 80)) -> dict:
    g = torch.Generator(device="cuda").manual_seed(3)
    h, w = hw
    video = 1 + cfg.vae_scale * (frames - 1)
    masks = torch.zeros(3, h, w, device="cuda")
    masks[0, :, : w // 2] = 1
    masks[1, :, w // 2 :] = 1
    return dict(
        latent=torch.randn(16, frames, h, w, device="cuda", generator=g),
        y=torch.randn(cfg.in_dim - 16, frames, h, w, device="cuda", generator=g),
        context=torch.randn(512, cfg.text_dim, device="cuda", generator=g),
        context_null=torch.randn(300, cfg.text_dim, device="cuda", generator=g),
        clip_fea=torch.randn(1, 257, cfg.clip_dim, device="cuda", generator=g).bfloat16(),
        audio=torch.randn(speakers, video, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, device="cuda",
                          generator=g).bfloat16(),
        ref_target_masks=masks if speakers == 2 else None,
    )


def _run(model, inp, branches=("cond", "drop_audio")) -> list[torch.Tensor]:
    with torch.inference_mode():
        guided = GuidedDiT(model, branches, context=inp["context"], context_null=inp["context_null"],
                           clip_fea=inp["clip_fea"], y=inp["y"], audio=inp["audio"],
                           ref_target_masks=inp["ref_target_masks"])
        out = [guided.predict_branch(inp["latent"], torch.tensor([t], device="cuda"), b)
               for t in (900.0, 400.0) for b in branches]
    torch.cuda.synchronize()
    return out


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fp8,speakers", [(False, 1), (False, 2), (True, 1)], ids=["bf16", "bf16-2spk", "fp8"])
def test_streamed_14b_forward_is_bit_identical(fp8, speakers):
    from bench_dit import build_random_model

    torch._dynamo.reset()
    cfg = WanDiTConfig.infinitetalk_14b()
    model = build_random_model(cfg, torch.device("cuda"), torch.bfloat16)
    if fp8:
        quantize_dit(model)
    model = make_fast(model, FastOptions(fp8_fast_accum=fp8, compile_blocks=not fp8))
    inp = _inputs(cfg, speakers)
    reference = _run(model, inp)
    resident = 8
    for block in model.blocks[resident:]:
        block.to("cpu")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    streamer = BlockStreamer(model.blocks, "cuda", range(resident, cfg.num_layers), store="pinned")
    assert streamer._host_slab[resident].is_pinned()
    streamed = _run(model, inp)
    for a, b in zip(reference, streamed):
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()
    block = OffloadModels.infinitetalk_14b(torch.bfloat16, fp8).dit_block
    assert streamer.slot_bytes <= 2 * block + 2 * 256 * 64
    # the weights on the GPU grew by the two slots only (activations of these small inputs come on top)
    assert torch.cuda.max_memory_allocated() - base < 2 * block + 6 * GiB
    assert streamer.copies >= 2 * (cfg.num_layers - resident)
    streamer.detach()
    torch._dynamo.reset()


@pytest.mark.gpu
@needs_cuda
def test_module_placer_moves_a_model_only_while_it_runs():
    layer = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.LayerNorm(256))
    x = torch.randn(4, 256)
    expected = layer(x)
    placer = ModulePlacer(layer, "cuda")
    assert all(p.device.type == "cpu" for p in layer.parameters())
    # the first CUDA matmuls of the process allocate cuBLAS's and cuBLASLt's workspaces for good: make them
    # (the same layer on the GPU) before the baseline
    with torch.inference_mode():
        copy.deepcopy(layer).cuda()(x.cuda())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with placer.on_device(), torch.inference_mode():  # as the pipeline runs it: no autograd graph keeps GPU tensors
        assert all(p.is_cuda for p in layer.parameters())
        got = layer(x.cuda()).cpu()
    assert all(p.device.type == "cpu" and p.is_pinned() for p in layer.parameters())
    assert torch.cuda.memory_allocated() <= before
    assert torch.allclose(got, expected, atol=1e-5)


def _rss_bytes() -> int:
    from infinitetalk.runtime.host_memory import process_memory

    return process_memory().rss


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the RSS from /proc")
def test_release_cached_memory_gives_freed_pinned_arenas_back():
    from infinitetalk.runtime.offload import release_cached_memory

    release_cached_memory()
    arena = torch.empty(256 * 2**20, dtype=torch.uint8, pin_memory=True)  # as HostSource allocates its arenas
    arena.fill_(1)
    held = _rss_bytes()
    del arena
    assert _rss_bytes() > held - 64 * 2**20  # freed into PyTorch's host caching allocator: still resident
    release_cached_memory()
    assert _rss_bytes() < held - 192 * 2**20


@pytest.mark.gpu
@needs_cuda
def test_tiny_pipeline_on_cuda_under_a_budget(media_dir):
    from infinitetalk.generation.pipeline import InfiniteTalk

    resident = InfiniteTalk.from_pretrained(model="tiny", device="cuda", vram_budget=None, fast=False)
    inputs, cfg = resident.prepare(image=str(media_dir / "portrait.png"), audio=str(media_dir / "speaker1.wav"),
                                   sample_steps=2, frame_num=9, motion_frame=1, max_frames=9, mode="clip")
    base = np.concatenate([c.frames for c in resident.stream(inputs, cfg)])
    plan = plan_offload(OffloadModels.tiny(torch.bfloat16), GiB, size=480)
    plan = dataclasses.replace(plan, resident_blocks=1, host_store="pinned", encoders_resident=False, text_encoder="gpu")
    streamed = InfiniteTalk.from_pretrained(model="tiny", device="cuda", vram_budget=plan, fast=False)
    frames = np.concatenate([c.frames for c in streamed.stream(inputs, cfg)])
    np.testing.assert_array_equal(base, frames)
    assert streamed.components.offload.streamer.copies > 0


@pytest.mark.gpu
@needs_cuda
def test_offloader_switches_on_expandable_segments(monkeypatch):
    from infinitetalk.runtime.offload import use_expandable_segments

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    import gc

    assert use_expandable_segments("cuda")
    gc.collect()
    torch.cuda.empty_cache()  # no cached fixed segment to take the block from
    x = torch.empty(2 * GiB, dtype=torch.uint8, device="cuda")
    segments = [s for s in torch.cuda.memory_snapshot() if s["address"] <= x.data_ptr() < s["address"] + s["total_size"]]
    assert segments and segments[0].get("is_expandable", False)

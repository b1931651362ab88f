"""The offload wrapper (`runtime.offload`) on the tiny models: streamed blocks give bit-identical outputs.

On the CPU the streamer runs the same code as on a GPU minus the side stream and events: blocks
are packed into host slabs, copied into two slots and their tensors pointed at the slot.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from torch import nn

from infinitetalk.generation.sampler import BlockCache
from infinitetalk.models.dit import InfiniteTalkDiT, WanDiTConfig
from infinitetalk.generation.guided_dit import GuidedDiT
from infinitetalk.quant.fp8 import Fp8Linear, is_dit_fp8_layer, quantize_module
from infinitetalk.runtime.offload import BlockStreamer, resolve_budget
from infinitetalk.runtime.offload_plan import GiB, OffloadModels, plan_offload
from infinitetalk.runtime.tiny_models import random_init_

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _dit(layers: int = 4, fp8: bool = False, seed: int = 0) -> InfiniteTalkDiT:
    cfg = WanDiTConfig.tiny(num_layers=layers)
    with torch.device("meta"):
        model = InfiniteTalkDiT(cfg)
    model = random_init_(model.to_empty(device="cpu"), torch.Generator().manual_seed(seed)).eval().requires_grad_(False)
    if fp8:
        quantize_module(model, lambda name, _m: is_dit_fp8_layer(name))
    return model


def _inputs(cfg: WanDiTConfig, speakers: int = 1, frames: int = 3, hw: int = 8, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    video_frames = 1 + cfg.vae_scale * (frames - 1)
    masks = torch.zeros(3, hw, hw)
    masks[0, :, : hw // 2] = 1
    masks[1, :, hw // 2 :] = 1
    return {
        "latent": torch.randn(16, frames, hw, hw, generator=g),
        "y": torch.randn(cfg.in_dim - 16, frames, hw, hw, generator=g),
        "context": torch.randn(7, cfg.text_dim, generator=g),
        "context_null": torch.randn(5, cfg.text_dim, generator=g),
        "clip_fea": torch.randn(1, 257, cfg.clip_dim, generator=g),
        "audio": torch.randn(speakers, video_frames, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, generator=g),
        "ref_target_masks": masks if speakers == 2 else None,
    }


def _predict(model, inp, branches, cache_conditions, steps=(900.0, 500.0), teacache=False) -> list[torch.Tensor]:
    guided = GuidedDiT(
        model, branches, context=inp["context"], context_null=inp["context_null"], clip_fea=inp["clip_fea"],
        y=inp["y"], audio=inp["audio"], ref_target_masks=inp["ref_target_masks"], cache_conditions=cache_conditions,
    )
    out, caches = [], {b: BlockCache() for b in branches}
    for i, t in enumerate(steps):
        for b in branches:
            cache = None
            if teacache:
                cache = caches[b]
                cache.reuse = i > 0  # second step reuses the residual of the first
            out.append(guided.predict_branch(inp["latent"], torch.tensor([t]), b, cache))
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize(
    "resident,speakers,fp8,cache,branches",
    [
        (0, 1, False, "context", ("cond", "drop_text", "uncond")),
        (1, 2, False, "all", ("cond", "drop_text", "uncond")),
        (2, 1, True, "none", ("cond", "drop_audio")),
        (0, 2, True, "context", ("cond", "drop_audio")),
    ],
)
def test_streamed_blocks_give_identical_outputs(resident, speakers, fp8, cache, branches):
    model = _dit(4, fp8)
    inp = _inputs(model.config, speakers)
    reference = _predict(model, inp, branches, cache)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    streamer = BlockStreamer(model.blocks, "cpu", range(resident, 4), store="plain")
    # streamed blocks live in host slabs: their tensors are not the originals any more
    assert streamer.host_bytes > 0 and streamer.slot_bytes == 0  # the first block allocates the slots
    streamed = _predict(model, inp, branches, cache)
    assert streamer.slot_bytes > 0
    _same(reference, streamed)
    assert streamer.copies >= 4 - resident  # the blocks were really copied in
    if fp8:
        assert any(isinstance(m, Fp8Linear) and m.weight.dtype == torch.float8_e4m3fn for m in model.blocks[3].modules())
    streamer.detach()
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    _same(reference, _predict(model, inp, branches, cache))


def test_at_most_two_streamed_blocks_occupy_slots_and_teacache_works():
    model = _dit(5)
    inp = _inputs(model.config)
    reference = _predict(model, inp, ("cond", "drop_audio"), "context", teacache=True)
    streamer = BlockStreamer(model.blocks, "cpu", [1, 2, 3, 4], store="plain")
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda *_: seen.append(sum(o is not None for o in streamer._in_slot)))
    with torch.inference_mode():  # as the GPU benchmark runs it: slot views made inside inference mode
        _same(reference, _predict(model, inp, ("cond", "drop_audio"), "context", teacache=True))
    assert seen and max(seen) <= 2 and len(streamer._slots) == 2
    # every streamed block's tensors point into a slot only while it is loaded
    loaded = {i for i in streamer._in_slot if i is not None}
    for i in (1, 2, 3, 4):
        on_host = all(p.data_ptr() != 0 and not _in_slots(p, streamer) for p in model.blocks[i].parameters())
        assert on_host == (i not in loaded)


def _in_slots(p: torch.Tensor, streamer) -> bool:
    return any(s.data_ptr() <= p.data_ptr() < s.data_ptr() + s.numel() for s in streamer._slots)


def test_compiled_blocks_stream_without_graph_breaks():
    from torch._dynamo.utils import counters

    model = _dit(3)
    inp = _inputs(model.config)
    reference = _predict(model, inp, ("cond",), "context", steps=(900.0,))
    torch._dynamo.reset()
    counters.clear()
    for block in model.blocks:
        block.compile(backend="eager", dynamic=False)
    streamer = BlockStreamer(model.blocks, "cpu", [1, 2], store="mmap")
    out = _predict(model, inp, ("cond",), "context", steps=(900.0, 900.0))
    assert torch.equal(out[0], reference[0]) and torch.equal(out[1], reference[0])
    assert not counters["graph_break"], dict(counters["graph_break"])
    spill = streamer._spill
    assert spill.unlinked and not spill.path.exists()  # mapped, then unlinked: nothing left if the process dies
    assert spill.data.numel() >= streamer.host_bytes
    streamer.detach()
    assert streamer._spill is None
    torch._dynamo.reset()


def test_streaming_inside_inference_mode_reuses_the_resident_compiled_graph():
    """Slot views made inside `torch.inference_mode()` were inference tensors: they failed the
    compiled block's dispatch-key guard on its parameters, so the streamed blocks compiled a second
    graph (on the GPU: a second compilation, whose kernels gave other bits than the resident run)."""
    from torch._dynamo.utils import counters

    model = _dit(3)
    inp = _inputs(model.config)
    torch._dynamo.reset()
    counters.clear()
    for block in model.blocks:
        block.compile(backend="aot_eager", dynamic=False)
    with torch.inference_mode():
        reference = _predict(model, inp, ("cond",), "context", steps=(900.0,))
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        streamer = BlockStreamer(model.blocks, "cpu", [1, 2], store="plain")
        streamed = _predict(model, inp, ("cond",), "context", steps=(900.0,))
        streamer.detach()
        after = _predict(model, inp, ("cond",), "context", steps=(900.0,))
    assert counters["stats"]["unique_graphs"] == graphs, "streaming recompiled the blocks"
    _same(reference, streamed)
    _same(reference, after)
    torch._dynamo.reset()


def _gguf_dit(layers: int = 4) -> InfiniteTalkDiT:
    """The tiny DiT with its block linears in GGUF blocks (Q4_K where the rows allow it, else Q8_0),
    as a GGUF file loads it, plus a LoRA on one streamed layer: a side path and a weight delta."""
    from infinitetalk.quant.gguf_linear import GGUFLinear
    from infinitetalk.quant.gguf_quantize import BLOCK_VALUES, QUANTIZERS

    model = _dit(layers)
    for name, old in [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear and is_dit_fp8_layer(n)]:
        qtype = "Q4_K" if old.in_features % BLOCK_VALUES["Q4_K"] == 0 else "Q8_0"
        layer = GGUFLinear(old.in_features, old.out_features, qtype, old.bias is not None)
        layer.weight = QUANTIZERS[qtype](old.weight)
        if old.bias is not None:
            layer.bias.data.copy_(old.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    g = torch.Generator().manual_seed(5)
    lora = model.blocks[layers - 1].self_attn.q
    lora.add_delta(torch.randn(lora.shape, generator=g) * 0.01)
    lora.add_lora(torch.randn(2, lora.in_features, generator=g) * 0.1, torch.randn(lora.out_features, 2, generator=g) * 0.1, 0.5)
    return model


def test_gguf_blocks_stream_as_stored_and_give_identical_outputs():
    from infinitetalk.quant.gguf_linear import GGUFLinear
    from infinitetalk.runtime.offload_plan import module_bytes

    model = _gguf_dit(4)
    inp = _inputs(model.config)
    branches = ("cond", "drop_audio")
    reference = _predict(model, inp, branches, "context")
    lora = model.blocks[3].self_attn.q
    assert "weight_delta" in lora._buffers and "weight_delta" not in model.state_dict()  # streams, not a checkpoint key
    weights = {n: b.clone() for n, b in model.named_buffers()}
    streamer = BlockStreamer(model.blocks, "cpu", [1, 2, 3], store="plain")
    seen = []

    def check(block, *_):
        layers = [m for m in block.modules() if isinstance(m, GGUFLinear)]
        assert layers and all(m.weight.dtype == torch.uint8 and _in_slots(m.weight, streamer) for m in layers)
        if block is model.blocks[3]:
            assert lora.weight_delta.dtype == torch.float32 and _in_slots(lora.weight_delta, streamer)
        seen.append(block)

    hooks = [model.blocks[i].register_forward_hook(check) for i in (1, 2, 3)]
    _same(reference, _predict(model, inp, branches, "context"))
    for hook in hooks:
        hook.remove()
    assert set(map(id, seen)) == {id(model.blocks[i]) for i in (1, 2, 3)}
    # the host keeps the stored bytes (uint8 blocks, the float32 delta), far fewer than a float32 block
    stored = sum(module_bytes(model.blocks[i]) for i in (1, 2, 3))
    float32 = sum(module_bytes(b) for b in _dit(4).blocks[1:])
    assert stored <= streamer.host_bytes <= stored + 256 * 64 * 3 and streamer.host_bytes < float32
    streamer.detach()
    assert all(torch.equal(b, weights[n]) for n, b in model.named_buffers())
    _same(reference, _predict(model, inp, branches, "context"))


def test_offload_plan_sized_from_the_loaded_gguf_dit():
    from infinitetalk.generation.components import offload_for
    from infinitetalk.runtime.offload_plan import module_bytes

    plain, gguf = _dit(2), _gguf_dit(2)
    before = offload_for("tiny", torch.device("cpu"), torch.float32, False, 8, 480)  # from the configs
    after = offload_for("tiny", torch.device("cpu"), torch.float32, False, 8, 480, dit=gguf)
    assert before.plan.block_bytes == max(module_bytes(b) for b in plain.blocks)
    assert after.plan.block_bytes == max(module_bytes(b) for b in gguf.blocks) < before.plan.block_bytes
    assert after.plan.dit_fixed == module_bytes(gguf) - sum(module_bytes(b) for b in gguf.blocks)


def test_budget_resolution():
    assert resolve_budget(None, torch.device("cpu")) is None
    assert resolve_budget("auto", torch.device("cpu")) is None
    assert resolve_budget(8, torch.device("cpu")) == 8 * GiB
    assert resolve_budget("0.5", torch.device("cpu")) == GiB // 2
    from infinitetalk.errors import InputError

    for bad in ("lots", -1, 0):
        with pytest.raises(InputError):
            resolve_budget(bad, torch.device("cpu"))


def _frames(pipe, inputs, cfg) -> np.ndarray:
    return np.concatenate([c.frames for c in pipe.stream(inputs, cfg)])


@pytest.mark.slow
def test_pipeline_with_streamed_dit_matches_resident(media_dir):
    from infinitetalk.generation.pipeline import InfiniteTalk

    resident = InfiniteTalk.from_pretrained(model="tiny", device="cpu", vram_budget=None)
    assert resident.components.offload is None
    inputs, cfg = resident.prepare(image=str(media_dir / "portrait.png"), audio=str(media_dir / "speaker1.wav"),
                                   sample_steps=1, frame_num=5, motion_frame=1, max_frames=5, mode="clip")
    base = _frames(resident, inputs, cfg)
    plan = plan_offload(OffloadModels.tiny(), int(0.5 * GiB), size=480)
    # the tiny DiT has two blocks, which fit in the two slots; stream one of them
    plan = dataclasses.replace(plan, resident_blocks=1, host_store="pinned", encoders_resident=False, text_encoder="gpu",
                               vae_tile=0, ffn_chunks=2, vae_chunk_latents=1)
    streamed = InfiniteTalk.from_pretrained(model="tiny", device="cpu", vram_budget=plan)
    offload = streamed.components.offload
    assert offload.streamer is not None and streamed.components.dit.ffn_chunks == 2
    assert resident.components.vae_chunk_latents == 8 and streamed.components.vae_chunk_latents == 1  # the plan's VAE step
    assert "VAE 1 latent frame per step" in streamed.memory_plan()
    assert "1/2 blocks resident" in streamed.memory_plan()
    frames = _frames(streamed, inputs, cfg)
    assert frames.std() > 0
    np.testing.assert_array_equal(base, frames)
    assert offload.streamer.copies > 0


@pytest.mark.slow
def test_cli_generate_with_vram_budget(tmp_path, media_dir, capsys):
    """`infinitetalk generate --model tiny --vram 8 ...` end to end (in-process: the same `main`)."""
    from infinitetalk.cli import main

    image, audio = media_dir / "portrait.png", media_dir / "speaker1.wav"
    out = tmp_path / "talk.mp4"
    argv = ["generate", "--model", "tiny", "--vram", "8", "--image", str(image), "--audio", str(audio),
            "--output", str(out), "--steps", "1", "--max-seconds", "0.2", "--mode", "clip"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert out.is_file() and out.stat().st_size > 0
    assert "VRAM plan for a budget of 8.00 GB" in err and "2/2 blocks resident" in err
    bad = [a if a != "8" else "lots" for a in argv]
    bad[bad.index("--output") + 1] = str(tmp_path / "bad.mp4")
    with pytest.raises(SystemExit) as exit_:
        main(bad)
    assert exit_.value.code == 2 and "VRAM budget" in capsys.readouterr().err
    assert not (tmp_path / "bad.mp4").exists()


def test_expandable_segments_only_on_cuda_and_never_against_the_users_setting(monkeypatch):
    from infinitetalk.runtime.offload import use_expandable_segments

    assert use_expandable_segments("cpu") is False
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    assert use_expandable_segments("cuda") is False  # the user's word, before anything touches CUDA
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128, expandable_segments:True")
    assert use_expandable_segments("cuda") is True


def test_a_killed_process_leaves_no_spill_file(tmp_path):
    """The memory-mapped store's file is unlinked once mapped: SIGKILL (out-of-memory killer,
    a stopped container) in the middle of a job leaves nothing in the spill folder."""
    import signal
    import subprocess
    import sys

    code = (
        "import os, signal, sys, torch\n"
        "from infinitetalk.runtime.block_store import SpillFile\n"
        "spill = SpillFile(3 << 20, sys.argv[1])\n"
        "view = spill.allocate(1 << 20); view.fill_(7); assert int(view.sum()) == 7 << 20\n"
        "print(len(os.listdir(sys.argv[1])), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert done.stdout.strip() == "0"  # already gone while the process ran
    assert list(tmp_path.iterdir()) == []


def test_module_placer_packs_the_host_copy_into_small_arenas():
    """The per-call models' host copy lives in `PLACER_ARENA_BYTES` arenas (pinned on CUDA), not one
    slab that the pinned allocator would round up to a power of two; the same code path on the CPU."""
    from infinitetalk.runtime.block_store import layout
    from infinitetalk.runtime.offload import ModulePlacer
    from infinitetalk.runtime.offload_plan import PLACER_ARENA_BYTES

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)).eval()  # 32 MiB of float32
    x = torch.randn(3, 1024)
    with torch.no_grad():
        reference = model(x)
    _entries, packed = layout(model)
    placer = ModulePlacer(model, "cpu", pack=True, arena_bytes=8 * 2**20)
    assert placer.moves and len(placer.source.arenas) > 1
    assert packed <= placer.host_bytes < packed + 8 * 2**20
    arenas = [(a.data_ptr(), a.data_ptr() + a.numel()) for a in placer.source.arenas]

    def in_arenas(t):
        return any(lo <= t.data_ptr() < hi for lo, hi in arenas)

    assert all(in_arenas(p) for p in model.parameters())
    with placer.on_device(), torch.no_grad():
        assert not any(in_arenas(p) for p in model.parameters())  # a buffer of its own while it runs
        with placer.on_device():  # nested: the same buffer
            inner = model(x)
        assert not any(in_arenas(p) for p in model.parameters())
    assert all(in_arenas(p) for p in model.parameters())
    assert torch.equal(inner, reference)
    assert ModulePlacer(model, "cpu").host_bytes == 0  # on a CPU device nothing moves by default
    assert PLACER_ARENA_BYTES == 128 * 2**20


def test_a_spill_file_the_disk_cannot_hold_is_a_storage_error(tmp_path):
    """The memory-mapped store reserves its disk blocks up front: a disk that cannot hold it (here a
    1 MiB file-size limit, EFBIG) is a StorageError with a sentence and no file left, not a SIGBUS
    when the mapping is first written."""
    import subprocess
    import sys

    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this system")
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "from infinitetalk.errors import StorageError\n"
        "from infinitetalk.runtime.block_store import SpillFile\n"
        "small = SpillFile(1 << 19, sys.argv[1]); small.close()\n"
        "try:\n"
        "    SpillFile(8 << 20, sys.argv[1])\n"
        "except StorageError as exc:\n"
        "    print('StorageError:', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    message = done.stdout.strip()
    assert message.startswith("StorageError: Not enough disk space in ") and "needs 8 MB;" in message
    assert "TMPDIR" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []

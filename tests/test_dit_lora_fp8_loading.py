"""load_dit with LoRAs merged at load, fp8 layers, and both together (the official code drops
LoRAs when quantised; we must not)."""
import torch
from safetensors.torch import save_file

from infinitetalk.quant.fp8 import Fp8Linear
from infinitetalk.weights.dit_loader import load_dit


def _lora_file(path, model, targets, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in targets:
        w = model.get_parameter(name + ".weight")
        tensors[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.2
        tensors[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.2
        tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(float(rank) / 2)
    save_file(tensors, str(path))
    return tensors


def _inputs(model):
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    return dict(
        x=torch.randn(1, 16, 3, 8, 12, generator=g), t=torch.tensor([900.0]),
        context=[torch.randn(11, cfg.text_dim, generator=g)], clip_fea=torch.randn(1, 257, cfg.clip_dim, generator=g),
        y=torch.randn(1, 20, 3, 8, 12, generator=g),
        audio=torch.randn(1, 1, 9, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, generator=g),
    )


@torch.no_grad()
def test_lora_merge_fp8_and_both(parity_dir, tmp_path):
    ckpt, adapter = parity_dir / "dit" / "checkpoint", parity_dir / "dit" / "infinitetalk.safetensors"
    base = load_dit(ckpt, adapter)
    targets = ["blocks.0.self_attn.q", "blocks.1.ffn.0"]
    lora = _lora_file(tmp_path / "lora.safetensors", base, targets)
    merged = load_dit(ckpt, adapter, loras=[(tmp_path / "lora.safetensors", 0.8)])
    for name in targets:
        down = lora[f"diffusion_model.{name}.lora_down.weight"]
        up = lora[f"diffusion_model.{name}.lora_up.weight"]
        expected = base.get_parameter(name + ".weight") + 0.8 * 0.5 * (up @ down)
        assert torch.allclose(merged.get_parameter(name + ".weight"), expected, atol=1e-6)
    assert torch.equal(merged.get_parameter("blocks.0.self_attn.k.weight"), base.get_parameter("blocks.0.self_attn.k.weight"))

    inp = _inputs(base)
    ref = merged(**inp)
    fp8 = load_dit(ckpt, adapter, fp8=True)
    both = load_dit(ckpt, adapter, fp8=True, loras=[(tmp_path / "lora.safetensors", 0.8)])
    assert isinstance(both.blocks[0].self_attn.q, Fp8Linear) and both.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
    assert both.blocks[0].self_attn.q.weight_scale.dtype == torch.float32
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    err_both, err_fp8_no_lora = rel(both(**inp), ref), rel(fp8(**inp), ref)
    print(f"[fp8+lora] fp8 model with LoRA vs float32 merged: rel L2 {err_both:.3e}; fp8 without the LoRA: {err_fp8_no_lora:.3e}")
    assert err_both < 0.12 and err_both < err_fp8_no_lora

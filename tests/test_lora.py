"""LoRA loading and merging at load (weights/lora.py), in every supported key format, on CPU.

Each test writes a tiny base checkpoint with official Wan/InfiniteTalk names and LoRA files in
one key format, merges through LoraMergedSource + materialize, and checks the merged weights
against W + scale * alpha/rank * up @ down computed here independently.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from test_fp8 import DIM, FFN, TinyDiT, build_tiny, dit_predicate, rms_rel, tiny_inputs

from infinitetalk.errors import CheckpointError
from infinitetalk.quant.fp8 import FP8_DTYPE, fp8_layer_names, quantize_module
from infinitetalk.weights.fp8_checkpoint import save_fp8_checkpoint
from infinitetalk.weights.lora import LoraMergedSource, kohya_to_module, load_lora
from infinitetalk.weights.materialize import materialize, open_weights
from infinitetalk.weights.quant import Fp8Source

RANK = 4


@pytest.fixture
def base_file(tmp_path):
    model = build_tiny()
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def _pair(out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(RANK, in_f, generator=g) * 0.1, torch.randn(out_f, RANK, generator=g) * 0.1  # down, up


def _save(tmp_path, name, tensors, dtype=torch.bfloat16):
    path = tmp_path / name
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(path))
    return path, {k: v.to(dtype).float() for k, v in tensors.items()}


def _load_merged(source):
    with torch.device("meta"):
        model = TinyDiT()
    return materialize(model, source, dtype=torch.float32, what="tiny model").state_dict()


# layers a LoRA changes in these tests: (official module, out, in)
LAYERS = [
    ("blocks.0.self_attn.q", DIM, DIM),
    ("blocks.1.cross_attn.k_img", DIM, DIM),
    ("blocks.0.ffn.0", FFN, DIM),
    ("blocks.1.ffn.2", DIM, FFN),
    ("blocks.0.audio_cross_attn.q_linear", DIM, DIM),
]


def _expected(base, lora_tensors, keys_of, scale, use_alpha=True):
    """W + scale * alpha/rank * up @ down for each layer, from the saved (rounded) tensors."""
    out = {}
    for module, _, _ in LAYERS:
        down_key, up_key, alpha_key = keys_of(module)
        delta = lora_tensors[up_key] @ lora_tensors[down_key]
        if use_alpha and alpha_key in lora_tensors:
            delta = delta * (lora_tensors[alpha_key].item() / RANK)
        out[module + ".weight"] = base[module + ".weight"] + scale * delta
    return out


def _check(merged, base, expected):
    for key, value in merged.items():
        if key in expected:
            torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)
            assert not torch.equal(value, base[key]), key
        elif key not in ("blocks.0.norm3.weight", "blocks.0.self_attn.q.bias", "blocks.1.modulation"):
            assert torch.equal(value, base[key]), key


# --------------------------------------------------------------------------- key formats


def test_kijai_comfyui_format_with_alpha_and_diffs(tmp_path, base_file):
    base_path, base = base_file
    tensors = {}
    for i, (module, out_f, in_f) in enumerate(LAYERS):
        down, up = _pair(out_f, in_f, i)
        tensors[f"diffusion_model.{module}.lora_down.weight"] = down
        tensors[f"diffusion_model.{module}.lora_up.weight"] = up
        tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(8.0)  # alpha/rank = 2
    g = torch.Generator().manual_seed(9)
    tensors["diffusion_model.blocks.0.norm3.diff"] = torch.randn(DIM, generator=g) * 0.01
    tensors["diffusion_model.blocks.0.self_attn.q.diff_b"] = torch.randn(DIM, generator=g) * 0.01
    tensors["diffusion_model.blocks.1.diff_m"] = torch.randn(1, 6, DIM, generator=g) * 0.01
    path, saved = _save(tmp_path, "kijai.safetensors", tensors)

    lora = load_lora(path)
    assert "blocks.1.modulation" in lora.targets() and "blocks.0.norm3.weight" in lora.targets()
    merged = _load_merged(LoraMergedSource(open_weights([base_path]), [(lora, 0.75)]))

    def keys_of(m):
        return (f"diffusion_model.{m}.lora_down.weight", f"diffusion_model.{m}.lora_up.weight", f"diffusion_model.{m}.alpha")

    expected = _expected(base, saved, keys_of, 0.75)
    expected["blocks.0.norm3.weight"] = base["blocks.0.norm3.weight"] + 0.75 * saved["diffusion_model.blocks.0.norm3.diff"]
    expected["blocks.0.self_attn.q.bias"] = base["blocks.0.self_attn.q.bias"] + 0.75 * saved["diffusion_model.blocks.0.self_attn.q.diff_b"]
    expected["blocks.1.modulation"] = base["blocks.1.modulation"] + 0.75 * saved["diffusion_model.blocks.1.diff_m"]
    _check(merged, base, expected)
    for key in ("blocks.0.norm3.weight", "blocks.0.self_attn.q.bias", "blocks.1.modulation"):
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=1e-6)

    # the official wan_lora.py ignores .alpha: use_alpha=False reproduces it
    merged_official = _load_merged(LoraMergedSource(open_weights([base_path]), [(load_lora(path, use_alpha=False), 0.75)]))
    expected_official = _expected(base, saved, keys_of, 0.75, use_alpha=False)
    for key, value in expected_official.items():
        torch.testing.assert_close(merged_official[key], value, rtol=0, atol=1e-6)


def test_kohya_format(tmp_path, base_file):
    base_path, base = base_file
    tensors = {}
    for i, (module, out_f, in_f) in enumerate(LAYERS):
        down, up = _pair(out_f, in_f, 10 + i)
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(float(RANK))
    path, saved = _save(tmp_path, "kohya.safetensors", tensors, dtype=torch.float16)
    merged = _load_merged(LoraMergedSource(open_weights([base_path]), [(load_lora(path), 1.0)]))

    def keys_of(m):
        name = "lora_unet_" + m.replace(".", "_")
        return f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"

    _check(merged, base, _expected(base, saved, keys_of, 1.0))


@pytest.mark.parametrize("prefix", ["", "transformer.", "diffusion_model.", "base_model.model."])
def test_peft_lora_a_b_format_with_prefixes(tmp_path, base_file, prefix):
    base_path, base = base_file
    tensors = {}
    for i, (module, out_f, in_f) in enumerate(LAYERS):
        down, up = _pair(out_f, in_f, 20 + i)
        tensors[f"{prefix}{module}.lora_A.weight"] = down
        tensors[f"{prefix}{module}.lora_B.weight"] = up
    path, saved = _save(tmp_path, "peft.safetensors", tensors, dtype=torch.float32)
    merged = _load_merged(LoraMergedSource(open_weights([base_path]), [(load_lora(path), -0.5)]))

    def keys_of(m):
        return f"{prefix}{m}.lora_A.weight", f"{prefix}{m}.lora_B.weight", None

    _check(merged, base, _expected(base, saved, keys_of, -0.5))


def test_diffusers_module_names(tmp_path, base_file):
    base_path, base = base_file
    diffusers_names = {
        "blocks.0.self_attn.q": "blocks.0.attn1.to_q",
        "blocks.1.cross_attn.k_img": "blocks.1.attn2.add_k_proj",
        "blocks.0.ffn.0": "blocks.0.ffn.net.0.proj",
        "blocks.1.ffn.2": "blocks.1.ffn.net.2",
        "blocks.0.audio_cross_attn.q_linear": "blocks.0.audio_cross_attn.q_linear",
    }
    tensors = {}
    for i, (module, out_f, in_f) in enumerate(LAYERS):
        down, up = _pair(out_f, in_f, 30 + i)
        tensors[f"transformer.{diffusers_names[module]}.lora_A.weight"] = down
        tensors[f"transformer.{diffusers_names[module]}.lora_B.weight"] = up
    tensors["transformer.blocks.0.attn1.to_q.lora_B.bias"] = torch.full((DIM,), 0.01)
    path, saved = _save(tmp_path, "diffusers.safetensors", tensors, dtype=torch.float32)
    merged = _load_merged(LoraMergedSource(open_weights([base_path]), [(load_lora(path), 1.0)]))

    def keys_of(m):
        return f"transformer.{diffusers_names[m]}.lora_A.weight", f"transformer.{diffusers_names[m]}.lora_B.weight", None

    _check(merged, base, _expected(base, saved, keys_of, 1.0))
    torch.testing.assert_close(merged["blocks.0.self_attn.q.bias"], base["blocks.0.self_attn.q.bias"] + 0.01, rtol=0, atol=1e-6)


def test_two_loras_add_up(tmp_path, base_file):
    base_path, base = base_file
    module, out_f, in_f = LAYERS[2]
    d1, u1 = _pair(out_f, in_f, 40)
    d2, u2 = _pair(out_f, in_f, 41)
    p1, s1 = _save(tmp_path, "a.safetensors", {f"diffusion_model.{module}.lora_down.weight": d1,
                                                f"diffusion_model.{module}.lora_up.weight": u1})
    p2, s2 = _save(tmp_path, "b.safetensors", {f"{module}.lora_A.weight": d2, f"{module}.lora_B.weight": u2})
    merged = _load_merged(LoraMergedSource(open_weights([base_path]), [(load_lora(p1), 1.0), (load_lora(p2), 0.3)]))
    want = (base[module + ".weight"]
            + s1[f"diffusion_model.{module}.lora_up.weight"] @ s1[f"diffusion_model.{module}.lora_down.weight"]
            + 0.3 * s2[f"{module}.lora_B.weight"] @ s2[f"{module}.lora_A.weight"])
    torch.testing.assert_close(merged[module + ".weight"], want, rtol=0, atol=1e-6)


def test_kohya_names_decode_for_every_real_wan_module(parity_dir):
    """Every module name of the real (parity) DiT + adapter checkpoint survives the kohya encoding."""
    index = json.loads((parity_dir / "dit/checkpoint/diffusion_pytorch_model.safetensors.index.json").read_text())
    keys = list(index["weight_map"]) + open_weights([parity_dir / "dit/infinitetalk.safetensors"]).keys()
    modules = {k.rsplit(".", 1)[0] for k in keys if k.endswith((".weight", ".bias"))}
    assert len(modules) > 30
    for module in modules:
        assert kohya_to_module(module.replace(".", "_")) == module


# --------------------------------------------------------------------------- errors and warnings


def test_unknown_keys_are_refused_by_name(tmp_path):
    down, up = _pair(DIM, DIM, 0)
    path, _ = _save(tmp_path, "odd.safetensors", {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
                                                  "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
                                                  "diffusion_model.blocks.0.self_attn.q.hada_w1_a": down})
    with pytest.raises(CheckpointError, match="hada_w1_a"):
        load_lora(path)


def test_incomplete_pair_is_refused(tmp_path):
    down, _ = _pair(DIM, DIM, 0)
    path, _ = _save(tmp_path, "half.safetensors", {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down})
    with pytest.raises(CheckpointError, match="no matching up"):
        load_lora(path)


def test_lora_for_another_model_is_refused(tmp_path, base_file):
    base_path, _ = base_file
    down, up = _pair(DIM, DIM, 0)
    path, _ = _save(tmp_path, "other.safetensors", {"diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": down,
                                                    "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": up})
    with pytest.raises(CheckpointError, match="another model"):
        LoraMergedSource(open_weights([base_path]), [(load_lora(path), 1.0)])


def test_wrong_shape_is_refused(tmp_path, base_file):
    base_path, _ = base_file
    down, up = _pair(DIM * 2, DIM, 0)
    path, _ = _save(tmp_path, "big.safetensors", {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
                                                  "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up})
    with pytest.raises(CheckpointError, match="another model size"):
        LoraMergedSource(open_weights([base_path]), [(load_lora(path), 1.0)])


def test_targets_missing_from_the_model_are_warned_and_skipped(tmp_path, base_file, caplog):
    base_path, base = base_file
    d1, u1 = _pair(DIM, DIM, 0)
    d2, u2 = _pair(DIM, DIM, 1)
    path, _ = _save(tmp_path, "extra.safetensors", {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": d1,
                                                    "diffusion_model.blocks.0.self_attn.q.lora_up.weight": u1,
                                                    "diffusion_model.blocks.7.self_attn.q.lora_down.weight": d2,
                                                    "diffusion_model.blocks.7.self_attn.q.lora_up.weight": u2})
    with caplog.at_level(logging.WARNING, logger="infinitetalk.weights.lora"):
        source = LoraMergedSource(open_weights([base_path]), [(load_lora(path), 1.0)])
    assert "blocks.7.self_attn.q.weight" in caplog.text
    assert source.patched() == ["blocks.0.self_attn.q.weight"]
    merged = _load_merged(source)
    assert not torch.equal(merged["blocks.0.self_attn.q.weight"], base["blocks.0.self_attn.q.weight"])


# --------------------------------------------------------------------------- LoRA + fp8


def _lightx2v_like(tmp_path):
    tensors = {}
    for i, (module, out_f, in_f) in enumerate(LAYERS):
        down, up = _pair(out_f, in_f, 50 + i)
        tensors[f"diffusion_model.{module}.lora_down.weight"] = down * 3
        tensors[f"diffusion_model.{module}.lora_up.weight"] = up * 3
    return _save(tmp_path, "lightx2v_like.safetensors", tensors)


def test_lora_applies_to_an_fp8_model_quantised_at_load(tmp_path, base_file):
    """The official code drops LoRAs when quantised; merged before quantisation, they apply."""
    base_path, base = base_file
    path, saved = _lightx2v_like(tmp_path)
    source = LoraMergedSource(open_weights([base_path]), [(load_lora(path), 1.0)])
    with torch.device("meta"):
        model = quantize_module(TinyDiT(), dit_predicate)
    materialize(model, Fp8Source(source, fp8_layer_names(model)), dtype=None)

    def keys_of(m):
        return f"diffusion_model.{m}.lora_down.weight", f"diffusion_model.{m}.lora_up.weight", None

    expected = _expected(base, saved, keys_of, 1.0)
    for module, _, _ in LAYERS:
        layer = model.get_submodule(module)
        assert layer.weight.dtype == FP8_DTYPE
        got = layer.dequantized_weight()
        want = expected[module + ".weight"]
        lora_size = (want - base[module + ".weight"]).abs().max()
        err = (got - want).abs().max()
        err_to_base = (got - base[module + ".weight"]).abs().max()
        # within fp8 rounding of the merged weight, and clearly not the base weight
        assert err <= 2**-4 * want.abs().max() + 1e-7, module
        assert err_to_base > 0.5 * lora_size, module

    reference = build_tiny()
    reference.load_state_dict({**base, **expected})
    tokens, audio = tiny_inputs()
    err = rms_rel(model(tokens, audio), reference(tokens, audio))
    no_lora = rms_rel(build_tiny()(tokens, audio), reference(tokens, audio))
    print(f"[lora] fp8 model with LoRA vs fp32 merged reference: rms-rel={err:.3e} (without the LoRA: {no_lora:.3e})")
    assert err < no_lora


def test_lora_on_an_fp8_checkpoint_is_dequantised_merged_and_requantised(tmp_path, base_file):
    base_path, base = base_file
    fp8_path = save_fp8_checkpoint(quantize_module(build_tiny(), dit_predicate), tmp_path / "fp8.safetensors")
    path, saved = _lightx2v_like(tmp_path)
    fp8_source = open_weights([fp8_path])
    merged_source = LoraMergedSource(fp8_source, [(load_lora(path), 1.0)])
    module = "blocks.0.ffn.0"
    assert module + ".weight_scale" in fp8_source and module + ".weight_scale" not in merged_source
    assert "blocks.0.ffn.2.weight_scale" in merged_source  # untouched layers keep their fp8 layout
    merged_w = merged_source[module + ".weight"]
    fp8_deq = fp8_source[module + ".weight"].float() * fp8_source[module + ".weight_scale"][:, None]
    delta = saved[f"diffusion_model.{module}.lora_up.weight"] @ saved[f"diffusion_model.{module}.lora_down.weight"]
    torch.testing.assert_close(merged_w, fp8_deq + delta, rtol=0, atol=1e-6)

    with torch.device("meta"):
        model = quantize_module(TinyDiT(), dit_predicate)
    materialize(model, Fp8Source(merged_source, fp8_layer_names(model)), dtype=None)
    untouched = model.blocks[0].ffn[2]
    assert torch.equal(untouched.weight.view(torch.uint8), fp8_source["blocks.0.ffn.2.weight"].view(torch.uint8))
    got = model.get_submodule(module).dequantized_weight()
    assert (got - (fp8_deq + delta)).abs().max() <= 2**-4 * (fp8_deq + delta).abs().max()

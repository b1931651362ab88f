"""fp8 linear layers (quant/fp8.py), fp8 checkpoints and quantised weight sources (weights/), on CPU.

The CPU path of Fp8Linear emulates the fp8 GEMM exactly (fp8 activations and weights, fp32
sums), so the errors printed here are the errors the GPU kernel makes; the emulation itself is
checked against torch._scaled_mm, which PyTorch also implements on the CPU.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from infinitetalk.errors import CheckpointError
from infinitetalk.quant.fp8 import (
    FP8_DTYPE,
    Fp8Linear,
    fp8_layer_names,
    is_dit_fp8_layer,
    quantize_activation_rowwise,
    quantize_module,
    quantize_weight_rowwise,
)
from infinitetalk.weights.fp8_checkpoint import load_fp8_checkpoint, save_fp8_checkpoint
from infinitetalk.weights.materialize import materialize, open_weights
from infinitetalk.weights.quant import Fp8Source, open_quanto_checkpoint

DIM, FFN, AUDIO, TEXT = 32, 64, 16, 24


class _Attn(nn.Module):
    def __init__(self, names, dim=DIM):
        super().__init__()
        for n in names:
            setattr(self, n, nn.Linear(dim, dim))


class TinyBlock(nn.Module):
    """A block with the official Wan/InfiniteTalk parameter names (sizes are tiny)."""

    def __init__(self):
        super().__init__()
        self.self_attn = _Attn(["q", "k", "v", "o"])
        self.cross_attn = _Attn(["q", "k", "v", "o", "k_img", "v_img"])
        self.norm3 = nn.LayerNorm(DIM)
        self.ffn = nn.Sequential(nn.Linear(DIM, FFN), nn.GELU(approximate="tanh"), nn.Linear(FFN, DIM))
        self.modulation = nn.Parameter(torch.randn(1, 6, DIM) / DIM**0.5)
        self.audio_cross_attn = nn.Module()
        self.audio_cross_attn.q_linear = nn.Linear(DIM, DIM)
        self.audio_cross_attn.kv_linear = nn.Linear(AUDIO, 2 * DIM)
        self.audio_cross_attn.proj = nn.Linear(DIM, DIM)

    def forward(self, x, audio):
        m = self.modulation[0]
        h = x * (1 + m[0]) + m[1]
        x = x + self.self_attn.o(torch.tanh(self.self_attn.q(h)) * self.self_attn.v(h) + self.self_attn.k(h))
        h = self.norm3(x)
        c = self.cross_attn
        x = x + c.o(c.q(h) + c.k(h) * 0.5 + c.v(h) * 0.25 + c.k_img(h) * 0.1 + c.v_img(h) * 0.1)
        kv = self.audio_cross_attn.kv_linear(audio).mean(dim=1, keepdim=True)
        a = self.audio_cross_attn
        x = x + a.proj(a.q_linear(x) + kv[..., :DIM] * kv[..., DIM:])
        return x + self.ffn(x * (1 + m[4]) + m[3]) * m[5]


class TinyDiT(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.text_embedding = nn.Sequential(nn.Linear(TEXT, DIM), nn.GELU(approximate="tanh"), nn.Linear(DIM, DIM))
        self.blocks = nn.ModuleList([TinyBlock() for _ in range(layers)])
        self.head = nn.Module()
        self.head.head = nn.Linear(DIM, 16)

    def forward(self, tokens, audio):
        x = self.text_embedding(tokens)
        for block in self.blocks:
            x = block(x, audio)
        return self.head.head(x)


def tiny_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 48, TEXT, generator=g), torch.randn(2, 8, AUDIO, generator=g)


def build_tiny(seed=0) -> TinyDiT:
    torch.manual_seed(seed)
    return TinyDiT().eval()


def dit_predicate(name, _module):
    return is_dit_fp8_layer(name)


def rel(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def rms_rel(got, ref):
    return ((got.double() - ref.double()).pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt()).item()


# --------------------------------------------------------------------------- quantisation math


def test_weight_quantization_error_is_within_e4m3_rounding():
    torch.manual_seed(0)
    w = torch.randn(256, 512) * torch.logspace(-3, 1, 256)[:, None]  # rows of very different size
    w[7] = 0.0
    q, scale = quantize_weight_rowwise(w)
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (256,)
    assert scale[7] == 1.0 and (q[7].float() == 0).all()
    deq = q.float() * scale[:, None]
    # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4 for normal values; per-row
    # scales keep small rows as accurate as large ones.
    row_err = ((deq - w).abs().amax(1) / w.abs().amax(1).clamp_min(1e-30))[w.abs().amax(1) > 0]
    print(f"[fp8] weight rowwise quantisation: max |err|/rowmax = {row_err.max():.3e}, rms rel = {rms_rel(deq, w):.3e}")
    assert row_err.max() <= 2**-4 + 1e-6
    assert (deq.abs().amax(1) - w.abs().amax(1)).abs().max() <= 1e-6 * w.abs().max()  # absmax kept exactly


def test_activation_quantization_rows_and_zero_rows():
    x = torch.randn(5, 64)
    x[2] = 0.0
    q, scale = quantize_activation_rowwise(x)
    assert scale.shape == (5, 1) and scale.dtype == torch.float32
    assert torch.isfinite(q.float()).all() and (q[2].float() == 0).all()
    assert rel(q.float() * scale, x) <= 2**-4


def test_emulation_equals_scaled_mm_kernel_math():
    """The CPU emulation is what torch._scaled_mm computes (checked against its CPU kernel)."""
    torch.manual_seed(0)
    layer = Fp8Linear.from_linear(nn.Linear(256, 512))
    x = torch.randn(64, 256)
    emulated = layer._forward_emulated(x)  # float32 output
    x_q, x_scale = quantize_activation_rowwise(x)
    kernel = torch._scaled_mm(
        x_q, layer.weight.t(), scale_a=x_scale, scale_b=layer.weight_scale.reshape(1, -1), out_dtype=torch.float32
    )
    kernel = kernel + layer.bias
    err = rel(emulated, kernel)
    print(f"[fp8] emulation vs torch._scaled_mm (CPU kernel, fp32 out): rel={err:.3e}")
    assert err < 1e-5


# --------------------------------------------------------------------------- Fp8Linear


def test_fp8_linear_error_against_fp32_and_bf16():
    torch.manual_seed(0)
    linear = nn.Linear(1024, 1024)
    x = torch.randn(4, 128, 1024)
    ref = linear(x)
    fp8 = Fp8Linear.from_linear(linear)(x)
    bf16 = nn.Linear(1024, 1024).to(torch.bfloat16)
    bf16.load_state_dict(linear.state_dict())
    out_bf16 = bf16(x.to(torch.bfloat16)).float()
    fp8_bf16_in = Fp8Linear.from_linear(linear)(x.to(torch.bfloat16))
    print(
        f"[fp8] random 512x1024 @ 1024x1024 vs fp32: fp8 max-rel={rel(fp8, ref):.3e} rms-rel={rms_rel(fp8, ref):.3e}; "
        f"bf16 max-rel={rel(out_bf16, ref):.3e} rms-rel={rms_rel(out_bf16, ref):.3e}; "
        f"fp8 with bf16 input rms-rel={rms_rel(fp8_bf16_in.float(), ref):.3e}"
    )
    assert fp8.shape == ref.shape and fp8.dtype == torch.float32 and fp8_bf16_in.dtype == torch.bfloat16
    # e4m3 on both operands: ~3-4 % rms for random data (bf16 is ~0.3 %)
    assert rms_rel(fp8, ref) < 0.05
    assert rel(fp8, ref) < 0.08
    assert rms_rel(fp8_bf16_in.float(), ref) < 0.05


def test_fp8_linear_without_bias_and_zero_input():
    layer = Fp8Linear.from_linear(nn.Linear(64, 32, bias=False))
    assert layer.bias is None
    out = layer(torch.zeros(3, 64))
    assert torch.equal(out, torch.zeros(3, 32))
    empty = layer(torch.zeros(0, 64))
    assert empty.shape == (0, 32)


def test_fp8_linear_refuses_a_cast_weight():
    layer = Fp8Linear.from_linear(nn.Linear(32, 32))
    layer.weight = nn.Parameter(layer.weight.to(torch.bfloat16), requires_grad=False)  # what a dtype cast at load does
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        layer(torch.randn(2, 32))


def test_model_dtype_cast_keeps_fp8_weights_and_float32_scales():
    model = quantize_module(build_tiny(), dit_predicate)
    layer = model.blocks[0].ffn[0]
    w_before, s_before = layer.weight.clone(), layer.weight_scale.clone()
    model.to(torch.bfloat16)
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16 and model.blocks[0].norm3.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight.view(torch.uint8), w_before.view(torch.uint8))
    assert torch.equal(layer.weight_scale, s_before)
    model.half()
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.dtype == torch.float32


def test_quantize_module_on_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32), nn.Linear(32, 30), nn.Linear(30, 16))
    x = torch.randn(16, 64)
    ref = model(x)
    returned = quantize_module(model, lambda name, m: name != "2")
    assert returned is model
    kinds = [type(m).__name__ for m in model]
    # "2" excluded by the predicate, "3" has out=30 and "4" has in=30: not multiples of 16
    assert kinds == ["Fp8Linear", "GELU", "Linear", "Linear", "Linear"]
    assert fp8_layer_names(model) == {"0"}
    err = rms_rel(model(x), ref)
    print(f"[fp8] nn.Sequential with one fp8 layer vs fp32: rms-rel={err:.3e}")
    assert err < 0.05


def test_quantize_module_dit_selection_and_tiny_forward_error():
    model = build_tiny()
    tokens, audio = tiny_inputs()
    ref = model(tokens, audio)
    quantize_module(model, dit_predicate)
    names = fp8_layer_names(model)
    expected = {
        f"blocks.{i}.{n}"
        for i in range(2)
        for n in [
            *(f"self_attn.{p}" for p in "qkvo"),
            *(f"cross_attn.{p}" for p in ["q", "k", "v", "o", "k_img", "v_img"]),
            "ffn.0",
            "ffn.2",
            "audio_cross_attn.q_linear",
            "audio_cross_attn.kv_linear",
            "audio_cross_attn.proj",
        ]
    }
    assert names == expected
    assert type(model.head.head) is nn.Linear and type(model.text_embedding[0]) is nn.Linear
    err = rms_rel(model(tokens, audio), ref)
    print(f"[fp8] tiny DiT-like model, all block linears fp8 vs fp32: rms-rel={err:.3e}")
    assert err < 0.12  # 2 blocks x 15 fp8 layers compound the ~3.5 % per-layer error


def test_is_dit_fp8_layer():
    assert is_dit_fp8_layer("blocks.39.ffn.2")
    assert is_dit_fp8_layer("blocks.0.cross_attn.v_img")
    assert is_dit_fp8_layer("blocks.12.audio_cross_attn.kv_linear")
    for name in ["head.head", "blocks.0.modulation", "text_embedding.0", "img_emb.proj.1", "audio_proj.proj1",
                 "blocks.0.ffn.1", "blocks.0.self_attn.norm_q", "time_projection.1", "blocks.0.ffn.0.x"]:
        assert not is_dit_fp8_layer(name), name


# --------------------------------------------------------------------------- save / load


def test_save_and_load_fp8_checkpoint_round_trip(tmp_path):
    model = quantize_module(build_tiny().to(torch.bfloat16), dit_predicate)
    tokens, audio = tiny_inputs()
    out = model(tokens.bfloat16(), audio.bfloat16())
    path = save_fp8_checkpoint(model, tmp_path / "tiny_fp8.safetensors")

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert f.get_slice("blocks.0.ffn.0.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("blocks.0.ffn.0.weight_scale").get_dtype() == "F32"
        assert f.get_slice("head.head.weight").get_dtype() == "BF16"
    assert set(json.loads(meta["fp8_layers"])) == fp8_layer_names(model)

    with torch.device("meta"):
        fresh = TinyDiT()
    load_fp8_checkpoint(fresh, path)
    assert fp8_layer_names(fresh) == fp8_layer_names(model)
    for (k, a), (k2, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), k
    assert torch.equal(fresh(tokens.bfloat16(), audio.bfloat16()), out)


def test_load_fp8_checkpoint_refuses_a_file_for_another_model(tmp_path):
    model = quantize_module(build_tiny(), dit_predicate)
    state = model.state_dict()
    state["blocks.0.norm3.weight_scale"] = torch.ones(DIM)  # norm3 is no linear layer
    state["blocks.0.norm3.weight"] = state["blocks.0.norm3.weight"].to(FP8_DTYPE)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with torch.device("meta"):
        fresh = TinyDiT()
    with pytest.raises(CheckpointError, match="norm3"):
        load_fp8_checkpoint(fresh, tmp_path / "bad.safetensors")


# --------------------------------------------------------------------------- Fp8Source


def _meta_fp8_model():
    with torch.device("meta"):
        model = TinyDiT()
    return quantize_module(model, dit_predicate)


def test_fp8_source_quantizes_a_float_checkpoint_at_load(tmp_path):
    base = build_tiny()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    model = _meta_fp8_model()
    assert all(m.weight.is_meta for m in model.modules() if isinstance(m, Fp8Linear))
    source = Fp8Source(open_weights([tmp_path / "base.safetensors"]), fp8_layer_names(model))
    materialize(model, source, dtype=None, what="tiny fp8 model")
    expected = quantize_module(build_tiny(), dit_predicate)  # quantised after loading: same bits
    for k, v in expected.state_dict().items():
        got = model.state_dict()[k]
        assert got.dtype == v.dtype and torch.equal(got.view(torch.uint8), v.view(torch.uint8)), k
    tokens, audio = tiny_inputs()
    err = rms_rel(model(tokens, audio), base(tokens, audio))
    print(f"[fp8] tiny model quantised at load (Fp8Source) vs fp32: rms-rel={err:.3e}")
    assert err < 0.12


def test_fp8_source_dequantizes_fp8_layers_the_model_keeps_in_high_precision(tmp_path):
    fp8_model = quantize_module(build_tiny(), lambda name, m: True)  # everything eligible, head too
    path = save_fp8_checkpoint(fp8_model, tmp_path / "all_fp8.safetensors")
    model = _meta_fp8_model()  # the head and text embedding are plain nn.Linear here
    source = Fp8Source(open_weights([path]), fp8_layer_names(model))
    assert "head.head.weight_scale" not in source and "blocks.0.ffn.0.weight_scale" in source
    materialize(model, source, dtype=None)
    assert model.head.head.weight.dtype == torch.float32
    assert torch.equal(model.head.head.weight, fp8_model.head.head.dequantized_weight())
    assert torch.equal(model.blocks[1].ffn[2].weight.view(torch.uint8), fp8_model.blocks[1].ffn[2].weight.view(torch.uint8))


# --------------------------------------------------------------------------- official quanto file


def _write_quanto_file(tmp_path, *, with_map=True, int8_layer="blocks.1.ffn.2", scale_dtype=torch.bfloat16):
    """A synthetic checkpoint in the optimum-quanto layout of the official fp8 release."""
    base = build_tiny()
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    qmap = {}
    for name, module in base.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        w = state.pop(name + ".weight")
        if name == int8_layer:
            scale = (w.abs().amax(dim=1, keepdim=True) / 127).to(scale_dtype)
            data = torch.round(w / scale.float()).clamp(-127, 127).to(torch.int8)
            qtype = "qint8"
        else:
            scale = (w.abs().amax(dim=1, keepdim=True) / 448.0).to(scale_dtype)  # quanto: absmax/qmax, [out, 1]
            data = (w / scale.float()).clamp(-448, 448).to(FP8_DTYPE)
            qtype = "qfloat8_e4m3fn"
        state[name + ".weight._data"] = data
        state[name + ".weight._scale"] = scale
        state[name + ".input_scale"] = torch.ones(())
        state[name + ".output_scale"] = torch.ones(())
        qmap[name] = {"weights": qtype, "activations": "none"}
    path = tmp_path / "infinitetalk_single_fp8.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    if with_map:
        path.with_suffix(".json").write_text(json.dumps(qmap))
    return path, state, qmap


def test_quanto_checkpoint_loads_into_fp8_model(tmp_path):
    path, raw, qmap = _write_quanto_file(tmp_path)
    source = open_quanto_checkpoint(path)
    assert source.qtypes["blocks.1.ffn.2"] == "qint8" and source.qtypes["blocks.0.ffn.0"] == "qfloat8_e4m3fn"
    assert "blocks.0.ffn.0.input_scale" not in source and "blocks.0.ffn.0.weight._data" not in source
    assert source.shape("blocks.0.ffn.0.weight_scale") == (FFN,)
    assert "blocks.1.ffn.2.weight_scale" not in source  # int8 is dequantised, no fp8 scale

    model = _meta_fp8_model()
    materialize(model, Fp8Source(source, fp8_layer_names(model)), dtype=None, what="tiny fp8 model")
    ffn0 = model.blocks[0].ffn[0]
    assert torch.equal(ffn0.weight.view(torch.uint8), raw["blocks.0.ffn.0.weight._data"].view(torch.uint8))
    assert torch.equal(ffn0.weight_scale, raw["blocks.0.ffn.0.weight._scale"].float().reshape(-1))
    # the int8 layer is fp8 in our model: dequantised from int8, then quantised to e4m3
    ffn2 = model.blocks[1].ffn[2]
    int8_deq = raw["blocks.1.ffn.2.weight._data"].float() * raw["blocks.1.ffn.2.weight._scale"].float()
    assert rel(ffn2.dequantized_weight(), int8_deq) <= 2**-4
    # layers kept in high precision are dequantised from fp8
    head_deq = raw["head.head.weight._data"].float() * raw["head.head.weight._scale"].float()
    assert torch.equal(model.head.head.weight, head_deq)
    assert torch.equal(model.blocks[0].modulation, raw["blocks.0.modulation"])

    tokens, audio = tiny_inputs()
    err = rms_rel(model(tokens, audio), build_tiny()(tokens, audio))
    print(f"[fp8] tiny model from a quanto-format fp8 file vs the fp32 original: rms-rel={err:.3e}")
    assert err < 0.12


def test_quanto_checkpoint_without_map_infers_types_and_bf16_model_dequantizes(tmp_path):
    path, raw, _ = _write_quanto_file(tmp_path, with_map=False, scale_dtype=torch.float32)
    source = open_quanto_checkpoint(path)
    assert source.qtypes["blocks.1.ffn.2"] == "qint8" and source.qtypes["blocks.0.self_attn.q"] == "qfloat8_e4m3fn"
    with torch.device("meta"):
        plain = TinyDiT()  # no fp8 layers at all: everything dequantised
    materialize(plain, Fp8Source(source, fp8_layer_names(plain)), dtype=torch.bfloat16)
    q = raw["blocks.0.self_attn.q.weight._data"].float() * raw["blocks.0.self_attn.q.weight._scale"]
    assert torch.equal(plain.blocks[0].self_attn.q.weight, q.to(torch.bfloat16))


def test_quanto_map_that_does_not_match_the_file_is_refused(tmp_path):
    path, _, qmap = _write_quanto_file(tmp_path)
    qmap["blocks.5.ffn.0"] = {"weights": "qfloat8_e4m3fn", "activations": "none"}
    path.with_suffix(".json").write_text(json.dumps(qmap))
    with pytest.raises(CheckpointError, match="blocks.5.ffn.0"):
        open_quanto_checkpoint(path)
    qmap.pop("blocks.5.ffn.0")
    qmap["blocks.0.ffn.0"] = {"weights": "qint4", "activations": "none"}
    path.with_suffix(".json").write_text(json.dumps(qmap))
    with pytest.raises(CheckpointError, match="qint4"):
        open_quanto_checkpoint(path)
    qmap["blocks.0.ffn.0"] = {"weights": "qint8", "activations": "none"}  # data is fp8, map says int8
    path.with_suffix(".json").write_text(json.dumps(qmap))
    source = open_quanto_checkpoint(path)
    with pytest.raises(CheckpointError, match="do not belong together"):
        source["blocks.0.ffn.0.weight"]

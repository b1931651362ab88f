"""The fp8 FFN with its GELU and the second layer's quantisation fused (runtime/fp8_gelu.py):
the GELU formula, the op against the unfused math, the module swap in make_fast, and (GPU) the
Triton kernel against the torch version."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from infinitetalk.models.dit import InfiniteTalkDiT, WanDiTConfig
from infinitetalk.quant.fp8 import Fp8Linear, quantize_activation_rowwise, quantize_dit
from infinitetalk.runtime.fast import FastOptions, make_fast
from infinitetalk.runtime.fp8_gelu import (
    Fp8GeluFfn,
    gelu_quantize_reference,
    gelu_quantize_rowwise,
    gelu_tanh_float32,
    kernel_runs_on,
)


def test_gelu_formula_matches_torch_tanh_gelu():
    h = torch.linspace(-30, 30, 200_001)
    ref = F.gelu(h.double(), approximate="tanh")
    got = gelu_tanh_float32(h).double()
    assert torch.isfinite(got).all()
    assert ((got - ref).abs() / ref.abs().clamp(min=1e-3)).max() < 2e-6
    assert (gelu_tanh_float32(torch.tensor([-1e4, -100.0])) == 0).all()  # no inf/inf, no NaN


def test_op_quantises_each_row_of_the_gelu():
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(33, 200, generator=g) * torch.logspace(-3, 1, 33)[:, None]).bfloat16()
    h[5] = 0  # a row of zeros gets the smallest scale and quantises to zeros
    q, scale = gelu_quantize_rowwise(h)
    assert q.dtype == torch.float8_e4m3fn and q.shape == h.shape and scale.shape == (33, 1)
    ref_q, ref_scale = quantize_activation_rowwise(gelu_tanh_float32(h))
    assert torch.equal(q.float(), ref_q.float()) and torch.equal(scale, ref_scale)
    assert (q[5].float() == 0).all()
    assert (q.float().abs().amax(dim=1) == 448).sum() >= 32  # every non-zero row uses the full e4m3 range
    deq = q.float() * scale
    gelu = F.gelu(h.float(), approximate="tanh")
    assert ((deq - gelu).norm() / gelu.norm()) < 0.04  # e4m3: 3 mantissa bits


def _ffn(seed=0, dim=64, hidden=160, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
    return nn.Sequential(Fp8Linear.from_linear(ffn[0]), ffn[1], Fp8Linear.from_linear(ffn[2])).to(dtype)


def test_fused_ffn_equals_its_math_and_stays_close_to_the_unfused_one():
    ffn = _ffn()
    fused = Fp8GeluFfn.from_ffn(ffn)
    assert [n for n, _ in fused.state_dict().items()] == [n for n, _ in ffn.state_dict().items()]
    x = torch.randn(2, 7, 64).bfloat16()
    with torch.no_grad():
        got = fused(x)
        hidden = ffn[0](x).reshape(-1, 160)
        want = ffn[2].forward_quantized(*gelu_quantize_reference(hidden), out_dtype=torch.bfloat16).reshape(2, 7, 64)
        unfused = ffn(x)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.equal(got, want)
    assert ((got.float() - unfused.float()).norm() / unfused.float().norm()) < 0.02  # only the bf16 GELU rounding


def test_fused_ffn_refuses_other_ffns():
    assert not Fp8GeluFfn.fusable(nn.Sequential(nn.Linear(4, 8), nn.GELU(approximate="tanh"), nn.Linear(8, 4)))
    ffn = _ffn()
    ffn[1] = nn.GELU()  # the erf GELU is another function
    assert not Fp8GeluFfn.fusable(ffn)
    with pytest.raises(ValueError, match="Fp8GeluFfn needs"):
        Fp8GeluFfn.from_ffn(ffn)


def test_forward_quantized_checks_its_input():
    layer = _ffn()[2]
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        layer.forward_quantized(torch.zeros(3, 160), torch.ones(3, 1), out_dtype=torch.float32)


def test_make_fast_swaps_the_ffn_of_fp8_blocks_and_back():
    torch.manual_seed(0)
    model = InfiniteTalkDiT(WanDiTConfig.tiny()).eval()
    make_fast(model, FastOptions(compile_blocks=False))  # no fp8 layers: nothing to fuse
    assert all(type(b.ffn) is nn.Sequential and type(b.ffn[0]) is nn.Linear for b in model.blocks)
    quantize_dit(model)
    make_fast(model, FastOptions(fp8_fused_gelu=False, compile_blocks=False))
    assert all(type(b.ffn) is nn.Sequential and isinstance(b.ffn[0], Fp8Linear) for b in model.blocks)
    keys = set(model.state_dict())
    make_fast(model, FastOptions(compile_blocks=False))
    assert all(isinstance(b.ffn, Fp8GeluFfn) for b in model.blocks)
    assert set(model.state_dict()) == keys
    make_fast(model, FastOptions(fp8_fused_gelu=False, compile_blocks=False))
    assert all(type(b.ffn) is nn.Sequential and isinstance(b.ffn[0], Fp8Linear) for b in model.blocks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_triton_kernel_matches_the_torch_version():
    g = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(4096, 13824, device="cuda", generator=g) * 2).bfloat16()
    assert kernel_runs_on(h)
    q, scale = gelu_quantize_rowwise(h)
    ref_q, ref_scale = gelu_quantize_reference(h)
    torch.testing.assert_close(scale, ref_scale, rtol=2e-6, atol=0)
    # exp may differ by an ulp between the kernel and torch: a value on a rounding boundary can
    # land one e4m3 step away, nothing more
    diff = (q.float() - ref_q.float()).abs() / ref_q.float().abs().clamp(min=2**-9)
    assert (diff > 0).float().mean() < 1e-4 and diff.max() <= 0.125 + 1e-6
    print(f"[fp8-gelu] kernel vs torch: {(diff > 0).float().mean().item():.2e} of the values one step apart")

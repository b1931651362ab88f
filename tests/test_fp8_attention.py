"""fp8 self-attention: the exact key smoothing, the per-tensor quantisation, the emulation of
the cuDNN fp8 kernel against float32 attention, the bf16 fallback, and (GPU, Hopper, cuDNN
frontend installed) the cuDNN graph against its emulation and inside the DiT fast path."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from infinitetalk.models.attention import sdpa_attention
from infinitetalk.runtime.fast import FastOptions, make_fast
from infinitetalk.runtime.fp8_attention import (
    FP8_MAX,
    CudnnFp8Attention,
    emulate_fp8_attention,
    fp8_attention_supported,
    quantize_per_tensor,
    smooth_keys,
)


def _qkv(length=256, heads=4, dim=64, peak=1.0, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, length, heads, dim, generator=g) * peak
    k = torch.randn(1, length, heads, dim, generator=g) * peak + shift
    v = torch.randn(1, length, heads, dim, generator=g)
    return q, k, v


def _attention_f32(q, k, v):
    out = F.scaled_dot_product_attention(q.double().transpose(1, 2), k.double().transpose(1, 2), v.double().transpose(1, 2))
    return out.transpose(1, 2)


def _rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_key_smoothing_is_exact():
    q, k, v = _qkv(shift=3.0)
    smoothed = smooth_keys(k)
    assert smoothed[:, ::16].mean(dim=1).abs().max() < 1e-5  # the sampled keys' mean is removed
    assert smoothed.mean(dim=1).abs().mean() < 0.3  # and with it most of the shared shift of 3
    assert _rel_l2(_attention_f32(q, smoothed, v), _attention_f32(q, k, v)) < 1e-6


def test_qk_bounds_hold_and_cost_no_accuracy():
    """`WanSelfAttention.qk_bounds` bounds |q| and |k| after the norms and RoPE (also for a token
    with all its energy in one channel), and scaling q and k by these bounds instead of by
    their max gives the same fp8 error against float32 (e4m3 rounds relatively)."""
    from infinitetalk.models.attention import RopeCache, apply_rope_3d
    from infinitetalk.models.dit import WanSelfAttention

    heads, dim, grid = 4, 64, (2, 16, 16)
    length = grid[0] * grid[1] * grid[2]
    attn = WanSelfAttention(heads * dim, heads).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # spread norm weights, as trained ones are
        for w in (attn.norm_q.weight, attn.norm_k.weight):
            w.copy_(torch.exp(torch.empty(heads * dim).uniform_(-2.3, 1.1, generator=g)))
    x = torch.randn(1, length, heads * dim, generator=g)
    table = RopeCache()(grid, dim, torch.device("cpu"))
    v = torch.randn(1, length, heads, dim, generator=g)
    for one_hot in (False, True):
        q_lin, k_lin = attn.q(x).detach(), attn.k(x).detach()
        if one_hot:  # a token whose projection is all in the largest-weight channel
            q_lin[0, 0] = 0.0
            q_lin[0, 0, attn.norm_q.weight.abs().argmax()] = 5.0
        with torch.no_grad():
            q = apply_rope_3d(attn.norm_q(q_lin).view(1, length, heads, dim), table)
            k = apply_rope_3d(attn.norm_k(k_lin).view(1, length, heads, dim), table) + 0.3
            q_bound, k_bound = attn.qk_bounds(q_lin, k_lin)
        k_bound = k_bound + 0.3
        assert q.abs().max() <= q_bound and k.abs().max() <= k_bound
        assert q.abs().max() > q_bound / 2.1  # within sqrt(2) * 1.02 of the largest pre-RoPE element
        want = _attention_f32(q, k, v)
        err_amax = _rel_l2(emulate_fp8_attention(q, k, v), want)
        err_bound = _rel_l2(emulate_fp8_attention(q, k, v, qk_bounds=(q_bound, k_bound)), want)
        print(f"[fp8 attention] one-hot token {one_hot}: scales from max|x| {err_amax:.4f}, "
              f"from the bounds {err_bound:.4f}")
        assert err_bound < 1.1 * err_amax + 1e-3


class _EmulatedFp8Attention:
    """An AttentionFn computing what the cuDNN graph computes (CPU), checking the bounds it gets."""

    takes_qk_bounds = True

    def __init__(self):
        self.calls_with_bounds = 0

    def __call__(self, q, k, v, qk_bounds=None):
        if qk_bounds is not None:
            self.calls_with_bounds += 1
            assert q.abs().max() <= qk_bounds[0] and k.abs().max() <= qk_bounds[1]
        return emulate_fp8_attention(q, k, v, qk_bounds)


def test_dit_passes_valid_bounds_to_fp8_attention():
    """Through the tiny DiT's blocks: every self-attention gets q/k bounds that hold, and the
    fp8 self-attention keeps the output within the fp8 error of the float32 one."""
    from infinitetalk.runtime.tiny_models import build_tiny_models

    dit = build_tiny_models(0, torch.device("cpu"), torch.float32).dit
    from test_dit_params import _tiny_inputs

    inputs = _tiny_inputs(dit.config, 2)
    with torch.inference_mode():
        want = dit(**inputs)
        dit.self_attention = fp8 = _EmulatedFp8Attention()
        got = dit(**inputs)
    assert fp8.calls_with_bounds == len(dit.blocks)
    err = _rel_l2(got, want)
    print(f"[fp8 attention] tiny DiT, emulated fp8 self-attention: rel L2 {err:.4f}")
    assert 1e-4 < err < 0.1


def test_per_tensor_quantisation():
    x = torch.randn(2, 50, 3, 16) * 7
    x8, descale, amax = quantize_per_tensor(x)
    assert x8.dtype == torch.float8_e4m3fn
    assert amax.item() == pytest.approx(x.abs().max().item())
    assert x8.float().abs().max().item() == pytest.approx(FP8_MAX)
    back = x8.float() * descale.reshape(1)
    big = x.abs() > amax.item() / 64  # normal e4m3 range: relative error <= 2^-4
    assert ((back - x).abs()[big] / x.abs()[big]).max() <= 1 / 16 + 1e-6


@pytest.mark.parametrize("peak,bound", [(1.0, 0.08), (2.0, 0.15)])
def test_emulation_error_against_float32(peak, bound):
    """e4m3 q, k, p, v and o: a few % relative L2 on flat attention, more on peaked attention
    (the q.k error grows with the logits). The error is real (not a bf16 copy): > 1%."""
    q, k, v = _qkv(peak=peak, shift=0.5)
    err = _rel_l2(emulate_fp8_attention(q, k, v), _attention_f32(q, k, v))
    print(f"[fp8 attention] peak {peak}: emulation rel L2 {err:.4f}")
    assert 0.01 < err < bound


def test_fallback_on_the_cpu_is_the_bf16_attention():
    q, k, v = _qkv()
    attn = CudnnFp8Attention(fallback=sdpa_attention)
    assert not attn.usable(q, k, v)
    assert torch.equal(attn(q, k, v), sdpa_attention(q, k, v))


def test_cudnn_call_is_an_op_that_compiles_without_a_graph_break():
    """The cuDNN call is a custom op of the attention object: a compiled function around it is
    one graph (here on the CPU, where the op runs its fallback: bf16 attention on the
    dequantised inputs, output in e4m3 like the graph's), and the op goes away with its object."""
    import gc

    q, k, v = _qkv(length=64, heads=2, dim=64)
    attn = CudnnFp8Attention(fallback=sdpa_attention)
    q8, dq, _ = quantize_per_tensor(q)
    k8, dk, _ = quantize_per_tensor(smooth_keys(k))
    v8, dv, amax_v = quantize_per_tensor(v)
    so = FP8_MAX / (amax_v * 1.125)

    def f(q8, k8, v8):
        return attn._op(q8, k8, v8, dq, dk, dv, so).float() / so.reshape(1) * 2.0

    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(q8, k8, v8)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    eager = f(q8, k8, v8)
    assert eager.dtype == torch.float32
    deq = lambda x8, d: (x8.float() * d.reshape(1)).bfloat16()  # noqa: E731
    want = sdpa_attention(deq(q8, dq), deq(k8, dk), deq(v8, dv)).float() * 2.0
    assert _rel_l2(eager, want) < 0.05  # the e4m3 rounding of the output
    assert torch.equal(torch.compile(f)(q8, k8, v8), eager)
    name = attn._op.name().split(".")[0]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd")
    del attn, f, explained
    torch._dynamo.reset()
    gc.collect()
    with pytest.raises(RuntimeError, match="does not exist"):
        torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd")


def test_make_fast_without_support_keeps_bf16_attention(caplog):
    from infinitetalk.runtime.tiny_models import build_tiny_models

    dit = build_tiny_models(0, torch.device("cpu"), torch.float32).dit
    with caplog.at_level("WARNING"):
        make_fast(dit, FastOptions.for_device("cpu", fp8_attention=True))
    assert dit.self_attention is None
    assert "fp8 attention needs" in caplog.text


needs_fp8_attention = pytest.mark.skipif(
    not fp8_attention_supported("cuda"), reason="needs CUDA compute capability >= 9.0 and the cuDNN frontend"
)


@pytest.mark.gpu
@needs_fp8_attention
@pytest.mark.parametrize("dim", [64, 128])
def test_gpu_cudnn_graph_matches_emulation(dim):
    q, k, v = (t.cuda() for t in _qkv(length=1024, heads=4, dim=dim, shift=0.5))
    v = v.bfloat16()
    attn = CudnnFp8Attention()
    got = attn(q, k, v)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    want = emulate_fp8_attention(q.bfloat16(), k.bfloat16(), v)
    err = _rel_l2(got.float(), want.float())
    print(f"[fp8 attention] cuDNN vs emulation, head dim {dim}: rel L2 {err:.4f}")
    assert err < 0.05
    assert _rel_l2(got.float(), _attention_f32(q, k, v.float()).float()) < 0.1
    assert len(attn._plans) == 1  # built once, reused
    attn(q, k, v)
    assert len(attn._plans) == 1
    bounds = (q.abs().amax() * 1.5, k.abs().amax() * 1.5)  # scales from given bounds (the DiT's path)
    got = attn(q, k, v, qk_bounds=bounds)
    want = emulate_fp8_attention(q.bfloat16(), k.bfloat16(), v, qk_bounds=bounds)
    err = _rel_l2(got.float(), want.float())
    print(f"[fp8 attention] cuDNN vs emulation with q/k bounds, head dim {dim}: rel L2 {err:.4f}")
    assert err < 0.05


@pytest.mark.gpu
@needs_fp8_attention
def test_usable_check_traces_without_a_graph_break():
    """The check runs inside compiled blocks: a graph break there would keep the float32 q and
    k alive across the attention (measured: +1.4 GB at 480p)."""
    q, k, v = (t.cuda() for t in _qkv())
    attn = CudnnFp8Attention(fallback=sdpa_attention)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda q, k, v: attn.usable(q, k, v) and q.sum() or q.mean())(q, k, v)
    assert explained.graph_break_count == 0


@pytest.mark.gpu
@needs_fp8_attention
def test_gpu_fp8_attention_in_compiled_block():
    """A compiled function around the attention (graph break at the cuDNN call) is as exact as
    eager: the compiler fuses the scale and cast differently, which flips some e4m3 roundings
    (measured: 4.7% relative L2 between the two), so both are held to the fp8 error bound
    against float32 attention rather than to each other."""
    q, k, v = (t.cuda() for t in _qkv(length=512, heads=2, dim=128))
    v = v.bfloat16()
    attn = CudnnFp8Attention()

    def f(q, k, v):
        return attn(q * 1.5, k, v).float() * 2

    torch._dynamo.reset()
    want = _attention_f32(q * 1.5, k, v.float()).float() * 2
    compiled, eager = torch.compile(f)(q, k, v), f(q, k, v)
    print(f"[fp8 attention] compiled {_rel_l2(compiled, want):.4f}, eager {_rel_l2(eager, want):.4f}, "
          f"between {_rel_l2(compiled, eager):.4f}")
    assert _rel_l2(compiled, want) < 0.1
    assert _rel_l2(eager, want) < 0.1
    assert math.isfinite(compiled.abs().max().item())

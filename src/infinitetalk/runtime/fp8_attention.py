"""fp8 (e4m3) self-attention: per-tensor scaled q, k, v through cuDNN's fp8 SDPA (Hopper and later).

At 480p the DiT's self-attention (33,600 tokens, 40 heads of 128) is half of a forward's
FLOPs, and fp8 tensor cores have twice the bf16 rate. torch's `scaled_dot_product_attention` has no fp8 path, so this module builds the
attention as a cuDNN graph through the cuDNN frontend's Python API (`pip install
nvidia-cudnn-frontend`, the optional `fp8` extra), one graph per input shape, kept by the
`CudnnFp8Attention` object that a fast path owns (no module-level cache).

What is computed (and what `emulate_fp8_attention` reproduces on any device):
1. k loses its mean over every 16th token (`smooth_keys`; subtracting any vector shared by all
   keys is exact for softmax attention); then q, k and v are quantised per tensor:
   x8 = e4m3(x * 448 / bound), descale = bound / 448, where the bound is max|x| (one more
   pass over the tensor), or for q and k a bound the caller already has (`qk_bounds`): the
   DiT takes the row maximum of |x_i w_i| / rms(x) with its RMS norm statistics, times sqrt(2)
   for RoPE (`WanSelfAttention.qk_bounds`). e4m3 is a floating-point format, so a scale up to
   2x looser than max|x| rounds every normal value with the same relative error.
2. cuDNN computes s = q8 k8^T * descale_q * descale_k / sqrt(D) in float32, the row
   maximum m, p = exp(s - m) in [0, 1], quantises p to e4m3 with scale 448 (descale 1/448),
   multiplies by v8 with float32 accumulation, divides by the row sum of p and writes the
   output in e4m3 with `scale_o`.
3. The output scale is known without a reduction: every output row is a convex combination
   of v's rows, so |o| <= max|v|; `scale_o = 448 / (max|v| * 1.125)` leaves room for the
   rounding of p (each p rounds by at most 1/16, so sum p v can exceed max|v| by 6.25%).
4. The caller gets o in bf16 (o8 / scale_o). The cuDNN call is a custom op owned by the
   attention object, so torch.compile keeps a block in one graph around it.

Only the self-attention uses it (`InfiniteTalkDiT.self_attention`); the cross-attention
calls (512 text keys, 257 image keys, 32 audio tokens a frame) stay in bf16: they are ~1%
of the FLOPs. CPU tensors and head sizes other than 64/128 go to the bf16 `fallback`
attention directly; on a GPU below compute capability 9.0, without the frontend, or for a
graph cuDNN refuses, the fallback runs on the dequantised inputs (logged once per device or
shape).
"""
from __future__ import annotations

import logging
import math
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..models.attention import AttentionFn, sdpa_attention

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# p in [0, 1] is stored as p * P_SCALE in e4m3.
P_SCALE = FP8_MAX
# o8 = o * 448 / (max|v| * O_MARGIN): room for the rounding of p (see the module docstring).
O_MARGIN = 1.125
_MIN_AMAX = 1e-12


def cudnn_frontend_available() -> bool:
    """True when the cuDNN frontend's Python package (`import cudnn`) can be imported."""
    try:
        import cudnn  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def fp8_attention_supported(device: torch.device | str) -> bool:
    """True when `CudnnFp8Attention` can run on `device`: CUDA, compute capability >= 9.0, frontend installed."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    return cudnn_frontend_available()


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x -> (e4m3 x * 448 / max|x|, descale [1, 1, 1, 1] float32, amax [1, 1, 1, 1] float32)."""
    amax = x.abs().amax().float().clamp(min=_MIN_AMAX).reshape(1, 1, 1, 1)
    x8 = (x.float() * (FP8_MAX / amax)).to(FP8)
    return x8, amax / FP8_MAX, amax


KEY_SAMPLE_STRIDE = 16  # the smoothing vector is the mean of every 16th key


def key_smoothing_vector(k: torch.Tensor, stride: int = KEY_SAMPLE_STRIDE) -> torch.Tensor:
    """The mean of every `stride`-th key [B, 1, H, D] float32: the part all keys share."""
    return k[:, ::stride].float().mean(dim=1, keepdim=True)


def smooth_keys(k: torch.Tensor, stride: int = KEY_SAMPLE_STRIDE) -> torch.Tensor:
    """k minus `key_smoothing_vector(k)` (per sample, head and channel), in float32.

    Exact for attention: q.(k_j - c) = q.k_j - q.c, and q.c is the same for every key j of a
    query, which the softmax cancels, for any c. With c near the keys' mean it removes the
    component all keys share (large in trained models, SageAttention's observation), so the
    fp8 values of k spend their precision on the part that differs between keys. A sample of
    the keys estimates the mean as well as all of them, for 1/16 of the reads.
    """
    return k.float() - key_smoothing_vector(k, stride)


def quantize_with_bound(x: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (e4m3 x * 448 / bound, descale [1, 1, 1, 1] float32) for a known bound >= max|x|.

    No reduction over x (one pass); values beyond the bound would saturate at +-448.
    """
    bound = bound.float().clamp(min=_MIN_AMAX).reshape(1, 1, 1, 1)
    x8 = (x.float() * (FP8_MAX / bound)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x8, bound / FP8_MAX


def _quantize_qk(q, k, qk_bounds):
    """(q8, dq, k8, dk): per-tensor amax scales, or the given bounds of |q| and |k|."""
    if qk_bounds is None:
        q8, dq, _ = quantize_per_tensor(q)
        k8, dk, _ = quantize_per_tensor(smooth_keys(k))
        return q8, dq, k8, dk
    q_bound, k_bound = qk_bounds
    c = key_smoothing_vector(k)
    q8, dq = quantize_with_bound(q, q_bound)
    k8, dk = quantize_with_bound(k.float() - c, k_bound.float() + c.abs().amax())  # |k - c| <= |k| + |c|
    return q8, dq, k8, dk


def quantize_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_bounds: Optional[tuple[torch.Tensor, torch.Tensor]] = None
) -> tuple[torch.Tensor, ...]:
    """(q8, k8, v8, descale_q, descale_k, descale_v, scale_o): what the cuDNN graph takes."""
    q8, dq, k8, dk = _quantize_qk(q, k, qk_bounds)
    v8, dv, amax_v = quantize_per_tensor(v)
    return q8, k8, v8, dq, dk, dv, FP8_MAX / (amax_v * O_MARGIN)


def emulate_fp8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_bounds: Optional[tuple[torch.Tensor, torch.Tensor]] = None
) -> torch.Tensor:
    """What the fp8 kernel computes, in float32 with explicit e4m3 roundings (any device).

    q, k, v [B, L, H, D] -> [B, Lq, H, D] in v's dtype; `qk_bounds` as in `CudnnFp8Attention`.
    Used by the CPU tests to measure the fp8 error, and on the GPU to check the cuDNN graph.
    """
    q8, k8, v8, dq, dk, dv, scale_o = quantize_attention_inputs(q, k, v, qk_bounds)
    scale = 1.0 / math.sqrt(q.shape[-1])
    qf = q8.float().transpose(1, 2) * dq.reshape(1)  # [B, H, L, D]
    kf = k8.float().transpose(1, 2) * dk.reshape(1)
    vf = v8.float().transpose(1, 2)
    s = (qf @ kf.transpose(-2, -1)) * scale
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p8 = (p * P_SCALE).to(FP8).float()
    o = (p8 @ vf) / (p.sum(-1, keepdim=True) * P_SCALE) * dv.reshape(1)
    scale_o = scale_o.reshape(1)
    o8 = (o * scale_o).to(FP8).float() / scale_o
    return o8.transpose(1, 2).to(v.dtype)


_OP_NAMESPACE = "infinitetalk_fp8_attention"


def _register_op(owner: "CudnnFp8Attention"):
    """A custom op `infinitetalk_fp8_attention::sdpa_<uid>` running `owner._run`, in a library
    fragment that `owner` holds (its registration goes away with the fragment).

    (q8, k8, v8 [B, L, H, D] e4m3; descale_q, descale_k, descale_v, scale_o [1, 1, 1, 1]
    float32) -> o8 [B, Lq, H, D] e4m3. As an op, torch.compile traces the call (with the
    fake implementation below for shapes) instead of breaking the graph around it.
    """
    name = f"sdpa_{uuid.uuid4().hex[:12]}"
    lib = torch.library.Library(_OP_NAMESPACE, "FRAGMENT")
    lib.define(f"{name}(Tensor q8, Tensor k8, Tensor v8, Tensor dq, Tensor dk, Tensor dv, Tensor scale_o) -> Tensor")
    owner_ref = weakref.ref(owner)  # the op must not keep its owner (and its cuDNN graphs) alive

    def run(q8, k8, v8, dq, dk, dv, scale_o):
        return owner_ref()._run(q8, k8, v8, dq, dk, dv, scale_o)

    def fake(q8, k8, v8, dq, dk, dv, scale_o):
        return torch.empty(q8.shape, dtype=FP8, device=q8.device)

    lib.impl(name, run, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{_OP_NAMESPACE}::{name}", fake, lib=lib)
    return lib, getattr(getattr(torch.ops, _OP_NAMESPACE), name).default


@dataclass
class _Plan:
    graph: Any
    tensors: dict
    workspace: torch.Tensor
    amax: torch.Tensor  # [2, 1, 1, 1, 1] float32: amax_s and amax_o outputs (unused)


class CudnnFp8Attention:
    """An `AttentionFn` running fp8 attention through a cuDNN graph; bf16 `fallback` otherwise.

    q, k, v [B, L, H, D] (q and k may be float32 after RoPE, v bf16) -> [B, Lq, H, D] in v's dtype.
    `qk_bounds` (optional, 0-dim tensors): bounds of |q| and |k| known without reading them
    (`WanSelfAttention.qk_bounds`); they save the two max|x| passes. One cuDNN graph is built
    per (shape, device) on first use and kept by this object.
    """

    takes_qk_bounds = True  # WanSelfAttention passes `qk_bounds` to attention functions that say so

    def __init__(self, fallback: AttentionFn = sdpa_attention):
        self.fallback = fallback
        self._plans: dict[tuple, Optional[_Plan]] = {}
        self._handles: dict[int, Any] = {}
        self._device_ok: dict[int, bool] = {}
        self._lib, self._op = _register_op(self)

    def __repr__(self) -> str:
        return f"CudnnFp8Attention({len(self._plans)} graphs, fallback={getattr(self.fallback, '__name__', self.fallback)})"

    def usable(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether the inputs can go to the cuDNN graph: CUDA tensors, head size 64 or 128.

        Only tensor properties, so torch.compile traces it without a graph break (a break here
        would keep the float32 q and k alive across the attention). Whether the GPU and the
        frontend can run the graph is checked in `_run`, once per device.
        """
        return q.is_cuda and q.shape[-1] in (64, 128) and q.shape[-1] == k.shape[-1] == v.shape[-1]

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        qk_bounds: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        if not self.usable(q, k, v):
            return self.fallback(q, k, v)
        dtype = v.dtype
        # q and k arrive in float32 from the RoPE; the bf16 path rounds them to bf16 too, and
        # bf16 copies keep the float32 [L, H, D] tensors out of memory while the scales reduce.
        q8, k8, v8, dq, dk, dv, scale_o = quantize_attention_inputs(q.to(dtype), k.to(dtype), v, qk_bounds)
        # The cuDNN call is a custom op of this object (`_register_op`): torch.compile traces it
        # as one opaque op, so a compiled block stays one graph and fuses the quantisation with
        # the norms and RoPE before it and the dequantisation with the o-projection after it.
        out = self._op(q8, k8, v8, dq, dk, dv, scale_o)
        return (out.float() / scale_o.reshape(1)).to(dtype)

    def _run(self, q8, k8, v8, dq, dk, dv, scale_o) -> torch.Tensor:
        """The op's implementation: the cached cuDNN graph for these shapes, e4m3 output scaled by
        `scale_o`. Where the graph cannot run (no Hopper GPU or frontend, a graph cuDNN refuses):
        the `fallback` attention on the dequantised inputs, quantised the same way."""
        q8, k8, v8 = q8.contiguous(), k8.contiguous(), v8.contiguous()  # the graph's strides
        key = (tuple(q8.shape), tuple(k8.shape), q8.device.index)
        if key not in self._plans:
            self._plans[key] = self._build(q8, k8) if self._supported(q8.device) else None
        plan = self._plans[key]
        if plan is None:
            deq = lambda x8, d: (x8.float() * d.reshape(1)).to(torch.bfloat16)  # noqa: E731
            out = self.fallback(deq(q8, dq), deq(k8, dk), deq(v8, dv))
            return (out.float() * scale_o.reshape(1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        import cudnn

        handle = self._handle(q8.device)
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
        b, lq, h, d = q8.shape
        out = torch.empty(b, lq, h, d, dtype=FP8, device=q8.device)
        t = plan.tensors
        pack = {
            t["q"]: q8, t["k"]: k8, t["v"]: v8, t["o"]: out,
            t["dq"]: dq, t["dk"]: dk, t["dv"]: dv, t["ds"]: self._const(q8.device, 1.0 / P_SCALE, plan),
            t["ss"]: self._const(q8.device, P_SCALE, plan), t["so"]: scale_o,
            t["amax_s"]: plan.amax[0], t["amax_o"]: plan.amax[1],
        }
        plan.graph.execute(pack, plan.workspace, handle=handle)
        return out

    def _supported(self, device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._device_ok:
            self._device_ok[index] = fp8_attention_supported(torch.device("cuda", index))
            if not self._device_ok[index]:
                log.warning("fp8 attention needs a GPU of compute capability >= 9.0 and the cuDNN frontend "
                            "(pip install 'infinitetalk[fp8]'); cuda:%d uses bf16 attention.", index)
        return self._device_ok[index]

    def _const(self, device: torch.device, value: float, plan: _Plan) -> torch.Tensor:
        name = f"const_{value}"
        if name not in plan.tensors:
            plan.tensors[name] = torch.full((1, 1, 1, 1), value, dtype=torch.float32, device=device)
        return plan.tensors[name]

    def _handle(self, device: torch.device):
        import cudnn

        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._handles:
            with torch.cuda.device(index):
                self._handles[index] = cudnn.create_handle()
        return self._handles[index]

    def _build(self, q8: torch.Tensor, k8: torch.Tensor) -> Optional[_Plan]:
        """The cuDNN graph for these shapes (e4m3 output, which every fp8-capable GPU offers)."""
        try:
            return self._build_graph(q8, k8)
        except Exception as exc:  # cuDNN reports unsupported graphs with several exception types
            log.warning("cuDNN fp8 attention is not available for q %s, k %s (%s); using bf16 attention.",
                        tuple(q8.shape), tuple(k8.shape), exc)
            return None

    def _build_graph(self, q8: torch.Tensor, k8: torch.Tensor) -> _Plan:
        import cudnn

        b, lq, h, d = q8.shape
        lk = k8.shape[1]
        fp8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        handle = self._handle(q8.device)
        graph = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=f32, compute_data_type=f32, handle=handle)

        def bshd(name, length):  # dims (b, h, s, d) over a [B, S, H, D] buffer
            return graph.tensor(name=name, dim=[b, h, length, d], stride=[length * h * d, d, h * d, 1], data_type=fp8)

        def scalar(name):
            return graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)

        tq, tk, tv = bshd("q", lq), bshd("k", lk), bshd("v", lk)
        dq, dk, dv, ds, ss, so = (scalar(n) for n in ("dq", "dk", "dv", "ds", "ss", "so"))
        o, _stats, amax_s, amax_o = graph.sdpa_fp8(
            q=tq, k=tk, v=tv, descale_q=dq, descale_k=dk, descale_v=dv, descale_s=ds, scale_s=ss,
            scale_o=so, is_inference=True, attn_scale=1.0 / math.sqrt(d), use_causal_mask=False, name="sdpa_fp8",
        )
        o.set_output(True).set_dim([b, h, lq, d]).set_stride([lq * h * d, d, h * d, 1])
        o.set_data_type(fp8)
        for a in (amax_s, amax_o):
            a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        workspace = torch.empty(max(1, graph.get_workspace_size()), dtype=torch.uint8, device=q8.device)
        amax = torch.zeros(2, 1, 1, 1, 1, dtype=torch.float32, device=q8.device)
        tensors = {"q": tq, "k": tk, "v": tv, "o": o, "dq": dq, "dk": dk, "dv": dv, "ds": ds, "ss": ss, "so": so,
                   "amax_s": amax_s, "amax_o": amax_o}
        log.info("cuDNN fp8 attention graph built for q %s, k %s", tuple(q8.shape), tuple(k8.shape))
        return _Plan(graph, tensors, workspace, amax)

#!/usr/bin/env python
"""Every cuDNN execution plan (engine and knob choice) for the DiT's fp8 self-attention, timed.

`CudnnFp8Attention` builds the first plan of cuDNN's heuristics (mode A). This sweep asks for
every plan cuDNN offers for the same graph (modes A, B and FALLBACK, every plan built), then
varies the knobs of each engine one at a time, and times each plan on the 480p shape
(33,600 tokens, 40 heads of 128) with pre-quantised inputs, in both memory layouts (the DiT's
[B, L, H, D] views and contiguous [B, H, L, D]). Each plan's output is compared with plan 0's.
Prints a table, writes JSON (`--out`). Without CUDA or the cuDNN frontend it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_kernels import git_commit  # noqa: E402
from infinitetalk.runtime.fp8_attention import (  # noqa: E402
    P_SCALE,
    fp8_attention_supported,
    quantize_attention_inputs,
)

HEADS, HEAD_DIM = 40, 128


def time_plan(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def knob_info(k) -> dict:
    out = {}
    for name in dir(k):
        if name.startswith("_"):
            continue
        try:
            val = getattr(k, name)
        except Exception:  # noqa: BLE001
            continue
        if callable(val):
            continue
        out[name] = val if isinstance(val, (int, float, str, bool)) else repr(val)
    return out


class Sweep:
    def __init__(self, n: int, layout: str, dev: torch.device):
        import cudnn

        self.cudnn = cudnn
        self.n, self.layout, self.dev = n, layout, dev
        g = torch.Generator(device=dev).manual_seed(1)
        q = torch.randn(1, n, HEADS, HEAD_DIM, device=dev, generator=g)
        k = torch.randn(1, n, HEADS, HEAD_DIM, device=dev, generator=g) + 0.5
        v = torch.randn(1, n, HEADS, HEAD_DIM, device=dev, generator=g).bfloat16()
        q8, k8, v8, self.dq, self.dk, self.dv, self.so = quantize_attention_inputs(q, k, v)
        del q, k, v
        if layout == "bhsd":  # contiguous [B, H, L, D] storage
            self.q8, self.k8, self.v8 = (x.transpose(1, 2).contiguous() for x in (q8, k8, v8))
            self.out = torch.empty(1, HEADS, n, HEAD_DIM, dtype=torch.float8_e4m3fn, device=dev)
        else:
            self.q8, self.k8, self.v8 = q8, k8, v8.contiguous()
            self.out = torch.empty(1, n, HEADS, HEAD_DIM, dtype=torch.float8_e4m3fn, device=dev)
        self.handle = cudnn.create_handle()
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(dev).cuda_stream)
        self.consts = {
            "ds": torch.full((1, 1, 1, 1), 1.0 / P_SCALE, device=dev),
            "ss": torch.full((1, 1, 1, 1), P_SCALE, device=dev),
        }
        self.amax = torch.zeros(2, 1, 1, 1, 1, device=dev)

    def graph(self, modes):
        cudnn = self.cudnn
        n, h, d = self.n, HEADS, HEAD_DIM
        fp8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=f32, compute_data_type=f32, handle=self.handle)
        stride = [n * h * d, d, h * d, 1] if self.layout == "bshd" else [n * h * d, n * d, d, 1]

        def t(name):
            return graph.tensor(name=name, dim=[1, h, n, d], stride=stride, data_type=fp8)

        def scalar(name):
            return graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)

        tq, tk, tv = t("q"), t("k"), t("v")
        dq, dk, dv, ds, ss, so = (scalar(x) for x in ("dq", "dk", "dv", "ds", "ss", "so"))
        o, _stats, amax_s, amax_o = graph.sdpa_fp8(
            q=tq, k=tk, v=tv, descale_q=dq, descale_k=dk, descale_v=dv, descale_s=ds, scale_s=ss,
            scale_o=so, is_inference=True, attn_scale=1.0 / math.sqrt(d), use_causal_mask=False, name="sdpa_fp8",
        )
        o.set_output(True).set_dim([1, h, n, d]).set_stride(stride).set_data_type(fp8)
        for a in (amax_s, amax_o):
            a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans(modes)
        graph.check_support()
        self.pack = {
            tq: self.q8, tk: self.k8, tv: self.v8, o: self.out, dq: self.dq, dk: self.dk, dv: self.dv,
            ds: self.consts["ds"], ss: self.consts["ss"], so: self.so, amax_s: self.amax[0], amax_o: self.amax[1],
        }
        return graph

    def run_plan(self, graph, index: int, iters: int) -> dict:
        ws = torch.empty(max(1, graph.get_workspace_size_plan_at_index(index)), dtype=torch.uint8, device=self.dev)
        fn = lambda: graph.execute_plan_at_index(self.pack, ws, index=index, handle=self.handle)  # noqa: E731
        fn()
        torch.cuda.synchronize()
        out = self.out.float().clone()
        ms = time_plan(fn, 2, iters)
        flops = 4.0 * HEADS * self.n * self.n * HEAD_DIM
        return {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1), "workspace": ws.numel()}, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--tokens", type=int, default=33_600)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--max-plans", type=int, default=80)
    p.add_argument("--budget-s", type=float, default=240.0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or not fp8_attention_supported("cuda"):
        msg = "needs CUDA with compute capability >= 9.0 and the cuDNN frontend (pip install nvidia-cudnn-frontend)"
        print(msg)
        if args.out:
            args.out.write_text(json.dumps({"skipped": msg}))
        return 0
    import cudnn

    t_start = time.time()
    dev = torch.device("cuda")
    res = {
        "benchmark": "fp8 attention plans",
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "cudnn_backend": torch.backends.cudnn.version(),
        "cudnn_frontend": getattr(cudnn, "__version__", "?"),
        "commit": git_commit(),
        "tokens": args.tokens,
        "plans": [],
        "notes": [],
    }
    modes = [cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK]
    ref = None
    for layout in ("bshd", "bhsd"):
        sweep = Sweep(args.tokens, layout, dev)
        try:
            graph = sweep.graph(modes)
            try:
                graph.build_plans(cudnn.build_plan_policy.ALL)
            except Exception as exc:  # noqa: BLE001
                res["notes"].append(f"{layout}: build_plans(ALL): {exc}")
            count = graph.get_execution_plan_count()
        except Exception as exc:  # noqa: BLE001
            res["notes"].append(f"{layout}: graph: {exc}")
            continue
        res["notes"].append(f"{layout}: {count} plans from heuristics A, B, FALLBACK")
        engines = {}
        for i in range(min(count, args.max_plans)):
            entry = {"layout": layout, "index": i, "source": "heuristics"}
            try:
                entry["name"] = str(graph.get_plan_name_at_index(i))
                eid, knobs = graph.get_engine_and_knobs_at_index(i)
                entry["engine"], entry["knobs"] = int(eid), {str(k): int(v) for k, v in dict(knobs).items()}
                engines.setdefault(int(eid), dict(knobs))
                timing, out = sweep.run_plan(graph, i, args.iters)
                entry.update(timing)
                if ref is None:
                    ref = out
                d = out - ref if layout == "bshd" else out.transpose(1, 2) - ref
                entry["rel_l2_vs_first"] = round((d.norm() / ref.norm()).item(), 5)
            except Exception as exc:  # noqa: BLE001
                entry["error"] = str(exc)[:300]
            res["plans"].append(entry)
            print(json.dumps(entry), flush=True)
            if time.time() - t_start > args.budget_s:
                res["notes"].append("time budget reached")
                break
        # knob variations, one knob at a time, for every engine seen
        if layout != "bshd":
            continue
        for eid, base in engines.items():
            if time.time() - t_start > args.budget_s:
                break
            try:
                kinfo = graph.get_knobs_for_engine(eid)
            except Exception as exc:  # noqa: BLE001
                try:
                    kinfo = graph._lowered_graph.get_knobs_for_engine(eid)
                except Exception as exc2:  # noqa: BLE001
                    res["notes"].append(f"engine {eid}: get_knobs_for_engine: {exc}; {exc2}")
                    continue
            described = [knob_info(k) for k in (kinfo.values() if isinstance(kinfo, dict) else kinfo)]
            res["notes"].append(f"engine {eid} knobs: {json.dumps(described, default=str)[:2000]}")
            print(res["notes"][-1], flush=True)
            variants = []
            for kd, kobj in zip(described, (kinfo.values() if isinstance(kinfo, dict) else kinfo)):
                ktype = kd.get("type", kd.get("knob_type"))
                if ktype is None:
                    continue
                lo = kd.get("min_value", kd.get("minValue", kd.get("min")))
                hi = kd.get("max_value", kd.get("maxValue", kd.get("max")))
                step = kd.get("stride", 1) or 1
                if not isinstance(lo, int) or not isinstance(hi, int) or hi - lo > 64 * step:
                    continue
                ktype_obj = getattr(kobj, "type", ktype)
                for val in range(lo, hi + 1, step):
                    knobs = dict(base)
                    key = next((kk for kk in knobs if str(kk) == str(ktype_obj)), ktype_obj)
                    if knobs.get(key) == val:
                        continue
                    knobs[key] = val
                    variants.append(knobs)
            for knobs in variants[:40]:
                if time.time() - t_start > args.budget_s:
                    break
                entry = {"layout": layout, "engine": eid, "source": "knob sweep",
                         "knobs": {str(k): int(v) for k, v in knobs.items()}}
                try:
                    graph.create_execution_plan(eid, knobs)
                    idx = graph.get_execution_plan_count() - 1
                    graph.build_plan_at_index(idx)
                    entry["name"] = str(graph.get_plan_name_at_index(idx))
                    timing, out = sweep.run_plan(graph, idx, args.iters)
                    entry.update(timing)
                    entry["rel_l2_vs_first"] = round(((out - ref).norm() / ref.norm()).item(), 5)
                except Exception as exc:  # noqa: BLE001
                    entry["error"] = str(exc)[:300]
                res["plans"].append(entry)
                print(json.dumps(entry), flush=True)
        del sweep, graph
        torch.cuda.empty_cache()

    ok = [e for e in res["plans"] if "ms" in e]
    ok.sort(key=lambda e: e["ms"])
    print(f"\n{res['device']}, torch {res['torch']}, cuDNN {res['cudnn_backend']}, frontend {res['cudnn_frontend']}")
    print(f"{'layout':6s} {'source':10s} {'ms':>8s} {'TFLOP/s':>8s} {'err':>8s}  name / knobs")
    for e in ok[:25]:
        print(f"{e['layout']:6s} {e['source'][:10]:10s} {e['ms']:8.2f} {e['tflops']:8.0f} "
              f"{e.get('rel_l2_vs_first', 0):8.4f}  {e.get('name', '')[:60]} {e.get('knobs')}")
    for n in res["notes"]:
        print("note:", n[:400])
    if ok:
        res["best"] = ok[0]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""On a GPU: check the Triton experts backend against the torch backend, then time it beside torch grouped_mm.

    PYTHONPATH=. python3 scripts/device_triton.py [--presets a,b] [--tokens 1,64] [--sweep] [--no-check]

Floor and timing follow docs/perf/MEASURING.md: ceilings measured in the same run (streaming read by a persistent
Triton kernel over 4 GiB; torch.matmul 8192^3 bf16), floor = max(routed weight bytes + T·H in/out over read_bw,
flops over mm_rate). T <= 1024 is timed as CUDA-graph replays; each graph runs ROTATE calls on distinct inputs
(different routings) so that repeated replays do not find the weights in L2. Prints a short table last; writes
JSON to $OUT when set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

import torch
import triton

from moekit.bench.baselines import grouped_mm_experts
from moekit.bench.floor import measure_ceilings
from moekit.kernel.torch_experts import TorchExperts
from moekit.kernel.triton_experts import TritonExperts
from moekit.ops.activation import Activation
from moekit.ops.align import AlignResult, align, align_num_blocks
from moekit.ops.grouped_gemm import grouped_gemm
from moekit.ops.heuristics import (
    GemmConfig,
    MoEKernelConfig,
    MoEShape,
    heuristic_config,
)
from moekit.ops.reduce import topk_reduce
from moekit.quant.params import UNQUANTIZED
from moekit.router import select_experts

PRESETS = {  # name: (E, H, I, K, activation, biases)
    "mixtral-8x7b": (8, 4096, 14336, 2, "silu", False),
    "qwen3-30b-a3b": (128, 2048, 768, 8, "silu", False),
    "deepseek-v3": (256, 7168, 2048, 8, "silu", False),
    "gpt-oss-120b": (128, 2880, 2880, 4, "swigluoai", True),
    "olmoe-1b-7b": (64, 2048, 1024, 8, "silu", False),
}
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
ROTATE = 4


def ceilings() -> tuple[float, float]:
    """(read bytes/s, bf16 matmul flop/s), measured now, as ``moekit bench`` measures them."""
    c = measure_ceilings(torch.device("cuda"))
    return c.read_bw, c.mm_rate


def time_us(calls, graph: bool) -> float:
    """Median µs per call of ``calls`` (a list of ROTATE closures run back to back)."""
    def run_all():
        for c in calls:
            c()
    run_all()
    torch.cuda.synchronize()
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run_all()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run_all()
        fn = g.replay
    else:
        fn = run_all
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median") * 1e3 / len(calls)


def sweep_configs(shape: MoEShape) -> dict[str, MoEKernelConfig]:
    """A few hand-picked alternatives to the heuristic around its choice."""
    base = heuristic_config(shape)
    out = {"heur": base}
    g1, g2 = base.gemm1, base.gemm2
    if base.block_m <= 32:
        out["bk64"] = replace(base, gemm1=replace(g1, block_k=64), gemm2=replace(g2, block_k=64))
        out["bk256s3"] = replace(base, gemm1=replace(g1, block_k=256, num_stages=3),
                                 gemm2=replace(g2, block_k=256, num_stages=3))
        out["s5"] = replace(base, gemm1=replace(g1, num_stages=5), gemm2=replace(g2, num_stages=5))
        out["bn1x2"] = replace(base, gemm1=replace(g1, block_n=min(128, g1.block_n * 2)))
        out["bn1/2"] = replace(base, gemm1=replace(g1, block_n=max(16, g1.block_n // 2)))
        out["split2x"] = replace(base, gemm2=replace(g2, split_k=g2.split_k * 2))
        out["w8"] = replace(base, gemm1=replace(g1, num_warps=8), gemm2=replace(g2, num_warps=8))
    else:
        narrow = replace(g1, block_n=128, num_warps=4 if base.block_m == 64 else 8)
        out["bn128"] = replace(base, gemm1=narrow, gemm2=narrow)
        wide = GemmConfig(block_n=256, block_k=64, num_warps=8, num_stages=3)
        out["bm128bn256"] = replace(base, block_m=128, gemm1=wide, gemm2=wide)
        out["bm64bn128"] = replace(base, block_m=64, gemm1=replace(narrow, num_warps=4, num_stages=4),
                                   gemm2=replace(narrow, num_warps=4, num_stages=4))
        out["s4"] = replace(base, gemm1=replace(g1, num_stages=4), gemm2=replace(g2, num_stages=4))
        out["g16"] = replace(base, gemm1=replace(g1, group_m=16), gemm2=replace(g2, group_m=16))
        out["yfp32"] = replace(base, y_fp32=True)
        # Half-height tiles for blocks whose second half is padding (the tail block of each expert).
        out["half"] = replace(base, gemm1=replace(g1, half_tail=True), gemm2=replace(g2, half_tail=True))
        wide_h = replace(wide, half_tail=True)
        out["bm128half"] = replace(base, block_m=128, gemm1=wide_h, gemm2=wide_h)
        n64_h = replace(narrow, num_warps=4, num_stages=4, half_tail=True)
        out["bm64half"] = replace(base, block_m=64, gemm1=n64_h, gemm2=n64_h)
        out["nohalf"] = replace(base, gemm1=replace(g1, half_tail=False), gemm2=replace(g2, half_tail=False))
        out["g32"] = replace(base, gemm1=replace(g1, group_m=32), gemm2=replace(g2, group_m=32))
        # 128-wide K tiles: at 128 x 256 a stage is 96 KB, so only 2 stages fit in shared memory.
        out["bk128s2"] = replace(base, gemm1=replace(g1, block_k=128, num_stages=2),
                                 gemm2=replace(g2, block_k=128, num_stages=2))
        # GEMM1 only on a half-wide tile: twice the programs with the same 128-row blocks.
        out["bn1half"] = replace(base, gemm1=replace(g1, block_n=g1.block_n // 2))
    return out


def stage_calls(sets, w13, w2, b13, b2, act, cfg: MoEKernelConfig):
    """Closures running the pipeline up to each stage (same ops as TritonExperts.run), per input set."""
    E, H, I = w2.shape
    out = {"align": [], "+gemm1": [], "+gemm2": [], "+reduce": []}
    for x, tw, ids in sets:
        T, K = ids.shape
        N = T * K
        nb = align_num_blocks(N, E, cfg.block_m)
        lay = AlignResult(sorted_ids=torch.empty(nb * cfg.block_m, dtype=torch.int32, device=x.device),
                          expert_ids=torch.empty(nb, dtype=torch.int32, device=x.device),
                          num_padded=torch.empty(1, dtype=torch.int32, device=x.device), block_m=cfg.block_m)
        a = torch.empty(N, I, dtype=x.dtype, device=x.device)
        S = cfg.gemm2.split_k
        y = torch.empty(S, N, H, dtype=torch.float32 if cfg.y_fp32 else x.dtype, device=x.device)
        o = torch.empty(T, H, dtype=x.dtype, device=x.device)
        st = [
            lambda ids=ids: align(ids, E, cfg.block_m, out=lay),
            lambda x=x, a=a, K=K, N=N: grouped_gemm(x, w13, lay, a, cfg.gemm1, num_rows=N, a_row_div=K,
                                                    bias_EN=b13, activation=act),
            lambda a=a, y=y, tw=tw, N=N: grouped_gemm(a, w2, lay, y if S > 1 else y[0], cfg.gemm2, num_rows=N,
                                                      bias_EN=b2, weights_N=tw.reshape(-1)),
            lambda y=y, o=o, K=K: topk_reduce(y, K, o),
        ]
        for i, key in enumerate(out):
            out[key].append(lambda st=st, i=i: [f() for f in st[: i + 1]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--sweep-tokens", default="", help="token counts at which to time sweep_configs")
    ap.add_argument("--stage-tokens", default="", help="token counts at which to time the pipeline stage by stage")
    ap.add_argument("--variants", default="", help="only these sweep_configs names (and heur)")
    ap.add_argument("--cells", default="", help="only these preset:T pairs (comma-separated)")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    read_bw, mm_rate = ceilings()
    print(f"{name}: read_bw {read_bw / 1e12:.2f} TB/s, mm_rate {mm_rate / 1e12:.0f} TFLOP/s", flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sweep_tokens = {int(t) for t in args.sweep_tokens.split(",") if t}
    stage_tokens = {int(t) for t in args.stage_tokens.split(",") if t}
    rows, sweeps = [], []
    cells = {(c.split(":")[0], int(c.split(":")[1])) for c in args.cells.split(",") if c}
    presets = [p for p in PRESETS if any(c[0] == p for c in cells)] if cells else args.presets.split(",")
    for preset in presets:
        E, H, I, K, act_name, biases = PRESETS[preset]
        act = Activation(name=act_name)
        w13 = (torch.randn(E, 2 * I, H, device=dev) * H**-0.5).bfloat16()
        w2 = (torch.randn(E, H, I, device=dev) * I**-0.5).bfloat16()
        b13 = (torch.randn(E, 2 * I, device=dev) * 0.1).bfloat16() if biases else None
        b2 = (torch.randn(E, H, device=dev) * 0.1).bfloat16() if biases else None
        expert_bytes = (w13[0].numel() + w2[0].numel()) * 2
        if biases:
            expert_bytes += (2 * I + H) * 2
        for T in (int(t) for t in args.tokens.split(",")):
            if cells and (preset, T) not in cells:
                continue
            sets = []
            for _ in range(ROTATE if T <= 1024 else 1):
                x = torch.randn(T, H, device=dev).bfloat16()
                tw, ids = select_experts(torch.randn(T, E, device=dev), K, renormalize=True)
                sets.append((x, tw, ids))
            kw = dict(activation=act, w13_bias_E2I=b13, w2_bias_EH=b2, expert_map_E=None, quant=UNQUANTIZED,
                      hidden_scale=None, out_dtype=torch.bfloat16)
            triton_exp = TritonExperts()
            err = float("nan")
            if not args.no_check and T <= 4096:
                x, tw, ids = sets[0]
                out = triton_exp.apply(x, w13, w2, tw, ids, **kw)
                ref = TorchExperts().apply(x, w13, w2, tw, ids, **kw)
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
                assert err < 2e-2 and torch.isfinite(out).all(), (preset, T, err)
            active = sum(int(torch.unique(s[2]).numel()) for s in sets) / len(sets)
            nbytes = active * expert_bytes + 2 * T * H * 2
            flops = 2 * T * K * 3 * H * I
            floor = max(nbytes / read_bw, flops / mm_rate) * 1e6
            graph = T <= 1024
            shape = MoEShape(num_tokens=T, top_k=K, num_experts=E, hidden=H, inter=I, num_sms=sms)
            configs = sweep_configs(shape) if T in sweep_tokens else {"heur": None}
            if args.variants:
                keep = {"heur", *args.variants.split(",")}
                configs = {k: v for k, v in configs.items() if k in keep}
            times = {}
            ref_out = None
            for cname, cfg in configs.items():
                exp = TritonExperts(cfg)
                try:
                    if len(configs) > 1:  # every variant must agree with the heuristic's output
                        x, tw, ids = sets[0]
                        o = exp.apply(x, w13, w2, tw, ids, **kw).float()
                        if ref_out is None:
                            ref_out = o
                        verr = float((o - ref_out).norm() / ref_out.norm())
                        assert verr < 2e-2 and torch.isfinite(o).all(), f"{cname} disagrees: {verr:.2e}"
                    times[cname] = time_us([lambda s=s, exp=exp, w13=w13, w2=w2: exp.apply(s[0], w13, w2, s[1], s[2],
                                                                                       **kw)
                                            for s in sets], graph)
                except Exception as exc:  # a sweep variant too big for shared memory, or not compiling here
                    print(f"variant {cname} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    times[cname] = float("inf")
            if T in stage_tokens:
                cum = {k: time_us(v, graph) for k, v in stage_calls(sets, w13, w2, b13, b2, act,
                                                                     heuristic_config(shape)).items()}
                prev, parts = 0.0, []
                for k, v in cum.items():
                    parts.append(f"{k} {v - prev:.1f}")
                    prev = v
                print(f"stages {preset} T={T}: " + ", ".join(parts) + f" (sum {prev:.1f} us)", flush=True)
            us = times["heur"]
            base = time_us([lambda s=s, w13=w13, w2=w2, b13=b13, b2=b2: grouped_mm_experts(
                s[0], w13, w2, s[1], s[2], activation=act, w13_bias_E2I=b13, w2_bias_EH=b2) for s in sets], graph)
            rows.append(dict(preset=preset, T=T, us=us, floor_us=floor, eff=floor / us, base_us=base,
                             speedup=base / us, err=err, card=name))
            if len(times) > 1:
                sweeps.append(dict(preset=preset, T=T, heur=heuristic_config(shape).to_dict(),
                                   times={k: round(v, 2) for k, v in times.items()}))
                print(f"sweep {preset} T={T}: " + " ".join(f"{k}={v:.1f}" for k, v in times.items()), flush=True)
            print(f"{preset:14s} T={T:6d} {us:9.1f}us floor {floor:9.1f} eff {floor / us:5.1%} "
                  f"grouped_mm {base:9.1f} x{base / us:4.2f} err {err:.1e}", flush=True)
        del w13, w2, b13, b2
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "device_triton.json"), "w") as f:
            json.dump(dict(card=name, read_bw=read_bw, mm_rate=mm_rate, rows=rows, sweeps=sweeps), f, indent=1)
    print(f"\n{name} read_bw {read_bw / 1e12:.2f} TB/s mm {mm_rate / 1e12:.0f} TF/s")
    print(f"{'preset':14s} {'T':>6s} {'us':>9s} {'%floor':>7s} {'x gmm':>6s}")
    for r in rows:
        print(f"{r['preset']:14s} {r['T']:6d} {r['us']:9.1f} {r['eff']:7.1%} {r['speedup']:6.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

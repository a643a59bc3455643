"""Probe: launch configurations of the Triton 8-bit (w8a8) path, per preset, scheme and T, on one GPU.

    python3 benchmarks/probes/fp8_tune.py [--cells deepseek-v3:fp8_block,...] [--tokens 1,16,...] [--out F.jsonl]
                                          [--heuristic-only]

For each cell it times the heuristic and a grid of candidates through ``moekit.bench.run.bench_point`` (the
bench's own timing, rotation, floor and error column: the whole layer call, activation quantization included),
with ``choose_config`` of the Triton backend replaced by the candidate. Also the bf16 layer (heuristic) of the
same run, so the fp8/bf16 ratio is same-run. One JSON line per point goes to ``--out`` as it is measured.
Not a unit test and not the bench; what it finds goes into ``moekit.ops.heuristics`` and docs/perf/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import torch
import triton

import moekit.kernel.triton_experts as triton_experts
from moekit.bench.floor import measure_ceilings
from moekit.bench.run import bench_point, make_weights
from moekit.bench.shapes import PRESETS
from moekit.ops.heuristics import GemmConfig, MoEKernelConfig, choose_config

CELLS = "deepseek-v3:fp8_block,qwen3-30b-a3b:fp8_block,mixtral-8x7b:fp8_block,mixtral-8x7b:fp8_channel"
TOKENS = "1,4,16,64,256,1024,4096,16384"


def candidates(base: MoEKernelConfig, block_scales: bool, big_t: bool) -> dict[str, MoEKernelConfig]:
    g1, g2 = base.gemm1, base.gemm2
    out = {"heuristic": base}
    if base.block_m <= 32:
        out["s6"] = replace(base, gemm1=replace(g1, num_stages=6), gemm2=replace(g2, num_stages=6))
        out["s6g1"] = replace(base, gemm1=replace(g1, num_stages=6))
        out["s6g2"] = replace(base, gemm2=replace(g2, num_stages=6))
        out["bn2x2_s6"] = replace(base, gemm1=replace(g1, num_stages=6),
                                  gemm2=replace(g2, block_n=min(256, 2 * g2.block_n), num_stages=6))
        # 256-byte runs of each weight row a K step (a bf16 row's bytes at BLOCK_K 128; block scales: two
        # 128-wide sub-tiles a step, each scaled on its own).
        for stages in (3, 4):
            out[f"dec_k256s{stages}"] = replace(base, gemm1=replace(g1, block_k=256, num_stages=stages),
                                                gemm2=replace(g2, block_k=256, num_stages=stages))
        out["dec_k256g1s3"] = replace(base, gemm1=replace(g1, block_k=256, num_stages=3))
        # 64-row tiles at decode (wgmma, which needs 64 rows a warpgroup, instead of 16-row mma.sync tiles that
        # load every weight tile from shared memory into registers): vLLM's default 8-bit block tile, and around it.
        v = GemmConfig(block_n=128, block_k=128, group_m=32, num_warps=4, num_stages=3)
        dec64 = MoEKernelConfig(block_m=64, gemm1=v, gemm2=v, y_fp32=base.y_fp32)
        out["dec_m64s3g32"] = dec64
        out["dec_m64s4"] = replace(dec64, gemm1=replace(v, num_stages=4), gemm2=replace(v, num_stages=4))
        out["dec_m64s4g2n64"] = replace(dec64, gemm1=replace(v, num_stages=4),
                                        gemm2=replace(v, block_n=64, num_stages=4))
        out["dec_m64s5"] = replace(dec64, gemm1=replace(v, num_stages=5), gemm2=replace(v, num_stages=5))
    if base.block_m >= 32:  # mid and prefill: around 64 x 128 x 128, 4 warps, 4 stages
        v = GemmConfig(block_n=128, block_k=128, group_m=8, num_warps=4, num_stages=4)
        m64 = MoEKernelConfig(block_m=64, gemm1=v, gemm2=v, y_fp32=False)
        out["m64n128k128w4s4"] = m64
        out["m64s3"] = replace(m64, gemm1=replace(v, num_stages=3), gemm2=replace(v, num_stages=3))
        out["m64s5"] = replace(m64, gemm1=replace(v, num_stages=5), gemm2=replace(v, num_stages=5))
        out["m64g32"] = replace(m64, gemm1=replace(v, group_m=32), gemm2=replace(v, group_m=32))
        out["m64n64"] = replace(m64, gemm1=replace(v, block_n=64), gemm2=replace(v, block_n=64))
        out["m64g2n64"] = replace(m64, gemm2=replace(v, block_n=64))
        out["m32n128k128w4s4"] = replace(m64, block_m=32)
        for stages in (3, 4):  # block scales: two 128-wide sub-tiles a step, each scaled on its own
            k256 = replace(v, block_k=256, num_stages=stages)
            out[f"m64k256s{stages}"] = replace(m64, gemm1=k256, gemm2=k256)
        if not block_scales:
            out["m128n128k128w8s4"] = replace(m64, block_m=128, gemm1=replace(v, num_warps=8, half_tail=True),
                                              gemm2=replace(v, num_warps=8, half_tail=True))
            k256w8 = replace(v, block_k=256, num_warps=8, num_stages=3, half_tail=True)
            out["m128k256w8s3"] = replace(m64, block_m=128, gemm1=k256w8, gemm2=k256w8)
        if big_t:
            out = {k: v for k, v in out.items() if k in ("heuristic", "m64n128k128w4s4", "m64s3", "m64g32",
                                                         "m128n128k128w8s4", "m64k256s3", "m64k256s4",
                                                         "m128k256w8s3")}
    seen: dict[MoEKernelConfig, str] = {}
    for name, cfg in out.items():
        seen.setdefault(cfg, name)
    return {name: cfg for cfg, name in seen.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cells", default=CELLS)
    p.add_argument("--tokens", default=TOKENS)
    p.add_argument("--out", default=None)
    p.add_argument("--heuristic-only", action="store_true", help="time only what ships (the table's run)")
    p.add_argument("--only", default=None, help="comma-separated candidate names to time beside the heuristic")
    args = p.parse_args()
    dev = torch.device("cuda")
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__} triton {triton.__version__}", flush=True)
    ceil_bf16 = measure_ceilings(dev)
    ceil_q = {}
    sink = open(args.out, "a") if args.out else None
    summary = []
    for cell in args.cells.split(","):
        name, scheme = cell.split(":")
        shape = PRESETS[name]
        if scheme not in ceil_q:
            ceil_q[scheme] = measure_ceilings(dev, scheme)
            print(f"ceilings {scheme}: read {ceil_q[scheme].read_bw / 1e12:.2f} TB/s, mm "
                  f"{ceil_q[scheme].mm_rate / 1e12:.0f} TFLOP/s; bf16 mm {ceil_bf16.mm_rate / 1e12:.0f}", flush=True)
        weights = make_weights(shape, torch.bfloat16, dev, 0, scheme)
        for t in [int(s) for s in args.tokens.split(",")]:
            bf = bench_point(shape, t, backend="triton", dtype=torch.bfloat16, device=dev, ceilings=ceil_bf16,
                             weights={k: v for k, v in weights.items() if k != "quantized"}, baselines=False)
            real_choose = triton_experts.choose_config
            base = None

            def capture(s, _real=real_choose):
                nonlocal base
                base = _real(s)
                return base

            triton_experts.choose_config = capture
            heur = bench_point(shape, t, backend="triton", dtype=torch.bfloat16, device=dev, ceilings=ceil_q[scheme],
                               weights=weights, baselines=False, quant=scheme)
            results = {"heuristic": (heur.moekit_us, heur.max_rel_err)}
            for cname, cfg in candidates(base, scheme.endswith("block"), t >= 16384).items():
                if cname == "heuristic" or args.heuristic_only or (args.only and cname not in args.only.split(",")):
                    continue
                triton_experts.choose_config = lambda s, _c=cfg: _c
                try:
                    r = bench_point(shape, t, backend="triton", dtype=torch.bfloat16, device=dev,
                                    ceilings=ceil_q[scheme], weights=weights, baselines=False, quant=scheme)
                    results[cname] = (r.moekit_us, r.max_rel_err)
                except Exception as e:  # a tile that does not fit: record and go on
                    results[cname] = (math.inf, math.nan)
                    print(f"  {cname}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            triton_experts.choose_config = real_choose
            best = min(results, key=lambda n: results[n][0] if results[n][1] < 0.1 else math.inf)
            fl = heur.floor_us
            line = {"preset": name, "scheme": scheme, "tokens": t, "floor_us": fl, "bf16_us": bf.moekit_us,
                    "bf16_eff": bf.efficiency, "heuristic": base.to_dict(), "best": best,
                    "best_cfg": candidates(base, scheme.endswith("block"), t >= 16384)[best].to_dict(),
                    "times": {n: v[0] for n, v in results.items()}, "errs": {n: v[1] for n, v in results.items()}}
            if sink:
                sink.write(json.dumps(line) + "\n")
                sink.flush()
            row = (f"{name:14s} {scheme:11s} T={t:6d} floor {fl:9.1f} bf16 {bf.moekit_us:9.1f} heur "
                   f"{results['heuristic'][0]:9.1f} ({100 * fl / results['heuristic'][0]:3.0f}%) best {best:18s} "
                   f"{results[best][0]:9.1f} ({100 * fl / results[best][0]:3.0f}%) x bf16 "
                   f"{bf.moekit_us / results[best][0]:4.2f} err {results[best][1]:.3f}")
            print(row + "  | " + " ".join(f"{n}={v[0]:.0f}" for n, v in results.items()), flush=True)
            summary.append(row)
        del weights
        torch.cuda.empty_cache()
    print("\n".join(["", "summary:"] + summary))


if __name__ == "__main__":
    main()

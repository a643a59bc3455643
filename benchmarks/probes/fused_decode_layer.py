"""Probe: the bf16 layer at decode sizes, unfused (align -> GEMM 1 -> GEMM 2 -> reduce) against the fused decode
(``moekit.ops.fused_decode``: both GEMMs in one launch per routed row and slice of I, then the reduce) over a
grid of its tiles, on one GPU.

    python3 benchmarks/probes/fused_decode_layer.py [--presets a,b] [--tokens 1,2,4] [--out F]

Each point goes through ``moekit.bench.run.bench_point`` (the bench's timing, floor and error column) with
``choose_config`` of the Triton backend replaced. Not a unit test and not the bench; what it finds goes into
``moekit.ops.heuristics`` and docs/perf/NOTES.md.
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
from moekit.ops.heuristics import FusedDecodeConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="qwen3-30b-a3b,olmoe-1b-7b,gpt-oss-120b,deepseek-v3,mixtral-8x7b")
    p.add_argument("--tokens", default="1,2,4")
    p.add_argument("--grid", default="i16,i32,i64,i32h64,i32w8,i64w8,i32s6",
                   help="variants: i<block_i>[h<block_h>][k<block_k>][w<warps>][s<stages>]")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__} triton {triton.__version__}", flush=True)
    ceil = measure_ceilings(dev)
    print(f"ceilings: read {ceil.read_bw / 1e12:.2f} TB/s, matmul {ceil.mm_rate / 1e12:.0f} TFLOP/s", flush=True)
    sink = open(args.out, "a") if args.out else None
    real_choose = triton_experts.choose_config
    rows = []
    for preset in args.presets.split(","):
        shape = PRESETS[preset]
        weights = make_weights(shape, torch.bfloat16, dev, 0)
        for t in [int(s) for s in args.tokens.split(",")]:
            base = None

            def unfused(s, _real=real_choose):
                nonlocal base
                base = replace(_real(s), fused=None)
                return base

            res = {}
            for name in ["unfused", "heuristic"] + args.grid.split(","):
                if name == "unfused":
                    triton_experts.choose_config = unfused
                elif name == "heuristic":
                    triton_experts.choose_config = real_choose
                else:
                    triton_experts.choose_config = lambda s, _c=replace(base, fused=_parse(name)): _c
                try:
                    r = bench_point(shape, t, backend="triton", dtype=torch.bfloat16, device=dev, ceilings=ceil,
                                    weights=weights, baselines=False)
                    res[name] = (r.moekit_us, r.max_rel_err, r.floor_us)
                except Exception as e:  # report and go on
                    res[name] = (math.inf, math.nan, math.nan)
                    print(f"  {preset} T={t} {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            triton_experts.choose_config = real_choose
            fl = res["unfused"][2]
            ok = {n: v[0] for n, v in res.items() if v[1] < 0.05}
            best = min(ok, key=ok.get)
            line = {"preset": preset, "tokens": t, "floor_us": fl, "times": {n: v[0] for n, v in res.items()},
                    "errs": {n: v[1] for n, v in res.items()}, "best": best}
            if sink:
                sink.write(json.dumps(line) + "\n")
                sink.flush()
            u = res["unfused"][0]
            row = (f"{preset:14s} T={t:3d} floor {fl:7.1f} unfused {u:7.1f} ({100 * fl / u:3.0f}%) "
                   f"heur {res['heuristic'][0]:7.1f} best {best:8s} {res[best][0]:7.1f} ({100 * fl / res[best][0]:3.0f}%)"
                   f" err {res[best][1]:.3f}")
            print(row + "  | " + " ".join(f"{n}={v[0]:.1f}" for n, v in res.items()), flush=True)
            rows.append(row)
        del weights
        torch.cuda.empty_cache()
    print("\n".join(["", "summary:"] + rows))


def _parse(name: str) -> FusedDecodeConfig:
    """"i32h64w8" -> FusedDecodeConfig(block_i=32, block_h=64, num_warps=8)."""
    keys = {"i": "block_i", "h": "block_h", "k": "block_k", "w": "num_warps", "s": "num_stages"}
    fields, key, num = {}, None, ""
    for ch in name + "$":
        if ch.isdigit():
            num += ch
            continue
        if key is not None:
            fields[keys[key]] = int(num)
        key, num = ch, ""
    return FusedDecodeConfig(**fields)


if __name__ == "__main__":
    main()

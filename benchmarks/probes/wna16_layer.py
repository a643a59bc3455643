"""Probe: the weight-only 4-bit layer (w4a16_g128) on the Triton backend, each ``grouped_gemm_wna16`` variant
forced for both GEMMs against the heuristic's choice, beside the bf16 layer of the same weights, on one GPU.

    python3 benchmarks/probes/wna16_layer.py [--presets a,b] [--tokens 1,4,...] [--scheme w4a16_g128] [--out F]

Each point goes through ``moekit.bench.run.bench_point`` (the bench's timing, 4-bit floor and error column), with
``choose_config`` of the Triton backend replaced by the heuristic's config with ``variant`` set. Not a unit test
and not the bench; what it finds goes into ``moekit.ops.heuristics`` and docs/perf/NOTES.md.
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

VARIANTS = ("gemv", "dequant", "dequant_bytes", "dequant_split", "dequant_pairs", "gluon_pairs", "postscale")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="mixtral-8x7b,qwen3-30b-a3b,deepseek-v3")
    p.add_argument("--tokens", default="1,4,16,64,256,1024,4096")
    p.add_argument("--scheme", default="w4a16_g128")
    p.add_argument("--out", default=None)
    p.add_argument("--block-k", default="", help="comma list of K tiles to try with each variant (default: the "
                   "heuristic's)")
    p.add_argument("--block-n", default="1", help="comma list of factors on the heuristic's BLOCK_N of both GEMMs "
                   "(0.5, 1, 2) to try with each variant and K tile")
    p.add_argument("--block-m", default="", help="comma list of BLOCK_M (rows a block) to try with each of the "
                   "above (default: the heuristic's)")
    p.add_argument("--warps", default="", help="comma list of num_warps to try (default: the heuristic's)")
    p.add_argument("--stages", default="", help="comma list of num_stages to try with each of the above (default: "
                   "the heuristic's)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
                   + "; a dequant variant with '+swap' swaps the MMA's operands (GemmConfig.swap_ab)")
    args = p.parse_args()
    dev = torch.device("cuda")
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__} triton {triton.__version__}", flush=True)
    ceil_bf16 = measure_ceilings(dev)
    ceil_q = measure_ceilings(dev, args.scheme)
    sink = open(args.out, "a") if args.out else None
    rows = []
    real_choose = triton_experts.choose_config
    # Which GEMMs "gluon_pairs" ran in Gluon (and why not where it fell back to "dequant_pairs"), by K.
    import moekit.ops.grouped_gemm_wna16 as op
    gluon_why = {}
    real_unsupported = op.gluon_unsupported

    def unsupported(*a, **kw):
        why = real_unsupported(*a, **kw)
        gluon_why[a[6]] = why or "gluon"
        return why

    op.gluon_unsupported = unsupported
    for preset in args.presets.split(","):
        shape = PRESETS[preset]
        weights = make_weights(shape, torch.bfloat16, dev, 0, args.scheme)
        for t in [int(s) for s in args.tokens.split(",")]:
            bf = bench_point(shape, t, backend="triton", dtype=torch.bfloat16, device=dev, ceilings=ceil_bf16,
                             weights={k: v for k, v in weights.items() if k != "quantized"}, baselines=False)
            base = None

            def capture(s, _real=real_choose):
                nonlocal base
                base = _real(s)
                return base

            triton_experts.choose_config = capture
            heur = bench_point(shape, t, backend="triton", dtype=torch.bfloat16, device=dev, ceilings=ceil_q,
                               weights=weights, baselines=False, quant=args.scheme)
            res = {"heuristic": (heur.moekit_us, heur.max_rel_err)}
            block_ks = [int(b) for b in args.block_k.split(",")] if args.block_k else [None]
            factors = [float(f) for f in args.block_n.split(",")]
            stages = [int(x) for x in args.stages.split(",")] if args.stages else [None]
            block_ms = [int(x) for x in args.block_m.split(",")] if args.block_m else [None]
            warps = [int(x) for x in args.warps.split(",")] if args.warps else [None]
            for v, bk, fn, st, bm, nw in [(v, bk, f, st, bm, nw) for v in args.variants.split(",") for bk in block_ks
                                          for f in factors for st in stages for bm in block_ms for nw in warps]:
                if (v == "gemv" and t >= 256) or (v == "postscale" and t >= 1024):
                    continue  # no tensor cores at prefill / the old design at prefill: minutes for nothing
                ks = {} if bk is None else {"block_k": bk}
                if st is not None:
                    ks["num_stages"] = st
                if nw is not None:
                    ks["num_warps"] = nw
                ks["swap_ab"] = v.endswith("+swap")
                kind = v.removesuffix("+swap")
                cfg = replace(base, gemm1=replace(base.gemm1, variant=kind, block_n=int(base.gemm1.block_n * fn), **ks),
                              gemm2=replace(base.gemm2, variant=kind, block_n=int(base.gemm2.block_n * fn), **ks))
                if bm is not None:
                    cfg = replace(cfg, block_m=bm)
                name = ((v if bk is None else f"{v}/k{bk}") + ("" if fn == 1 else f"/n*{fn:g}")
                        + ("" if st is None else f"/s{st}") + ("" if bm is None else f"/m{bm}")
                        + ("" if nw is None else f"/w{nw}"))
                triton_experts.choose_config = lambda s, _c=cfg: _c
                gluon_why.clear()
                try:
                    r = bench_point(shape, t, backend="triton", dtype=torch.bfloat16, device=dev, ceilings=ceil_q,
                                    weights=weights, baselines=False, quant=args.scheme)
                    res[name] = (r.moekit_us, r.max_rel_err)
                    if gluon_why:
                        print(f"  {preset} T={t} {name}: " + ", ".join(f"K={k}: {w}" for k, w in gluon_why.items()),
                              flush=True)
                except Exception as e:  # report and go on
                    res[name] = (math.inf, math.nan)
                    print(f"  {preset} T={t} {name}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            triton_experts.choose_config = real_choose
            ok = {n: us for n, (us, err) in res.items() if err < 0.05}
            best = min(ok, key=ok.get) if ok else "heuristic"
            fl = heur.floor_us
            line = {"preset": preset, "tokens": t, "floor_us": fl, "bf16_us": bf.moekit_us,
                    "bf16_floor_us": bf.floor_us, "heuristic": base.to_dict(), "best": best,
                    "times": {n: v[0] for n, v in res.items()}, "errs": {n: v[1] for n, v in res.items()}}
            if sink:
                sink.write(json.dumps(line) + "\n")
                sink.flush()
            row = (f"{preset:14s} T={t:5d} floor {fl:8.1f} bf16 {bf.moekit_us:8.1f} heur({base.gemm1.variant}) "
                   f"{res['heuristic'][0]:8.1f} ({100 * fl / res['heuristic'][0]:3.0f}%) best {best:13s} "
                   f"{res[best][0]:8.1f} ({100 * fl / res[best][0]:3.0f}%, x bf16 {bf.moekit_us / res[best][0]:4.2f})"
                   f" err {res[best][1]:.3f}")
            print(row + "  | " + " ".join(f"{n}={v[0]:.0f}" for n, v in res.items()), flush=True)
            rows.append(row)
        del weights
        torch.cuda.empty_cache()
    print("\n".join(["", "summary:"] + rows))


if __name__ == "__main__":
    main()

"""Probe: the WNA16 grouped GEMM's variants (postscale / dequant / gemv, 4-bit codes, g = 128, symmetric) and a few
tiles against moekit's bf16 grouped GEMM, op level, one GPU.

    python3 benchmarks/probes/wna16_timing.py [--presets mixtral-8x7b,...] [--tokens 1,16,64,4096] [--bits 4]

Per preset of ``moekit.bench.shapes.PRESETS`` and T: GEMM 1 (x @ w13 with silu fused) and GEMM 2 (a @ w2 with the
routing weight, split-K partials) each timed alone (median; CUDA-graph replays for T <= 64, eager above) for the
heuristic config and at most 5 others (``variants``), beside the bf16 kernel (heuristic) on the same values
dequantized to bf16, same layout. GB/s counts the weight bytes of the experts that get a row (codes + scales;
activations and outputs left out); ``floor`` is the 4-bit floor (those bytes at READ_BW) over the time; ``err``
is the max error of that GEMM's output relative to the bf16 kernel's (bf16 rounding of the dequantized weights;
above 0.1 the line says WRONG and the candidate cannot win). A candidate that fails to compile or launch is
reported and skipped. One summary line per (preset, T): the best candidate. Weights are random codes and scales,
routing random. Meant to run in under 3 minutes on an H200 (mostly compilation). Not a unit test; what it finds
goes into ``moekit.ops.heuristics._wna16_config`` and docs/perf/NOTES.md.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
import triton.testing

from moekit.bench.shapes import PRESETS
from moekit.ops.activation import Activation
from moekit.ops.align import align, row_per_block
from moekit.ops.gluon_wna16 import gluon_decode
from moekit.ops.grouped_gemm import grouped_gemm
from moekit.ops.grouped_gemm_wna16 import grouped_gemm_wna16
from moekit.ops.heuristics import GemmConfig, MoEKernelConfig, MoEShape, choose_config
from moekit.ops.quantize_wna16 import WNA16Weight, dequantize_wna16
from moekit.testing import rel_errors

READ_BW = 4.45e12  # H200 streaming read measured by MEASURING.md's method (the 4-bit floor's bandwidth)
GROUP = 128
SILU = Activation(name="silu")
DEVICE = "cuda"  # a dry run of the probe's logic in the interpreter swaps this (and bench) out


def _both(cfg: MoEKernelConfig, **changes) -> MoEKernelConfig:
    """``cfg`` with the same GemmConfig fields changed in both GEMMs."""
    return replace(cfg, gemm1=replace(cfg.gemm1, **changes), gemm2=replace(cfg.gemm2, **changes))


def variants(base: MoEKernelConfig, bits: int) -> dict[str, MoEKernelConfig]:
    """At most 6 candidates a point (compilation dominates the run): the heuristic, the other kernel variants on
    its tiles, and a few tiles around it. Names: variant, then what differs from the heuristic tile (decode) or
    the tile (prefill)."""
    g1, g2 = base.gemm1, base.gemm2
    out = {"heuristic": base}
    if base.block_m <= 32:  # decode: the variants on the decode tile, K tile width, the old kernel
        out["dequant"] = _both(base, variant="dequant")
        out["dequant k/2"] = _both(base, variant="dequant", block_k=g1.block_k // 2)
        out["dequant_bytes"] = _both(base, variant="dequant_bytes")
        out["gemv"] = _both(base, variant="gemv")
        # gemv: twice the programs (narrower N tiles, GEMM2 split twice as far; GEMM1 cannot split K)
        out["gemv n/2"] = replace(base, gemm1=replace(g1, variant="gemv", block_n=max(16, g1.block_n // 2)),
                                  gemm2=replace(g2, variant="gemv", split_k=2 * g2.split_k))
        out["postscale k/2"] = _both(base, variant="postscale", block_k=g1.block_k // 2)  # the old kernel's best
    else:  # prefill: dequant on the bf16 prefill shapes, K width, the old kernel's best tile
        d = GemmConfig(block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=4, variant="dequant")
        out["dequant m64n128"] = MoEKernelConfig(block_m=64, gemm1=d, gemm2=d, y_fp32=False)
        out["dequant m64n128k128"] = _both(out["dequant m64n128"], block_k=128, num_stages=3)
        w = GemmConfig(block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3, half_tail=True,
                       variant="dequant")
        out["dequant m128n128w8"] = MoEKernelConfig(block_m=128, gemm1=w, gemm2=w, y_fp32=False)
        out["dequant m128n256w8"] = _both(out["dequant m128n128w8"], block_n=256)
        p = GemmConfig(block_n=128, block_k=128 if bits == 4 else 64, group_m=8, num_warps=4, num_stages=4,
                       variant="postscale")
        out["postscale m64n128"] = MoEKernelConfig(block_m=64, gemm1=p, gemm2=p, y_fp32=False)
        out["dequant_bytes"] = _both(base, variant="dequant_bytes")
    seen: dict[MoEKernelConfig, str] = {}
    for name, cfg in out.items():
        seen.setdefault(cfg, name)
    return {name: cfg for cfg, name in seen.items()}


def random_wna16(e: int, n: int, k: int, bits: int, dev: torch.device) -> WNA16Weight:
    width = k // 2 if bits == 4 else k
    q = torch.randint(0, 256, (e, n, width), dtype=torch.uint8, device=dev)
    s = (torch.rand(e, n, k // GROUP, device=dev) * 2e-3 + 1e-3).to(torch.bfloat16)
    return WNA16Weight(q, s, None, bits, GROUP, k)


def to_bf16(w: WNA16Weight) -> torch.Tensor:
    """Per expert, so the fp32 temporaries stay one expert large."""
    return torch.stack([dequantize_wna16(WNA16Weight(w.qweight[e], w.scales[e], None, w.bits, w.group_size, w.k))
                        .to(torch.bfloat16) for e in range(w.qweight.shape[0])])


def nbytes(w: WNA16Weight, experts: int) -> int:
    per_expert = (w.qweight[0].numel() * w.qweight.element_size() + w.scales[0].numel() * w.scales.element_size())
    return experts * per_expert


def bench(fn, graph: bool) -> float:
    fn()  # compile outside the timing
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3
    return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median") * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="mixtral-8x7b,qwen3-30b-a3b,deepseek-v3")
    p.add_argument("--tokens", default="1,16,64,4096")
    p.add_argument("--bits", type=int, default=4, choices=(4, 8))
    p.add_argument("--only", default="", help="comma list: time only the candidates whose name contains one")
    args = p.parse_args()
    dev = torch.device(DEVICE)
    bits = args.bits
    scheme = f"w{bits}a16_g{GROUP}"
    start = time.perf_counter()
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__} triton {triton.__version__}  {scheme}")
    print(f"{'preset':14s} {'T':>5s} {'gemm':4s} {'config':20s} {'us':>8s} {'GB/s':>7s} {'floor':>6s} "
          f"{'bf16 us':>8s} {'x bf16':>6s}  err")
    summary = []
    for name in args.presets.split(","):
        shape = PRESETS[name]
        num_experts, hidden, inter, top_k = (shape.num_experts, shape.hidden_size, shape.intermediate_size,
                                             shape.top_k)
        torch.manual_seed(0)
        w13 = random_wna16(num_experts, 2 * inter, hidden, bits, dev)
        w2 = random_wna16(num_experts, hidden, inter, bits, dev)
        w13_bf, w2_bf = to_bf16(w13), to_bf16(w2)
        for num_tokens in [int(t) for t in args.tokens.split(",")]:
            graph = num_tokens <= 64
            num_rows = num_tokens * top_k
            ids = torch.rand(num_tokens, num_experts, device=dev).argsort(dim=1)[:, :top_k].int().contiguous()
            active = int(ids.unique().numel())
            x = torch.randn(num_tokens, hidden, device=dev, dtype=torch.bfloat16) / 10
            weights = torch.rand(num_rows, device=dev)
            layouts: dict[int, object] = {}

            def layout_for(block_m: int):
                if block_m not in layouts:
                    layouts[block_m] = (row_per_block(ids, block_m) if num_tokens == 1
                                        else align(ids, num_experts, block_m))
                return layouts[block_m]

            def run(cfg: MoEKernelConfig, quant: bool):
                """The two GEMMs' callables and their outputs (a, the summed y) for one config."""
                lay = layout_for(cfg.block_m)
                a = torch.empty(num_rows, inter, device=dev, dtype=torch.bfloat16)
                split = cfg.gemm2.split_k
                y = torch.empty(split, num_rows, hidden, device=dev,
                                dtype=torch.float32 if cfg.y_fp32 else torch.bfloat16)
                y_arg = y if split > 1 else y[0]
                gemm = grouped_gemm_wna16 if quant else grouped_gemm
                b13, b2 = (w13, w2) if quant else (w13_bf, w2_bf)

                def g1():
                    gemm(x, b13, lay, a, cfg.gemm1, num_rows=num_rows, a_row_div=top_k, activation=SILU)

                def g2():
                    gemm(a, b2, lay, y_arg, cfg.gemm2, num_rows=num_rows, weights_N=weights)

                return g1, g2, a, y

            base_shape = MoEShape(num_tokens=num_tokens, top_k=top_k, num_experts=num_experts, hidden=hidden,
                                  inter=inter, num_sms=torch.cuda.get_device_properties(dev).multi_processor_count)
            bf1, bf2, a_bf, y_bf = run(choose_config(base_shape), quant=False)
            t_bf = (bench(bf1, graph), bench(bf2, graph))
            floor_us = [nbytes(w, active) / READ_BW * 1e6 for w in (w13, w2)]
            # What the layer's heuristic sees on this device (bf16 activations: the Gluon tiles where it runs).
            heur = choose_config(replace(base_shape, weights=scheme, gluon=gluon_decode(dev, torch.bfloat16)))
            totals: dict[str, float] = {}
            point_start = time.perf_counter()
            for cname, cfg in variants(heur, bits).items():
                if args.only and cname != "heuristic" and not any(o in cname for o in args.only.split(",")):
                    continue
                label = f"{cname} ({cfg.gemm1.variant})" if cname == "heuristic" else cname
                try:
                    q1, q2, a_q, y_q = run(cfg, quant=True)
                    t = (bench(q1, graph), bench(q2, graph))
                    # Against the bf16 kernel on the same weights rounded to bf16: ~1e-2 is rounding, a wrong
                    # variant shows as O(1).
                    errs = (rel_errors(a_q, a_bf)[0], rel_errors(y_q.float().sum(0), y_bf.float().sum(0))[0])
                except Exception as e:  # a tile that does not fit (shared memory, registers), a compile error
                    print(f"  {name} T={num_tokens} {label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                wrong = max(errs) > 0.1 or errs != errs  # NaN
                for i in range(2):
                    gbs = nbytes((w13, w2)[i], active) / (t[i] * 1e-6) / 1e9
                    print(f"{name:14s} {num_tokens:5d} {'g' + str(i + 1):4s} {label:20s} {t[i]:8.1f} {gbs:7.0f} "
                          f"{100 * floor_us[i] / t[i]:5.0f}% {t_bf[i]:8.1f} {t_bf[i] / t[i]:6.2f}  {errs[i]:.4f}"
                          f"{'  WRONG' if wrong else ''}", flush=True)
                if not wrong:
                    totals[label] = sum(t)
            line = f"{name:14s} T={num_tokens:5d} active {active:3d}: bf16 {sum(t_bf):8.1f} us"
            print(f"  ({time.perf_counter() - point_start:.0f} s for this point)", flush=True)
            if totals:
                heur_t = next((v for k, v in totals.items() if k.startswith("heuristic")), float("nan"))
                winner = min(totals, key=totals.get)
                line += (f", heuristic {heur_t:8.1f} us ({sum(t_bf) / heur_t:.2f}x), best {winner} "
                         f"{totals[winner]:8.1f} us ({sum(t_bf) / totals[winner]:.2f}x, "
                         f"{100 * sum(floor_us) / totals[winner]:.0f}% of the 4-bit floor)")
            else:
                line += ", no candidate ran correctly (FAILED or WRONG above)"
            summary.append(line)
            print(line, flush=True)
        del w13, w2, w13_bf, w2_bf
        torch.cuda.empty_cache()
    print("\nsummary (GEMM 1 + GEMM 2; floor = packed codes + scales of the active experts at "
          f"{READ_BW / 1e12:.2f} TB/s):")
    print("\n".join(summary))
    print(f"elapsed {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

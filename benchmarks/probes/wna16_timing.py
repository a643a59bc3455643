"""Probe: the WNA16 grouped GEMM (4-bit codes, g = 128, symmetric) against moekit's bf16 grouped GEMM, op level,
one GPU.

    python3 benchmarks/probes/wna16_timing.py [--presets mixtral-8x7b,...] [--tokens 1,16,64,4096] [--bits 4]

Per preset of ``moekit.bench.shapes.PRESETS`` and T: GEMM 1 (x @ w13 with silu fused) and GEMM 2 (a @ w2 with the
routing weight, split-K partials) each timed alone (median; CUDA-graph replays for T <= 64, eager above) for the
heuristic tile and a few alternatives, beside the bf16 kernel (heuristic) on the same values dequantized to bf16,
same layout. GB/s counts the weight bytes of the experts that get a row (codes + scales; activations and outputs
left out), % is of the H200's 4.8 TB/s; ``err`` is the max error of the WNA16 GEMM 1 relative to the bf16 one
(bf16 rounding of the dequantized weights only). Weights are random codes and scales, routing random. Runs in
about 2 minutes on an H200 (mostly compilation). Not a unit test; what it finds goes into
``moekit.ops.heuristics._wna16_config`` and docs/perf/NOTES.md.
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
from moekit.ops.grouped_gemm import grouped_gemm
from moekit.ops.grouped_gemm_wna16 import grouped_gemm_wna16
from moekit.ops.heuristics import GemmConfig, MoEKernelConfig, MoEShape, choose_config
from moekit.ops.quantize_wna16 import WNA16Weight, dequantize_wna16
from moekit.testing import rel_errors

PEAK_BW = 4.8e12  # H200 HBM3e, nominal
GROUP = 128
SILU = Activation(name="silu")


def variants(base: MoEKernelConfig, bits: int) -> dict[str, MoEKernelConfig]:
    g1, g2 = base.gemm1, base.gemm2
    out = {"heuristic": base}
    if base.block_m <= 32:  # decode: K tile width, pipeline depth
        for label, f in (("k/2", 0.5), ("k*2", 2)):
            out[label] = replace(base, gemm1=replace(g1, block_k=int(g1.block_k * f)),
                                 gemm2=replace(g2, block_k=int(g2.block_k * f)))
        out["s6"] = replace(base, gemm1=replace(g1, num_stages=6), gemm2=replace(g2, num_stages=6))
    else:  # prefill: tile shapes around 64 x 128 and 128 x 128
        bk = 128 if bits == 4 else 64
        v = GemmConfig(block_n=128, block_k=bk, group_m=8, num_warps=4, num_stages=4)
        out["m64n128"] = MoEKernelConfig(block_m=64, gemm1=v, gemm2=v, y_fp32=False)
        out["m64n128k64"] = MoEKernelConfig(block_m=64, gemm1=replace(v, block_k=64), gemm2=replace(v, block_k=64),
                                            y_fp32=False)
        w = GemmConfig(block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3, half_tail=True)
        out["m128n128w8"] = MoEKernelConfig(block_m=128, gemm1=w, gemm2=w, y_fp32=False)
        out["m128n256w8"] = MoEKernelConfig(block_m=128, gemm1=replace(w, block_n=256), gemm2=replace(w, block_n=256),
                                            y_fp32=False)
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
    args = p.parse_args()
    dev = torch.device("cuda")
    bits = args.bits
    scheme = f"w{bits}a16_g{GROUP}"
    start = time.perf_counter()
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__} triton {triton.__version__}  {scheme}")
    print(f"{'preset':14s} {'T':>5s} {'gemm':4s} {'config':11s} {'us':>8s} {'GB/s':>7s} {'%4.8T':>6s} "
          f"{'bf16 us':>8s} {'x bf16':>6s}")
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
                """The two GEMMs' callables and their outputs for one config."""
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

                return g1, g2, a

            base_shape = MoEShape(num_tokens=num_tokens, top_k=top_k, num_experts=num_experts, hidden=hidden,
                                  inter=inter, num_sms=torch.cuda.get_device_properties(dev).multi_processor_count)
            bf_cfg = choose_config(base_shape)
            bf1, bf2, a_bf = run(bf_cfg, quant=False)
            t_bf = (bench(bf1, graph), bench(bf2, graph))
            heur = choose_config(replace(base_shape, weights=scheme))
            best = {}
            for cname, cfg in variants(heur, bits).items():
                try:
                    q1, q2, a_q = run(cfg, quant=True)
                    t = (bench(q1, graph), bench(q2, graph))
                except Exception as e:  # a tile that does not fit (shared memory, registers): note it, go on
                    print(f"  {name} T={num_tokens} {cname}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                    continue
                err = rel_errors(a_q, a_bf)[0] if cname == "heuristic" else None
                for i, (gemm_w, t_gemm) in enumerate(((w13, t[0]), (w2, t[1]))):
                    gbs = nbytes(gemm_w, active) / (t_gemm * 1e-6) / 1e9
                    line = (f"{name:14s} {num_tokens:5d} {'g' + str(i + 1):4s} {cname:11s} {t_gemm:8.1f} {gbs:7.0f} "
                            f"{100 * gbs * 1e9 / PEAK_BW:5.0f}% {t_bf[i]:8.1f} {t_bf[i] / t_gemm:6.2f}")
                    print(line + (f"  err {err:.4f}" if err is not None and i == 0 else ""), flush=True)
                best.setdefault("total", {})[cname] = sum(t)
            tot = best["total"]
            winner = min(tot, key=tot.get)
            summary.append(f"{name:14s} T={num_tokens:5d} active {active:3d}: bf16 {sum(t_bf):8.1f} us, heuristic "
                           f"{tot.get('heuristic', float('nan')):8.1f} us ({sum(t_bf) / tot.get('heuristic', 1):.2f}x),"
                           f" best {winner} {tot[winner]:8.1f} us ({sum(t_bf) / tot[winner]:.2f}x)")
        del w13, w2, w13_bf, w2_bf
        torch.cuda.empty_cache()
    print("\nsummary (GEMM 1 + GEMM 2):")
    print("\n".join(summary))
    print(f"elapsed {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

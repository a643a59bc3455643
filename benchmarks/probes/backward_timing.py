"""Probe: time the routed experts' backward (Triton and torch backends) against their forward, bf16, one GPU.

    python3 benchmarks/probes/backward_timing.py [--tokens 4096]

Prints per preset: forward and backward time (ms) and the backward's TFLOP/s counting 16·N·H·I FLOPs (GEMM 1
recomputed, dout @ w2, dx, dw13, dw2; a gated activation) against the forward's 6·N·H·I. Not a unit test.
"""

import argparse

import torch
import triton.testing

from moekit import fused_experts
from moekit.testing import make_moe_inputs

PRESETS = {"mixtral-8x7b": (8, 4096, 14336, 2), "qwen3-30b-a3b": (128, 2048, 768, 8),
           "olmoe-1b-7b": (64, 2048, 1024, 8), "deepseek-v3(E=64 slice)": (64, 7168, 2048, 8)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    print(f"card: {torch.cuda.get_device_name()}  T={args.tokens}")
    print(f"{'preset':26s} {'backend':7s} {'fwd ms':>8s} {'bwd ms':>8s} {'bwd/fwd':>8s} {'bwd TF/s':>9s}")
    for name, (E, H, I, K) in PRESETS.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        routing = make_moe_inputs(args.tokens, E, 16, 16, K, dtype=torch.bfloat16, device="cuda")
        x = (torch.randn(args.tokens, H, device="cuda", generator=g)).bfloat16().requires_grad_()
        w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * H**-0.5).bfloat16().requires_grad_()
        w2 = (torch.randn(E, H, I, device="cuda", generator=g) * I**-0.5).bfloat16().requires_grad_()
        tw = routing["topk_weights"].requires_grad_()
        ids = routing["topk_ids"]
        dout = torch.randn(args.tokens, H, device="cuda", generator=g).bfloat16()
        n = args.tokens * K
        for backend in ("triton", "torch"):
            def fwd():
                with torch.no_grad():
                    return fused_experts(x, w13, w2, tw, ids, backend=backend)

            def fwd_bwd():
                out = fused_experts(x, w13, w2, tw, ids, backend=backend)
                torch.autograd.grad(out, (x, w13, w2, tw), dout)

            t_f = triton.testing.do_bench(fwd, warmup=50, rep=300, return_mode="median")
            t_fb = triton.testing.do_bench(fwd_bwd, warmup=50, rep=500, return_mode="median")
            t_b = t_fb - t_f
            print(f"{name:26s} {backend:7s} {t_f:8.3f} {t_b:8.3f} {t_b / t_f:8.2f} {16 * n * H * I / t_b / 1e9:9.1f}")
        del x, w13, w2
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

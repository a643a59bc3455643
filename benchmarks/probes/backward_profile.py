"""Probe: where the Triton backward's time goes (torch.profiler, per kernel), and grouped_wgrad tile variants.

    python3 benchmarks/probes/backward_profile.py
"""

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

from moekit import fused_experts
from moekit.ops.align import align
from moekit.ops.grouped_wgrad import grouped_wgrad
from moekit.ops.heuristics import GemmConfig
from moekit.testing import make_moe_inputs

SHAPES = {"mixtral-8x7b": (8, 4096, 14336, 2), "qwen3-30b-a3b": (128, 2048, 768, 8)}
T = 4096


def tensors(E, H, I, K):
    g = torch.Generator(device="cuda").manual_seed(0)
    routing = make_moe_inputs(T, E, 16, 16, K, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16().requires_grad_()
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * H**-0.5).bfloat16().requires_grad_()
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) * I**-0.5).bfloat16().requires_grad_()
    return x, w13, w2, routing["topk_weights"].requires_grad_(), routing["topk_ids"]


for name, (E, H, I, K) in SHAPES.items():
    x, w13, w2, tw, ids = tensors(E, H, I, K)
    dout = torch.randn_like(x)

    def step():
        out = fused_experts(x, w13, w2, tw, ids, backend="triton")
        torch.autograd.grad(out, (x, w13, w2, tw), dout)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"== {name} T={T}: per-step CUDA time by kernel (ms, 5 steps averaged)")
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]
    for e in rows:
        print(f"  {e.device_time_total / 5e3:8.3f}  x{e.count // 5:<3d} {e.key[:90]}")
    # grouped_wgrad alone: dW13 shape (G = dh [N, 2I], X = x gathered) under tile variants
    N = T * K
    dh = torch.randn(N, 2 * I, device="cuda").bfloat16()
    out = torch.empty(E, 2 * I, H, device="cuda", dtype=torch.bfloat16)
    flops = 2 * N * 2 * I * H
    variants = [GemmConfig(block_n=64, block_k=64, num_warps=4, num_stages=2),
                GemmConfig(block_n=128, block_k=64, num_warps=4, num_stages=3),
                GemmConfig(block_n=128, block_k=128, num_warps=8, num_stages=3),
                GemmConfig(block_n=128, block_k=128, num_warps=8, num_stages=4),
                GemmConfig(block_n=128, block_k=256, num_warps=8, num_stages=3),
                GemmConfig(block_n=256, block_k=128, num_warps=8, num_stages=3)]
    for bm in (64, 128):
        layout = align(ids, E, bm)
        for cfg in variants:
            try:
                t = triton.testing.do_bench(lambda: grouped_wgrad(dh, x.detach(), layout, out, num_rows=N,
                                                                  x_row_div=K, config=cfg),
                                            warmup=30, rep=200, return_mode="median")
            except Exception as exc:  # noqa: BLE001 (out of shared memory etc.: report and go on)
                print(f"  wgrad bm={bm} {cfg}: failed {type(exc).__name__}")
                continue
            print(f"  wgrad dW13 bm={bm} n={cfg.block_n} k={cfg.block_k} w={cfg.num_warps} s={cfg.num_stages}: "
                  f"{t:.3f} ms  {flops / t / 1e9:.0f} TFLOP/s")
    del x, w13, w2
    torch.cuda.empty_cache()

"""Probe: the Triton forward on expert weights stored transposed ([E, H, 2I] / [E, I, H], as Llama4 and other
transformers families keep them, passed as views) against the canonical contiguous layout.

    python3 benchmarks/probes/transposed_weights.py
"""

import torch
import triton.testing

from moekit import fused_experts
from moekit.testing import make_moe_inputs

SHAPES = {"mixtral-8x7b": (8, 4096, 14336, 2), "qwen3-30b-a3b": (128, 2048, 768, 8)}

print(f"card: {torch.cuda.get_device_name()}")
print(f"{'preset':16s} {'T':>6s} {'contig ms':>10s} {'views ms':>10s} {'ratio':>6s}")
for name, (E, H, I, K) in SHAPES.items():
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * H**-0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) * I**-0.5).bfloat16()
    w13_view = w13.transpose(1, 2).contiguous().transpose(1, 2)  # same values, stored [E, H, 2I]
    w2_view = w2.transpose(1, 2).contiguous().transpose(1, 2)
    for T in (1, 64, 4096):
        r = make_moe_inputs(T, E, 16, 16, K, dtype=torch.bfloat16, device="cuda", seed=T)
        x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
        with torch.no_grad():
            a = fused_experts(x, w13, w2, r["topk_weights"], r["topk_ids"])
            b = fused_experts(x, w13_view, w2_view, r["topk_weights"], r["topk_ids"])
            err = float((a.float() - b.float()).norm() / a.float().norm())
            t_c = triton.testing.do_bench(lambda: fused_experts(x, w13, w2, r["topk_weights"], r["topk_ids"]),
                                          return_mode="median")
            t_v = triton.testing.do_bench(lambda: fused_experts(x, w13_view, w2_view, r["topk_weights"],
                                                                r["topk_ids"]), return_mode="median")
        print(f"{name:16s} {T:6d} {t_c:10.4f} {t_v:10.4f} {t_v / t_c:6.2f}   rel diff {err:.1e}")
    del w13, w2, w13_view, w2_view
    torch.cuda.empty_cache()

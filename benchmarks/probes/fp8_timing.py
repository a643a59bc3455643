"""Probe: the routed experts in fp8 (block 128x128 / per channel) against bf16, Triton backend, one GPU.

    python3 benchmarks/probes/fp8_timing.py

Prints per preset and T: bf16 and fp8 times (do_bench median, eager calls) and their ratio, and the fp8 output's
max/rms error against the bf16 layer. Not a unit test and not the bench's floor accounting.
"""

import torch
import triton.testing

import moekit
from moekit import MoE, MoEConfig
from moekit.testing import make_moe_inputs, rel_errors

PRESETS = {"mixtral-8x7b": (8, 4096, 14336, 2), "qwen3-30b-a3b": (128, 2048, 768, 8),
           "deepseek-v3(E=128)": (128, 7168, 2048, 8)}


def layer(E, H, I, K, backend):
    cfg = MoEConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, backend=backend)
    return MoE(cfg, dtype=torch.bfloat16, device="cuda").requires_grad_(False)


print(f"card: {torch.cuda.get_device_name()}")
print(f"{'preset':20s} {'scheme':12s} {'T':>5s} {'bf16 us':>9s} {'fp8 us':>9s} {'ratio':>6s} {'max err':>8s} {'rms err':>8s}")
for name, (E, H, I, K) in PRESETS.items():
    for scheme in ("fp8_block", "fp8_channel"):
        ref = layer(E, H, I, K, "triton")
        q = layer(E, H, I, K, "triton")
        q.load_state_dict(ref.state_dict())
        moekit.quantize(q, scheme)
        for T in (1, 16, 64, 1024, 4096):
            r = make_moe_inputs(T, E, 16, 16, K, dtype=torch.bfloat16, device="cuda", seed=T)
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
            args = (x, r["topk_weights"], r["topk_ids"])
            with torch.no_grad():
                want = ref.routed_experts(*args)
                got = q.routed_experts(*args)
                t_ref = triton.testing.do_bench(lambda: ref.routed_experts(*args), return_mode="median")
                t_q = triton.testing.do_bench(lambda: q.routed_experts(*args), return_mode="median")
            mx, rms = rel_errors(got, want)
            print(f"{name:20s} {scheme:12s} {T:5d} {t_ref * 1e3:9.1f} {t_q * 1e3:9.1f} {t_ref / t_q:6.2f} "
                  f"{mx:8.3f} {rms:8.3f}", flush=True)
        del ref, q
        torch.cuda.empty_cache()

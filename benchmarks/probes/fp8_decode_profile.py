"""Probe: where a quantized decode call spends its time on one GPU (kernel durations vs the graph replay).

    python3 benchmarks/probes/fp8_decode_profile.py [preset:scheme:T,...]   (scheme "bf16" for none)

For a few (preset, scheme, T) decode points: each kernel's duration (torch.profiler over CUDA-graph replays, so
launch gaps are the graph's), their sum, and the replay time of the same call; the difference is what lies
between kernels (gaps, ramp-up). Not a unit test; what it finds goes into docs/perf/NOTES.md.
"""

import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from moekit import fused_experts
from moekit.bench.run import make_tokens, make_weights
from moekit.bench.shapes import PRESETS
from moekit.bench.timing import time_us

POINTS = [("deepseek-v3", "fp8_block", 1), ("qwen3-30b-a3b", "fp8_block", 1), ("qwen3-30b-a3b", "fp8_block", 16),
          ("mixtral-8x7b", "fp8_block", 1), ("mixtral-8x7b", "fp8_block", 64), ("qwen3-30b-a3b", None, 1)]
if len(sys.argv) > 1:
    POINTS = [(n, None if s == "bf16" else s, int(t)) for n, s, t in (p.split(":") for p in sys.argv[1].split(","))]

dev = torch.device("cuda")
print(f"card: {torch.cuda.get_device_name()}")
for name, scheme, t in POINTS:
    shape = PRESETS[name]
    w = make_weights(shape, torch.bfloat16, dev, 0, scheme)
    if scheme:
        layer = w["quantized"]
        kw = dict(w13=layer.w13, w2=layer.w2, quant=layer.quant_method.quant_params(layer))
    else:
        kw = dict(w13=w["w13"], w2=w["w2"])
    if shape.bias:  # gpt-oss: both biases, as the layer runs
        kw.update(w13_bias=w["w13_bias"], w2_bias=w["w2_bias"])
    tok = make_tokens(shape, t, torch.bfloat16, dev, 0)

    def call():
        return fused_experts(tok["hidden_states"], topk_weights=tok["topk_weights"], topk_ids=tok["topk_ids"],
                             activation=shape.activation, backend="triton", **kw)

    with torch.no_grad():
        replay_us = time_us(call, dev, graph=True)
        call()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            call()
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                g.replay()
            torch.cuda.synchronize()
    # Keyed by place in the call (a GEMM kernel runs twice a call, once per GEMM): events in start order, 20 replays.
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    per_call = max(1, len(kernels) // 20)
    per = collections.defaultdict(list)
    for i, e in enumerate(kernels):
        per[f"{i % per_call}: {e.name[:56]}"].append(
            e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
    total = sum(sum(v) for v in per.values()) / 20
    print(f"\n{name} {scheme or 'bf16'} T={t}: replay {replay_us:.1f} us, kernels {total:.1f} us, between "
          f"{replay_us - total:.1f} us")
    for k, v in sorted(per.items()):
        print(f"   {sum(v) / 20:8.1f} us x{len(v) // 20}  {k}")
    del w, kw
    torch.cuda.empty_cache()

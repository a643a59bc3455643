"""Shared experts on a side CUDA stream: same result as running them inline, also inside a CUDA graph."""

import pytest
import torch

from moekit import MoE, MoEConfig, RoutingConfig
from moekit.kernel import make_kernel
from moekit.testing import assert_close, make_moe_inputs

pytestmark = pytest.mark.gpu



def test_overlap_matches_inline_and_orders_streams():
    inputs = make_moe_inputs(64, 16, 256, 128, 4, dtype=torch.bfloat16, device="cuda", seed=1)
    big = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def slow_shared(x):
        # Long enough that a missing join would let the sum read an unfinished result.
        y = big
        for _ in range(20):
            y = y @ big * 1e-3
        return x * 0.5 + y[: x.shape[0], : x.shape[1]].sum() * 0.0

    kernel = make_kernel("auto", torch.device("cuda"))
    args = [inputs[k] for k in ("hidden_states", "w13", "w2", "topk_weights", "topk_ids")]
    overlapped = kernel.apply(*args, shared_experts=slow_shared)
    limit = kernel.shared_overlap_max_tokens
    try:
        kernel.shared_overlap_max_tokens = 0  # force the inline path
        inline = kernel.apply(*args, shared_experts=slow_shared)
    finally:
        kernel.shared_overlap_max_tokens = limit
    torch.testing.assert_close(overlapped, inline)


def test_moe_forward_with_shared_experts_in_cuda_graph():
    cfg = MoEConfig(num_experts=16, top_k=4, hidden_size=256, intermediate_size=128, shared_intermediate_size=256,
                    shared_expert_gate=True, routing=RoutingConfig(renormalize=True))
    moe = MoE(cfg, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    eager = moe(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        moe(x)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        graphed = moe(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert_close(graphed, moe(x).float(), torch.bfloat16)
    assert not torch.equal(graphed, eager)

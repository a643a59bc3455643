"""The moekit::fused_experts custom op: schema accepts every Activation, and torch.compile traces either backend
as one node (fullgraph) — checked on CPU with the eager compile backend and the interpreter. Its autograd formula
is checked in test_autograd.py."""

import pytest
import torch

from moekit import Activation, fused_experts
from moekit.kernel import available_backends
from moekit.testing import assert_close, make_moe_inputs, reference_experts

pytestmark = pytest.mark.skipif("triton" not in available_backends("cpu"), reason="needs triton")


@pytest.mark.parametrize("activation", [Activation(name="silu"), Activation(name="silu", limit=0.5),
                                        Activation(name="swigluoai", alpha=1.5, limit=3.0)], ids=str)
def test_custom_op_runs_every_activation(activation):
    from moekit.kernel.custom_op import fused_experts_op

    d = make_moe_inputs(5, 4, 32, 16, 2, dtype=torch.float32, activation=activation)
    out = fused_experts_op(d["hidden_states"], d["w13"], d["w2"], d["topk_weights"], d["topk_ids"], None, None,
                           None, activation.name, activation.alpha, activation.limit, torch.float32, "triton")
    ref = reference_experts(d["hidden_states"], d["w13"], d["w2"], d["topk_weights"], d["topk_ids"],
                            activation=activation)
    assert_close(out, ref, torch.float32)


def test_compile_fullgraph_through_fused_experts():
    d = make_moe_inputs(6, 4, 32, 16, 2, dtype=torch.float32, seed=2)

    def layer(x, w13, w2, tw, ids):
        return fused_experts(x * 2, w13, w2, tw, ids, backend="triton") + 1

    args = (d["hidden_states"], d["w13"], d["w2"], d["topk_weights"], d["topk_ids"])
    torch._dynamo.reset()
    out = torch.compile(layer, backend="eager", fullgraph=True)(*args)  # a graph break would raise
    ref = reference_experts(args[0] * 2, *args[1:]) + 1
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compile_fullgraph_whole_moe_layer(backend):
    # The torch backend (the CPU path) goes through the op too: its per-expert loop reads counts on the host,
    # which used to break the graph.
    from moekit import MoE, MoEConfig, RoutingConfig

    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=32, intermediate_size=16, shared_intermediate_size=16,
                    shared_expert_gate=True, routing=RoutingConfig(renormalize=True), backend=backend)
    moe = MoE(cfg)
    x = torch.randn(2, 3, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(moe, backend="eager", fullgraph=True)(x)
        assert_close(compiled, moe(x).double(), torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("scheme", ["int8_channel", "fp8_block", "fp8_tensor"])
def test_compile_fullgraph_8bit_layer(backend, scheme):
    # 8-bit experts with quantized activations go through the op too, codes and scales as its arguments: traced
    # into, the Triton path's tile choice read the tuned tables from disk and broke the graph.
    import moekit
    from moekit import MoE, MoEConfig

    cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=128, intermediate_size=128, backend=backend)
    moe = moekit.quantize(MoE(cfg).requires_grad_(False), scheme)
    x = torch.randn(5, 128)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(moe, backend="eager", fullgraph=True)(x)  # a graph break would raise
        assert_close(compiled, moe(x).double(), torch.float32)

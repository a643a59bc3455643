"""Gradients of the routed experts on every backend, against autograd of the fp64 einsum reference.

CPU: the torch backend and the Triton backend in the interpreter, in fp32 (interpreted tl.dot is wrong in bf16).
GPU: both backends in bf16 with the tolerance table. Gradients w.r.t. hidden states, both weight tensors, both
biases and the routing weights are checked; so are frozen weights, torch.compile, and the refusals.
"""

import pytest
import torch

from moekit import MoE, MoEConfig, QuantParams, RoutingConfig, fused_experts
from moekit.kernel import LocalPrepareFinalize, ModularKernel, available_backends, get_experts
from moekit.ops.activation import Activation
from moekit.testing import assert_close, make_moe_inputs, reference_experts

BACKENDS = [b for b in ("torch", "triton") if b in available_backends("cpu")]
TRAINABLE = ("hidden_states", "w13", "w2", "topk_weights", "w13_bias", "w2_bias")


def _run(inp, backend, *, activation="silu", expert_map=None, on_input=False, wanted=TRAINABLE, ref=False):
    """Output and gradients (for a fixed random dout) of one call; ``ref`` runs the fp64 reference instead."""
    leaves = {k: v.detach().clone() for k, v in inp.items()}
    if ref:
        leaves = {k: v.double() if v.is_floating_point() else v for k, v in leaves.items()}
    for k in wanted:
        if k in leaves:
            leaves[k].requires_grad_(True)
    args = (leaves["hidden_states"], leaves["w13"], leaves["w2"], leaves["topk_weights"], leaves["topk_ids"])
    if ref:
        out = reference_experts(*args, activation=activation, w13_bias_E2I=leaves.get("w13_bias"),
                                w2_bias_EH=leaves.get("w2_bias"), expert_map=expert_map,
                                apply_router_weight_on_input=on_input)
    else:
        out = fused_experts(*args, activation=activation, w13_bias=leaves.get("w13_bias"),
                            w2_bias=leaves.get("w2_bias"), backend=backend, expert_map=expert_map,
                            apply_router_weight_on_input=on_input)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    out.backward(dout)
    return out, {k: leaves[k].grad for k in wanted if k in leaves}


def _check(inp, backend, dtype=torch.float32, **kw):
    out, grads = _run(inp, backend, **kw)
    ref_out, ref_grads = _run(inp, None, ref=True, **kw)
    assert_close(out, ref_out, dtype, name=f"{backend} output")
    assert grads.keys() == ref_grads.keys()
    for k, g in grads.items():
        assert g is not None, f"{backend}: no gradient reached {k}"
        assert g.dtype == inp[k].dtype and g.shape == inp[k].shape
        assert_close(g, ref_grads[k], dtype, name=f"{backend} d{k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "num_tokens, num_experts, hidden, inter, top_k",
    [
        (1, 8, 32, 16, 2),      # T = 1 (the forward's no-align path)
        (13, 6, 40, 24, 6),     # top_k = E, odd T
        (21, 5, 33, 19, 1),     # top_k = 1, odd H and I (ragged tiles in every GEMM)
        (3, 256, 16, 16, 8),    # E >= 256: most experts get no row, their weight gradients are zero
    ],
)
def test_gradients_match_reference(backend, num_tokens, num_experts, hidden, inter, top_k):
    inp = make_moe_inputs(num_tokens, num_experts, hidden, inter, top_k, bias=True, seed=num_tokens)
    _check(inp, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu2", "swigluoai",
                                        Activation(name="silu", limit=0.5)])
def test_gradients_every_activation(backend, activation):
    # Activation("silu", limit=...): the clamped SiLU (silu(min(gate, limit)) * clamp(up, ±limit)).
    inp = make_moe_inputs(9, 4, 32, 24, 2, activation=activation, bias=True, seed=3)
    if activation == "swigluoai" or not isinstance(activation, str):
        inp["hidden_states"] = inp["hidden_states"] * 8  # push some gate/up values past the clamp limit
    _check(inp, backend, activation=activation)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_expert_and_one_hot_expert(backend):
    # Experts 0 and 2 get no token: zero weight gradients; with top_k = 1 expert 1 takes every token.
    inp = make_moe_inputs(17, 3, 32, 16, 1, bias=True, empty_experts=(0, 2), seed=1)
    _check(inp, backend)
    _, grads = _run(inp, backend)
    for k in ("w13", "w2", "w13_bias", "w2_bias"):
        assert bool((grads[k][[0, 2]] == 0).all()), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend):
    inp = make_moe_inputs(0, 4, 16, 8, 2, bias=True)
    out, grads = _run(inp, backend)
    assert out.shape == (0, 16)
    for k in TRAINABLE:  # zero (no token used them), or none reached as with any unused torch input
        assert grads[k] is None or bool((grads[k] == 0).all()), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_map_remote_rows_get_no_gradient(backend):
    # 8 global experts, 3 local: rows routed elsewhere contribute nothing, their routing weights get zero.
    inp = make_moe_inputs(11, 8, 32, 16, 2, bias=True, seed=2)
    inp = {k: v[:3] if k in ("w13", "w2", "w13_bias", "w2_bias") else v for k, v in inp.items()}
    emap = torch.tensor([-1, 0, -1, -1, 1, -1, 2, -1], dtype=torch.int32)
    _check(inp, backend, expert_map=emap)
    _, grads = _run(inp, backend, expert_map=emap)
    remote = emap[inp["topk_ids"].long()] < 0
    assert bool((grads["topk_weights"][remote] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [1, 3])
def test_router_weights_on_input(backend, top_k):
    # Llama4: the weight scales x before the experts (prepare), K > 1 expands rows; the gradient flows both ways.
    inp = make_moe_inputs(7, 4, 32, 16, top_k, seed=4)
    _check(inp, backend, on_input=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wanted", [("hidden_states",), ("w13", "w2"), ("topk_weights",)])
def test_partial_gradients(backend, wanted):
    # Only what requires grad gets one (frozen weights: the backward skips their grouped GEMMs).
    inp = make_moe_inputs(9, 4, 32, 16, 2, seed=5)
    out, grads = _run(inp, backend, wanted=wanted)
    _, ref_grads = _run(inp, None, wanted=wanted, ref=True)
    for k in wanted:
        assert_close(grads[k], ref_grads[k], torch.float32, name=f"d{k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_graph_when_nothing_requires_grad(backend):
    inp = make_moe_inputs(5, 4, 32, 16, 2)
    out = fused_experts(inp["hidden_states"], inp["w13"], inp["w2"], inp["topk_weights"], inp["topk_ids"],
                        backend=backend)
    assert out.grad_fn is None and not out.requires_grad
    leaf = inp["w13"].requires_grad_(True)
    with torch.inference_mode():
        out = fused_experts(inp["hidden_states"], leaf, inp["w2"], inp["topk_weights"], inp["topk_ids"],
                            backend=backend)
    assert out.grad_fn is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_layer_trains(backend):
    # Every parameter of a MoE (router, routed and shared experts) gets the gradient the torch backend gives,
    # and an optimizer step over moe.parameters() changes the routed experts.
    cfg = MoEConfig(num_experts=6, top_k=2, hidden_size=32, intermediate_size=16, shared_intermediate_size=16,
                    routing=RoutingConfig(renormalize=True), bias=True, backend=backend)
    moe = MoE(cfg)
    ref = MoE(MoEConfig(**{**cfg.__dict__, "backend": "torch"}))
    ref.load_state_dict(moe.state_dict())
    x = torch.randn(2, 5, 32)
    for layer in (moe, ref):
        layer(x).square().sum().backward()
    for (name, p), q in zip(moe.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        assert_close(p.grad, q.grad.double(), torch.float32, name=name)
    before = moe.routed_experts.w13.detach().clone()
    torch.optim.SGD(moe.parameters(), lr=0.1).step()
    assert not torch.equal(moe.routed_experts.w13, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_forward_and_backward(backend):
    # One opaque node each way (fullgraph: a graph break raises); aot_eager runs the registered autograd formula.
    inp = make_moe_inputs(6, 4, 32, 16, 2, bias=True, seed=6)

    def layer(x, w13, w2, tw, ids, b13, b2):
        return fused_experts(x * 2, w13, w2, tw, ids, w13_bias=b13, w2_bias=b2, backend=backend) + 1

    names = ("hidden_states", "w13", "w2", "topk_weights", "topk_ids", "w13_bias", "w2_bias")
    leaves = [inp[k].detach().clone().requires_grad_(k != "topk_ids") for k in names]
    torch._dynamo.reset()
    out = torch.compile(layer, backend="aot_eager", fullgraph=True)(*leaves)
    out.backward(torch.ones_like(out))
    ref = [inp[k].detach().double().requires_grad_(k != "topk_ids") for k in names]
    ref_out = reference_experts(ref[0] * 2, *ref[1:5], w13_bias_E2I=ref[5], w2_bias_EH=ref[6]) + 1
    ref_out.backward(torch.ones_like(ref_out))
    assert_close(out, ref_out.detach(), torch.float32)
    for name, a, b in zip(names, leaves, ref):
        if name != "topk_ids":
            assert_close(a.grad, b.grad, torch.float32, name=f"d{name}")


def test_custom_op_is_registered_by_import_moekit():
    # An exported graph that names the op must load without touching the Triton backend first.
    import moekit  # noqa: F401

    assert hasattr(torch.ops.moekit, "fused_experts") and hasattr(torch.ops.moekit, "fused_experts_backward")


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_weights_refuse_a_gradient(backend):
    # No backward exists for quantized weights: a gradient request fails loudly, never a detached output.
    inp = make_moe_inputs(3, 4, 16, 8, 2)
    x = inp["hidden_states"].requires_grad_(True)
    kernel = ModularKernel(LocalPrepareFinalize(), get_experts(backend))
    with pytest.raises(ValueError, match="quantized experts .* no backward"):
        kernel.apply(x, inp["w13"], inp["w2"], inp["topk_weights"], inp["topk_ids"],
                     quant=QuantParams(weight_dtype="int8"))


# --------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "num_tokens, num_experts, hidden, inter, top_k, activation, bias",
    [
        (1, 8, 256, 128, 2, "silu", False),
        (77, 64, 512, 256, 8, "silu", False),          # odd T, many experts (some empty)
        (300, 16, 384, 192, 4, "swigluoai", True),     # gpt-oss style
        (200, 256, 256, 128, 8, "silu", False),        # E = 256
        (64, 8, 256, 128, 2, "relu2", False),
    ],
)
def test_gpu_bf16_gradients(backend, num_tokens, num_experts, hidden, inter, top_k, activation, bias):
    inp = make_moe_inputs(num_tokens, num_experts, hidden, inter, top_k, dtype=torch.bfloat16, device="cuda",
                          activation=activation, bias=bias, seed=num_tokens)
    _check(inp, backend, torch.bfloat16, activation=activation)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_triton_backward_with_prefill_blocks():
    # block_m = 128: the weight gradients run over a second, 64-row layout (their faster reduction step).
    from moekit.kernel.triton_experts import TritonExperts
    from moekit.ops.heuristics import GemmConfig, MoEKernelConfig

    config = MoEKernelConfig(block_m=128, gemm1=GemmConfig(block_n=32, block_k=32, num_stages=2),
                             gemm2=GemmConfig(block_n=32, block_k=32, num_stages=2))
    inp = make_moe_inputs(150, 3, 32, 16, 2, bias=True, seed=8)  # ~100 rows per expert: two 64-row blocks
    leaves = {k: v.detach().clone().requires_grad_(k != "topk_ids") for k, v in inp.items()}
    kernel = ModularKernel(LocalPrepareFinalize(), TritonExperts(config))
    out = kernel.apply(leaves["hidden_states"], leaves["w13"], leaves["w2"], leaves["topk_weights"],
                       leaves["topk_ids"], w13_bias=leaves["w13_bias"], w2_bias=leaves["w2_bias"])
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(dout)
    _, ref_grads = _run(inp, None, ref=True)
    for k, g in ref_grads.items():
        assert_close(leaves[k].grad, g, torch.float32, name=f"d{k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_pass_opcheck_with_transposed_weights(backend):
    # The fake implementations must describe what the real ones return, strides included: transformers keeps
    # experts transposed ([E, H, 2I]) and moekit reads them as views; inductor lays gradients out by the fake's
    # strides (a transposed fake gave silently wrong gradients once size asserts were off).
    inp = make_moe_inputs(5, 4, 32, 16, 2, bias=True, seed=6)
    w13 = inp["w13"].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    w2 = inp["w2"].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    x = inp["hidden_states"].requires_grad_(True)
    args = (x, w13, w2, inp["topk_weights"], inp["topk_ids"], inp["w13_bias"], inp["w2_bias"], None,
            "silu", 1.702, None, torch.float32, backend)
    torch.library.opcheck(torch.ops.moekit.fused_experts.default, args)
    dout = torch.randn(5, 32)
    # (no double backward: the backward op is called on plain tensors)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:8]]
    bwd_args = (dout, *plain, "silu", 1.702, None, backend, [True, True, True, True, True, True])
    torch.library.opcheck(torch.ops.moekit.fused_experts_backward.default, bwd_args)


def test_activation_scalars_from_numpy_and_tensors_compile():
    # alpha/limit given as NumPy or 0-d tensor values are stored as Python floats: the op's schema takes floats.
    import numpy as np

    from moekit import Activation

    act = Activation(name="swigluoai", alpha=np.float32(1.5), limit=torch.tensor(5.0))
    assert type(act.alpha) is float and type(act.limit) is float
    inp = make_moe_inputs(4, 4, 16, 8, 2, activation=act, seed=2)
    args = (inp["hidden_states"], inp["w13"], inp["w2"], inp["topk_weights"], inp["topk_ids"])
    torch._dynamo.reset()
    out = torch.compile(lambda *a: fused_experts(*a, activation=act, backend="torch"), backend="aot_eager",
                        fullgraph=True)(*args)
    assert_close(out, reference_experts(*args, activation=act), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_refusal_names_what_requires_grad(backend):
    # A trainable router gate makes only topk_weights require grad: "an input or weight requires grad" sent the
    # reader to the wrong tensors. The backend called directly refuses the same way.
    inp = make_moe_inputs(3, 4, 16, 8, 2)
    weights = inp["topk_weights"].requires_grad_(True)
    kernel = ModularKernel(LocalPrepareFinalize(), get_experts(backend))
    quant = QuantParams(weight_dtype="int8")
    with pytest.raises(ValueError, match="have no backward, but topk_weights requires grad"):
        kernel.apply(inp["hidden_states"], inp["w13"], inp["w2"], weights, inp["topk_ids"], quant=quant)
    from moekit import RoutedExperts, quantize

    layer = quantize(RoutedExperts(4, 16, 8, backend=backend), "w8a16_g128")
    x = inp["hidden_states"].requires_grad_(True)
    with pytest.raises(ValueError, match="have no backward, but hidden_states, topk_weights require grad"):
        get_experts(backend).apply(x, layer.w13, layer.w2, weights, inp["topk_ids"], activation=layer.activation,
                                   w13_bias_E2I=None, w2_bias_EH=None, expert_map_E=None,
                                   quant=layer.quant_method.quant_params(layer), hidden_scale=None,
                                   out_dtype=x.dtype)

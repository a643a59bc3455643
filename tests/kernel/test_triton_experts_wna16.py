"""TritonExperts on weight-only 4/8-bit experts (int4/int8 codes, group scales, optional zero points) against the
torch backend on the same layer: CPU in the interpreter with fp16 activations (its bf16 tl.dot is wrong), GPU in
bf16 at real sizes, under a CUDA graph and torch.compile."""

import pytest
import torch

import moekit
from moekit import RoutedExperts, fused_experts
from moekit.kernel.triton_experts import TritonExperts
from moekit.ops.heuristics import GemmConfig, MoEKernelConfig
from moekit.quant import WNA16MoEMethod
from moekit.testing import QUANT_REFERENCE_TOLERANCE, TOLERANCES, Tolerance, assert_close, make_moe_inputs

# (bits, group size, symmetric): moekit.quantize's three schemes and 32-column groups.
SCHEMES = {
    "w4a16_g128": (4, 128, True),
    "w4a16_g128_asym": (4, 128, False),
    "w8a16_g128": (8, 128, True),
    "w4a16_g32_asym": (4, 32, False),
    "w8a16_g32": (8, 32, True),
}

# Decode tiles with split-K GEMM 2 (K tiles of 64: two 32-column groups a tile at g = 32); prefill tiles with
# 32-row blocks, activation-dtype partials and half-height tail tiles.
DECODE = MoEKernelConfig(
    block_m=16,
    gemm1=GemmConfig(block_n=32, block_k=64, num_stages=2),
    gemm2=GemmConfig(block_n=32, block_k=32, split_k=2, num_stages=2),
)
PREFILL = MoEKernelConfig(
    block_m=32,
    gemm1=GemmConfig(block_n=64, block_k=64, group_m=4, num_stages=2, half_tail=True),
    gemm2=GemmConfig(block_n=32, block_k=32, group_m=4, num_stages=2),
    y_fp32=False,
)


def _layer(scheme, num_experts, hidden, inter, **kw):
    """A WNA16 RoutedExperts quantized from random float weights (round to nearest) and its QuantParams."""
    bits, group, sym = SCHEMES[scheme]
    layer, q = quantized_layer(WNA16MoEMethod(bits=bits, group_size=group, sym=sym), num_experts, hidden, inter, **kw)
    assert q.scheme == scheme
    return layer, q


def quantized_layer(method, num_experts, hidden, inter, *, activation="silu", bias=False, expert_map=None,
                    dtype=torch.float16, device="cpu", seed=0):
    """A RoutedExperts of random float weights (only the local experts of ``expert_map``) quantized in place by
    quant ``method``, and its QuantParams."""
    global_e = num_experts if expert_map is None else expert_map.numel()
    inputs = make_moe_inputs(1, global_e, hidden, inter, 1, dtype=dtype, activation=activation, bias=bias, seed=seed)
    layer = RoutedExperts(num_experts, hidden, inter, activation=activation, bias=bias, expert_map=expert_map,
                          dtype=dtype)
    local = list(range(num_experts)) if expert_map is None else (expert_map >= 0).nonzero()[:, 0].tolist()
    with torch.no_grad():
        for name in ("w13", "w2", "w13_bias", "w2_bias"):
            if name in inputs:
                getattr(layer, name).copy_(inputs[name][local])
    method.quantize_layer(layer)
    layer.to(device)
    return layer, layer.quant_method.quant_params(layer)


def _routing(num_tokens, num_experts, top_k, seed=0, device="cpu"):
    r = make_moe_inputs(num_tokens, num_experts, 16, 16, top_k, seed=seed, device=device)
    return r["topk_weights"], r["topk_ids"]


def _run(layer, q, x, weights, ids, backend, config=None):
    with torch.no_grad():
        if backend == "torch" or config is None:
            return fused_experts(x, layer.w13, layer.w2, weights, ids, activation=layer.activation,
                                 w13_bias=layer.w13_bias, w2_bias=layer.w2_bias, expert_map=layer.expert_map,
                                 quant=q, backend=backend)
        return TritonExperts(config).apply(
            x, layer.w13, layer.w2, weights, ids, activation=layer.activation, w13_bias_E2I=layer.w13_bias,
            w2_bias_EH=layer.w2_bias, expert_map_E=layer.expert_map, quant=q, hidden_scale=None, out_dtype=x.dtype)


def _tol(dtype):
    # The same codes on both sides: only the dots' dtype and summation order and the output's rounding differ.
    rounding = TOLERANCES[dtype]
    return Tolerance(max=max(QUANT_REFERENCE_TOLERANCE.max, rounding.max),
                     rms=max(QUANT_REFERENCE_TOLERANCE.rms, rounding.rms))


def _check(layer, q, x, weights, ids, config=None):
    out = _run(layer, q, x, weights, ids, "triton", config)
    want = _run(layer, q, x, weights, ids, "torch")
    assert out.dtype == x.dtype and out.shape == x.shape and torch.isfinite(out).all()
    assert_close(out, want.double(), tol=_tol(x.dtype))
    return out


@pytest.mark.parametrize("scheme", ["w4a16_g128", "w4a16_g128_asym", "w8a16_g128", "w4a16_g32_asym"])
@pytest.mark.parametrize(("num_tokens", "num_experts", "hidden", "inter", "top_k", "config"), [
    (1, 8, 128, 64, 2, None),        # T = 1: one routed row per block (no align), heuristic decode tiles
    (1, 8, 256, 128, 2, DECODE),     # T = 1 with split-K GEMM 2
    (7, 4, 256, 96, 1, PREFILL),     # odd T, top_k = 1; I = 96: a short last group at g = 128, ragged N tiles
    (9, 6, 128, 64, 6, DECODE),      # top_k = E
    (40, 5, 128, 64, 2, None),       # heuristic config, several blocks an expert
])
def test_matches_torch_backend(scheme, num_tokens, num_experts, hidden, inter, top_k, config):
    layer, q = _layer(scheme, num_experts, hidden, inter)
    weights, ids = _routing(num_tokens, num_experts, top_k, seed=num_tokens)
    _check(layer, q, torch.randn(num_tokens, hidden).half() / 10, weights, ids, config)


@pytest.mark.parametrize("scheme", ["w4a16_g128_asym", "w8a16_g128"])
def test_no_tokens(scheme):
    # T = 0: an empty [0, H] result, nothing launched.
    layer, q = _layer(scheme, 4, 128, 64)
    weights, ids = _routing(0, 4, 2)
    out = _check(layer, q, torch.zeros(0, 128).half(), weights, ids)
    assert out.shape == (0, 128)


@pytest.mark.parametrize("scheme", ["w4a16_g32_asym", "w8a16_g32"])
def test_bias_nongated_and_empty_experts(scheme):
    # Biases in both epilogues; relu2 (w13 [E, I, H], no gate/up split); swigluoai; experts 4 and 5 get no token.
    for activation, bias in (("silu", True), ("relu2", False), ("swigluoai", True)):
        layer, q = _layer(scheme, 6, 128, 64, activation=activation, bias=bias)
        weights, ids = _routing(11, 6, 2)
        ids = torch.where(ids >= 4, ids - 4, ids)
        _check(layer, q, torch.randn(11, 128).half() / 10, weights, ids, PREFILL)


@pytest.mark.parametrize("scheme", ["w4a16_g128", "w4a16_g32_asym", "w8a16_g128"])
@pytest.mark.parametrize("num_tokens", [1, 11])
def test_expert_map(scheme, num_tokens):
    # EP: 3 of 6 global experts live here; rows routed elsewhere contribute nothing (T = 1 too: the layout is
    # aligned, not one row per block, under a map).
    expert_map = torch.tensor([-1, 0, -1, 1, 2, -1], dtype=torch.int32)
    layer, q = _layer(scheme, 3, 128, 64, expert_map=expert_map)
    weights, ids = _routing(num_tokens, 6, 2, seed=3)
    _check(layer, q, torch.randn(num_tokens, 128).half() / 10, weights, ids, DECODE)


def test_layer_backend_triton_and_auto_is_torch_on_cpu():
    layer, q = _layer("w4a16_g128", 4, 128, 64)
    x = torch.randn(3, 128).half() / 10
    weights, ids = _routing(3, 4, 2)
    assert layer.quant_method.kernel_for(layer, x).experts.name == "torch"  # CPU tensors, also when interpreting
    layer.backend = "triton"
    assert layer.quant_method.kernel_for(layer, x).experts.name == "triton"
    with torch.no_grad():
        out = layer(x, weights, ids)
    assert_close(out, _run(layer, q, x, weights, ids, "torch").double(), tol=_tol(torch.float16))


def test_compile_fullgraph_through_the_custom_op():
    # Under torch.compile the layer is one moekit::fused_experts node carrying the codes, scales and zero points.
    layer, q = _layer("w4a16_g32_asym", 4, 128, 64)
    weights, ids = _routing(5, 4, 2)
    x = torch.randn(5, 128).half() / 10

    def f(x, weights, ids):
        return fused_experts(x * 2, layer.w13, layer.w2, weights, ids, quant=q, backend="triton") + 1

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(f, backend="eager", fullgraph=True)(x, weights, ids)  # a graph break would raise
        want = f(x, weights, ids)
    assert_close(out, want.double(), tol=_tol(torch.float16))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_backend_called_directly_refuses_a_gradient_on_quantized_weights(backend):
    # Only ModularKernel refused: the Triton backend called directly returned a detached output (the gradient
    # silently lost), the torch backend one whose gradient ignored the quantization.
    from moekit.kernel import get_experts

    layer, q = _layer("w8a16_g32", 4, 64, 64, dtype=torch.float32)
    r = make_moe_inputs(3, 4, 64, 64, 2, seed=1)
    x = r["hidden_states"].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="quant: quantized experts .* have no backward"):
        get_experts(backend).apply(x, layer.w13, layer.w2, r["topk_weights"], r["topk_ids"],
                                   activation=layer.activation, w13_bias_E2I=None, w2_bias_EH=None,
                                   expert_map_E=None, quant=q, hidden_scale=None, out_dtype=x.dtype)


def test_refusals_name_what_is_wrong():
    layer, q = _layer("w4a16_g128", 4, 128, 64)
    with pytest.raises(ValueError, match=r"backend 'triton': w4a16_g128 weights .* need hidden_states in"):
        TritonExperts().check_supported(torch.zeros(2, 128, dtype=torch.int8), q)
    with pytest.raises(ValueError, match="have no backward"):
        x = torch.randn(2, 128).half().requires_grad_()
        weights, ids = _routing(2, 4, 2)
        fused_experts(x, layer.w13, layer.w2, weights, ids, quant=q, backend="triton")


# --------------------------------------------------------------------------------------------------- GPU
PRESETS = {  # name: (E, H, I, K) — real expert sizes (fewer experts where the bf16 originals would not fit)
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "deepseek-v3": (64, 7168, 2048, 8),     # 64 of the 256 experts
    "mixtral-8x7b": (8, 4096, 14336, 2),
}


def _gpu_layer(scheme, E, H, I):  # noqa: E741
    torch.manual_seed(0)
    layer = RoutedExperts(E, H, I, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        layer.w13.normal_(std=H**-0.5)
        layer.w2.normal_(std=I**-0.5)
    moekit.quantize(layer, scheme)
    return layer, layer.quant_method.quant_params(layer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["w4a16_g128", "w4a16_g128_asym", "w8a16_g128"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_gpu_presets_match_torch_backend(scheme, preset):
    # Triton vs the torch backend on the same codes, bf16 activations (randn/10, as vLLM's wNa16 test), decode
    # to prefill sizes.
    E, H, I, K = PRESETS[preset]  # noqa: E741
    layer, q = _gpu_layer(scheme, E, H, I)
    for num_tokens in (1, 7, 64, 1024, 4096):
        weights, ids = _routing(num_tokens, E, K, seed=num_tokens, device="cuda")
        x = (torch.randn(num_tokens, H, device="cuda") / 10).bfloat16()
        out = _run(layer, q, x, weights, ids, "triton")
        want = _run(layer, q, x, weights, ids, "torch")
        assert_close(out, want.double(), tol=_tol(torch.bfloat16), name=f"{scheme} {preset} T={num_tokens}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_capture_and_replay():
    layer, q = _gpu_layer("w4a16_g128_asym", 16, 1024, 512)
    weights, ids = _routing(4, 16, 2, device="cuda")
    x = (torch.randn(4, 1024, device="cuda") / 10).bfloat16()
    experts = TritonExperts()

    def call():
        return experts.apply(x, layer.w13, layer.w2, weights, ids, activation=layer.activation, w13_bias_E2I=None,
                             w2_bias_EH=None, expert_map_E=None, quant=q, hidden_scale=None, out_dtype=x.dtype)

    with torch.no_grad():
        call()  # compile + warm the workspace outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        for seed in (8, 9):  # new tokens and routing copied into the captured inputs, then replay
            new_w, new_ids = _routing(4, 16, 2, seed=seed, device="cuda")
            weights.copy_(new_w)
            ids.copy_(new_ids)
            x.copy_((torch.randn(4, 1024, device="cuda") / 10).bfloat16())
            graph.replay()
            assert_close(out, _run(layer, q, x, weights, ids, "torch").double(), tol=_tol(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["w4a16_g128", "w8a16_g128"])
def test_gpu_auto_runs_triton_eager_and_compiled(scheme):
    # A WNA16 layer's 'auto' is the Triton backend on CUDA, and the whole MoE compiles without a graph break
    # (the routed experts are one custom-op node) to the eager result.
    cfg = moekit.MoEConfig(num_experts=16, top_k=2, hidden_size=1024, intermediate_size=512)
    moe = moekit.MoE(cfg, dtype=torch.bfloat16, device="cuda").requires_grad_(False)
    moekit.quantize(moe, scheme)
    x = torch.randn(37, 1024, device="cuda", dtype=torch.bfloat16) / 10
    re = moe.routed_experts
    assert re.quant_method.kernel_for(re, x).experts.name == "triton"
    torch._dynamo.reset()
    with torch.no_grad():
        eager = moe(x)
        compiled = torch.compile(moe, fullgraph=True)(x)
    assert_close(compiled, eager.double(), torch.bfloat16)

"""TritonExperts on 8-bit experts (fp8 e4m3 / int8 codes, every granularity) against the fp64 reference on the same
codes (CPU: interpreter, where e4m3 and int8 dots are exact-product matmuls) and against the torch backend (GPU:
bf16 activations, real sizes)."""

import pytest
import torch

import moekit
from moekit import RoutedExperts, fused_experts
from moekit.kernel import ModularKernel
from moekit.kernel.prepare_finalize import LocalPrepareFinalize
from moekit.kernel.torch_experts import TorchExperts
from moekit.kernel.triton_experts import TritonExperts
from moekit.ops.heuristics import GemmConfig, MoEKernelConfig
from moekit.quant.params import QuantParams
from moekit.testing import (
    QUANT_REFERENCE_TOLERANCE,
    TOLERANCES,
    Tolerance,
    assert_close,
    make_moe_inputs,
    reference_quantized_experts,
)

SCHEMES = ["fp8_block", "fp8_channel", "fp8_tensor", "int8_channel"]

# Decode tiles with split-K GEMM 2 and a BLOCK_K (128) the block scheme must keep inside its 128-wide scale
# groups; prefill tiles with 64-row blocks.
DECODE = MoEKernelConfig(
    block_m=16,
    gemm1=GemmConfig(block_n=32, block_k=128, num_stages=2),
    gemm2=GemmConfig(block_n=32, block_k=64, split_k=2, num_stages=2),
)
PREFILL = MoEKernelConfig(
    block_m=32,
    gemm1=GemmConfig(block_n=64, block_k=64, group_m=4, num_stages=2),
    gemm2=GemmConfig(block_n=32, block_k=64, group_m=4, num_stages=2),
    y_fp32=False,
)


def _layer(scheme, num_experts, hidden, inter, *, activation="silu", bias=False, expert_map=None, seed=0,
           dtype=torch.float32):
    """A quantized RoutedExperts (codes + scales from moekit.quantize) and inputs for it."""
    global_e = num_experts if expert_map is None else expert_map.numel()
    inputs = make_moe_inputs(13, global_e, hidden, inter, 2, dtype=dtype, activation=activation, bias=bias,
                             seed=seed)
    layer = RoutedExperts(num_experts, hidden, inter, activation=activation, bias=bias, expert_map=expert_map,
                          dtype=dtype)
    local = list(range(num_experts)) if expert_map is None else (expert_map >= 0).nonzero()[:, 0].tolist()
    with torch.no_grad():
        for name in ("w13", "w2", "w13_bias", "w2_bias"):
            if name in inputs:
                getattr(layer, name).copy_(inputs[name][local])
    moekit.quantize(layer, scheme)
    return layer, layer.quant_method.quant_params(layer)


def _run(layer, q, x, topk_weights, topk_ids, config=None):
    kernel = ModularKernel(LocalPrepareFinalize(), TritonExperts(config))
    with torch.no_grad():
        return kernel.apply(x, layer.w13, layer.w2, topk_weights, topk_ids, activation=layer.activation,
                            w13_bias=layer.w13_bias, w2_bias=layer.w2_bias, expert_map=layer.expert_map, quant=q)


def _check(layer, q, x, topk_weights, topk_ids, config=None):
    out = _run(layer, q, x, topk_weights, topk_ids, config)
    assert out.dtype == x.dtype and torch.isfinite(out).all()
    ref = reference_quantized_experts(x, layer.w13, layer.w2, topk_weights, topk_ids, q, activation=layer.activation,
                                      w13_bias_E2I=layer.w13_bias, w2_bias_EH=layer.w2_bias,
                                      expert_map=layer.expert_map)
    # Against the same codes only fp32 summation order (which can flip an intermediate code) and the output's
    # rounding to its dtype differ.
    rounding = TOLERANCES[out.dtype]
    tol = Tolerance(max=max(QUANT_REFERENCE_TOLERANCE.max, rounding.max),
                    rms=max(QUANT_REFERENCE_TOLERANCE.rms, rounding.rms))
    assert_close(out, ref, tol=tol)


def _routing(num_tokens, num_experts, top_k, seed=0):
    r = make_moe_inputs(num_tokens, num_experts, 16, 16, top_k, seed=seed)
    return r["topk_weights"], r["topk_ids"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("num_tokens", "num_experts", "hidden", "inter", "top_k", "dtype", "config"), [
    (1, 8, 256, 192, 2, torch.bfloat16, None),     # T = 1: one routed row per block; I = 192 not a multiple of 128
    (1, 8, 256, 128, 2, torch.float32, DECODE),    # split-K GEMM 2, BLOCK_K 128
    (7, 4, 130, 67, 1, torch.float32, PREFILL),    # odd T, top_k = 1, odd H and I: short edge blocks, ragged tiles
    (9, 6, 256, 128, 6, torch.float16, DECODE),    # top_k = E
    (40, 5, 128, 64, 2, torch.float32, None),      # heuristic prefill-ish config, several blocks an expert
])
def test_matches_reference(scheme, num_tokens, num_experts, hidden, inter, top_k, dtype, config):
    layer, q = _layer(scheme, num_experts, hidden, inter, dtype=dtype)
    weights, ids = _routing(num_tokens, num_experts, top_k, seed=num_tokens)
    x = torch.randn(num_tokens, hidden).to(dtype)
    _check(layer, q, x, weights, ids, config)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_bias_nongated_and_empty_experts(scheme):
    # Biases in both epilogues; relu2 (w13 [E, I, H], no gate/up split); two experts get no token.
    for activation, bias in (("silu", True), ("relu2", False), ("swigluoai", True)):
        layer, q = _layer(scheme, 6, 128, 96, activation=activation, bias=bias)
        weights, ids = _routing(11, 6, 2)
        ids = torch.where(ids >= 4, ids - 4, ids)  # experts 4 and 5 stay empty
        _check(layer, q, torch.randn(11, 128), weights, ids, PREFILL)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_expert_map(scheme):
    # EP: 3 of 6 global experts live here; remote rows contribute nothing and stay out of the per-tensor amax.
    expert_map = torch.tensor([-1, 0, -1, 1, 2, -1], dtype=torch.int32)
    layer, q = _layer(scheme, 3, 128, 64, expert_map=expert_map)
    weights, ids = _routing(11, 6, 2, seed=3)
    _check(layer, q, torch.randn(11, 128), weights, ids, DECODE)


@pytest.mark.parametrize("k", [1, 2])
def test_router_weights_on_input(k):
    # Llama4: K = 1 folds the weights into x before quantization; K = 2 expands x to one quantized row per
    # (token, expert), which the Triton layout reads one to one. Same codes as the torch backend's.
    cfg = moekit.MoEConfig(num_experts=4, top_k=k, hidden_size=128, intermediate_size=128,
                           routing=moekit.RoutingConfig(scoring_func="sigmoid", renormalize=False,
                                                        apply_weights_on_input=True))
    moe = moekit.MoE(cfg, dtype=torch.float32)
    x = torch.randn(5, 128)
    with torch.no_grad():
        moekit.quantize(moe, "fp8_block")
        want = moe(x)
        moe.routed_experts.backend = "triton"
        out = moe(x)
    assert_close(out, want, tol=QUANT_REFERENCE_TOLERANCE)


def test_static_activation_scales_and_all_zero_token():
    layer, q = _layer("fp8_tensor", 4, 128, 64)
    q = QuantParams(weight_dtype=q.weight_dtype, act_dtype=q.act_dtype, w13_scale=q.w13_scale, w2_scale=q.w2_scale,
                    granularity="tensor", a13_scale=torch.tensor([0.004]), a2_scale=torch.tensor(0.0005))
    weights, ids = _routing(6, 4, 2)
    x = torch.randn(6, 128)
    _check(layer, q, x, weights, ids)
    layer, q = _layer("fp8_block", 4, 128, 64)
    x[3] = 0  # scale 0 for its groups: zeros, never NaN
    out = _run(layer, q, x, weights, ids)
    assert torch.isfinite(out).all() and torch.equal(out[3], torch.zeros(128))


def test_backend_triton_runs_quantized_layers_and_auto_is_torch_on_cpu():
    layer, _ = _layer("fp8_block", 4, 128, 64)
    x = torch.randn(3, 128)
    weights, ids = _routing(3, 4, 2)
    assert layer.quant_method.kernel_for(layer, x).experts.name == "torch"  # CPU tensors, also when interpreting
    layer.backend = "triton"
    assert layer.quant_method.kernel_for(layer, x).experts.name == "triton"
    with torch.no_grad():
        out = layer(x, weights, ids)
    assert_close(out, _run(layer, layer.quant_method.quant_params(layer), x, weights, ids), torch.float32)


def test_unsupported_schemes_are_refused_naming_them():
    layer, q = _layer("fp8_channel", 4, 128, 64)
    weight_only = QuantParams(weight_dtype="fp8_e4m3", w13_scale=q.w13_scale, w2_scale=q.w2_scale,
                              granularity="channel")
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match=r"backend 'triton': quantized weights \(fp8_e4m3 channel \(activations "
                                         r"unquantized\)\) are not supported"):
        TritonExperts().check_supported(x, weight_only)
    with pytest.raises(ValueError, match="expected hidden_states as torch.float8_e4m3fn codes"):
        TritonExperts().check_supported(x, q)


# --------------------------------------------------------------------------------------------------- GPU
PRESETS = {  # name: (E, H, I, K) — real expert sizes (fewer experts where the bf16 originals would not fit)
    "qwen3-30b-a3b": (128, 2048, 768, 8),   # I = 768: 6 blocks of 128
    "deepseek-v3": (64, 7168, 2048, 8),     # 64 of the 256 experts
    "mixtral-8x7b": (8, 4096, 14336, 2),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_gpu_presets_match_torch_backend(scheme, preset):
    # Triton vs the torch backend on the same codes, bf16 activations, decode to prefill sizes.
    E, H, I, K = PRESETS[preset]
    torch.manual_seed(0)
    layer = RoutedExperts(E, H, I, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        layer.w13.normal_(std=H**-0.5)
        layer.w2.normal_(std=I**-0.5)
    moekit.quantize(layer, scheme)
    q = layer.quant_method.quant_params(layer)
    for num_tokens in (1, 7, 64, 1024, 4096, 9000):  # past 8192: where vLLM widens its fp8 tolerance
        routing = make_moe_inputs(num_tokens, E, 16, 16, K, device="cuda", seed=num_tokens)
        x = torch.randn(num_tokens, H, device="cuda").bfloat16()
        args = (x, layer.w13, layer.w2, routing["topk_weights"], routing["topk_ids"])
        with torch.no_grad():
            out = fused_experts(*args, quant=q, backend="triton")
            want = fused_experts(*args, quant=q, backend="torch")
        rounding = TOLERANCES[torch.bfloat16]
        tol = Tolerance(max=max(QUANT_REFERENCE_TOLERANCE.max, rounding.max),
                        rms=max(QUANT_REFERENCE_TOLERANCE.rms, rounding.rms))
        assert_close(out, want.double(), tol=tol, name=f"{scheme} {preset} T={num_tokens}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_gpu_matches_reference(scheme):
    # Small enough for the fp64 reference (it gathers each token's expert matrices), on the device.
    layer, q = _layer(scheme, 8, 512, 256, dtype=torch.bfloat16)
    layer.cuda()
    q = layer.quant_method.quant_params(layer)
    weights, ids = _routing(33, 8, 2)
    _check(layer, q, torch.randn(33, 512).bfloat16().cuda(), weights.cuda(), ids.cuda())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_capture_and_replay():
    layer, _ = _layer("fp8_block", 16, 1024, 512, dtype=torch.bfloat16)
    layer.cuda()
    q = layer.quant_method.quant_params(layer)
    weights, ids = _routing(4, 16, 2)
    weights, ids = weights.cuda(), ids.cuda()
    x = torch.randn(4, 1024, device="cuda").bfloat16()
    eager = _run(layer, q, x, weights, ids)
    kernel = ModularKernel(LocalPrepareFinalize(), TritonExperts())
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        kernel.apply(x, layer.w13, layer.w2, weights, ids, quant=q, check_ids=False)  # warm up (compile)
        with torch.cuda.graph(graph):
            out = kernel.apply(x, layer.w13, layer.w2, weights, ids, quant=q, check_ids=False)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["fp8_block", "int8_channel"])
def test_gpu_auto_runs_triton_eager_and_compiled(scheme):
    # A quantized layer's 'auto' is the Triton 8-bit path on a GPU with the scheme's dots, and the layer compiles
    # (the experts as one moekit::fused_experts node, fullgraph) to the eager result.
    cfg = moekit.MoEConfig(num_experts=16, top_k=2, hidden_size=1024, intermediate_size=512)
    moe = moekit.MoE(cfg, dtype=torch.bfloat16, device="cuda").requires_grad_(False)
    moekit.quantize(moe, scheme)
    x = torch.randn(37, 1024, device="cuda", dtype=torch.bfloat16)
    re = moe.routed_experts
    assert re.quant_method.kernel_for(re, x).experts.name == "triton"
    with torch.no_grad():
        eager = moe(x)
        compiled = torch.compile(moe, fullgraph=True)(x)
    assert_close(compiled, eager.double(), torch.bfloat16)

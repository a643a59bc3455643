"""TritonExperts on mxfp4 experts (e2m1 codes, e8m0 scales per 32 columns) against the torch backend on the same
layer, in the interpreter with fp16 activations (its bf16 tl.dot is wrong); a gpt-oss-style block (swigluoai with
its clamp, biases) also against gpt-oss's own forward on upcast weights. GPU: bf16 at gpt-oss-20b's expert size."""

import pytest
import torch

from moekit.kernel.triton_experts import TritonExperts
from moekit.ops.activation import Activation
from moekit.quant import MXFP4MoEMethod
from moekit.quant.mxfp4 import dequantized_weights
from moekit._layout import interleave
from moekit.testing import assert_close
from tests.kernel.test_triton_experts_wna16 import DECODE, PREFILL, _check, _routing, _run, _tol, quantized_layer
from tests.quant.test_mxfp4 import GPT_OSS_TOLERANCE, gpt_oss_forward

SWIGLUOAI = Activation(name="swigluoai", alpha=1.702, limit=7.0)


def _layer(num_experts, hidden, inter, **kw):
    """An mxfp4 RoutedExperts quantized from random float weights and its QuantParams."""
    layer, q = quantized_layer(MXFP4MoEMethod(), num_experts, hidden, inter, **kw)
    assert q.scheme == "mxfp4"
    return layer, q


@pytest.mark.parametrize(("num_tokens", "num_experts", "hidden", "inter", "top_k", "config"), [
    (1, 8, 128, 64, 2, None),        # T = 1: one routed row per block (no align), heuristic decode tiles
    (1, 8, 256, 128, 2, DECODE),     # T = 1 with split-K GEMM 2
    (7, 4, 256, 96, 1, PREFILL),     # odd T, top_k = 1; I = 96: ragged N and K tiles
    (9, 6, 128, 64, 6, DECODE),      # top_k = E
    (40, 5, 128, 64, 2, None),       # heuristic config, several blocks an expert
])
def test_matches_torch_backend(num_tokens, num_experts, hidden, inter, top_k, config):
    layer, q = _layer(num_experts, hidden, inter)
    weights, ids = _routing(num_tokens, num_experts, top_k, seed=num_tokens)
    _check(layer, q, torch.randn(num_tokens, hidden).half() / 10, weights, ids, config)


def test_no_tokens():
    layer, q = _layer(4, 128, 64)
    weights, ids = _routing(0, 4, 2)
    assert _check(layer, q, torch.zeros(0, 128).half(), weights, ids).shape == (0, 128)


@pytest.mark.parametrize("config", [DECODE, PREFILL])
def test_gpt_oss_block_with_empty_experts(config):
    # gpt-oss's activation (swigluoai, alpha 1.702, clamp 7) with biases on both GEMMs; experts 4 and 5 of 6 get
    # no token. Against the torch backend, and against gpt-oss's forward (interleaved rows, its swiglu) on the
    # upcast weights within the bar.
    layer, q = _layer(6, 128, 64, activation=SWIGLUOAI, bias=True, seed=1)
    weights, ids = _routing(11, 6, 2, seed=2)
    ids = torch.where(ids >= 4, ids - 4, ids)
    x = torch.randn(11, 128).half()
    out = _check(layer, q, x, weights, ids, config)
    w13, w2 = dequantized_weights(layer)
    b13 = layer.w13_bias.float()
    ref = gpt_oss_forward(x, interleave(w13, dim=1), interleave(b13, dim=1), w2, layer.w2_bias.float(), weights, ids)
    assert_close(out, ref, tol=GPT_OSS_TOLERANCE, name="vs gpt-oss forward")


def test_nongated_relu2():
    # w13 [E, I, H]: no gate/up split.
    layer, q = _layer(4, 64, 96, activation="relu2")
    weights, ids = _routing(6, 4, 2)
    _check(layer, q, torch.randn(6, 64).half() / 10, weights, ids, PREFILL)


@pytest.mark.parametrize("num_tokens", [1, 11])
def test_expert_map(num_tokens):
    # EP: 3 of 6 global experts live here; rows routed elsewhere contribute nothing.
    expert_map = torch.tensor([-1, 0, -1, 1, 2, -1], dtype=torch.int32)
    layer, q = _layer(3, 128, 64, activation=SWIGLUOAI, bias=True, expert_map=expert_map)
    weights, ids = _routing(num_tokens, 6, 2, seed=3)
    _check(layer, q, torch.randn(num_tokens, 128).half() / 10, weights, ids, DECODE)


def test_layer_backend_triton_and_auto():
    # 'auto' resolves for mxfp4 as for the other formats (torch on CPU, Triton on CUDA: 27x the torch backend at
    # T = 1 on an H200); backend="triton" runs the kernel here too.
    layer, q = _layer(4, 128, 64)
    x = torch.randn(3, 128).half() / 10
    weights, ids = _routing(3, 4, 2)
    assert layer.quant_method.kernel_for(layer, x).experts.name == "torch"  # CPU tensors
    if torch.cuda.is_available():
        assert layer.quant_method.kernel_for(layer.cuda(), x.cuda()).experts.name == "triton"
        layer.cpu()
    layer.backend = "triton"
    assert layer.quant_method.kernel_for(layer, x).experts.name == "triton"
    with torch.no_grad():
        out = layer(x, weights, ids)
    assert_close(out, _run(layer, q, x, weights, ids, "torch").double(), tol=_tol(torch.float16))


def test_refusals_name_what_is_wrong():
    layer, q = _layer(4, 128, 64)
    with pytest.raises(ValueError, match=r"backend 'triton': mxfp4 weights .* need hidden_states in"):
        TritonExperts().check_supported(torch.zeros(2, 128, dtype=torch.int8), q)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16, 64, 1024])
def test_gpt_oss_20b_size_on_gpu(num_tokens):
    # gpt-oss-20b's experts (H = I = 2880, top-4 of 32) in bf16, heuristic tiles; gpt-oss's swiglu and biases.
    layer, q = _layer(32, 2880, 2880, activation=SWIGLUOAI, bias=True, dtype=torch.bfloat16, device="cuda")
    weights, ids = _routing(num_tokens, 32, 4, seed=num_tokens, device="cuda")
    x = (torch.randn(num_tokens, 2880, device="cuda") / 10).bfloat16()
    _check(layer, q, x, weights, ids)

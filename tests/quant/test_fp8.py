"""fp8 experts (block 128x128, per channel, per tensor) through moekit.quantize, the weight loader and the torch
backend: edge shapes, empty and all-zero experts, outliers, the Triton refusal, bad inputs."""

import pytest
import torch

import moekit
from moekit import MoE, MoEConfig, QuantParams, RoutedExperts, fused_experts
from moekit.ops.quantize import dequantize_weight, quantize_weight
from moekit.quant import Fp8BlockMoEMethod, Fp8ChannelMoEMethod, Fp8TensorMoEMethod, UnquantizedMoEMethod
from moekit.quant.w8a8 import dequantized_weights
from moekit.testing import (
    QUANT_REFERENCE_TOLERANCE,
    QUANT_TOLERANCES,
    TOLERANCES,
    Tolerance,
    assert_close,
    make_moe_inputs,
    reference_quantized_experts,
)
from tests.quant.cases import build, check_end_to_end, check_storage, reference, run

SCHEMES = ["fp8_block", "fp8_channel", "fp8_tensor"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_storage(scheme):
    check_storage(scheme, torch.float8_e4m3fn)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("num_tokens", "top_k", "hidden", "inter", "dtype"), [
    (1, 2, 256, 192, torch.bfloat16),   # decode; block: I = 192 is not a multiple of 128 (gate/up blocked apart)
    (7, 1, 130, 67, torch.float32),     # odd T, top_k = 1, odd H and I (short edge blocks); tight tolerance
    (9, 8, 256, 128, torch.float16),    # top_k = E
])
def test_matches_references(scheme, num_tokens, top_k, hidden, inter, dtype):
    check_end_to_end(scheme, num_tokens=num_tokens, top_k=top_k, hidden=hidden, inter=inter, dtype=dtype)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_no_tokens_and_empty_expert(scheme):
    moe, inputs = build(scheme, num_tokens=0)
    moekit.quantize(moe, scheme)
    assert run(moe, inputs).shape == (0, 256)
    check_end_to_end(scheme, empty_experts=(2, 5), bias=True)  # two experts receive no tokens; biases
    check_end_to_end(scheme, activation="relu2")  # non-gated: w13 [E, I, H], no gate/up split


@pytest.mark.parametrize("scheme", SCHEMES)
def test_all_zero_expert_gives_zeros_not_nan(scheme):
    moe, inputs = build(scheme, num_experts=4, top_k=1)
    with torch.no_grad():
        moe.routed_experts.w13[1] = 0
        moe.routed_experts.w2[1] = 0
    moekit.quantize(moe, scheme)
    inputs["topk_ids"] = torch.full_like(inputs["topk_ids"], 1)  # every token to the all-zero expert
    out = run(moe, inputs)
    assert torch.equal(out, torch.zeros_like(out))
    zero_rows = inputs["hidden_states"].clone()
    zero_rows[3] = 0  # an all-zero token too: activation scale 0, no NaN
    inputs["hidden_states"], inputs["topk_ids"] = zero_rows, torch.zeros_like(inputs["topk_ids"])
    out = run(moe, inputs)
    assert torch.isfinite(out).all() and torch.equal(out[3], torch.zeros(256, dtype=out.dtype))


@pytest.mark.parametrize("scheme", [*SCHEMES, "int8_channel"])
def test_one_huge_outlier_per_token(scheme):
    # Per-token scales: an outlier coarsens its own token (group: its own 128 columns), never NaN/inf; the
    # backend still matches the reference on the same codes.
    moe, inputs = build(scheme, num_tokens=9, dtype=torch.float32)
    x = inputs["hidden_states"]
    x[torch.arange(9), torch.randint(0, 256, (9,))] = 3e4
    moekit.quantize(moe, scheme)
    out = run(moe, inputs)
    assert torch.isfinite(out).all()
    assert_close(out, reference(moe, inputs), tol=QUANT_REFERENCE_TOLERANCE)


@pytest.mark.parametrize("scheme", [*SCHEMES, "int8_channel"])
def test_non_finite_weight_is_refused(scheme):
    # Quantized, an inf becomes NaN scales and the layer would output NaN: moekit.quantize raises instead.
    moe, _ = build(scheme)
    with torch.no_grad():
        moe.routed_experts.w13[2, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="w_NK: expected finite values"):
        moekit.quantize(moe, scheme)


@pytest.mark.parametrize("scheme", [*SCHEMES, "int8_channel"])
def test_refused_quantization_leaves_the_layer_as_it_was(scheme):
    # inf in the last expert (one without tokens) is refused while storing it, after the other experts' codes were
    # written: the float weights, biases and method come back, and the layer runs exactly as before.
    moe, inputs = build(scheme, bias=True, empty_experts=(7,))
    layer = moe.routed_experts
    with torch.no_grad():
        layer.w2[7, 0, 0] = float("inf")
    before, params = run(moe, inputs), dict(layer.named_parameters())
    with pytest.raises(ValueError, match="w_NK: expected finite values"):
        moekit.quantize(moe, scheme)
    assert type(layer.quant_method) is UnquantizedMoEMethod and layer.params_dtype == torch.bfloat16
    after = dict(layer.named_parameters())
    assert after.keys() == params.keys() and all(after[n] is p for n, p in params.items())  # the same Parameters
    assert layer.w13.dtype == torch.bfloat16 and torch.equal(run(moe, inputs), before)


@pytest.mark.parametrize("k", [1, 2])
def test_router_weights_on_input(k):
    # Llama4 folds the weights into x (K = 1) or expands x to K rows (finalize sums them in the layer's dtype).
    cfg = MoEConfig(num_experts=4, top_k=k, hidden_size=128, intermediate_size=128,
                    routing=moekit.RoutingConfig(scoring_func="sigmoid", renormalize=False,
                                                 apply_weights_on_input=True))
    moe = MoE(cfg, dtype=torch.bfloat16)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        before = moe(x)
        moekit.quantize(moe, "fp8_block")
        out = moe(x)
    assert out.dtype == torch.bfloat16
    assert_close(out, before, tol=moekit.testing.QUANT_TOLERANCES["fp8_e4m3"])


def test_expert_map():
    # EP: 3 of 6 global experts live here; rows of the others contribute nothing, and stay out of per-tensor amax.
    expert_map = torch.tensor([-1, 0, -1, 1, 2, -1], dtype=torch.int32)
    inputs = make_moe_inputs(11, 6, 128, 64, 2, seed=3)
    layer = RoutedExperts(3, 128, 64, expert_map=expert_map, dtype=torch.float32)
    with torch.no_grad():
        layer.w13.copy_(inputs["w13"][[1, 3, 4]])
        layer.w2.copy_(inputs["w2"][[1, 3, 4]])
    moekit.quantize(layer, "fp8_tensor")
    with torch.no_grad():
        out = layer(inputs["hidden_states"], inputs["topk_weights"], inputs["topk_ids"])
    ref = reference_quantized_experts(inputs["hidden_states"], layer.w13, layer.w2, inputs["topk_weights"],
                                      inputs["topk_ids"], layer.quant_method.quant_params(layer),
                                      expert_map=layer.expert_map)
    assert_close(out, ref, tol=QUANT_REFERENCE_TOLERANCE)


def test_static_activation_scales():
    # Per-tensor static scales (a checkpoint's input_scale): the kernel uses them instead of amax, and codes
    # saturate at ±448 where the scale is too small.
    inputs = make_moe_inputs(6, 4, 128, 64, 2)
    layer = RoutedExperts(4, 128, 64, dtype=torch.float32)
    with torch.no_grad():
        layer.w13.copy_(inputs["w13"])
        layer.w2.copy_(inputs["w2"])
    moekit.quantize(layer, "fp8_tensor")
    q = layer.quant_method.quant_params(layer)
    q = QuantParams(weight_dtype=q.weight_dtype, act_dtype=q.act_dtype, w13_scale=q.w13_scale, w2_scale=q.w2_scale,
                    granularity="tensor", a13_scale=torch.tensor([0.004]), a2_scale=torch.tensor(0.0005))
    args = (inputs["hidden_states"], layer.w13, layer.w2, inputs["topk_weights"], inputs["topk_ids"])
    with torch.no_grad():
        out = fused_experts(*args, quant=q, backend="torch")
    assert_close(out, reference_quantized_experts(*args, q), tol=QUANT_REFERENCE_TOLERANCE)


def test_weight_loader_fills_block_scales_per_shard():
    # A checkpoint's per-expert fp8 shards + weight_scale_inv loaded through the layer's loader equal
    # moekit.quantize of the same float weights; I = 192 puts gate and up scales in rows [0, 2) and [2, 4).
    torch.manual_seed(1)
    w13, w2 = torch.randn(3, 384, 256), torch.randn(3, 256, 192)
    quantized = RoutedExperts(3, 256, 192, dtype=torch.float32)
    with torch.no_grad():
        quantized.w13.copy_(w13)
        quantized.w2.copy_(w2)
    moekit.quantize(quantized, "fp8_block")
    loaded = RoutedExperts(3, 256, 192, quant_method=Fp8BlockMoEMethod(), dtype=torch.float32)
    assert loaded.w13_scale.shape == (3, 4, 2) and loaded.w2_scale.shape == (3, 2, 2)
    for e in range(3):
        for shard, w, param, scale in (("w1", w13[e, :192], loaded.w13, loaded.w13_scale),
                                       ("w3", w13[e, 192:], loaded.w13, loaded.w13_scale),
                                       ("w2", w2[e], loaded.w2, loaded.w2_scale)):
            q, s = quantize_weight(w, "fp8_e4m3", "block", (128, 128))
            param.weight_loader(param, q, shard, e)
            scale.weight_loader(scale, s, shard, e)
    loaded.process_weights_after_loading()
    for name in ("w13", "w2", "w13_scale", "w2_scale"):
        a, b = getattr(loaded, name), getattr(quantized, name)
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a,
                           b.view(torch.uint8) if b.dtype != torch.float32 else b), name


def test_per_tensor_shards_are_requantized_to_their_max():
    # w1 and w3 of a per-tensor checkpoint carry their own scales ([1] or 0-d); after loading, each expert keeps
    # the larger one and the other shard's codes are requantized to it (vLLM).
    layer = RoutedExperts(2, 128, 64, quant_method=Fp8TensorMoEMethod(), dtype=torch.bfloat16)
    assert layer.w13_scale.shape == (2, 2)
    w1, w3, w2 = torch.randn(64, 128), torch.randn(64, 128) * 4, torch.randn(128, 64)
    for e in range(2):
        for shard, w in (("w1", w1), ("w3", w3), ("w2", w2)):
            q, s = quantize_weight(w, "fp8_e4m3", "tensor")
            param = layer.w2 if shard == "w2" else layer.w13
            scale = layer.w2_scale if shard == "w2" else layer.w13_scale
            param.weight_loader(param, q, shard, e)
            scale.weight_loader(scale, s.reshape(1) if shard == "w1" else s, shard, e)
    with pytest.raises(RuntimeError, match="call layer.process_weights_after_loading"):
        layer(torch.randn(2, 128, dtype=torch.bfloat16), torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int32))
    layer.process_weights_after_loading()
    assert layer.w13_scale.shape == (2,) and not layer.w13_scale.requires_grad
    assert layer.w13_scale[0] == w3.abs().max() / 448 or torch.isclose(layer.w13_scale[0], w3.abs().max() / 448)
    w13, _ = dequantized_weights(layer)
    rel = (w13[0] - torch.cat((w1, w3))).norm(dim=1) / torch.cat((w1, w3)).norm(dim=1)
    assert rel[64:].max() < 0.04  # w3 kept its codes
    assert rel[:64].max() < 0.25  # w1 lost resolution to w3's 4x larger scale, but stays close


@pytest.mark.parametrize("static", [False, True])
def test_per_tensor_merge_on_a_meta_layer(static):
    # A layer built on the meta device (materialized later) merges its scales' shapes; the requantization loop
    # read the meta values (Tensor.item() cannot be called on meta tensors).
    layer = RoutedExperts(4, 64, 32, quant_method=Fp8TensorMoEMethod(static_input_scales=static), device="meta")
    layer.process_weights_after_loading()
    assert layer.w13_scale.shape == (4,) and layer.w13_scale.device.type == "meta"


def test_auto_backend_and_triton_accepts_the_codes(monkeypatch):
    # 'auto' is torch on CPU and on a GPU without fp8 dots, Triton on CUDA otherwise
    # (tests/kernel/test_triton_experts_w8a8.py), on x's codes from prepare.
    from moekit.ops import quantize as w8a8_dots

    moe, inputs = build("fp8_block")
    moekit.quantize(moe, "fp8_block")
    re, x = moe.routed_experts, inputs["hidden_states"]
    assert re.quant_method.kernel_for(re, x).experts.name == "torch"
    cuda = torch.device("cuda")
    for capability, want in (((8, 0), False), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert w8a8_dots.native_8bit_dots("fp8_e4m3", cuda) is want
        assert w8a8_dots.native_8bit_dots("int8", cuda)
    assert not w8a8_dots.native_8bit_dots("int8", torch.device("cpu"))
    monkeypatch.undo()
    pytest.importorskip("triton")
    from moekit.kernel.triton_experts import TritonExperts

    q = moe.routed_experts.quant_method.quant_params(moe.routed_experts)
    TritonExperts().check_supported(inputs["hidden_states"].to(torch.float8_e4m3fn), q)
    with pytest.raises(ValueError, match=r"backend 'triton': expected hidden_states as torch.float8_e4m3fn codes "
                                         r"for fp8_e4m3 block 128x128 \(activations fp8_e4m3 per group\)"):
        TritonExperts().check_supported(inputs["hidden_states"], q)


def test_gradient_is_refused():
    moe, inputs = build("fp8_channel")
    moekit.quantize(moe, "fp8_channel")
    x = inputs["hidden_states"].requires_grad_()
    with pytest.raises(ValueError, match="quantized experts .* no backward"):
        moe(x, topk_weights=inputs["topk_weights"], topk_ids=inputs["topk_ids"])


def test_bad_inputs_are_named():
    moe, _ = build("fp8_block")
    with pytest.raises(ValueError, match="scheme: expected one of"):
        moekit.quantize(moe, "fp4")
    with pytest.raises(TypeError, match="moe: expected a moekit.MoE or RoutedExperts"):
        moekit.quantize(torch.nn.Linear(2, 2), "fp8_block")
    moekit.quantize(moe, "fp8_block")
    with pytest.raises(ValueError, match="moe: expected unquantized routed experts, got quant method 'fp8_block'"):
        moekit.quantize(moe, "fp8_channel")
    re = moe.routed_experts
    with pytest.raises(TypeError, match="loaded_weight: expected dtype float8_e4m3fn for w13"):
        re.weight_loader(re.w13, torch.zeros(192, 256, dtype=torch.bfloat16), "w1", 0)
    with pytest.raises(ValueError, match=r"loaded_weight: expected shape \(2, 2\) for w13_scale\[0\] shard 'w3'"):
        re.weight_loader(re.w13_scale, torch.ones(4, 2), "w3", 0)
    unq = RoutedExperts(2, 128, 64, dtype=torch.float32)
    with pytest.raises(TypeError, match="loaded_weight: expected dtype float32 for w13"):
        unq.weight_loader(unq.w13, torch.zeros(64, 128, dtype=torch.float8_e4m3fn), "w1", 0)
    # The kernel checks the scales against the weights, naming them.
    inputs = make_moe_inputs(3, 8, 256, 192, 2)
    q = re.quant_method.quant_params(re)
    bad = QuantParams(weight_dtype="fp8_e4m3", act_dtype="fp8_e4m3", w13_scale=q.w13_scale[:, :3], w2_scale=q.w2_scale,
                      granularity="block", block_shape=(128, 128))
    args = (inputs["hidden_states"].bfloat16(), re.w13, re.w2, inputs["topk_weights"], inputs["topk_ids"])
    with pytest.raises(ValueError, match=r"quant.w13_scale: expected shape \(8, 4, 2\)"):
        fused_experts(*args, quant=bad, backend="torch")
    with pytest.raises(TypeError, match="w13: expected dtype int8"):
        fused_experts(*args, quant=QuantParams(weight_dtype="int8", act_dtype="int8", w13_scale=q.w13_scale,
                                               w2_scale=q.w2_scale, granularity="block", block_shape=(128, 128)),
                      backend="torch")


def test_quant_params_validation():
    s = torch.ones(2)
    with pytest.raises(ValueError, match="quant.granularity: expected None or one of"):
        QuantParams(weight_dtype="fp8_e4m3", granularity="row", w13_scale=s, w2_scale=s)
    with pytest.raises(ValueError, match="quant.block_shape: expected a shape with granularity 'block'"):
        QuantParams(weight_dtype="fp8_e4m3", granularity="block", w13_scale=s, w2_scale=s)
    with pytest.raises(ValueError, match="quant.w13_scale/w2_scale: quantized weights need both scales"):
        QuantParams(weight_dtype="fp8_e4m3", granularity="channel", w13_scale=s)
    with pytest.raises(ValueError, match="quant.act_dtype: 'fp8_e4m3' needs quant.granularity"):
        QuantParams(weight_dtype="fp8_e4m3", act_dtype="fp8_e4m3")
    with pytest.raises(ValueError, match="quant.a13_scale: a static activation scale needs"):
        QuantParams(weight_dtype="fp8_e4m3", act_dtype="fp8_e4m3", granularity="channel", w13_scale=s, w2_scale=s,
                    a13_scale=torch.ones(1))


def test_channel_method_creates_n_first_scales():
    layer = RoutedExperts(4, 96, 40, quant_method=Fp8ChannelMoEMethod(), bias=True, dtype=torch.bfloat16)
    shapes = {n: (p.dtype, tuple(p.shape)) for n, p in layer.named_parameters()}
    assert shapes == {"w13": (torch.float8_e4m3fn, (4, 80, 96)), "w2": (torch.float8_e4m3fn, (4, 96, 40)),
                      "w13_scale": (torch.float32, (4, 80, 1)), "w2_scale": (torch.float32, (4, 96, 1)),
                      "w13_bias": (torch.bfloat16, (4, 80)), "w2_bias": (torch.bfloat16, (4, 96))}
    assert layer.params_dtype == torch.bfloat16
    w = torch.randn(40, 96)
    q, s = quantize_weight(w, "fp8_e4m3", "channel")
    layer.w13_scale.weight_loader(layer.w13_scale, s, "w3", 2)
    assert torch.equal(layer.w13_scale[2, 40:], s) and torch.equal(layer.w13_scale[2, :40], torch.ones(40, 1))
    assert torch.equal(dequantize_weight(q, s, "channel"), q.float() * s)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_casting_the_layer_keeps_codes_and_scales(scheme):
    # .to(bf16)/.half() cast every floating tensor, float8 codes and fp32 scales included: the next forward failed
    # and the scales had lost their precision. Now the codes and scales stay; biases and the layer's dtype follow.
    moe, inputs = build(scheme, dtype=torch.float32, bias=True)
    moekit.quantize(moe, scheme)
    want = run(moe, inputs)
    re = moe.routed_experts
    before = {n: p.detach().clone() for n, p in re.named_parameters() if n in ("w13", "w2", "w13_scale", "w2_scale")}
    order = [n for n, _ in re.named_parameters()]
    moe.to(torch.bfloat16)
    assert re.params_dtype == torch.bfloat16 and re.w13_bias.dtype == torch.bfloat16
    assert [n for n, _ in re.named_parameters()] == order
    for name, value in before.items():
        assert torch.equal(getattr(re, name).view(torch.uint8) if value.dtype == torch.float8_e4m3fn
                           else getattr(re, name), value.view(torch.uint8) if value.dtype == torch.float8_e4m3fn
                           else value), name
    bf16_inputs = {**inputs, "hidden_states": inputs["hidden_states"].bfloat16()}
    out = run(moe, bf16_inputs)
    assert out.dtype == torch.bfloat16
    # The same codes as before the cast: the reference on them, as check_end_to_end compares a bf16 layer.
    tol = Tolerance(max=max(QUANT_REFERENCE_TOLERANCE.max, TOLERANCES[torch.bfloat16].max),
                    rms=max(QUANT_REFERENCE_TOLERANCE.rms, TOLERANCES[torch.bfloat16].rms))
    assert_close(out, reference(moe, bf16_inputs), tol=tol)
    assert_close(out, want.double(), tol=QUANT_TOLERANCES["fp8_e4m3"], name="vs the fp32 layer")

"""4/8-bit weight-only experts (w4a16 / w8a16 with group scales): QuantParams, the quant method, ``moekit.quantize``
and the torch backend (the checkpoint loaders: test_wna16_loading.py; the Triton backend:
tests/kernel/test_triton_experts_wna16.py)."""

import pytest
import torch

import moekit
from moekit import QuantParams, RoutedExperts, fused_experts
from moekit.quant import WNA16MoEMethod
from moekit.quant import mxfp4, wna16
from moekit.testing import (
    QUANT_REFERENCE_TOLERANCE,
    QUANT_TOLERANCES,
    TOLERANCES,
    Tolerance,
    assert_close,
    make_moe_inputs,
    reference_experts,
)
from tests.quant.cases import build, routed_bytes, run


def _scales(e=2, n=4, g=2, dtype=torch.bfloat16):
    return torch.ones(e, n, g, dtype=dtype)


@pytest.mark.parametrize(("weight_dtype", "group_size", "zp", "scheme"), [
    ("int4", 128, False, "w4a16_g128"),
    ("int4", 128, True, "w4a16_g128_asym"),
    ("int8", 128, False, "w8a16_g128"),
    ("int4", 32, False, "w4a16_g32"),
    ("int4", -1, False, "w4a16_channel"),   # one group per row
])
def test_quant_params_scheme_and_describe(weight_dtype, group_size, zp, scheme):
    s = _scales()
    z = torch.zeros_like(s, dtype=torch.uint8) if zp else None
    q = QuantParams(weight_dtype=weight_dtype, granularity="group", group_size=group_size, w13_scale=s, w2_scale=s,
                    w13_zp=z, w2_zp=z)
    assert q.scheme == scheme and q.is_quantized and q.act_granularity is None
    assert q.bits == (4 if weight_dtype == "int4" else 8)
    assert q.describe() == (f"{weight_dtype} group {group_size} {'asym' if zp else 'sym'} "
                            "(activations unquantized)")


def test_quant_params_8bit_cases_unchanged():
    s = torch.ones(2, 4, 1)
    q = QuantParams(weight_dtype="int8", act_dtype="int8", granularity="channel", w13_scale=s, w2_scale=s)
    assert q.scheme == "int8_channel" and q.bits is None and q.group_size is None


@pytest.mark.parametrize(("change", "field"), [
    ({"act_dtype": "int8"}, "quant.act_dtype"),              # weight-only
    ({"group_size": 0}, "quant.group_size"),
    ({"group_size": True}, "quant.group_size"),
    ({"group_size": None}, "quant.group_size"),
    ({"weight_dtype": "fp8_e4m3"}, "quant.weight_dtype"),
    ({"w13_zp": torch.zeros(2, 4, 2, dtype=torch.uint8)}, "quant.w13_zp/w2_zp"),     # only one of the pair
    ({"w13_zp": torch.zeros(2, 4, 2), "w2_zp": torch.zeros(2, 4, 2)}, "quant.w13_zp"),  # float zero points
    ({"w13_zp": torch.zeros(2, 4, 3, dtype=torch.uint8), "w2_zp": torch.zeros(2, 4, 3, dtype=torch.uint8)},
     "quant.w13_zp"),                                          # not the scales' shape
    ({"w13_scale": torch.ones(4, 2)}, "quant.w13_scale"),    # not [E, N, G]
    ({"w2_scale": torch.ones(2, 4, 2, dtype=torch.int32)}, "quant.w2_scale"),
    ({"granularity": "channel", "group_size": None}, "quant.granularity"),  # int4 needs groups
])
def test_quant_params_refusals_name_the_field(change, field):
    kw = dict(weight_dtype="int4", granularity="group", group_size=128, w13_scale=_scales(), w2_scale=_scales())
    kw.update(change)
    with pytest.raises(ValueError, match=field):
        QuantParams(**kw)


def test_group_size_only_with_groups():
    s = torch.ones(2, 4, 1)
    with pytest.raises(ValueError, match="quant.group_size"):
        QuantParams(weight_dtype="int8", granularity="channel", group_size=128, w13_scale=s, w2_scale=s)


# ------------------------------------------------------------------ the layer: moekit.quantize and the torch backend

SCHEMES = ["w4a16_g128", "w4a16_g128_asym", "w8a16_g128"]


def dequantized_weights(layer):
    """float32 (w13, w2) of a WNA16 or MXFP4 layer."""
    module = mxfp4 if isinstance(layer.quant_method, mxfp4.MXFP4MoEMethod) else wna16
    return module.dequantized_weights(layer)


def _reference(layer, inputs):
    """fp64 experts on the layer's own dequantized weights (no other rounding)."""
    w13, w2 = dequantized_weights(layer)
    return reference_experts(inputs["hidden_states"], w13, w2, inputs["topk_weights"], inputs["topk_ids"],
                             activation=layer.activation, w13_bias_E2I=layer.w13_bias, w2_bias_EH=layer.w2_bias,
                             expert_map=layer.expert_map)


def _tol(dtype):
    # Same weights as the reference: only fp32 GEMMs and the output's rounding to the layer dtype differ.
    tight, rounding = QUANT_REFERENCE_TOLERANCE, TOLERANCES[dtype]
    return Tolerance(max=max(tight.max, rounding.max), rms=max(tight.rms, rounding.rms))


def _check_layer(moe, inputs, before=None, qdtype=None):
    out = run(moe, inputs)
    assert out.dtype == inputs["hidden_states"].dtype and torch.isfinite(out).all()
    assert_close(out, _reference(moe.routed_experts, inputs), tol=_tol(out.dtype), name="vs dequantized reference")
    if before is not None:
        assert_close(out, before, tol=QUANT_TOLERANCES[qdtype], name="vs unquantized")
    return out


def _vllm_inputs(inputs):
    """vLLM's wNa16 test inputs: x = randn / 10 (the layer's weights stay nn.Linear-scaled)."""
    g = torch.Generator().manual_seed(7)
    x = inputs["hidden_states"]
    inputs["hidden_states"] = (torch.randn(x.shape, generator=g) / 10).to(x.dtype)
    return inputs


@pytest.mark.parametrize("scheme", SCHEMES)
def test_storage_stays_packed(scheme):
    moe, _ = build(scheme, hidden=512, inter=256)
    re = moe.routed_experts
    before = routed_bytes(re)
    moekit.quantize(moe, scheme)
    assert re.w13.dtype == re.w2.dtype == torch.uint8
    assert re.w13_scale.dtype == torch.bfloat16  # the weights' dtype: the scales are never rounded again
    assert all(not p.requires_grad for p in re.parameters(recurse=False))
    ratio = routed_bytes(re) / before
    assert ratio <= (0.3 if scheme.startswith("w4") else 0.52), ratio  # scales and zero points included
    big = re.w2.numel()
    for value in (*vars(re).values(), *re._buffers.values(), *re._parameters.values()):
        if isinstance(value, torch.Tensor) and value.numel() >= big:
            assert value.dtype == torch.uint8, f"a {value.dtype} tensor of {value.numel()} elements is left"
    assert re.params_dtype == torch.bfloat16
    assert re.quant_method.quant_params(re).scheme == scheme  # the key of tuned tables
    assert re.to(torch.float16).w13_scale.dtype == torch.bfloat16  # a cast moves activations, not scales


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("num_tokens", "top_k", "hidden", "inter", "dtype"), [
    (1, 2, 256, 192, torch.bfloat16),   # decode; I = 192 is not a multiple of g = 128 (a short last group)
    (7, 1, 130, 67, torch.float32),     # odd T, top_k = 1, odd H and I: a padding nibble per row
    (9, 8, 256, 128, torch.float16),    # top_k = E
])
def test_quantize_matches_references(scheme, num_tokens, top_k, hidden, inter, dtype):
    moe, inputs = build(scheme, num_tokens=num_tokens, top_k=top_k, hidden=hidden, inter=inter, dtype=dtype)
    inputs = _vllm_inputs(inputs)
    before = run(moe, inputs)
    moekit.quantize(moe, scheme)
    _check_layer(moe, inputs, before, "int4" if scheme.startswith("w4") else "int8")


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_group_sizes_and_zero_points(group_size, sym, bits):
    moe, inputs = build("", num_tokens=11, hidden=192, inter=160, dtype=torch.bfloat16)
    inputs = _vllm_inputs(inputs)
    with torch.no_grad():
        WNA16MoEMethod(bits=bits, group_size=group_size, sym=sym).quantize_layer(moe.routed_experts)
    q = moe.routed_experts.quant_method.quant_params(moe.routed_experts)
    assert q.w13_scale.shape == (8, 320, -(-192 // group_size)) and (q.w13_zp is None) == sym
    _check_layer(moe, inputs)


def test_edge_cases():
    moe, inputs = build("w4a16_g128", num_tokens=0)
    moekit.quantize(moe, "w4a16_g128")
    assert run(moe, inputs).shape == (0, 256)                      # T = 0
    for kw in (dict(empty_experts=(2, 5), bias=True),              # experts without tokens; biases
               dict(activation="relu2"),                           # non-gated: w13 [E, I, H/2]
               dict(num_tokens=5, num_experts=4, top_k=4)):        # odd T, top_k = E
        moe, inputs = build("w4a16_g128_asym", **kw)
        moekit.quantize(moe, "w4a16_g128_asym")
        _check_layer(moe, _vllm_inputs(inputs))


@pytest.mark.parametrize("scheme", ["w4a16_g128", "mxfp4"])
def test_expert_map(scheme):
    # This rank holds experts 1, 4, 6 of 8 (as local 0, 1, 2); the others' rows contribute nothing.
    inputs = _vllm_inputs(make_moe_inputs(13, 8, 128, 96, 3, dtype=torch.bfloat16))
    expert_map = torch.full((8,), -1, dtype=torch.int32)
    expert_map[[1, 4, 6]] = torch.arange(3, dtype=torch.int32)
    layer = RoutedExperts(3, 128, 96, expert_map=expert_map, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.w13.copy_(inputs["w13"][[1, 4, 6]])
        layer.w2.copy_(inputs["w2"][[1, 4, 6]])
    moekit.quantize(layer, scheme)
    with torch.no_grad():
        out = layer(inputs["hidden_states"], inputs["topk_weights"], inputs["topk_ids"])
    assert_close(out, _reference(layer, inputs), tol=_tol(torch.bfloat16))


def test_bad_scale_shapes_refused_by_the_kernel():
    moe, inputs = build("w4a16_g128")
    moekit.quantize(moe, "w4a16_g128")
    layer = moe.routed_experts
    q = layer.quant_method.quant_params(layer)
    bad = QuantParams(weight_dtype="int4", granularity="group", group_size=64, w13_scale=q.w13_scale,
                      w2_scale=q.w2_scale)  # the scales hold g = 128 groups
    with pytest.raises(ValueError, match=r"quant.w13_scale: expected shape \(8, 384, 4\)"):
        fused_experts(inputs["hidden_states"], layer.w13, layer.w2, inputs["topk_weights"], inputs["topk_ids"],
                      quant=bad, backend="torch")
    with pytest.raises(ValueError, match="w13: expected uint8 codes of shape"):
        fused_experts(inputs["hidden_states"], layer.w13[:, :, :64], layer.w2, inputs["topk_weights"],
                      inputs["topk_ids"], quant=q, backend="torch")


def test_quantize_refuses_a_quantized_layer_and_unknown_schemes():
    moe, _ = build("w4a16_g128")
    moekit.quantize(moe, "w4a16_g128")
    with pytest.raises(ValueError, match="expected unquantized routed experts"):
        moekit.quantize(moe, "w8a16_g128")
    with pytest.raises(ValueError, match="scheme"):
        moekit.quantize(build("")[0], "w3a16_g128")
    with pytest.raises(ValueError, match="checkpoint_format: AWQ stores 4-bit weights with zero points"):
        WNA16MoEMethod(bits=4, sym=True, checkpoint_format="awq")



@pytest.mark.parametrize("scheme", ["w4a16_g128_asym", "w8a16_g128"])
def test_quantize_refuses_non_finite_weights_and_keeps_the_layer(scheme):
    # NaN in an expert without tokens: refused (its groups would dequantize to NaN), the layer runs as before.
    moe, inputs = build("", empty_experts=(5,))
    with torch.no_grad():
        moe.routed_experts.w13[5, 7, 100] = float("nan")
    before = run(moe, inputs)
    with pytest.raises(ValueError, match="w_NK: expected finite values"):
        moekit.quantize(moe, scheme)
    assert moe.routed_experts.quant_method.name == "unquantized" and torch.equal(run(moe, inputs), before)


def test_reference_quantized_experts_points_weight_only_weights_to_reference_experts():
    # It models 8-bit weights and activations; a w4a16 QuantParams failed on an internal 'granularity' check.
    from moekit.testing import reference_quantized_experts

    layer = moekit.quantize(RoutedExperts(4, 64, 32, backend="torch"), "w4a16_g128")
    inp = make_moe_inputs(3, 4, 64, 32, 2)
    with pytest.raises(ValueError, match=r"quant: expected 8-bit weights .*, got int4 group 128 .*use reference_experts"):
        reference_quantized_experts(inp["hidden_states"], layer.w13, layer.w2, inp["topk_weights"],
                                    inp["topk_ids"], layer.quant_method.quant_params(layer))

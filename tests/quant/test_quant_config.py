"""get_quant_method: each quantization_config spelling in the wild -> its method; everything else refused, named.
Static activation scales (input_scale): loaded per expert and shard, one per layer after loading."""

import pytest
import torch

from moekit import RoutedExperts
from moekit.quant import (
    Fp8BlockMoEMethod,
    Fp8ChannelMoEMethod,
    Fp8TensorMoEMethod,
    Int8ChannelMoEMethod,
    UnsupportedQuantization,
    get_quant_method,
)
from moekit.testing import QUANT_REFERENCE_TOLERANCE, assert_close, make_moe_inputs, reference_quantized_experts


def ct(weights, acts, **top):
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            **top}


FP8 = dict(num_bits=8, type="float", symmetric=True, dynamic=False)
INT8 = dict(num_bits=8, type="int", symmetric=True, dynamic=False)

CASES = [
    # DeepSeek-V3 / Qwen3-FP8
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]},
     Fp8BlockMoEMethod, False),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, Fp8TensorMoEMethod, False),  # no blocks: per tensor
    ({"quant_method": "fp8", "activation_scheme": "static"}, Fp8TensorMoEMethod, True),
    # compressed-tensors FP8_BLOCK, FP8_DYNAMIC, FP8 (static and dynamic), W8A8
    (ct({**FP8, "strategy": "block", "block_structure": [128, 128]},
        {**FP8, "strategy": "group", "group_size": 128, "dynamic": True}), Fp8BlockMoEMethod, False),
    (ct({**FP8, "strategy": "channel"}, {**FP8, "strategy": "token", "dynamic": True}), Fp8ChannelMoEMethod, False),
    (ct({**FP8, "strategy": "tensor"}, {**FP8, "strategy": "tensor"}), Fp8TensorMoEMethod, True),
    (ct({**FP8, "strategy": "tensor"}, {**FP8, "strategy": "tensor", "dynamic": True}), Fp8TensorMoEMethod, False),
    (ct({**INT8, "strategy": "channel"}, {**INT8, "strategy": "token", "dynamic": True}, format="int-quantized"),
     Int8ChannelMoEMethod, False),
    # ModelOpt, as config.json and as hf_quant_config.json nest it
    ({"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": None}, Fp8TensorMoEMethod, True),
    ({"quant_method": "modelopt", "quantization": {"quant_algo": "FP8"}}, Fp8TensorMoEMethod, True),
]


@pytest.mark.parametrize(("cfg", "cls", "static"), CASES)
def test_dispatch(cfg, cls, static):
    method = get_quant_method(cfg)
    assert type(method) is cls and method.static_input_scales is static


@pytest.mark.parametrize(("cfg", "match"), [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits: gptq 3-bit weights are not supported yet"),
    ({"quant_method": "gptq", "bits": 4.0, "group_size": 128}, "bits: gptq 4.0-bit weights are not supported yet"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}, "desc_act: GPTQ group activation"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "gptq_v2"}, "checkpoint_format: gptq 'gptq_v2'"),
    ({"quant_method": "awq", "version": "gemv"}, "version: awq 'gemv' is not supported yet"),
    ({"quant_method": "awq", "zero_point": False}, "zero_point: awq without zero points"),
    ({"quant_method": "bitsandbytes"}, "'bitsandbytes' checkpoints are not supported yet"),
    ({"quant_method": "nonsense"}, "quant_method: unknown 'nonsense'"),
    ({}, "quant_method: unknown None"),
    ({"quant_method": "fp8", "weight_block_size": [64, 64]}, r"weight_block_size: fp8 blocks \[64, 64\]"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt: fp8 'e5m2'"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
     "activation_scheme: fp8 block weights with static"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "quant_algo: modelopt 'NVFP4' is not supported yet"),
    (ct({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}, {**INT8, "strategy": "token"},
        format="pack-quantized"), "input_activations: pack-quantized int 4-bit weights per group with quantized"),
    (ct({"num_bits": 2, "type": "int", "strategy": "group", "group_size": 128}, None, format="pack-quantized"),
     "weights: pack-quantized int 2-bit weights per group is not supported yet"),
    (ct({"num_bits": 4.0, "type": "int", "strategy": "group", "group_size": 128}, None, format="pack-quantized"),
     "weights: pack-quantized int 4.0-bit weights per group is not supported yet"),
    (ct({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "actorder": "group"}, None,
        format="pack-quantized"), "actorder: 'group'"),
    (ct({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}, None, format="nvfp4-pack-quantized"),
     "format: compressed-tensors 'nvfp4-pack-quantized' is not supported yet"),
    (ct({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}, None),
     "group_0.weights: int 4-bit weights"),
    (ct({**FP8, "strategy": "channel"}, None), "weight-only float 8-bit"),
    (ct({**INT8, "strategy": "tensor"}, {**INT8, "strategy": "tensor"}), "int 8-bit weights per tensor"),
    (ct({**INT8, "strategy": "channel", "symmetric": False}, {**INT8, "strategy": "token", "dynamic": True}),
     "weights.symmetric"),
    ({"quant_method": "compressed-tensors", "config_groups": {}}, "config_groups: expected a non-empty"),
    # malformed block sizes and flags: refused naming the field, never a bare TypeError or a guess
    ({"quant_method": "fp8", "weight_block_size": 128},
     r"weight_block_size: expected a list of two positive ints, got 128"),
    ({"quant_method": "fp8", "weight_block_size": [128, 0]}, r"weight_block_size: expected a list of two positive"),
    ({"quant_method": "fp8", "weight_block_size": [128.0, 128]}, r"weight_block_size: expected a list of two positive"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128, 1]}, r"weight_block_size: expected a list of two"),
    (ct({**FP8, "strategy": "block", "block_structure": 128},
        {**FP8, "strategy": "group", "group_size": 128, "dynamic": True}),
     r"weights.block_structure: expected a list of two positive ints, got 128"),
    (ct({**FP8, "strategy": "tensor"}, {**FP8, "strategy": "tensor", "dynamic": "false"}),
     r"group_0.input_activations.dynamic: expected a bool, got 'false'"),
    (ct({**FP8, "strategy": "tensor"}, {**FP8, "strategy": "tensor", "dynamic": None}),
     r"group_0.input_activations.dynamic: expected a bool, got None"),
    (ct({**FP8, "strategy": "channel"}, {**FP8, "strategy": "token", "dynamic": 1}),
     r"group_0.input_activations.dynamic: expected a bool, got 1"),
    (ct({**FP8, "strategy": "channel", "dynamic": "no"}, {**FP8, "strategy": "token", "dynamic": True}),
     r"group_0.weights.dynamic: expected a bool, got 'no'"),
])
def test_refusals_name_the_scheme(cfg, match):
    with pytest.raises(UnsupportedQuantization, match=match):
        get_quant_method(cfg)
    assert issubclass(UnsupportedQuantization, ValueError)


def test_online_transforms_refused():
    # A compressed-tensors checkpoint quantized in a rotated basis (transform_config: Hadamard, SpinQuant) needs the
    # rotation at run time; moekit has none, so loading it would compute every expert in the wrong basis.
    cfg = ct({**FP8, "strategy": "channel"}, {**FP8, "strategy": "token", "dynamic": True})
    cfg["transform_config"] = {"config_groups": {"u": {"type": "hadamard", "apply": [{"targets": ["Linear"]}]}}}
    with pytest.raises(UnsupportedQuantization, match="transform_config: compressed-tensors online transforms"):
        get_quant_method(cfg)


def test_mixed_groups_refused_and_bad_type():
    cfg = ct({**FP8, "strategy": "channel"}, {**FP8, "strategy": "token", "dynamic": True})
    cfg["config_groups"]["group_1"] = {"weights": {**FP8, "strategy": "tensor"},
                                       "input_activations": {**FP8, "strategy": "tensor"}}
    with pytest.raises(UnsupportedQuantization, match="use different schemes"):
        get_quant_method(cfg)
    with pytest.raises(TypeError, match="quantization_config: expected a dict, got list"):
        get_quant_method([])
    with pytest.raises(ValueError, match="static_input_scales: static activation scales need per-tensor"):
        Fp8BlockMoEMethod(static_input_scales=True)


def test_static_input_scales_load_and_reduce_to_the_max():
    inputs = make_moe_inputs(6, 3, 128, 64, 2)
    layer = RoutedExperts(3, 128, 64, dtype=torch.float32, quant_method=Fp8TensorMoEMethod(static_input_scales=True))
    assert layer.w13_input_scale.shape == (3, 2) and layer.w2_input_scale.shape == (3, 1)
    scales = {"w1": [0.01, 0.02, 0.015], "w3": [0.01, 0.03, 0.015], "w2": [0.002, 0.001, 0.004]}
    for shard, values in scales.items():
        param = layer.w2_input_scale if shard == "w2" else layer.w13_input_scale
        for e, v in enumerate(values):
            param.weight_loader(param, torch.tensor(v), shard, e)  # 0-d, as ModelOpt writes them
    with pytest.raises(RuntimeError, match="per-shard scales .* are loaded but not merged"):
        layer(inputs["hidden_states"], inputs["topk_weights"], inputs["topk_ids"])
    layer.process_weights_after_loading()
    q = layer.quant_method.quant_params(layer)
    assert q.a13_scale.item() == pytest.approx(0.03) and q.a2_scale.item() == pytest.approx(0.004)
    with torch.no_grad():
        out = layer(inputs["hidden_states"], inputs["topk_weights"], inputs["topk_ids"])
    ref = reference_quantized_experts(inputs["hidden_states"], layer.w13, layer.w2, inputs["topk_weights"],
                                      inputs["topk_ids"], q)
    assert_close(out, ref, tol=QUANT_REFERENCE_TOLERANCE)
    assert layer.to(torch.bfloat16).w13_input_scale.dtype == torch.float32  # stored, not cast


def _static_layer() -> RoutedExperts:
    """A per-tensor static layer whose scales an engine loaded (all 1)."""
    layer = RoutedExperts(2, 128, 64, quant_method=Fp8TensorMoEMethod(static_input_scales=True))
    for name in ("w13_scale", "w13_input_scale", "w2_input_scale"):
        getattr(layer, name).data.fill_(1.0)
    return layer


def test_scales_a_partial_load_left_out_do_not_win_the_merge():
    # strict=False may leave a shard's scales out: they start at 0, so the max over the loaded ones is what merges
    # (unit defaults requantized a loaded w1 of scale 0.02 to 1.0, and made 1.0 the layer's activation scale).
    layer = RoutedExperts(2, 128, 64, quant_method=Fp8TensorMoEMethod(static_input_scales=True))
    layer.w13_scale.data[:, 0] = 0.02  # w1 loaded, w3 not
    layer.w13_input_scale.data[:, 0] = 0.03
    layer.w2_input_scale.data[0] = 0.05  # expert 1's w2 input scale not loaded
    layer.process_weights_after_loading()
    assert torch.equal(layer.w13_scale, torch.full((2,), 0.02))
    assert layer.w13_input_scale.item() == pytest.approx(0.03) and layer.w2_input_scale.item() == pytest.approx(0.05)
    unloaded = RoutedExperts(2, 128, 64, quant_method=Fp8TensorMoEMethod(static_input_scales=True))
    with pytest.raises(ValueError, match="every static activation scale is 0"):
        unloaded.process_weights_after_loading()


def test_static_input_scales_refuse_bad_values_and_online_quantization():
    # Scales an engine loaded through weight_loader: a 0 (an expert calibration never reached) is harmless under
    # the max; NaN/inf/negative or all zeros are refused, and before anything is merged.
    layer = _static_layer()
    layer.w2_input_scale.data[1] = 0.0
    layer.process_weights_after_loading()
    assert layer.w2_input_scale.item() == 1.0
    for name, value, match in (("w2_input_scale", float("nan"), "expected finite non-negative"),
                               ("w2_input_scale", -1.0, "expected finite non-negative"),
                               ("w2_input_scale", 0.0, "every static activation scale is 0"),
                               ("w2_input_scale", 1e-40, "the largest static activation scale is .*, below the "
                                                         "smallest normal float32"),
                               ("w13_scale", float("inf"), "expected finite non-negative")):
        layer = _static_layer()
        getattr(layer, name).data.fill_(value)
        before = {n: p.detach().clone() for n, p in layer.named_parameters()}
        with pytest.raises(ValueError, match=f"{name}: {match}"):
            layer.process_weights_after_loading()
        # w13's scales were merged before w2's were checked: the layer was left half merged, unloadable again
        after = dict(layer.named_parameters())
        assert after.keys() == before.keys()
        assert all(torch.equal(after[n].view(torch.uint8), t.view(torch.uint8)) for n, t in before.items())
    with pytest.raises(ValueError, match="static_input_scales: a layer quantized from float weights"):
        Fp8TensorMoEMethod(static_input_scales=True).quantize_layer(RoutedExperts(2, 128, 64))

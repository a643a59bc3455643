"""RoutedExperts: parameters, weight_loader (per-expert checkpoint tensors), expert map."""

import pytest
import torch

from moekit import RoutedExperts
from moekit.testing import assert_close, make_moe_inputs, reference_experts


def test_parameters_and_loader_attribute():
    re = RoutedExperts(4, 16, 8, bias=True, backend="torch")
    assert re.w13.shape == (4, 16, 16) and re.w2.shape == (4, 16, 8)
    assert re.w13_bias.shape == (4, 16) and re.w2_bias.shape == (4, 16)
    assert re.w13.weight_loader == re.weight_loader


def test_parameters_are_trainable_like_linear():
    # Created frozen, the routed experts were silently skipped by an optimizer over moe.parameters().
    re = RoutedExperts(4, 16, 8, bias=True, backend="torch")
    assert all(p.requires_grad for p in re.parameters())
    inp = make_moe_inputs(5, 4, 16, 8, 2)
    re(inp["hidden_states"], inp["topk_weights"], inp["topk_ids"]).sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in re.parameters())
    # Frozen by the engine: no graph is built, and the result is the same.
    re.requires_grad_(False)
    out = re(inp["hidden_states"], inp["topk_weights"], inp["topk_ids"])
    assert out.grad_fn is None


def test_copies_keep_their_own_weight_loader():
    # Parameter's deepcopy/pickle drop python attributes: a copied layer lost weight_loader (vLLM-style loaders
    # look it up on the parameter).
    import copy
    import pickle

    re = RoutedExperts(3, 16, 8, bias=True, backend="torch")
    for clone in (copy.deepcopy(re), pickle.loads(pickle.dumps(re))):
        for p in clone.parameters():
            assert p.weight_loader.__self__ is clone
        clone.w2.weight_loader(clone.w2, torch.ones(16, 8), "w2", 1)
        assert bool((clone.w2[1] == 1).all()) and not bool((re.w2[1] == 1).all())


@pytest.mark.parametrize("flag", ["bias", "apply_router_weight_on_input"])
def test_bool_flags_reject_non_bools(flag):
    # "no" is truthy: it used to switch the feature on.
    with pytest.raises(TypeError, match=f"{flag}: expected a bool, got str 'no'"):
        RoutedExperts(3, 16, 8, **{flag: "no"})


def test_weight_loader_places_gate_up_down():
    re = RoutedExperts(3, 16, 8, bias=True, backend="torch")
    gate, up, down = torch.randn(8, 16), torch.randn(8, 16), torch.randn(16, 8)
    re.weight_loader(re.w13, gate, "w1", 2)
    re.weight_loader(re.w13, up, "w3", 2)
    re.weight_loader(re.w2, down, "w2", 2)
    assert torch.equal(re.w13[2, :8], gate) and torch.equal(re.w13[2, 8:], up) and torch.equal(re.w2[2], down)
    gb, ub, db = torch.randn(8), torch.randn(8), torch.randn(16)
    re.weight_loader(re.w13_bias, gb, "w1", 0)
    re.weight_loader(re.w13_bias, ub, "w3", 0)
    re.weight_loader(re.w2_bias, db, "w2", 0)
    assert torch.equal(re.w13_bias[0], torch.cat([gb, ub])) and torch.equal(re.w2_bias[0], db)


def test_loaded_layer_computes_the_checkpoint_function():
    E, H, I = 4, 16, 8
    inputs = make_moe_inputs(9, E, H, I, 2)
    re = RoutedExperts(E, H, I, backend="torch")
    for e in range(E):
        re.weight_loader(re.w13, inputs["w13"][e, :I], "w1", e)
        re.weight_loader(re.w13, inputs["w13"][e, I:], "w3", e)
        re.weight_loader(re.w2, inputs["w2"][e], "w2", e)
    re.process_weights_after_loading()
    out = re(inputs["hidden_states"], inputs["topk_weights"], inputs["topk_ids"])
    ref = reference_experts(inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"])
    assert_close(out, ref, torch.float32)


def test_weight_loader_with_expert_map_skips_remote_experts():
    expert_map = torch.tensor([-1, 0, -1, 1], dtype=torch.int32)
    re = RoutedExperts(2, 16, 8, expert_map=expert_map, backend="torch")
    before = re.w13.detach().clone()
    re.weight_loader(re.w13, torch.ones(8, 16), "w1", 0)  # lives elsewhere
    assert torch.equal(re.w13, before)
    re.weight_loader(re.w13, torch.ones(8, 16), "w1", 3)  # global 3 -> local 1
    assert torch.equal(re.w13[1, :8], torch.ones(8, 16))


def test_relu2_non_gated_loader():
    re = RoutedExperts(2, 16, 8, activation="relu2", backend="torch")
    assert re.w13.shape == (2, 8, 16)
    re.weight_loader(re.w13, torch.ones(8, 16), "w1", 1)
    assert torch.equal(re.w13[1], torch.ones(8, 16))
    with pytest.raises(ValueError, match="'w3' \\(up\\) does not exist"):
        re.weight_loader(re.w13, torch.ones(8, 16), "w3", 1)


def test_weight_loader_errors():
    re = RoutedExperts(3, 16, 8, backend="torch")
    with pytest.raises(ValueError, match=r"loaded_weight: expected shape \(8, 16\) for w13\[0\] shard 'w1', got \(16, 8\)"):
        re.weight_loader(re.w13, torch.ones(16, 8), "w1", 0)
    with pytest.raises(ValueError, match=r"expert_id: expected in \[0, 3\), got 3"):
        re.weight_loader(re.w13, torch.ones(8, 16), "w1", 3)
    with pytest.raises(ValueError, match="shard_id: expected one of"):
        re.weight_loader(re.w13, torch.ones(8, 16), "gate", 0)
    with pytest.raises(ValueError, match="shard_id: 'w2' does not load into 'w13'"):
        re.weight_loader(re.w13, torch.ones(16, 8), "w2", 0)
    with pytest.raises(ValueError, match="param: expected one of this layer's parameters"):
        re.weight_loader(torch.nn.Parameter(torch.ones(2)), torch.ones(2), "w1", 0)


def test_weight_loader_argument_types():
    re = RoutedExperts(3, 16, 8, backend="torch")
    # A bool indexed param.data[True] (a new leading dim) and a float raised a bare IndexError.
    for bad in (True, 1.0):
        with pytest.raises(TypeError, match=f"expert_id: expected an int, got {type(bad).__name__}"):
            re.weight_loader(re.w2, torch.ones(16, 8), "w2", bad)
    with pytest.raises(TypeError, match="loaded_weight: expected a torch.Tensor, got list"):
        re.weight_loader(re.w2, [[1.0] * 8] * 16, "w2", 0)
    re.weight_loader(re.w2, torch.ones(16, 8), "w2", torch.tensor(2))  # 0-d integer tensors are ids too
    assert torch.equal(re.w2[2], torch.ones(16, 8))


def test_expert_map_validation():
    with pytest.raises(ValueError, match="expert_map: expected 3 local experts"):
        RoutedExperts(3, 16, 8, expert_map=torch.tensor([0, 1, -1, -1]))
    with pytest.raises(ValueError, match=r"expert_map: expected values in \[-1, 2\)"):
        RoutedExperts(2, 16, 8, expert_map=torch.tensor([0, 5, -1, -1]))
    with pytest.raises(ValueError, match="expert_map: each local expert id may appear once"):
        RoutedExperts(2, 16, 8, expert_map=torch.tensor([0, 0, -1, 1]))


def test_unsupported_dtype_is_refused_at_construction():
    # A float64 layer would reject every input at its first call.
    with pytest.raises(ValueError, match="dtype: expected one of"):
        RoutedExperts(3, 16, 8, dtype=torch.float64)


def _quantized(scheme, **kw):
    from moekit import quantize

    re = RoutedExperts(4, 64, 32, backend="torch", **kw)
    with torch.no_grad():
        re.w13.normal_(0, 0.125)
        re.w2.normal_(0, 0.18)
    return quantize(re, scheme)


@pytest.mark.parametrize("scheme, name, weight, error", [
    # Float values into uint8 codes were cast (to 0), 1.0 into an e8m0 scale became byte 1 (2^-126), and an fp16
    # group scale rounded 1e-9 to 0: the parameter's own weight_loader refused all three, the layer's did not.
    ("w8a16_g128", "w13", torch.full((32, 64), 0.05), TypeError),
    ("mxfp4", "w13_scale", torch.ones(32, 2), TypeError),
    ("w4a16_g128", "w13_scale", torch.full((32, 1), 1e-9), ValueError),
])
def test_weight_loader_refuses_what_the_parameter_loader_refuses(scheme, name, weight, error):
    re = _quantized(scheme, dtype=torch.float16 if scheme == "w4a16_g128" else None)
    param = getattr(re, name)
    before = param.detach().clone()
    for loader in (re.weight_loader, param.weight_loader):
        with pytest.raises(error, match=f"loaded_weight: .*{name}"):
            loader(param, weight, "w1", 0)
    assert torch.equal(param, before)


def test_weight_loader_into_a_merged_scale_names_it():
    # fp8_tensor merges w1/w3's scales to one per expert ([E]) and the static input scales to one per layer (0-d):
    # a later weight_loader call raised a bare IndexError.
    from moekit.quant import Fp8TensorMoEMethod

    re = _quantized("fp8_tensor")
    with pytest.raises(ValueError, match="w13_scale: .*merged by process_weights_after_loading.*freshly built"):
        re.weight_loader(re.w13_scale, torch.tensor([0.5]), "w1", 0)
    re = RoutedExperts(2, 16, 8, quant_method=Fp8TensorMoEMethod(static_input_scales=True), backend="torch")
    for name, shard in (("w13_input_scale", "w1"), ("w13_input_scale", "w3"), ("w2_input_scale", "w2")):
        re.weight_loader(getattr(re, name), torch.tensor(0.5), shard, 0)  # every input scale 0 is refused
    re.process_weights_after_loading()
    for name in ("w13_input_scale", "w2_input_scale"):
        with pytest.raises(ValueError, match=f"{name}: .*merged by process_weights_after_loading"):
            re.weight_loader(getattr(re, name), torch.tensor([0.5]), "w2" if name.startswith("w2") else "w1", 1)


@pytest.mark.parametrize("source, target", [
    # Equal keys and shapes: fp8 codes became wrapped int8 values (rel err ~1), int8 codes uint8 ones.
    ("fp8_channel", "int8_channel"),
    ("int8_channel", "w8a16_g128"),
])
def test_load_state_dict_refuses_codes_of_another_dtype(source, target):
    src, dst = _quantized(source), _quantized(target)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"state_dict\['w13'\]: expected dtype .* for w13 \(quant method .*\), got "):
        dst.load_state_dict(src.state_dict())
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    dst.load_state_dict(_quantized(target).state_dict())  # the same scheme loads


@pytest.mark.parametrize("source", ["int8_channel", "fp8_channel", "w8a16_g128"])
def test_a_float_layer_refuses_codes_in_its_state_dict(source):
    # Another layer's 8-bit codes of the same shapes were copied in as numbers (an int8 code 100 became the weight
    # 100.0: rel err ~1e9), and strict=True raised only after w13 was overwritten. Refused first, as weight_loader
    # refuses them; float weights of another dtype still load (rounded, as a Linear's would be).
    dst = RoutedExperts(4, 64, 32)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    for strict in (False, True):
        with pytest.raises(RuntimeError, match=r"state_dict\['w13'\]: expected float values for w13 \(quant method "
                                               r"'unquantized'\), got (int8|uint8|float8_e4m3fn)"):
            dst.load_state_dict(_quantized(source).state_dict(), strict=strict)
        assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    dst.load_state_dict({k: v.half() for k, v in RoutedExperts(4, 64, 32).state_dict().items()})


def test_copies_keep_the_quant_methods_own_loaders():
    # A copied GPTQ layer got the layer's loader on every parameter, which cuts w1/w3 along the rows where GPTQ
    # stores them in the columns: every shard was refused.
    import copy
    import pickle

    from moekit.quant import WNA16MoEMethod

    re = RoutedExperts(2, 64, 32, quant_method=WNA16MoEMethod(group_size=32, checkpoint_format="gptq"))
    scales = torch.rand(2, 32)  # [⌈K/g⌉, N]: expert 1's gate columns
    for clone in (copy.deepcopy(re), pickle.loads(pickle.dumps(re))):
        clone.w13_scales.weight_loader(clone.w13_scales, scales, "w1", 1)
        assert torch.equal(clone.w13_scales[1, :, :32], scales) and not torch.equal(re.w13_scales[1, :, :32], scales)


def test_float_weights_loaded_then_quantized_online_are_not_refused():
    # The load record belongs to the quant method it was made under: float weights written through weight_loader
    # and then quantized by moekit.quantize (which makes codes and scales together) are not "codes without scales".
    from moekit import quantize

    layer = RoutedExperts(2, 128, 128)
    for e in range(2):
        for shard in ("w1", "w3"):
            layer.weight_loader(layer.w13, torch.randn(128, 128), shard, e)
        layer.weight_loader(layer.w2, torch.randn(128, 128), "w2", e)
    quantize(layer, "fp8_block")
    layer.process_weights_after_loading()


def test_the_load_record_both_ways_and_after_a_state_dict():
    # Scales loaded through weight_loader without their codes computed with the initial codes (a w4a16 layer's
    # zeros read as -8: max |y| 12); refused as codes without scales are. A state dict after a partial
    # weight_loader load writes whole tensors, scales with codes: no refusal then.
    from moekit.quant import Fp8BlockMoEMethod, WNA16MoEMethod

    layer = RoutedExperts(2, 64, 32, quant_method=WNA16MoEMethod(group_size=32), dtype=torch.bfloat16)
    for e in range(2):
        for shard in ("w1", "w3"):
            layer.weight_loader(layer.w13_scale, torch.ones(32, 2, dtype=torch.bfloat16), shard, e)
        layer.weight_loader(layer.w2_scale, torch.ones(64, 1, dtype=torch.bfloat16), "w2", e)
    with pytest.raises(ValueError, match=r"w13: expert 0 shard w1: not loaded through weight_loader while the "
                                         r"tensors it goes with were"):
        layer.process_weights_after_loading()
    full = _quantized("fp8_block")
    layer = RoutedExperts(4, 64, 32, quant_method=Fp8BlockMoEMethod(), backend="torch")
    layer.weight_loader(layer.w13, full.w13.data[0, :32], "w1", 0)
    layer.load_state_dict(full.state_dict())
    layer.process_weights_after_loading()

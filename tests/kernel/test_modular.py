"""ModularKernel: prepare -> experts -> finalize composition, shared experts per call, pluggable halves."""

import pytest
import torch

from moekit import (
    Experts,
    LocalPrepareFinalize,
    ModularKernel,
    MoE,
    MoEConfig,
    MoEQuantMethod,
    PrepareResult,
    QuantParams,
    UnquantizedMoEMethod,
)
from moekit import fused_experts
from moekit.kernel import get_experts, make_kernel
from moekit.testing import assert_close, make_moe_inputs, reference_experts


def _args(inputs):
    return (inputs["hidden_states"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"])


def test_kernel_is_shared_and_stateless():
    k1 = make_kernel("torch", torch.device("cpu"))
    assert k1 is make_kernel("auto", torch.device("cpu"))
    a, b = MoE(MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=8, shared_intermediate_size=8)), \
        MoE(MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=8))
    x = torch.randn(3, 16)
    assert a.routed_experts.kernel_for(x) is b.routed_experts.kernel_for(x)
    before = dict(vars(k1))
    a(x)
    b(x)
    assert vars(k1) == before  # nothing of either layer stuck to the kernel


def test_shared_experts_are_called_per_call_with_their_input():
    inputs = make_moe_inputs(5, 4, 16, 8, 2)
    kernel = make_kernel("torch", torch.device("cpu"))
    calls = []

    def shared(x):
        calls.append(x)
        return torch.full_like(x, 2.0)

    other = torch.randn(5, 16)
    out = kernel.apply(*_args(inputs), shared_experts=shared, shared_experts_input=other)
    plain = kernel.apply(*_args(inputs))
    assert len(calls) == 1 and calls[0] is other
    torch.testing.assert_close(out, plain + 2.0)


def test_shared_experts_output_is_checked_and_keeps_the_layer_dtype():
    inputs = make_moe_inputs(5, 4, 16, 8, 2)
    kernel = make_kernel("torch", torch.device("cpu"))
    plain = kernel.apply(*_args(inputs))
    # A [T, 1] output (say, a gate module passed by mistake) used to broadcast into a silently wrong [T, H] sum.
    with pytest.raises(ValueError, match=r"shared_experts: expected an output of shape \(5, 16\) \[T, H\], got \(5, 1\)"):
        kernel.apply(*_args(inputs), shared_experts=lambda x: x[:, :1])
    # A shared MLP that computes in fp32/fp64 must not promote the layer's output dtype.
    out = kernel.apply(*_args(inputs), shared_experts=lambda x: torch.full_like(x, 2.0, dtype=torch.float64))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, plain + 2.0)


class _RecordingPrepareFinalize(LocalPrepareFinalize):
    def __init__(self):
        self.events = []

    def prepare(self, *args, **kwargs):
        self.events.append("prepare")
        return super().prepare(*args, **kwargs)

    def finalize(self, output, prep: PrepareResult):
        self.events.append("finalize")
        assert prep.num_tokens == output.shape[0]
        return output * 2.0


class _ScaledTorchExperts(Experts):
    """A second backend built by composition: proves the experts half swaps independently."""

    name = "scaled"

    def run(self, *args, **kwargs):
        self.called = True
        return get_experts("torch").run(*args, **kwargs)


def test_halves_swap_independently():
    inputs = make_moe_inputs(6, 4, 16, 8, 2)
    pf, ex = _RecordingPrepareFinalize(), _ScaledTorchExperts()
    out = ModularKernel(pf, ex).apply(*_args(inputs))
    assert pf.events == ["prepare", "finalize"] and ex.called
    assert_close(out, 2.0 * reference_experts(*_args(inputs)), torch.float32)


class _HalvedW2Method(UnquantizedMoEMethod):
    """A toy 'format' that stores w2 halved and undoes it after loading: exercises the quant seam's hooks."""

    name = "halved"

    def process_weights_after_loading(self, layer):
        layer.w2.data.mul_(2.0)

    def quant_params(self, layer):
        return QuantParams()


def test_quant_method_seam():
    assert issubclass(UnquantizedMoEMethod, MoEQuantMethod)
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=16, intermediate_size=8, backend="torch")
    moe = MoE(cfg, quant_method=_HalvedW2Method())
    re = moe.routed_experts
    w2 = re.w2.detach().clone()
    re.w2.data.mul_(0.5)
    re.process_weights_after_loading()
    torch.testing.assert_close(re.w2.detach(), w2)
    assert "quant=halved" in repr(re)


def test_quantized_params_the_backend_cannot_run_are_rejected():
    # fp8 weights without a granularity: the torch backend cannot tell how to read the scales.
    inputs = make_moe_inputs(2, 4, 16, 8, 2)
    q = QuantParams(weight_dtype="fp8_e4m3", w13_scale=torch.ones(4), w2_scale=torch.ones(4))
    with pytest.raises(ValueError, match=r"quantized weights \(fp8_e4m3 \(activations unquantized\)\) are not "
                                         r"supported: it runs \['fp8_e4m3', 'int8'\] weights with quant.granularity"):
        make_kernel("torch", torch.device("cpu")).apply(*_args(inputs), quant=q)


def test_expanded_weights_on_input_rounds_once():
    # K > 1 with weights on the input: the experts write fp32 rows and finalize rounds their sum once.
    seen = []

    class Recording(Experts):
        name = "recording"

        def run(self, *args, **kwargs):
            seen.append(kwargs["out_dtype"])
            return get_experts("torch").run(*args, **kwargs)

    inputs = make_moe_inputs(9, 4, 32, 16, 3, dtype=torch.bfloat16, seed=3)
    out = ModularKernel(LocalPrepareFinalize(), Recording()).apply(*_args(inputs), apply_router_weight_on_input=True)
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    assert_close(out, reference_experts(*_args(inputs), apply_router_weight_on_input=True), torch.bfloat16)


@pytest.mark.parametrize("bias", ["w13_bias", "w2_bias"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.float64])
def test_bias_dtypes_are_checked(bias, dtype):
    # A bool or integer bias ran as 0/1 or integer values on both backends, silently; fp64 is no layer dtype.
    d = make_moe_inputs(5, 4, 16, 8, 2, dtype=torch.float32)
    rows = {"w13_bias": d["w13"].shape[1], "w2_bias": d["w2"].shape[1]}[bias]
    value = (torch.randn(4, rows) > 0).to(dtype)
    with pytest.raises(TypeError, match=bias):
        fused_experts(d["hidden_states"], d["w13"], d["w2"], d["topk_weights"], d["topk_ids"], backend="torch",
                      **{bias: value})

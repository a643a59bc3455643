"""End-to-end checks shared by test_fp8.py and test_int8.py: build a MoE, quantize it with ``moekit.quantize``,
compare with the fp64 reference on the same codes and with the layer before quantization."""

from __future__ import annotations

import torch

import moekit
from moekit import MoE, MoEConfig
from moekit.testing import (
    QUANT_REFERENCE_TOLERANCE,
    QUANT_TOLERANCES,
    TOLERANCES,
    Tolerance,
    assert_close,
    make_moe_inputs,
    reference_quantized_experts,
)


def build(scheme, *, num_tokens=16, num_experts=8, hidden=256, inter=192, top_k=2, activation="silu",
          bias=False, empty_experts=(), dtype=torch.bfloat16, seed=0):
    """A quantized MoE, its routing and input, and the output of the same layer before quantization."""
    inputs = make_moe_inputs(num_tokens, num_experts, hidden, inter, top_k, dtype=dtype, activation=activation,
                             bias=bias, empty_experts=empty_experts, seed=seed)
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, hidden_size=hidden, intermediate_size=inter,
                    activation=activation, bias=bias)
    moe = MoE(cfg, dtype=dtype)
    with torch.no_grad():
        re = moe.routed_experts
        re.w13.copy_(inputs["w13"])
        re.w2.copy_(inputs["w2"])
        if bias:
            re.w13_bias.copy_(inputs["w13_bias"])
            re.w2_bias.copy_(inputs["w2_bias"])
    return moe, inputs


def run(moe, inputs):
    with torch.no_grad():
        return moe(inputs["hidden_states"], topk_weights=inputs["topk_weights"], topk_ids=inputs["topk_ids"])


def reference(moe, inputs):
    re = moe.routed_experts
    return reference_quantized_experts(
        inputs["hidden_states"], re.w13, re.w2, inputs["topk_weights"], inputs["topk_ids"],
        re.quant_method.quant_params(re), activation=re.activation, w13_bias_E2I=re.w13_bias,
        w2_bias_EH=re.w2_bias, expert_map=re.expert_map,
    )


def check_end_to_end(scheme, **kw):
    """Quantized output: the layer's dtype, close to the fp64 reference on its codes, and to the float layer."""
    moe, inputs = build(scheme, **kw)
    before = run(moe, inputs)
    assert moekit.quantize(moe, scheme) is moe
    out = run(moe, inputs)
    assert out.dtype == before.dtype and out.shape == before.shape
    assert torch.isfinite(out).all()
    qdtype = moe.routed_experts.quant_method.qdtype
    # Against the same codes only the fp32 GEMMs and the output's rounding to the layer dtype differ.
    tight, rounding = QUANT_REFERENCE_TOLERANCE, TOLERANCES[out.dtype]
    tol = Tolerance(max=max(tight.max, rounding.max), rms=max(tight.rms, rounding.rms))
    assert_close(out, reference(moe, inputs), tol=tol, name=f"{scheme} vs reference")
    assert_close(out, before, tol=QUANT_TOLERANCES[qdtype], name=f"{scheme} vs unquantized")
    return moe, inputs, out


def routed_bytes(layer) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters(recurse=False))


def check_storage(scheme, storage_dtype):
    """8-bit codes + float32 scales, half the bytes of bf16, and no float copy of the weights left anywhere."""
    moe, _ = build(scheme, hidden=512, inter=256)
    re = moe.routed_experts
    before = routed_bytes(re)
    moekit.quantize(moe, scheme)
    assert re.w13.dtype == re.w2.dtype == storage_dtype
    assert re.w13_scale.dtype == re.w2_scale.dtype == torch.float32
    assert all(not p.requires_grad for p in re.parameters(recurse=False))
    assert 0.5 <= routed_bytes(re) / before < 0.52
    big = re.w2.numel()
    for value in (*vars(re).values(), *re._buffers.values(), *re._parameters.values()):
        if isinstance(value, torch.Tensor) and value.numel() >= big:
            assert value.dtype == storage_dtype, f"a {value.dtype} tensor of {value.numel()} elements is left"
    assert re.params_dtype == torch.bfloat16
    assert re.quant_method.quant_params(re).scheme == scheme  # the key of tuned tables and heuristics

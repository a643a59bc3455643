"""Test and benchmark support: the readable reference MoE, one tolerance table, input makers.

Every test in the suite and the error column of ``moekit bench`` compare through ``assert_close``/``rel_errors``
with the tolerances below, so "correct" means the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.ops.activation import Activation, activation_ref, resolve_activation
from moekit.ops.quantize import dequantize_activation, dequantize_weight, quantize_activation
from moekit.quant.params import QuantParams
from moekit.router import select_experts


@dataclass(frozen=True)
class Tolerance:
    """``max``: max |a - e| / max |e|;  ``rms``: ||a - e||_2 / ||e||_2 (both against the reference)."""

    max: float
    rms: float


# Why these numbers: fp32 GEMMs with different summation orders agree to ~1e-6 relative; fp16 has a 2^-11
# mantissa and the intermediate activation is rounded once more before GEMM 2; bf16 has 2^-8.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(max=1e-10, rms=1e-11),
    torch.float32: Tolerance(max=1e-5, rms=2e-6),
    torch.float16: Tolerance(max=1e-2, rms=2e-3),
    torch.bfloat16: Tolerance(max=4e-2, rms=1e-2),
}


def rel_errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max-abs error, rms error), each relative to the reference's max-abs / rms. NaN if ``actual`` has NaN."""
    a = actual.detach().double()
    e = expected.detach().double()
    if a.shape != e.shape:
        raise ValueError(f"actual: expected shape {tuple(e.shape)}, got {tuple(a.shape)}")
    if a.numel() == 0:
        return 0.0, 0.0
    diff = (a - e).abs()
    tiny = torch.finfo(torch.float64).tiny
    max_err = float(diff.max() / e.abs().max().clamp_min(tiny))
    rms_err = float(diff.square().mean().sqrt() / e.square().mean().sqrt().clamp_min(tiny))
    return max_err, rms_err


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    name: str = "output",
    tol: Tolerance | None = None,
) -> None:
    """Check ``actual`` against a (higher-precision) reference with the tolerance of ``dtype`` (or ``tol``, one of
    this module's quantization tolerances)."""
    tol = tol or TOLERANCES[dtype or actual.dtype]
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
    bad = ~torch.isfinite(actual) & torch.isfinite(expected.to(actual.device))
    if bool(bad.any()):
        raise AssertionError(f"{name}: {int(bad.sum())} non-finite values where the reference is finite")
    max_err, rms_err = rel_errors(actual, expected.to(actual.device))
    if not (max_err <= tol.max and rms_err <= tol.rms):
        raise AssertionError(f"{name}: max rel err {max_err:.3g} (tol {tol.max}), rms rel err {rms_err:.3g} (tol {tol.rms})")


def reference_experts(
    x_TH: torch.Tensor,
    w13_E2IH: torch.Tensor,
    w2_EHI: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    *,
    activation: str | Activation = "silu",
    w13_bias_E2I: torch.Tensor | None = None,
    w2_bias_EH: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
) -> torch.Tensor:
    """The routed experts as three einsums in fp64, independent of every backend. Returns fp64 [T, H].

    Gathers each token's K expert matrices, so use it only at test sizes.
    """
    act = resolve_activation(activation)
    ids = topk_ids_TK.long()
    weights = topk_weights_TK.double()
    valid = torch.ones_like(weights)
    if expert_map is not None:
        ids = expert_map.long()[ids]
        valid = (ids >= 0).double()  # rows of remote experts contribute nothing, biases included
        ids = ids.clamp_min(0)
    x_TKH = x_TH.double().unsqueeze(1).expand(-1, ids.shape[1], -1)
    if apply_router_weight_on_input:
        x_TKH = x_TKH * weights.unsqueeze(-1)
        weights = torch.ones_like(weights)
    weights = weights * valid
    h = torch.einsum("tkh,tkih->tki", x_TKH, w13_E2IH.double()[ids])
    if w13_bias_E2I is not None:
        h = h + w13_bias_E2I.double()[ids]
    a = activation_ref(h, act)
    y = torch.einsum("tki,tkhi->tkh", a, w2_EHI.double()[ids])
    if w2_bias_EH is not None:
        y = y + w2_bias_EH.double()[ids]
    return torch.einsum("tk,tkh->th", weights, y)


# 8-bit experts against the same layer unquantized (max/rms relative, as ``assert_close``). Four roundings (x,
# w13, the activation's output, w2), each ~2.6 % rms for e4m3's 3 mantissa bits, measured at most 9.1 % max /
# 7.7 % rms over 48 cases (all three fp8 granularities); int8 (7 bits, per channel/token) 3.2 % / 2.5 %.
QUANT_TOLERANCES: dict[str, Tolerance] = {
    "fp8_e4m3": Tolerance(max=0.15, rms=0.1),
    "int8": Tolerance(max=0.05, rms=0.04),
    # Weight-only int4 groups (w4a16 g128, sym and asym), moekit.quantize's round to nearest: each weight's own
    # rel-RMS error is ~0.11 (QUANT_FORMATS.md), compounded over two GEMMs; measured at most 0.27 max / 0.20 rms.
    "int4": Tolerance(max=0.4, rms=0.3),
}
# The torch backend against ``reference_quantized_experts`` (same codes, fp64 GEMMs). Beyond fp32's ~1e-6, an
# activation code may land on the other side of a rounding boundary because fp32 and fp64 disagree in the last
# bit (one e4m3 step is 6 %); measured at most 1.8e-3 max / 3.5e-4 rms over the same 48 cases.
QUANT_REFERENCE_TOLERANCE = Tolerance(max=5e-3, rms=1e-3)


def reference_quantized_experts(
    x_TH: torch.Tensor,
    w13_E2IH: torch.Tensor,
    w2_EHI: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    quant: QuantParams,
    *,
    activation: str | Activation = "silu",
    w13_bias_E2I: torch.Tensor | None = None,
    w2_bias_EH: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """8-bit experts as their math says, in fp64: dequantized weights, activations fake-quantized (x per token
    row, the activation's output per routed row, or per tensor over the rows this rank computes). fp64 [T, H].
    Weight-only group-quantized weights (w4a16, w8a16, mxfp4) have no activation math to model: their reference
    is ``reference_experts`` on the dequantized weights (``moekit.quant.wna16/mxfp4.dequantized_weights``)."""
    if not quant.is_quantized or quant.granularity == "group":
        raise ValueError(f"quant: expected 8-bit weights with tensor, channel or block scales, got "
                         f"{quant.describe()}; use reference_experts on the dequantized weights "
                         "(moekit.quant.wna16.dequantized_weights / moekit.quant.mxfp4.dequantized_weights)")
    act = resolve_activation(activation)
    gate_rows = w2_EHI.shape[2] if act.is_gated else None
    w13 = dequantize_weight(w13_E2IH, quant.w13_scale, quant.granularity, quant.block_shape, gate_rows=gate_rows)
    w2 = dequantize_weight(w2_EHI, quant.w2_scale, quant.granularity, quant.block_shape)
    granularity, group = quant.act_granularity, quant.act_group_size

    def fake_quant(v: torch.Tensor, static: torch.Tensor | None) -> torch.Tensor:
        if granularity is None or v.shape[0] == 0:
            return v.double()
        q, s = quantize_activation(v.float(), quant.act_dtype, granularity, group, static_scale=static)
        return dequantize_activation(q, s, granularity, group).double()

    x = fake_quant(x_TH, quant.a13_scale)
    ids = topk_ids_TK.long()
    valid = torch.ones_like(ids, dtype=torch.bool)
    if expert_map is not None:
        ids = expert_map.long()[ids]
        valid = ids >= 0
        ids = ids.clamp_min(0)
    h = torch.einsum("th,tkih->tki", x, w13.double()[ids])
    if w13_bias_E2I is not None:
        h = h + w13_bias_E2I.double()[ids]
    a = activation_ref(h, act)
    a[valid] = fake_quant(a[valid], quant.a2_scale)
    y = torch.einsum("tki,tkhi->tkh", a, w2.double()[ids])
    if w2_bias_EH is not None:
        y = y + w2_bias_EH.double()[ids]
    return torch.einsum("tk,tkh->th", topk_weights_TK.double() * valid, y)


def make_moe_inputs(
    num_tokens: int,
    num_experts: int,
    hidden_size: int,
    intermediate_size: int,
    top_k: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    activation: str | Activation = "silu",
    bias: bool = False,
    empty_experts: tuple[int, ...] = (),
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random (never zero) inputs for ``fused_experts``, routed through the real router.

    ``empty_experts`` get a -inf logit, so no token is routed to them (needs top_k <= E - len(empty_experts)).
    Weights are scaled like nn.Linear's init so activations stay O(1) at any size.
    """
    act = resolve_activation(activation)
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    rows = act.w13_rows(intermediate_size)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    if empty_experts:
        logits[:, list(empty_experts)] = float("-inf")
    topk_weights, topk_ids = select_experts(logits, top_k, renormalize=True)
    inputs = {
        "hidden_states": rand(num_tokens, hidden_size),
        "w13": rand(num_experts, rows, hidden_size, scale=hidden_size**-0.5),
        "w2": rand(num_experts, hidden_size, intermediate_size, scale=intermediate_size**-0.5),
        "topk_weights": topk_weights.to(device),
        "topk_ids": topk_ids.to(device),
    }
    if bias:
        inputs["w13_bias"] = rand(num_experts, rows, scale=0.1)
        inputs["w2_bias"] = rand(num_experts, hidden_size, scale=0.1)
    return inputs

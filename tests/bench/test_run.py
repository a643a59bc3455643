"""The benchmark's correctness column: the chunked fp32 reference agrees with the one-shot reference."""

import pytest
import torch

import moekit.bench.run as run
from moekit.bench.shapes import MoEShape
from moekit.testing import (QUANT_REFERENCE_TOLERANCE, QUANT_TOLERANCES, TOLERANCES, make_moe_inputs,
                             reference_experts)


@pytest.mark.parametrize("bias", [False, True])
def test_reference_error_over_expert_chunks(monkeypatch, bias):
    shape = MoEShape(name="t", num_experts=12, hidden_size=32, intermediate_size=24, top_k=3,
                     activation="swigluoai" if bias else "silu", bias=bias)
    inp = make_moe_inputs(20, 12, 32, 24, 3, dtype=torch.float32, bias=bias, seed=3)
    exact = reference_experts(inp["hidden_states"], inp["w13"], inp["w2"], inp["topk_weights"], inp["topk_ids"],
                              activation=shape.activation, w13_bias_E2I=inp.get("w13_bias"),
                              w2_bias_EH=inp.get("w2_bias")).float()
    expert_bytes = 4 * (inp["w13"][0].numel() + inp["w2"][0].numel())
    for chunk in (1, 5, 100):  # one expert a chunk, ragged chunks, all at once
        monkeypatch.setattr(run, "REF_CHUNK_BYTES", chunk * expert_bytes)
        assert run.reference_error(inp, exact, shape) < 1e-5
        wrong = exact.clone()
        wrong[0] += 1.0
        assert run.reference_error(inp, wrong, shape) > 1e-2


@pytest.mark.parametrize("scheme", ["w4a16_g128", "w4a16_g128_asym", "w8a16_g128"])
def test_weight_only_point_is_checked_against_its_dequantized_weights(monkeypatch, scheme):
    # The error column of a weight-only layer is the kernel's: against the fp32 reference on the dequantized
    # weights (a wrong nibble would show), not the rounding to 4 bits (which would hide it).
    shape = MoEShape(name="t", num_experts=6, hidden_size=64, intermediate_size=40, top_k=2)
    weights = run.make_weights(shape, torch.float32, torch.device("cpu"), 0, scheme)
    layer = weights["quantized"]
    assert layer.quant_method.name == scheme and layer.w13.dtype == torch.uint8
    row = run.bench_point(shape, 5, backend="auto", dtype=torch.float32, device=torch.device("cpu"), ceilings=None,
                          weights=weights, baselines=False, quant=scheme)
    assert row.quant == scheme and row.backend == "torch"  # auto on CPU
    assert row.max_rel_err < 1e-5
    tokens = run.make_tokens(shape, 5, torch.float32, torch.device("cpu"), 0)
    with torch.no_grad():
        out = layer(tokens["hidden_states"], tokens["topk_weights"], tokens["topk_ids"])
    inputs = {**weights, **tokens}
    expert_bytes = 4 * (weights["w13"][0].numel() + weights["w2"][0].numel())
    for chunk in (1, 4, 100):  # the layer's experts dequantized chunk by chunk too
        monkeypatch.setattr(run, "REF_CHUNK_BYTES", chunk * expert_bytes)
        assert run.reference_error(inputs, out, shape, layer) < 1e-5
    assert run.reference_error(inputs, out, shape) > 1e-3  # against the float weights: the quantization error
    with pytest.raises(ValueError, match="scheme: expected one of"):
        run.quantized_experts(shape, weights, "w4a16_g64")


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_mxfp4_point_is_checked_against_its_dequantized_weights(backend):
    # mxfp4 (H, I multiples of 32; gpt-oss's activation and biases): 'auto' runs the torch backend on CPU, the
    # Triton kernel in the interpreter (fp16: its bf16 dots are wrong); either way the error column is against the
    # fp32 reference on the dequantized weights, far below the 4-bit rounding.
    shape = MoEShape(name="t", num_experts=6, hidden_size=64, intermediate_size=32, top_k=2, activation="swigluoai",
                     bias=True)
    dtype = torch.float32 if backend == "auto" else torch.float16
    weights = run.make_weights(shape, dtype, torch.device("cpu"), 0, "mxfp4")
    layer = weights["quantized"]
    assert layer.quant_method.name == "mxfp4" and layer.w13.dtype == torch.uint8
    row = run.bench_point(shape, 5, backend=backend, dtype=dtype, device=torch.device("cpu"), ceilings=None,
                          weights=weights, baselines=False, quant="mxfp4")
    assert row.quant == "mxfp4" and row.backend == ("torch" if backend == "auto" else "triton")
    assert row.max_rel_err < (1e-5 if backend == "auto" else 5e-3)
    tokens = run.make_tokens(shape, 5, dtype, torch.device("cpu"), 0)
    with torch.no_grad():
        out = layer(tokens["hidden_states"], tokens["topk_weights"], tokens["topk_ids"])
    assert run.reference_error({**weights, **tokens}, out, shape) > 1e-3  # the float weights: 4-bit rounding


@pytest.mark.parametrize(("dtype", "quant", "want"), [
    (torch.bfloat16, None, TOLERANCES[torch.bfloat16].max),  # the dtype's rounding against the fp32 reference
    (torch.float32, None, TOLERANCES[torch.float32].max),
    (torch.bfloat16, "fp8_block", QUANT_TOLERANCES["fp8_e4m3"].max),  # against the unquantized reference
    (torch.float32, "int8_channel", QUANT_TOLERANCES["int8"].max),
    (torch.float32, "w4a16_g128", QUANT_REFERENCE_TOLERANCE.max),  # against its own dequantized weights
    (torch.float16, "mxfp4", TOLERANCES[torch.float16].max),
])
def test_error_tolerance_is_the_tests_for_the_same_comparison(dtype, quant, want):
    assert run.error_tolerance(dtype, quant) == want
    with pytest.raises(ValueError, match="quant: expected None or one of .* got 'fp4'"):
        run.error_tolerance(dtype, "fp4")


def test_a_point_records_its_tolerance_and_a_wrong_output_exceeds_it(monkeypatch):
    shape = MoEShape(name="t", num_experts=6, hidden_size=64, intermediate_size=40, top_k=2)
    kw = dict(backend="torch", dtype=torch.float32, device=torch.device("cpu"), ceilings=None, baselines=False)
    row = run.bench_point(shape, 3, **kw)
    assert row.max_rel_err_tol == TOLERANCES[torch.float32].max and not row.error_exceeds
    monkeypatch.setattr(run, "reference_error", lambda *a: 0.3)
    assert run.bench_point(shape, 3, **kw).error_exceeds


def test_bench_point_checks_tokens_quant_and_weights():
    shape = MoEShape(name="t", num_experts=6, hidden_size=64, intermediate_size=40, top_k=2)
    cpu = torch.device("cpu")
    kw = dict(backend="torch", dtype=torch.float32, device=cpu, ceilings=None, baselines=False)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"num_tokens: expected a non-negative int, got {bad!r}"):
            run.bench_point(shape, bad, **kw)
    with pytest.raises(ValueError, match="quant: expected None or one of .* got 'fp4'"):
        run.bench_point(shape, 1, quant="fp4", **kw)
    with pytest.raises(ValueError, match="quant: expected None or one of .* got 'fp4'"):
        run.make_weights(shape, torch.float32, cpu, 0, "fp4")
    # Weights made for another format: moekit would time one and the floor and error column count another.
    float_w = run.make_weights(shape, torch.float32, cpu, 0)
    w4 = run.make_weights(shape, torch.float32, cpu, 0, "w4a16_g128")
    for weights, quant, made in ((float_w, "w4a16_g128", None), (w4, "w8a16_g128", "w4a16_g128"),
                                 (w4, None, "w4a16_g128")):
        with pytest.raises(ValueError, match=f"weights: expected make_weights\\(..., quant={quant!r}\\)'s, got "
                                             f"weights made with quant={made!r}"):
            run.bench_point(shape, 1, weights=weights, quant=quant, **kw)


def test_the_average_call_counts_each_token_sets_own_experts():
    # Four rotated token sets touching 5, 6, 5 and 5 experts: floor and bytes both of 5.25 on average (GB/s used a
    # rounded 5, so it described other bytes than the floor: 89.5% of the read ceiling against 94% of the floor).
    from moekit.bench.floor import Ceilings, floor_us, moe_bytes
    from moekit.bench.run import average_call
    from moekit.bench.shapes import PRESETS

    shape, ceilings = PRESETS["mixtral-8x7b"], Ceilings(read_bw=4.5e12, mm_rate=700e12)
    fl, moved = average_call(shape, 4, [5, 6, 5, 5], 2, ceilings, None)
    assert moved == (3 * moe_bytes(shape, 4, 5, 2) + moe_bytes(shape, 4, 6, 2)) / 4
    assert fl == (3 * floor_us(shape, 4, 5, 2, ceilings) + floor_us(shape, 4, 6, 2, ceilings)) / 4
    assert fl * 1e-6 * ceilings.read_bw == pytest.approx(moved, rel=1e-3)  # decode: the floor is the bytes

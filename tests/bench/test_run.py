"""The benchmark's correctness column: the chunked fp32 reference agrees with the one-shot reference."""

import pytest
import torch

import moekit.bench.run as run
from moekit.bench.shapes import MoEShape
from moekit.testing import make_moe_inputs, reference_experts


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

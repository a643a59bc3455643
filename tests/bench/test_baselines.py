"""The baselines must compute the same function as moekit, or the speed comparison means nothing."""

import pytest
import torch

from moekit.bench.baselines import eager_experts, grouped_mm_experts
from moekit.bench.run import _grouped_mm_runs
from moekit.ops.activation import Activation
from moekit.testing import assert_close, make_moe_inputs, reference_experts


@pytest.mark.parametrize("activation, bias", [("silu", False), ("swigluoai", True)])
@pytest.mark.parametrize("baseline", [eager_experts, grouped_mm_experts])
def test_baseline_matches_reference(baseline, activation, bias):
    if baseline is grouped_mm_experts and not _grouped_mm_runs(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm does not run on this CPU build")
    d = make_moe_inputs(13, 8, 32, 16, 2, activation=activation, bias=bias, empty_experts=(2,))
    args = (d["hidden_states"], d["w13"], d["w2"], d["topk_weights"], d["topk_ids"])
    kw = {"w13_bias_E2I": d.get("w13_bias"), "w2_bias_EH": d.get("w2_bias")}
    out = baseline(*args, activation=Activation(name=activation), **kw)
    assert_close(out, reference_experts(*args, activation=activation, **kw), torch.float32)

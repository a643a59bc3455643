"""SharedExperts: gated MLP with an optional per-token sigmoid gate."""

import pytest
import torch
import torch.nn.functional as F

from moekit import SharedExperts


@pytest.mark.parametrize("gate", [False, True])
def test_matches_hand_written_mlp(gate):
    se = SharedExperts(16, 12, gate=gate)
    x = torch.randn(5, 16)
    w_gate, w_up = se.gate_up_proj.weight[:12], se.gate_up_proj.weight[12:]
    ref = (F.silu(x @ w_gate.t()) * (x @ w_up.t())) @ se.down_proj.weight.t()
    if gate:
        ref = torch.sigmoid(x @ se.gate.weight.t()) * ref
    torch.testing.assert_close(se(x), ref)


def test_errors():
    with pytest.raises(ValueError, match="intermediate_size: expected a positive int"):
        SharedExperts(16, 0)
    with pytest.raises(ValueError, match=r"x: expected last dim H = 16, got shape \(2, 8\)"):
        SharedExperts(16, 8)(torch.randn(2, 8))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        SharedExperts(16, 8)([[0.0] * 16])
    with pytest.raises(TypeError, match="x: expected dtype float32 \\(the shared experts' weights\\), got float64"):
        SharedExperts(16, 8)(torch.randn(2, 16, dtype=torch.float64))


@pytest.mark.parametrize("flag", ["gate", "bias"])
def test_flags_must_be_bools(flag):
    # "no" is truthy: it silently added a gate or biases.
    with pytest.raises(TypeError, match=f"{flag}: expected a bool, got str 'no'"):
        SharedExperts(16, 8, **{flag: "no"})

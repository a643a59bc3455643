"""activation_backward (the analytic derivatives the backward ops use) against autograd of activation_ref."""

import pytest
import torch

from moekit.ops.activation import ACTIVATIONS, Activation, activation_backward, activation_ref
from moekit.testing import assert_close

CASES = [Activation(name=n) for n in ACTIVATIONS] + [Activation(name="silu", limit=1.5),
                                                     Activation(name="swigluoai", alpha=1.3, limit=2.0)]


@pytest.mark.parametrize("activation", CASES, ids=str)
def test_matches_autograd_of_the_reference(activation):
    g = torch.Generator().manual_seed(0)
    rows = 16 if activation.is_gated else 8
    h = torch.randn(37, rows, generator=g, dtype=torch.float64) * 3  # many values past the clamp limits
    grad_a = torch.randn(37, 8, generator=g, dtype=torch.float64)
    leaf = h.clone().requires_grad_(True)
    a_ref = activation_ref(leaf, activation)
    (dh_ref,) = torch.autograd.grad(a_ref, leaf, grad_a)
    a, dh = activation_backward(h, grad_a, activation)
    assert a.dtype == dh.dtype == torch.float32 and dh.shape == h.shape
    assert_close(a, a_ref.detach(), torch.float32, name="a")
    assert_close(dh, dh_ref, torch.float32, name="dh")


def test_clamped_inputs_get_no_gradient():
    # Past the limit the clamp is flat: no gradient reaches gate > limit or |up| > limit.
    act = Activation(name="swigluoai", limit=1.0)
    h = torch.tensor([[2.0, 0.5, 0.5, 3.0]])  # gate [2, 0.5], up [0.5, 3]
    _, dh = activation_backward(h, torch.ones(1, 2), act)
    assert dh[0, 0] == 0 and dh[0, 3] == 0 and dh[0, 1] != 0 and dh[0, 2] != 0

"""activation_backward (Triton, interpreter on CPU) and its torch twin against autograd of activation_ref."""

import pytest
import torch

from moekit.ops.activation import ACTIVATIONS, Activation, activation_ref
from moekit.ops.activation_backward import activation_backward, activation_backward_ref
from moekit.testing import assert_close

CASES = [Activation(name=n) for n in ACTIVATIONS] + [Activation(name="silu", limit=1.5),
                                                     Activation(name="swigluoai", alpha=1.3, limit=2.0)]


@pytest.mark.parametrize("op", [activation_backward, activation_backward_ref], ids=["triton", "ref"])
@pytest.mark.parametrize("activation", CASES, ids=str)
def test_matches_autograd_of_the_reference(op, activation):
    g = torch.Generator().manual_seed(0)
    inter = 37  # odd I: ragged column tiles
    rows = 2 * inter if activation.is_gated else inter
    h = torch.randn(23, rows, generator=g) * 3  # odd N; many values past the clamp limits
    grad = torch.randn(23, inter, generator=g)
    weights = torch.rand(23, generator=g)
    leaf = h.double().requires_grad_(True)
    a_ref = activation_ref(leaf, activation)
    (dh_ref,) = torch.autograd.grad(a_ref, leaf, grad.double() * weights.double()[:, None])
    a, dh, dw = op(h, grad, weights, activation, a_dtype=torch.float32, dh_dtype=torch.float32)
    assert a.shape == (23, inter) and dh.shape == h.shape and dw.shape == (23,)
    assert_close(a, a_ref.detach(), torch.float32, name="a")
    assert_close(dh, dh_ref, torch.float32, name="dh")
    assert_close(dw, (grad.double() * a_ref.detach()).sum(-1), torch.float32, name="dw")


def test_rounds_a_before_the_row_sum_and_writes_every_output():
    # The forward's GEMM 2 read a in the activation dtype: dw sums g · a as rounded; fp16 outputs.
    h, grad, weights = torch.randn(9, 40), torch.randn(9, 20), torch.rand(9)
    a, dh, dw = activation_backward(h, grad, weights, "silu", a_dtype=torch.float16, dh_dtype=torch.float16)
    ref_a, ref_dh, ref_dw = activation_backward_ref(h, grad, weights, "silu", a_dtype=torch.float16,
                                                    dh_dtype=torch.float16)
    assert a.dtype == dh.dtype == torch.float16 and dw.dtype == torch.float32
    assert torch.equal(a, ref_a)
    assert_close(dh, ref_dh.double(), torch.float16)
    assert_close(dw, (grad.double() * ref_a.double()).sum(-1), torch.float32)


@pytest.mark.parametrize("op", [activation_backward, activation_backward_ref], ids=["triton", "ref"])
def test_clamped_inputs_get_no_gradient(op):
    # Past the limit the clamp is flat: no gradient reaches gate > limit or |up| > limit.
    act = Activation(name="swigluoai", limit=1.0)
    h = torch.tensor([[2.0, 0.5, 0.5, 3.0]])  # gate [2, 0.5], up [0.5, 3]
    _, dh, _ = op(h, torch.ones(1, 2), torch.ones(1), act, a_dtype=torch.float32, dh_dtype=torch.float32)
    assert dh[0, 0] == 0 and dh[0, 3] == 0 and dh[0, 1] != 0 and dh[0, 2] != 0


def test_validation():
    with pytest.raises(ValueError, match="g_NI: expected shape"):
        activation_backward(torch.randn(3, 8), torch.randn(3, 3), torch.ones(3), "silu", a_dtype=torch.float32,
                            dh_dtype=torch.float32)
    with pytest.raises(ValueError, match="h_NR: gated activation 'silu' needs an even last dim"):
        activation_backward(torch.randn(3, 7), torch.randn(3, 3), torch.ones(3), "silu", a_dtype=torch.float32,
                            dh_dtype=torch.float32)

"""activation_ref against hand-computed values."""

import math

import pytest
import torch

from moekit import Activation
from moekit.ops.activation import activation_ref


def _silu(v):
    return v / (1 + math.exp(-v))


def _gelu(v):
    return 0.5 * v * (1 + math.erf(v / math.sqrt(2)))


def _gelu_tanh(v):
    return 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))


@pytest.mark.parametrize("name, fn", [("silu", _silu), ("gelu", _gelu), ("gelu_tanh", _gelu_tanh)])
def test_gated(name, fn):
    gate, up = [0.5, -2.0], [3.0, 0.25]
    out = activation_ref(torch.tensor([gate + up]), name)
    torch.testing.assert_close(out, torch.tensor([[fn(g) * u for g, u in zip(gate, up)]]))


def test_relu2_non_gated():
    out = activation_ref(torch.tensor([[-1.0, 0.5, 3.0]]), "relu2")
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.25, 9.0]]))


def test_swigluoai_clamps_and_offsets():
    act = Activation(name="swigluoai", alpha=1.702, limit=7.0)
    gate, up = [9.0, -3.0, 1.0], [10.0, -8.0, 0.5]

    def f(g, u):
        g = min(g, 7.0)
        u = max(min(u, 7.0), -7.0)
        return g / (1 + math.exp(-1.702 * g)) * (u + 1)

    out = activation_ref(torch.tensor([gate + up]), act)
    torch.testing.assert_close(out, torch.tensor([[f(g, u) for g, u in zip(gate, up)]]))
    custom = activation_ref(torch.tensor([gate + up]), Activation(name="swigluoai", alpha=1.0, limit=2.0))
    g, u = 2.0, 2.0  # both clamped to the custom limit
    assert float(custom[0, 0]) == pytest.approx(g / (1 + math.exp(-g)) * (u + 1), rel=1e-6)


def test_clamped_silu():
    act = Activation(name="silu", limit=1.5)
    gate, up = [3.0, -2.0, 0.5], [4.0, -5.0, 1.0]
    out = activation_ref(torch.tensor([gate + up]), act)
    expected = [_silu(min(g, 1.5)) * max(min(u, 1.5), -1.5) for g, u in zip(gate, up)]
    torch.testing.assert_close(out, torch.tensor([expected]))
    assert Activation(name="silu").limit is None and Activation(name="swigluoai").limit == 7.0


def test_fp64_stays_fp64_and_low_precision_computes_in_fp32():
    assert activation_ref(torch.randn(2, 4, dtype=torch.float64), "silu").dtype == torch.float64
    assert activation_ref(torch.randn(2, 4, dtype=torch.bfloat16), "silu").dtype == torch.float32


def test_errors():
    with pytest.raises(ValueError, match="only silu and swigluoai take a limit"):
        Activation(name="gelu", limit=2.0)
    for name in ("silu", "gelu", "gelu_tanh", "relu2"):  # accepted and ignored, it looked as if it applied
        with pytest.raises(ValueError, match=f"activation.alpha: only swigluoai takes an alpha, got 5.0 for '{name}'"):
            Activation(name=name, alpha=5.0)
    assert Activation(name="swigluoai", alpha=5.0).alpha == 5.0
    with pytest.raises(ValueError, match="even last dim"):
        activation_ref(torch.randn(2, 3), "silu")
    with pytest.raises(TypeError, match="activation: expected a str or moekit.Activation"):
        activation_ref(torch.randn(2, 4), 3)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"name": 3}, TypeError, "activation.name: expected a str, got int"),
        ({"name": "swigluoai", "alpha": "1.7"}, TypeError, "activation.alpha: expected a float, got str"),
        ({"name": "swigluoai", "alpha": float("nan")}, ValueError, "activation.alpha: expected a finite value"),
        ({"name": "swigluoai", "limit": "7"}, TypeError, "activation.limit: expected a float, got str"),
        ({"name": "silu", "limit": -1.0}, ValueError, "activation.limit: expected a finite value > 0"),
    ],
)
def test_activation_argument_types(kwargs, err, match):
    with pytest.raises(err, match=match):
        Activation(**kwargs)

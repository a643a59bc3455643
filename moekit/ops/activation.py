"""Expert activations.

Gated activations read the first GEMM's output ``h_N2I`` as ``[gate | up]`` (gate rows then up rows of ``w13``)
and return ``act(gate) * up`` of width I. The one non-gated activation, ``relu2``, maps ``h_NI`` to ``relu(h)**2``
and its ``w13`` holds I rows, not 2I.

    silu       silu(gate) * up                                   (Mixtral, Qwen, DeepSeek, OLMoE)
               with ``limit``: silu(min(gate, limit)) * clamp(up, -limit, limit)   (DeepSeek-V4, HY-V4)
    gelu       gelu(gate) * up                                   (erf form)
    gelu_tanh  gelu_tanh(gate) * up
    relu2      relu(h) ** 2                                      (non-gated; Nemotron-H style)
    swigluoai  g = min(gate, limit); u = clamp(up, -limit, limit)
               g * sigmoid(alpha * g) * (u + 1)                  (gpt-oss; alpha 1.702, limit 7.0)

``activation_ref`` is the torch twin every fast path is checked against; it computes in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu2", "swigluoai")
_GATED = {"silu": True, "gelu": True, "gelu_tanh": True, "relu2": False, "swigluoai": True}


@dataclass(frozen=True, kw_only=True)
class Activation:
    """An expert activation and its parameters.

    ``alpha`` matters only for ``swigluoai``. ``limit`` clamps ``swigluoai`` (default 7.0) and, when given,
    ``silu`` (clamped SiLU); other activations take no limit.
    """

    name: str = "silu"
    alpha: float = 1.702
    limit: float | None = None

    def __post_init__(self) -> None:
        if self.name not in _GATED:
            raise ValueError(f"activation: expected one of {list(ACTIVATIONS)}, got {self.name!r}")
        if self.name == "swigluoai" and self.limit is None:
            object.__setattr__(self, "limit", 7.0)
        if self.limit is not None:
            if self.name not in ("silu", "swigluoai"):
                raise ValueError(f"activation.limit: only silu and swigluoai take a limit, got one for {self.name!r}")
            if not self.limit > 0:
                raise ValueError(f"activation.limit: expected a positive float, got {self.limit}")

    @property
    def is_gated(self) -> bool:
        return _GATED[self.name]

    def w13_rows(self, intermediate_size: int) -> int:
        """Rows of ``w13`` per expert: 2I for gated activations, I for ``relu2``."""
        return 2 * intermediate_size if self.is_gated else intermediate_size


def resolve_activation(activation: str | Activation) -> Activation:
    if isinstance(activation, Activation):
        return activation
    if not isinstance(activation, str):
        raise TypeError(f"activation: expected a str or moekit.Activation, got {type(activation).__name__}")
    return Activation(name=activation)


def activation_ref(h_N2I: torch.Tensor, activation: str | Activation) -> torch.Tensor:
    """Apply ``activation`` to the rows of the first GEMM's output, in fp32 (fp64 stays fp64). Returns ``[N, I]``."""
    act = resolve_activation(activation)
    h = h_N2I if h_N2I.dtype == torch.float64 else h_N2I.float()
    if not act.is_gated:
        return F.relu(h).square()
    if h.shape[-1] % 2:
        raise ValueError(f"h_N2I: gated activation {act.name!r} needs an even last dim, got shape {tuple(h.shape)}")
    gate, up = h.chunk(2, dim=-1)
    if act.limit is not None:  # clamped silu and swigluoai clamp the same way
        gate = gate.clamp(max=act.limit)
        up = up.clamp(min=-act.limit, max=act.limit)
    if act.name == "silu":
        return F.silu(gate) * up
    if act.name == "gelu":
        return F.gelu(gate) * up
    if act.name == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    return gate * torch.sigmoid(act.alpha * gate) * (up + 1)


def activation_backward(
    h_N2I: torch.Tensor, grad_a_NI: torch.Tensor, activation: str | Activation
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, dh)`` in fp32: ``a = activation_ref(h)`` and the gradient of ``sum(grad_a · a)`` w.r.t. ``h``.

    Written out rather than left to autograd: it runs inside the backward custom op, below autograd. A clamp
    passes the gradient where its input lies within the bounds (inclusive), as torch's clamp does.
    """
    act = resolve_activation(activation)
    h = h_N2I.float()
    da = grad_a_NI.float()
    if not act.is_gated:  # relu2: relu(h)^2
        r = F.relu(h)
        return r.square(), 2.0 * r * da
    gate, up = h.chunk(2, dim=-1)
    d_gate_mask = d_up_mask = None
    if act.limit is not None:
        d_gate_mask = gate <= act.limit
        d_up_mask = (up >= -act.limit) & (up <= act.limit)
        gate = gate.clamp(max=act.limit)
        up = up.clamp(min=-act.limit, max=act.limit)
    if act.name == "swigluoai":
        s = torch.sigmoid(act.alpha * gate)
        glu = gate * s
        a = glu * (up + 1)
        d_gate = da * (up + 1) * (s + act.alpha * glu * (1 - s))
        d_up = da * glu
    else:
        if act.name == "silu":
            s = torch.sigmoid(gate)
            f, df = gate * s, s * (1 + gate * (1 - s))
        elif act.name == "gelu":
            cdf = 0.5 * (1 + torch.erf(gate * 0.7071067811865476))
            f, df = gate * cdf, cdf + gate * torch.exp(-0.5 * gate.square()) * 0.3989422804014327
        else:  # gelu_tanh
            c = 0.7978845608028654
            t = torch.tanh(c * (gate + 0.044715 * gate.pow(3)))
            f = 0.5 * gate * (1 + t)
            df = 0.5 * (1 + t) + 0.5 * gate * (1 - t.square()) * c * (1 + 3 * 0.044715 * gate.square())
        a = f * up
        d_gate = da * up * df
        d_up = da * f
    if d_gate_mask is not None:
        d_gate = torch.where(d_gate_mask, d_gate, 0.0)
        d_up = torch.where(d_up_mask, d_up, 0.0)
    return a, torch.cat([d_gate, d_up], dim=-1)

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

from moekit._checks import check_real

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu2", "swigluoai")
_GATED = {"silu": True, "gelu": True, "gelu_tanh": True, "relu2": False, "swigluoai": True}
_DEFAULT_ALPHA = 1.702  # gpt-oss's swigluoai


@dataclass(frozen=True, kw_only=True)
class Activation:
    """An expert activation and its parameters.

    ``alpha`` matters only for ``swigluoai``. ``limit`` clamps ``swigluoai`` (default 7.0) and, when given,
    ``silu`` (clamped SiLU); other activations take no limit.
    """

    name: str = "silu"
    alpha: float = 1.702  # _DEFAULT_ALPHA
    limit: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"activation.name: expected a str, got {type(self.name).__name__} {self.name!r}")
        if self.name not in _GATED:
            raise ValueError(f"activation: expected one of {list(ACTIVATIONS)}, got {self.name!r}")
        # Stored as Python floats: the custom op's schema takes floats (a NumPy or 0-d tensor value failed there).
        object.__setattr__(self, "alpha", check_real("activation.alpha", self.alpha))
        if self.name != "swigluoai" and self.alpha != _DEFAULT_ALPHA:
            # Accepted and ignored, it would look as if it applied.
            raise ValueError(f"activation.alpha: only swigluoai takes an alpha, got {self.alpha} for {self.name!r}")
        if self.name == "swigluoai" and self.limit is None:
            object.__setattr__(self, "limit", 7.0)
        if self.limit is not None:
            if self.name not in ("silu", "swigluoai"):
                raise ValueError(f"activation.limit: only silu and swigluoai take a limit, got one for {self.name!r}")
            object.__setattr__(self, "limit", check_real("activation.limit", self.limit, positive=True))

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


# Compile-time codes of the Triton kernels' activation branches (the epilogue of grouped_gemm, the backward
# kernel): 0 none, then one per activation; clamped silu has its own branch.
_CODES = {None: 0, "silu": 1, "gelu": 2, "gelu_tanh": 3, "relu2": 4, "swigluoai": 5}
_CLAMPED_SILU = 6


def activation_code(activation: Activation | None) -> int:
    """The ``ACTIVATION`` constexpr the Triton kernels branch on (None: identity)."""
    if activation is not None and activation.name == "silu" and activation.limit is not None:
        return _CLAMPED_SILU
    return _CODES[activation.name if activation is not None else None]

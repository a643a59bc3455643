"""The ``"moekit"`` experts implementation for transformers (>= 5.0).

transformers decorates each family's experts module with ``@use_experts_implementation(...)``; the decorator
records the weight layout on the module and dispatches ``forward(x_TH, top_k_index_TK, top_k_weights_TK)`` to the
function registered under ``config._experts_implementation``. ``register()`` adds ``moekit_experts_forward``
under the name ``"moekit"``:

    spec  = read_experts_spec(module)            once per module: layout flags + activation (probed)
    w13, w2, b13, b2 = canonical_weights(module)  views when the layout is already [E, 2I, H] / [E, H, I]
    out_TH = fused_experts(x_TH, w13, w2, top_k_weights_TK, top_k_index_TK)

What the decorator records and how it is honoured:
    has_gate=False       non-gated experts (``up_proj``); the activation must be ``relu2``
    has_bias             ``gate_up_proj_bias`` / ``down_proj_bias`` become ``w13_bias`` / ``w2_bias``
    is_transposed        weights stored [E, H, 2I] / [E, I, H]; transposed into a cached canonical copy
    is_concatenated=False gate/up rows interleaved (gpt-oss); de-interleaved into the cached copy
    _apply_gate          the module's gate (default or custom) is probed against moekit's activations
    has_post_expert_norm a per-expert norm moekit cannot express: falls back to transformers' grouped_mm

A module moekit cannot run exactly (unknown activation, post-expert norm, expert parallelism) falls back to
transformers' own ``grouped_mm`` forward with a one-time warning, so the result is always the family's math.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from moekit._checks import check_choice
from moekit.config import BACKENDS
from moekit.functional import fused_experts
from moekit.loading import deinterleave
from moekit.ops.activation import Activation, activation_ref

IMPLEMENTATION_NAME = "moekit"

# Probe values cover both sides of the swigluoai clamp (limit 7) so a wrong limit shows up.
_PROBE_ROWS = 64
_PROBE_RANGE = 12.0
_PROBE_TOL = 1e-5


@dataclass(frozen=True, kw_only=True)
class ExpertsSpec:
    """How one transformers experts module maps onto ``fused_experts``.

    ``activation`` is None when the module cannot run on moekit; ``reason`` then says why.
    """

    activation: Activation | None
    has_bias: bool
    transposed: bool
    interleaved: bool
    reason: str | None = None

    @property
    def canonical(self) -> bool:
        """True when the stored weights already are moekit's [E, 2I, H] / [E, H, I] layout (no copy needed)."""
        return not (self.transposed or self.interleaved)


def register(*, backend: str = "auto") -> None:
    """Register ``"moekit"`` in transformers' experts interface. Idempotent; the last ``backend`` wins.

    Afterwards ``model.set_experts_implementation("moekit")`` and
    ``from_pretrained(..., experts_implementation="moekit")`` route every decorated experts module here.
    """
    from transformers.integrations.moe import ExpertsInterface

    # Checked here: a bad name would otherwise register fine and fail in the first forward of every model.
    check_choice("backend", backend, BACKENDS)

    def moekit_experts_forward(
        module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return experts_forward(module, hidden_states, top_k_index, top_k_weights, backend=backend)

    moekit_experts_forward.moekit_backend = backend
    ExpertsInterface.register(IMPLEMENTATION_NAME, moekit_experts_forward)


def is_registered() -> bool:
    from transformers.integrations.moe import ExpertsInterface

    return IMPLEMENTATION_NAME in ExpertsInterface._global_mapping


def experts_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``forward`` of a decorated experts module on moekit.

    Args:
        hidden_states: x [T, H].  top_k_index: [T, K] expert ids.  top_k_weights: [T, K] routing weights.
    Returns:
        [T, H] in x's dtype.
    """
    spec = experts_spec(module)
    if spec.activation is None or getattr(module, "_is_expert_parallel", False):
        return _fallback(module, spec, hidden_states, top_k_index, top_k_weights)
    w13, w2, w13_bias, w2_bias = canonical_weights(module, spec)
    # Ids come from the family's own router over this module's experts, so the value check (a device sync)
    # is skipped.
    return fused_experts(
        hidden_states,
        w13,
        w2,
        top_k_weights,
        top_k_index,
        activation=spec.activation,
        w13_bias=w13_bias,
        w2_bias=w2_bias,
        backend=backend,
        check_ids=False,
    )


def experts_spec(module: nn.Module) -> ExpertsSpec:
    """The (cached) ``ExpertsSpec`` of ``module``."""
    spec = module.__dict__.get("_moekit_spec")
    if spec is None:
        spec = read_experts_spec(module)
        module._moekit_spec = spec
    return spec


def read_experts_spec(module: nn.Module) -> ExpertsSpec:
    """Read the decorator's flags from ``module`` and identify its activation by probing ``_apply_gate``."""
    has_gate = getattr(module, "has_gate", True)
    flags = {
        "has_bias": bool(getattr(module, "has_bias", False)),
        "transposed": bool(getattr(module, "is_transposed", False)),
        "interleaved": not getattr(module, "is_concatenated", True),
    }
    if not hasattr(module, "down_proj") or not hasattr(module, "gate_up_proj" if has_gate else "up_proj"):
        return ExpertsSpec(activation=None, reason="no gate_up_proj/up_proj + down_proj parameters", **flags)
    if getattr(module, "has_post_expert_norm", False):
        return ExpertsSpec(activation=None, reason="a post-expert norm (has_post_expert_norm)", **flags)
    activation = probe_activation(module, gated=has_gate, interleaved=flags["interleaved"])
    if activation is None:
        what = "_apply_gate" if has_gate else "act_fn"
        return ExpertsSpec(
            activation=None, reason=f"its {what} matches none of moekit's activations", **flags
        )
    return ExpertsSpec(activation=activation, **flags)


@torch.no_grad()
def probe_activation(module: nn.Module, *, gated: bool, interleaved: bool = False) -> Activation | None:
    """The moekit activation that reproduces ``module._apply_gate`` (gated) or ``module.act_fn``, else None.

    Feeds one fixed fp32 probe [64, 2I] through the module's own gate and compares it with each candidate of
    ``activation_ref`` (swigluoai takes ``alpha``/``limit`` or ``swiglu_alpha``/``swiglu_limit`` from the module).
    """
    width = 16
    if not gated:
        probe = gate_probe(2 * width)
        expected = _call(module.act_fn, probe)
        return match_activation(expected, probe, [Activation(name="relu2")])
    candidates = _candidates(module)
    # The probe must reach past the module's clamp: with a limit above the default range (Step-3.7 clamps at
    # 16) no probe value is clamped, plain silu (tried first) matches, and the clamp is lost on large inputs.
    probe = gate_probe(2 * width, limit=max([0.0, *(c.limit or 0.0 for c in candidates)]))
    stored = probe
    if interleaved:
        gate, up = probe.chunk(2, dim=-1)
        stored = torch.stack((gate, up), dim=-1).reshape(_PROBE_ROWS, 2 * width)
    return match_activation(_call(module._apply_gate, stored), probe, candidates)


def gate_probe(cols: int, *, limit: float = 0.0) -> torch.Tensor:
    """A fixed fp32 probe [64, cols], uniform in +-max(12, 1.5 * limit) so that a clamp at ``limit`` shows up."""
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(_PROBE_ROWS, cols, generator=gen) * 2 - 1) * max(_PROBE_RANGE, 1.5 * limit)


def match_activation(
    actual: torch.Tensor | None, probe: torch.Tensor, candidates: list[Activation]
) -> Activation | None:
    """The first of ``candidates`` whose ``activation_ref(probe)`` equals ``actual`` (a gate's output on
    ``probe``, gate columns then up columns), else None."""
    for candidate in candidates:
        if _matches(actual, activation_ref(probe, candidate)):
            return candidate
    return None


def gated_act_fn_activation(act_fn) -> Activation | None:
    """The moekit activation equal to ``act_fn(gate) * up`` (experts and MLPs without ``_apply_gate``)."""
    probe = gate_probe(32)
    gate, up = probe.chunk(2, dim=-1)
    actual = _call(lambda g: act_fn(g) * up, gate)
    return match_activation(actual, probe, [Activation(name=name) for name in ("silu", "gelu", "gelu_tanh")])


def _candidates(module: nn.Module) -> list[Activation]:
    found = [Activation(name=name) for name in ("silu", "gelu", "gelu_tanh")]
    for alpha_name, limit_name in (("alpha", "limit"), ("swiglu_alpha", "swiglu_limit")):
        alpha, limit = getattr(module, alpha_name, None), getattr(module, limit_name, None)
        # An infinite limit means "no clamp" (Step-3.7 writes float("inf")); it would also make the probe infinite.
        if not (isinstance(limit, (int, float)) and not isinstance(limit, bool) and 0 < limit < math.inf):
            continue
        found.append(Activation(name="silu", limit=float(limit)))  # clamped SiLU (DeepSeek-V4, HY-V4)
        if isinstance(alpha, (int, float)):
            found.append(Activation(name="swigluoai", alpha=float(alpha), limit=float(limit)))
    return found


def _call(fn, probe: torch.Tensor) -> torch.Tensor | None:
    try:
        out = fn(probe)
    except Exception:  # an activation that cannot take the probe cannot be matched either
        return None
    return out if isinstance(out, torch.Tensor) else None


def _matches(actual: torch.Tensor | None, expected: torch.Tensor) -> bool:
    if actual is None or actual.shape != expected.shape:
        return False
    scale = expected.abs().max().clamp_min(1.0)
    return bool(((actual.float() - expected).abs().max() / scale) <= _PROBE_TOL)


def canonical_weights(
    module: nn.Module, spec: ExpertsSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(w13 [E, 2I, H], w2 [E, H, I], w13_bias [E, 2I] | None, w2_bias [E, H] | None)`` of ``module``.

    The module's own parameters when the layout is canonical; otherwise a rearranged copy, cached on the module
    and rebuilt when a source parameter changes (its storage or version counter). Under autograd the copy is
    rebuilt on every call so gradients reach the module's parameters.
    """
    sources = _source_weights(module, spec)
    if spec.canonical:
        return sources
    live = [t for t in sources if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in live):
        return _rearrange(sources, spec)
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in live)
    cached = module.__dict__.get("_moekit_weights")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, _rearrange(sources, spec))
        module._moekit_weights = cached
    return cached[1]


def _source_weights(module: nn.Module, spec: ExpertsSpec):
    has_gate = getattr(module, "has_gate", True)
    prefix = "gate_up_proj" if has_gate else "up_proj"
    w13 = getattr(module, prefix)
    w2 = module.down_proj
    b13 = getattr(module, f"{prefix}_bias", None) if spec.has_bias else None
    b2 = getattr(module, "down_proj_bias", None) if spec.has_bias else None
    return w13, w2, b13, b2


def _rearrange(sources, spec: ExpertsSpec):
    w13, w2, b13, b2 = sources
    if spec.transposed:
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    if spec.interleaved:
        w13 = deinterleave(w13, dim=1)
        b13 = None if b13 is None else deinterleave(b13, dim=1)
    return w13.contiguous(), w2.contiguous(), b13, b2


_WARNED: set[str] = set()


def _fallback(module, spec, hidden_states, top_k_index, top_k_weights):
    from transformers.integrations.moe import grouped_mm_experts_forward

    name = type(module).__name__
    reason = spec.reason or "expert parallelism (moekit's transformers path is single-rank)"
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"moekit: {name} runs on transformers' grouped_mm experts because of {reason}.",
            RuntimeWarning,
            stacklevel=3,
        )
    return grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)

"""What a transformers experts module is in moekit terms: its layout flags, its activation, its weights.

transformers decorates each family's experts module with ``@use_experts_implementation(...)``, which records the
weight layout on the module. ``read_experts_spec`` reads those flags and identifies the activation by probing:

    has_gate=False        non-gated experts (``up_proj``); the activation must be ``relu2``
    has_bias              ``gate_up_proj_bias`` / ``down_proj_bias`` become ``w13_bias`` / ``w2_bias``
    is_transposed         weights stored [E, H, 2I] / [E, I, H]: moekit reads them as transposed views
    is_concatenated=False gate/up rows interleaved (gpt-oss): de-interleaved into a copy
    _apply_gate           the module's gate (default or custom) is probed against moekit's activations
    has_post_expert_norm  a per-expert norm moekit cannot express (``activation`` None, ``reason`` says so)

``canonical_weights`` gives moekit's w13 [E, 2I, H] / w2 [E, H, I] (+ biases) of such a module: views of its own
parameters unless the gate/up rows are interleaved. Used by the experts implementation (``experts.py``) and by
whole-block conversion (``layouts.py``, ``convert.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moekit._layout import deinterleave
from moekit.ops.activation import Activation, activation_ref

# Probe values cover both sides of the swigluoai clamp (limit 7) so a wrong limit shows up.
_PROBE_ROWS = 64
_PROBE_RANGE = 12.0
_PROBE_TOL = 1e-5

ExpertsTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


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
    def needs_copy(self) -> bool:
        """True when moekit's layout is not a view of the stored weights (interleaved gate/up rows)."""
        return self.interleaved


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


def source_names(module: nn.Module, spec: ExpertsSpec) -> tuple[str, str, str | None, str | None]:
    """The attribute names of ``module``'s (w13, w2, w13_bias, w2_bias): ``gate_up_proj`` (``up_proj`` when
    non-gated), ``down_proj`` and their ``_bias``; a bias name is None without biases."""
    w13 = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    if not spec.has_bias:
        return w13, "down_proj", None, None
    return w13, "down_proj", f"{w13}_bias", "down_proj_bias"


def source_weights(module: nn.Module, spec: ExpertsSpec) -> ExpertsTensors:
    """``module``'s stored (w13, w2, w13_bias, w2_bias), in its own layout (a bias is None when absent)."""
    return tuple(None if name is None else getattr(module, name, None) for name in source_names(module, spec))


def canonical_weights(module: nn.Module, spec: ExpertsSpec) -> ExpertsTensors:
    """``(w13 [E, 2I, H], w2 [E, H, I], w13_bias [E, 2I] | None, w2_bias [E, H] | None)`` of ``module``.

    Views of the module's parameters (transposed ones for ``is_transposed``: the kernels take any strides on the
    weights), except w13 and its bias when the gate/up rows are interleaved, which are de-interleaved copies.
    """
    w13, w2, b13, b2 = source_weights(module, spec)
    if spec.transposed:
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    if spec.interleaved:
        w13 = deinterleave(w13, dim=1)
        b13 = None if b13 is None else deinterleave(b13, dim=1)
    return w13, w2, b13, b2


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

"""The ``"moekit"`` experts implementation for transformers (>= 5.0).

transformers decorates each family's experts module with ``@use_experts_implementation(...)``; the decorator
records the weight layout on the module and dispatches ``forward(x_TH, top_k_index_TK, top_k_weights_TK)`` to the
function registered under ``config._experts_implementation``. ``register()`` adds ``moekit_experts_forward``
under the name ``"moekit"``:

    spec  = experts_spec(module)                   once per module: layout flags + activation (probed, spec.py)
    w13, w2, b13, b2 = weights(module, spec)       views of the module's parameters; a cached copy only for
                                                   interleaved gate/up rows (gpt-oss)
    out_TH = fused_experts(x_TH, w13, w2, top_k_weights_TK, top_k_index_TK)

A module moekit cannot run exactly (unknown activation, post-expert norm, expert parallelism) falls back to
transformers' own ``grouped_mm`` forward with a one-time warning, so the result is always the family's math.

fp8 models (``FineGrainedFP8Config``) dispatch their ``FP8Experts`` through a second interface; ``register()``
puts ``"moekit"`` there too, running the module's own fp8 codes and scales on moekit's fp8 block method
(``fp8.py`` maps the layouts; a variant it cannot express falls back to transformers' fp8 ``grouped_mm``).
"""

from __future__ import annotations

import weakref

import warnings

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from moekit._checks import check_bool, check_choice
from moekit.config import BACKENDS
from moekit.functional import fused_experts
from moekit.hf.fp8 import fp8_unsupported, fp8_weights, is_fp8_experts
from moekit.hf.spec import ExpertsSpec, ExpertsTensors, canonical_weights, experts_spec, source_weights
from moekit.quant.params import UNQUANTIZED

IMPLEMENTATION_NAME = "moekit"


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
        # Ids come from the family's own router over this module's experts: the value check (a device sync)
        # is skipped.
        return experts_forward(module, hidden_states, top_k_index, top_k_weights, backend=backend, check_ids=False)

    moekit_experts_forward.moekit_backend = backend
    ExpertsInterface.register(IMPLEMENTATION_NAME, moekit_experts_forward)
    try:
        from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
    except ImportError:  # a transformers without fine-grained fp8: nothing more to register
        return
    # Its own mapping (a class attribute of the subclass), so registering above does not reach fp8 models.
    FP8ExpertsInterface.register(IMPLEMENTATION_NAME, moekit_experts_forward)


def experts_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    backend: str = "auto",
    check_ids: bool = True,
) -> torch.Tensor:
    """``forward`` of a decorated experts module on moekit.

    Args:
        hidden_states: x [T, H].  top_k_index: [T, K] expert ids.  top_k_weights: [T, K] routing weights.
        check_ids: check that the ids are in [0, E) (a device sync; the registered implementation skips it, its
            ids come from the family's router).
    Returns:
        [T, H] in x's dtype.
    """
    check_bool("check_ids", check_ids)
    spec = experts_spec(module)
    expert_parallel = getattr(module, "_is_expert_parallel", False)
    if is_fp8_experts(module):
        reason = spec.reason or fp8_unsupported(module)
        if reason is not None or expert_parallel:
            from transformers.integrations.finegrained_fp8 import fp8_grouped_mm_experts_forward

            return _fallback(module, spec, hidden_states, top_k_index, top_k_weights,
                             reason=reason, forward=fp8_grouped_mm_experts_forward)
        w13, w2, quant = fp8_weights(module)  # the module's own codes and scales
        w13_bias = w2_bias = None
    else:
        if spec.activation is None or expert_parallel:
            return _fallback(module, spec, hidden_states, top_k_index, top_k_weights)
        w13, w2, w13_bias, w2_bias = weights(module, spec)
        quant = UNQUANTIZED
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
        quant=quant,
        check_ids=check_ids,
    )


def weights(module: nn.Module, spec: ExpertsSpec) -> ExpertsTensors:
    """``canonical_weights(module, spec)``, with the de-interleaved copy of interleaved gate/up rows cached.

    The copy (as large as the module's ``gate_up_proj``) is cached on the module and rebuilt when a source
    parameter changes (its storage or version counter); under autograd it is rebuilt on every call so gradients
    reach the module's parameters. Every other layout is a view: no copy, nothing cached.
    """
    if not spec.needs_copy:
        return canonical_weights(module, spec)
    live = [t for t in source_weights(module, spec) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in live):
        return canonical_weights(module, spec)
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in live)
    cached = module.__dict__.get("_moekit_weights")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, canonical_weights(module, spec))
        module._moekit_weights = cached
        _CACHED.add(module)
    return cached[1]


# Modules holding a cached copy. A fused optimizer step (Adam/AdamW/SGD fused=True) writes parameters without
# moving their version counters, so the key above would not see it: every torch.optim step drops the copies
# (rebuilt at the next call; the copy of a module being trained is never cached, see weights()).
_CACHED: weakref.WeakSet = weakref.WeakSet()


def weights_changed(module: nn.Module | None = None) -> None:
    """Forget the cached de-interleaved copies (gpt-oss's ``gate_up_proj``, see ``weights``) of ``module``'s experts
    modules, or of every module when None; the next call rebuilds them.

    Writes moekit cannot see need it: through ``.data`` (PEFT's merge, an EMA update) or a ``torch.distributed``
    collective, which move neither the storage nor the version counter. In-place ops, ``load_state_dict`` and
    ``torch.optim`` steps are seen without it.
    """
    if module is not None and not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module or None, got {type(module).__name__}")
    targets = list(_CACHED) if module is None else [m for m in module.modules() if m in _CACHED]
    for m in targets:
        m.__dict__.pop("_moekit_weights", None)
        _CACHED.discard(m)


def _drop_copies(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    weights_changed()


register_optimizer_step_post_hook(_drop_copies)


_WARNED: set[str] = set()


def _fallback(module, spec, hidden_states, top_k_index, top_k_weights, *, reason=None, forward=None):
    if forward is None:
        from transformers.integrations.moe import grouped_mm_experts_forward as forward

    name = type(module).__name__
    reason = reason or spec.reason or "expert parallelism (moekit's transformers path is single-rank)"
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"moekit: {name} runs on transformers' grouped_mm experts because of {reason}.",
            RuntimeWarning,
            stacklevel=3,
        )
    return forward(module, hidden_states, top_k_index, top_k_weights)

"""``fused_experts``: the functional entry point to the routed experts."""

from __future__ import annotations

import torch

from moekit.kernel import make_kernel
from moekit.ops.activation import Activation
from moekit.quant.params import UNQUANTIZED, QuantParams


def fused_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str | Activation = "silu",
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    backend: str = "auto",
    expert_map: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
    quant: QuantParams = UNQUANTIZED,
    check_ids: bool = True,
) -> torch.Tensor:
    """Routed experts of a MoE layer.

        out[t] = sum_k topk_weights[t, k] * (act(x[t] @ w13[e].T + b13[e]) @ w2[e].T + b2[e]),  e = topk_ids[t, k]

    Args:
        hidden_states: x, [T, H] in fp16/bf16/fp32.
        w13: [E, 2I, H], gate rows then up rows ([E, I, H] for ``relu2``); same dtype as x.
        w2: [E, H, I].
        topk_weights: [T, K] float routing weights.  topk_ids: [T, K] int expert ids in [0, E).
        activation: ``silu`` | ``gelu`` | ``gelu_tanh`` | ``relu2`` | ``swigluoai`` or a ``moekit.Activation``.
        w13_bias: optional [E, 2I].  w2_bias: optional [E, H].
        backend: ``auto`` (Triton on CUDA when installed, else torch), ``torch`` or ``triton``.
        expert_map: optional [E_global] int map from global to local expert id (-1: not on this rank).
        apply_router_weight_on_input: scale each expert's input by its routing weight instead of its output (Llama4).
        check_ids: check that ``topk_ids`` lie in [0, E) (a device-to-host sync; skipped automatically while
            capturing a CUDA graph or compiling). Pass False for ids that come from ``select_experts``.
    Returns:
        [T, H] in x's dtype. Inputs are never modified.
    """
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states: expected a torch.Tensor, got {type(hidden_states).__name__}")
    kernel = make_kernel(backend, hidden_states.device)
    return kernel.apply(
        hidden_states,
        w13,
        w2,
        topk_weights,
        topk_ids,
        activation=activation,
        w13_bias=w13_bias,
        w2_bias=w2_bias,
        expert_map=expert_map,
        apply_router_weight_on_input=apply_router_weight_on_input,
        quant=quant,
        check_ids=check_ids,
    )

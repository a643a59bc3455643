"""``moekit::fused_experts``: the Triton experts as one PyTorch custom op, so ``torch.compile`` keeps the MoE in
its graph as a single opaque node (no graph break) and knows its output from the fake implementation.

Only the Triton backend's hot path goes through it, and only while compiling: eager calls skip the dispatcher.
"""

from __future__ import annotations

import functools

import torch

from moekit.ops.activation import Activation


@functools.cache
def _experts():
    from moekit.kernel import get_experts

    return get_experts("triton")


@torch.library.custom_op("moekit::fused_experts", mutates_args=())
def fused_experts_op(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    expert_map: torch.Tensor | None,
    activation: str,
    alpha: float,
    limit: float | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """[T, H] routed-experts output in ``out_dtype`` (``Experts.apply``'s contract), by the Triton backend."""
    return _experts().run(
        hidden_states, w13, w2, topk_weights, topk_ids,
        activation=Activation(name=activation, alpha=alpha, limit=limit),
        w13_bias_E2I=w13_bias, w2_bias_EH=w2_bias, expert_map_E=expert_map, out_dtype=out_dtype,
    )


@fused_experts_op.register_fake
def _(hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, expert_map, activation, alpha, limit,
      out_dtype):
    return hidden_states.new_empty(hidden_states.shape, dtype=out_dtype)

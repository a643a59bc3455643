"""``torch.ops.moekit.fused_experts``: an experts backend as one PyTorch custom op, with its autograd formula.

Under ``torch.compile`` the routed experts become a single opaque node of the graph (no graph break; the fake
implementation gives the output's shape and dtype) and their backward another, ``moekit::fused_experts_backward``.
Both dispatch by backend name to the registry's shared instance (``moekit.kernel.get_experts``), so they are
registered by ``import moekit`` whether or not Triton is installed — an exported graph that names them loads
anywhere — and only calling them with ``backend="triton"`` needs Triton. Eager calls do not go through the
dispatcher at all (``Experts.apply``).
"""

from __future__ import annotations

import torch

from moekit.ops.activation import Activation
from moekit.quant.params import UNQUANTIZED, QuantParams

# Positions among fused_experts' arguments of the inputs that can carry a gradient, in the order of
# Experts.backward's result: hidden_states, w13, w2, topk_weights, w13_bias, w2_bias.
_GRAD_POSITIONS = (0, 1, 2, 3, 5, 6)
# fused_experts' trailing arguments for quantized experts (``quant_op_args``).
_QUANT_ARGS = 12


def _experts(backend: str):  # noqa: ANN202
    from moekit.kernel import get_experts  # the registry imports this module: resolve it at call time

    return get_experts(backend)


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
    backend: str,
    weight_dtype: str | None = None,
    granularity: str | None = None,
    group_size: int | None = None,
    act_dtype: str | None = None,
    block_shape: list[int] | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w13_zp: torch.Tensor | None = None,
    w2_zp: torch.Tensor | None = None,
    a13_scale: torch.Tensor | None = None,
    a2_scale: torch.Tensor | None = None,
    hidden_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """[T, H] routed-experts output in ``out_dtype`` (``Experts.apply``'s contract), by backend ``backend``.

    Quantized experts pass the fields of their ``QuantParams`` and the activation scales of ``hidden_states``
    (``quant_op_args``); ``w13``/``w2`` (and, with an activation dtype, ``hidden_states``) then hold codes. No
    ``weight_dtype``: unquantized."""
    quant = UNQUANTIZED
    if weight_dtype is not None:
        quant = QuantParams(weight_dtype=weight_dtype, act_dtype=act_dtype, granularity=granularity,
                            group_size=group_size, block_shape=tuple(block_shape) if block_shape else None,
                            w13_scale=w13_scale, w2_scale=w2_scale, w13_zp=w13_zp, w2_zp=w2_zp,
                            a13_scale=a13_scale, a2_scale=a2_scale)
    return _experts(backend).run(
        hidden_states, w13, w2, topk_weights, topk_ids,
        activation=Activation(name=activation, alpha=alpha, limit=limit),
        w13_bias_E2I=w13_bias, w2_bias_EH=w2_bias, expert_map_E=expert_map, out_dtype=out_dtype, quant=quant,
        hidden_scale=hidden_scale,
    )


@fused_experts_op.register_fake
def _(hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, expert_map, activation, alpha, limit,
      out_dtype, backend, *quant_args):  # noqa: ANN001, ANN202
    return hidden_states.new_empty(hidden_states.shape, dtype=out_dtype)


def quant_op_args(quant: QuantParams, hidden_scale: torch.Tensor | None = None) -> tuple:
    """``fused_experts_op``'s trailing arguments for ``quant`` and the activation scales ``hidden_scale``
    (``prepare``'s, for weights whose activations are quantized too): () when unquantized."""
    if not quant.is_quantized:
        return ()
    return (quant.weight_dtype, quant.granularity, quant.group_size, quant.act_dtype,
            list(quant.block_shape) if quant.block_shape is not None else None,
            quant.w13_scale, quant.w2_scale, quant.w13_zp, quant.w2_zp, quant.a13_scale, quant.a2_scale, hidden_scale)


@torch.library.custom_op("moekit::fused_experts_backward", mutates_args=())
def fused_experts_backward_op(
    grad_out: torch.Tensor,
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
    backend: str,
    needs: list[bool],
) -> list[torch.Tensor]:
    """Gradients for (hidden_states, w13, w2, topk_weights, w13_bias, w2_bias); an empty tensor where ``needs``
    is False (a custom op returns tensors only)."""
    grads = _experts(backend).backward(
        grad_out, hidden_states, w13, w2, topk_weights, topk_ids,
        activation=Activation(name=activation, alpha=alpha, limit=limit),
        w13_bias_E2I=w13_bias, w2_bias_EH=w2_bias, expert_map_E=expert_map, needs=needs,
    )
    return [g if g is not None else grad_out.new_empty(0) for g in grads]


@fused_experts_backward_op.register_fake
def _(grad_out, hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, expert_map, activation, alpha,
      limit, backend, needs):  # noqa: ANN001, ANN202
    like = (hidden_states, w13, w2, topk_weights, w13_bias, w2_bias)
    # Contiguous, as every backend returns them (empty_like would copy the strides of a transposed weight view,
    # and inductor would then lay the real gradients out wrong).
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) if need and t is not None else grad_out.new_empty(0)
            for t, need in zip(like, needs)]


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, expert_map, *rest = inputs
    ctx.save_for_backward(hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, expert_map)
    activation, alpha, limit, _out_dtype, backend, *quant = rest
    ctx.static = (activation, alpha, limit, backend)
    ctx.quantized = bool(quant) and quant[0] is not None


def _backward(ctx, grad_out):  # noqa: ANN001, ANN202
    if ctx.quantized:
        # ModularKernel refuses a gradient through quantized experts before the op runs; this is the backstop.
        raise NotImplementedError("fused_experts: quantized experts have no backward")
    saved = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) for i in _GRAD_POSITIONS]
    grads = fused_experts_backward_op(grad_out, *saved, *ctx.static, needs)
    dx, dw13, dw2, dtw, db13, db2 = (g if need else None for g, need in zip(grads, needs))
    return dx, dw13, dw2, dtw, None, db13, db2, None, None, None, None, None, None, *(None,) * _QUANT_ARGS


fused_experts_op.register_autograd(_backward, setup_context=_setup_context)

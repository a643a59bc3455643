"""The experts half of a modular kernel: the grouped GEMMs, and their backward.

Contract of ``Experts.apply`` (N = T·K routed rows, E = local experts):

    for t in tokens, k in top-k with e = local(topk_ids[t, k]) valid:
        h = x[t] @ w13[e].T + b13[e]                   # [2I]  (I for non-gated activations)
        a = act(h)                                      # [I]
        y = a @ w2[e].T + b2[e]                         # [H]
        out[t] += topk_weights[t, k] * y                # fp32 accumulation, cast to out dtype at the end

``local(g) = expert_map[g]`` when an expert map is given (-1 = expert lives on another rank: skipped), else g.
A backend reduces over top-k itself and writes every row of ``out`` (rows with no valid expert are zero).

A backend implements ``run`` (the forward for validated inputs) and, to be trainable, ``backward`` (the
gradients, recomputing what it needs from the inputs: the forward keeps no intermediates, so inference pays
nothing for training). ``apply`` is the one entry point and picks the path:

    compiling                     -> torch.ops.moekit.fused_experts (one opaque node, autograd formula attached;
                                     a quantized layer's QuantParams fields and activation scales ride along
                                     as its arguments)
    eager, a gradient is needed   -> an autograd.Function around run/backward
    otherwise (inference)         -> run, with nothing in between
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch.autograd.function import once_differentiable

from moekit.kernel import cpu_packed
from moekit.kernel.custom_op import fused_experts_op, quant_op_args
from moekit.ops.activation import Activation
from moekit.quant.params import UNQUANTIZED, QuantParams

# (grad of hidden_states, w13, w2, topk_weights, w13_bias, w2_bias); None where not asked for.
Grads = tuple[torch.Tensor | None, ...]


class Experts(ABC):
    """Base class of expert backends; stateless, so one instance serves every layer."""

    name: ClassVar[str]

    @property
    def op_backend(self) -> str | None:
        """Registry name whose shared instance computes exactly what this one does (the custom op dispatches by
        name under ``torch.compile``), or None to trace ``run`` instead."""
        return None

    def check_supported(self, hidden_states: torch.Tensor, quant: QuantParams) -> None:
        """Raise ``ValueError`` if this backend cannot run these inputs; the default accepts unquantized ones."""
        if quant.is_quantized:
            raise ValueError(f"backend {self.name!r}: quantized weights ({quant.describe()}) are not supported yet; "
                             "backend 'torch' runs 8-bit weights (a quantized layer's backend 'auto' picks it)")

    def apply(
        self,
        hidden_states_TH: torch.Tensor,
        w13_E2IH: torch.Tensor,
        w2_EHI: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        *,
        activation: Activation,
        w13_bias_E2I: torch.Tensor | None,
        w2_bias_EH: torch.Tensor | None,
        expert_map_E: torch.Tensor | None,
        quant: QuantParams,
        hidden_scale: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """Return ``out`` [T, H] in ``out_dtype`` as the module docstring defines it (differentiable)."""
        self.check_supported(hidden_states_TH, quant)
        tensors = (hidden_states_TH, w13_E2IH, w2_EHI, topk_weights_TK, topk_ids_TK, w13_bias_E2I, w2_bias_EH,
                   expert_map_E)
        if torch.compiler.is_compiling() and self.op_backend is not None:
            # One opaque node: tracing into the backends broke the graph (the Triton 8-bit path's tile choice
            # reads tuned tables from disk).
            return fused_experts_op(*tensors, activation.name, activation.alpha, activation.limit, out_dtype,
                                    self.op_backend, *quant_op_args(quant, hidden_scale))
        if needs_grad(tensors):
            if quant.is_quantized:  # ModularKernel refuses earlier; a backend called directly must too
                named = {"hidden_states": hidden_states_TH, "w13": w13_E2IH, "w2": w2_EHI,
                         "topk_weights": topk_weights_TK, "w13_bias": w13_bias_E2I, "w2_bias": w2_bias_EH}
                raise ValueError(f"quant: quantized experts ({quant.describe()}) have no backward, but "
                                 f"{requiring_grad(named)}: run them under torch.no_grad()/torch.inference_mode() "
                                 "or detach it")
            if type(self).backward is Experts.backward:
                raise NotImplementedError(f"backend {self.name!r}: no backward, but a gradient is required "
                                          "(run it under torch.no_grad()/torch.inference_mode())")
            with cpu_packed.not_packed():
                return _ExpertsFunction.apply(self, activation, out_dtype, *tensors)
        return self.run(
            hidden_states_TH, w13_E2IH, w2_EHI, topk_weights_TK, topk_ids_TK,
            activation=activation, w13_bias_E2I=w13_bias_E2I, w2_bias_EH=w2_bias_EH, expert_map_E=expert_map_E,
            out_dtype=out_dtype, quant=quant, hidden_scale=hidden_scale,
        )

    @abstractmethod
    def run(
        self,
        hidden_states_TH: torch.Tensor,
        w13_E2IH: torch.Tensor,
        w2_EHI: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        *,
        activation: Activation,
        w13_bias_E2I: torch.Tensor | None,
        w2_bias_EH: torch.Tensor | None,
        expert_map_E: torch.Tensor | None,
        out_dtype: torch.dtype,
        quant: QuantParams = UNQUANTIZED,
        hidden_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The forward for inputs ``apply`` has validated."""

    def backward(
        self,
        grad_out_TH: torch.Tensor,
        hidden_states_TH: torch.Tensor,
        w13_E2IH: torch.Tensor,
        w2_EHI: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        *,
        activation: Activation,
        w13_bias_E2I: torch.Tensor | None,
        w2_bias_EH: torch.Tensor | None,
        expert_map_E: torch.Tensor | None,
        needs: Sequence[bool],
    ) -> Grads:
        """Gradients of ``sum(grad_out · run(...))`` for (x, w13, w2, topk_weights, w13_bias, w2_bias), each in
        its input's dtype and shape; ``needs`` flags the ones wanted, in that order, and the others are None."""
        raise NotImplementedError(f"backend {self.name!r}: no backward")


def needs_grad(tensors: Sequence[torch.Tensor | None]) -> bool:
    """Whether autograd must track a call on ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def requiring_grad(named: Mapping[str, torch.Tensor | None]) -> str:
    """The names of ``named``'s tensors that require grad, for a refusal to say which (a trainable router gate
    makes only ``topk_weights`` require it)."""
    names = [n for n, t in named.items() if t is not None and t.requires_grad]
    return f"{', '.join(names)} require{'s' if len(names) == 1 else ''} grad"


class _ExpertsFunction(torch.autograd.Function):
    """Eager autograd: the forward keeps only its inputs; ``Experts.backward`` recomputes what it needs."""

    @staticmethod
    def forward(ctx, experts, activation, out_dtype, x, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias,
                expert_map):  # noqa: ANN001, ANN205 (autograd.Function's signature)
        ctx.experts, ctx.activation = experts, activation
        ctx.save_for_backward(x, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, expert_map)
        return experts.run(
            x, w13, w2, topk_weights, topk_ids, activation=activation, w13_bias_E2I=w13_bias,
            w2_bias_EH=w2_bias, expert_map_E=expert_map, out_dtype=out_dtype,
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, expert_map = ctx.saved_tensors
        flags = ctx.needs_input_grad
        dx, dw13, dw2, dtw, db13, db2 = ctx.experts.backward(
            grad_out, x, w13, w2, topk_weights, topk_ids, activation=ctx.activation, w13_bias_E2I=w13_bias,
            w2_bias_EH=w2_bias, expert_map_E=expert_map, needs=(*flags[3:7], *flags[8:10]),
        )
        return None, None, None, dx, dw13, dw2, dtw, None, db13, db2, None

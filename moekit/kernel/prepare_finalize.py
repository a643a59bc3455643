"""The prepare/finalize half of a modular kernel.

``prepare`` turns the layer's tokens into what the experts stage consumes (optionally quantized activations,
router weights folded into the input, and — in expert parallelism — only the tokens this rank owns).
``finalize`` turns the experts stage's output back into ``[T, H]`` for the caller (for EP: combine across
ranks). The handle that connects the two is a frozen ``PrepareResult``, not a tuple.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from moekit.ops.quantize import QDTYPES, quantize_activation
from moekit.quant.params import QuantParams



@dataclass(frozen=True, kw_only=True)
class PrepareResult:
    """What ``prepare`` hands to the experts stage and, later, to ``finalize``.

    Attributes:
        hidden_states: [T', H] rows the experts stage computes on (T' = T for a local prepare).
        hidden_scale: activation scales when ``hidden_states`` is quantized (float32: [T', ⌈H/g⌉] per group of
            g columns, [T', 1] per token, [] per tensor; ``moekit.ops.quantize``), else None.
        topk_weights: [T', K] float32 routing weights (all ones when ``weights_applied``).
        topk_ids: [T', K] int32 expert ids.
        weights_applied: the router weights were already multiplied into ``hidden_states``.
        num_tokens: T, the row count ``finalize`` must return.
        experts_out_dtype: the dtype the experts stage should write (None: the layer's dtype); fp32 when
            ``finalize`` still sums rows, so the layer's output is rounded once.
        handle: whatever a cross-rank finalize needs to route rows home; locally (K, the layer dtype) when x was
            expanded to one row per (token, expert), else None.
    """

    hidden_states: torch.Tensor
    hidden_scale: torch.Tensor | None
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    weights_applied: bool
    num_tokens: int
    experts_out_dtype: torch.dtype | None = None
    handle: object | None = None


class PrepareFinalize(ABC):
    """Base class; subclasses keep no per-layer state so one instance serves every layer.

    ``collective``: prepare/finalize run collectives across ranks (expert parallelism), so every rank must call
    them on every layer call, even with no tokens of its own, and no gradient flows through them.
    """

    collective: bool = False
    # False on a rank whose output is summed with other ranks' for the same tokens and experts (tensor
    # parallelism, tp_rank > 0): the kernel leaves out the GEMM-2 bias there, so the sum holds it once.
    adds_w2_bias: bool = True

    @abstractmethod
    def prepare(
        self,
        hidden_states_TH: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        *,
        apply_router_weight_on_input: bool,
        quant: QuantParams,
    ) -> PrepareResult: ...

    @abstractmethod
    def finalize(self, output_TH: torch.Tensor, prep: PrepareResult) -> torch.Tensor:
        """Return the layer's routed output [T, H], in the layer's dtype, from the experts stage's output."""


def check_act_dtype(quant: QuantParams) -> None:
    if quant.act_dtype is not None and quant.act_dtype not in QDTYPES:
        raise NotImplementedError(f"quant.act_dtype={quant.act_dtype!r}: only {list(QDTYPES)} activations exist")


def quantize_input(x_TH: torch.Tensor, quant: QuantParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, None)`` unquantized, else ``(codes, scale)`` as ``quant`` asks (scale layouts: ``PrepareResult``).

    On CUDA one Triton launch (moekit.ops.act_quant) gives the torch function's codes and scales bit for bit.
    """
    if quant.act_dtype is None:
        return x_TH, None
    if x_TH.shape[0] == 0 and quant.act_granularity == "tensor" and quant.a13_scale is None:
        # No rows, no amax (an expert-parallel rank can receive none): any scale quantizes nothing.
        return x_TH.to(QDTYPES[quant.act_dtype]), torch.ones((), dtype=torch.float32, device=x_TH.device)
    quantize = quantize_activation
    # The registry's lookup, made once at import: torch.compile cannot trace importlib (a lookup per call broke
    # every compiled 8-bit layer on CUDA). Imported here: the package imports this module.
    from moekit.kernel import triton_available

    if x_TH.device.type == "cuda" and triton_available():
        from moekit.ops.act_quant import act_quant as quantize  # imported on use: Triton is optional
    return quantize(x_TH if x_TH.stride(-1) == 1 else x_TH.contiguous(), quant.act_dtype, quant.act_granularity,
                    quant.act_group_size, static_scale=quant.a13_scale)


class LocalPrepareFinalize(PrepareFinalize):
    """Single-rank prepare/finalize: nothing to dispatch; the experts stage already reduces over top-k.

    Router weights on the input (Llama4) with K > 1 cannot be folded into one row per token, since each of
    its K experts sees a differently scaled copy of x. ``prepare`` then expands x into the N = T·K routed rows
    (row t·K + k = x[t] · w[t, k], routed to expert ids[t, k] with weight 1) and ``finalize`` sums the K rows
    of each token back together.
    """

    def prepare(
        self,
        hidden_states_TH: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        *,
        apply_router_weight_on_input: bool,
        quant: QuantParams,
    ) -> PrepareResult:
        check_act_dtype(quant)
        num_tokens, top_k = topk_ids_TK.shape
        x = hidden_states_TH
        weights, ids, expanded_k = topk_weights_TK, topk_ids_TK, None
        if apply_router_weight_on_input:
            if top_k == 1:
                x = (x.float() * weights).to(x.dtype)
                weights = torch.ones_like(weights)
            else:
                x_NH = x.float().unsqueeze(1) * weights.float().unsqueeze(-1)
                x = x_NH.reshape(num_tokens * top_k, x.shape[-1]).to(x.dtype)
                ids = ids.reshape(-1, 1)
                weights = torch.ones(num_tokens * top_k, 1, dtype=torch.float32, device=x.device)
                expanded_k = top_k
        # Once per routed row (after any weight folding), shared by all of its K experts.
        x, scale = quantize_input(x, quant)
        return PrepareResult(
            hidden_states=x,
            hidden_scale=scale,
            topk_weights=weights,
            topk_ids=ids,
            weights_applied=apply_router_weight_on_input,
            num_tokens=num_tokens,
            experts_out_dtype=None if expanded_k is None else torch.float32,
            handle=None if expanded_k is None else (expanded_k, hidden_states_TH.dtype),
        )

    def finalize(self, output_TH: torch.Tensor, prep: PrepareResult) -> torch.Tensor:
        if prep.handle is None:
            return output_TH
        top_k, dtype = prep.handle  # the layer's dtype: hidden_states may hold 8-bit codes by now
        return output_TH.view(prep.num_tokens, top_k, output_TH.shape[-1]).sum(dim=1).to(dtype)

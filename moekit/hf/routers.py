"""Readers that turn a transformers MoE block's router into moekit routing settings.

Each reader takes the block and returns a ``RouterSpec``: the router Linear's tensors, the correction bias, K,
and the ``RoutingConfig`` that reproduces the family's ``forward``. The families' router math, in moekit terms:

    softmax_topk      softmax(logits) -> top-k [-> renormalize]           Mixtral, Qwen*, OLMoE, Jamba, HunYuan
    topk_softmax      top-k(logits) -> softmax over the K picked          gpt-oss, Granite-MoE, Aria, Cohere2, JetMoE
    topk_sigmoid      top-k(logits [+ correction bias]) -> sigmoid of     Llama4 (weights on the input), Kolibri
                      the picked logits [-> renormalize]
    dbrx              softmax -> top-k -> weights / ||weights||_p         DBRX (p = 1: renormalize)
    deepseek_v3       sigmoid, + correction bias, grouped "top2_sum",     DeepSeek-V3, GLM-4-MoE, Dots1, Kimi, ...
                      renormalize, x routed_scaling_factor
    deepseek_v2       softmax, greedy or grouped "max", x scaling         DeepSeek-V2
    mistral4          softmax, grouped "top2_sum", renormalize, x scaling Mistral-4
    sigmoid_bias      sigmoid + correction bias, renormalize, x scaling   MiniMax-M2, AFMoE, LFM2, HY-V3, Laguna, ...
    ernie             softmax + correction bias, renormalize              ERNIE-4.5-MoE

A reader raises ``NotImplementedError`` for a setting moekit cannot express (the block then stays as it is).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moekit.config import RoutingConfig


@dataclass(frozen=True, kw_only=True)
class RouterSpec:
    """A transformers router in moekit terms. ``weight`` [E, H], ``bias`` [E], ``correction_bias`` [E]."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    correction_bias: torch.Tensor | None
    top_k: int
    routing: RoutingConfig
    fp32: bool = False  # logits from fp32 copies of x and the weight (also implied by an fp32 weight)


RouterReader = Callable[[nn.Module], RouterSpec]


def _router(block: nn.Module) -> nn.Module:
    return block.gate if isinstance(getattr(block, "gate", None), nn.Module) else block.router


def _weight(router: nn.Module, linear: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    owner = getattr(router, linear) if linear else router
    return owner.weight, getattr(owner, "bias", None)


def _scale(block: nn.Module, router: nn.Module, *names: str) -> float:
    """Product of the scaling factors found under ``names`` on the router or the block (absent = 1)."""
    factor = 1.0
    for name in names:
        for owner in (router, block):
            value = getattr(owner, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                factor *= float(value)
                break
    return factor


def softmax_topk(
    *,
    renormalize: bool | str = "norm_topk_prob",
    topk_before_score: bool = False,
    linear: str | None = None,
    fp32: bool = False,
):
    """softmax(logits) -> top-k, or with ``topk_before_score`` top-k(logits) -> softmax over the K picked (the
    router's bias, if any, is part of the logits). ``renormalize`` is a constant or the name of the router's flag."""

    def read(block: nn.Module) -> RouterSpec:
        router = _router(block)
        weight, bias = _weight(router, linear)
        renorm = bool(getattr(router, renormalize)) if isinstance(renormalize, str) else renormalize
        return RouterSpec(
            weight=weight,
            bias=bias,
            correction_bias=None,
            top_k=_top_k(router, block),
            routing=RoutingConfig(scoring_func="softmax", topk_before_score=topk_before_score, renormalize=renorm),
            fp32=fp32,
        )

    return read


def topk_softmax(*, fp32: bool = False) -> RouterReader:
    """top-k over the raw logits, softmax over the K picked (gpt-oss, Granite-MoE, Aria)."""
    return softmax_topk(renormalize=False, topk_before_score=True, fp32=fp32)


def topk_sigmoid(*, weights_on_input: bool = False, fp32: bool = False) -> RouterReader:
    """top-k over the raw logits (plus the router's ``e_score_correction_bias``, if any, for the choice only),
    sigmoid of the picked logits, renormalized when the router's ``norm_topk_prob`` is set. ``weights_on_input``:
    the weight scales the expert's input instead of its output (Llama4)."""

    def read(block: nn.Module) -> RouterSpec:
        router = _router(block)
        top_k = _top_k(router, block)
        correction = getattr(router, "e_score_correction_bias", None)
        routing = RoutingConfig(
            scoring_func="sigmoid",
            topk_before_score=True,
            renormalize=bool(getattr(router, "norm_topk_prob", False)),
            correction_bias=correction is not None,
            apply_weights_on_input=weights_on_input,
        )
        return RouterSpec(
            weight=router.weight, bias=None, correction_bias=correction, top_k=top_k, routing=routing, fp32=fp32
        )

    return read


@dataclass(frozen=True)
class PNormTopK:
    """``custom_routing_function`` for softmax -> top-k -> ``weights / ||weights||_p`` (DBRX with p != 1)."""

    p: float

    def __call__(
        self, hidden_states: torch.Tensor | None, router_logits: torch.Tensor, top_k: int, renormalize: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.softmax(router_logits.float(), dim=-1)
        weights, ids = torch.topk(scores, top_k, dim=-1)
        return weights / torch.linalg.vector_norm(weights, ord=self.p, dim=-1, keepdim=True), ids


def dbrx(block: nn.Module) -> RouterSpec:
    """softmax -> top-k; ``moe_normalize_expert_weights`` = p divides by the p-norm of the K weights (None: no
    division; p = 1 is renormalize, the weights being positive). The training-time input jitter
    (``router.moe_jitter_eps``) is the converted layer's (``HFMoE.jitter_noise``)."""
    router = _router(block)
    p = block.moe_normalize_expert_weights
    custom = None if p is None or float(p) == 1.0 else PNormTopK(float(p))
    routing = RoutingConfig(scoring_func="softmax", renormalize=p is not None, custom_routing_function=custom)
    return RouterSpec(
        weight=router.layer.weight, bias=router.layer.bias, correction_bias=None, top_k=block.top_k, routing=routing
    )


def cohere2(block: nn.Module) -> RouterSpec:
    """top-k over the logits, then softmax over the picked or sigmoid of each (renormalized on request)."""
    router = _router(block)
    sigmoid = router.expert_selection_fn == "sigmoid"
    routing = RoutingConfig(
        scoring_func="sigmoid" if sigmoid else "softmax",
        topk_before_score=True,
        renormalize=sigmoid and bool(router.norm_topk_prob),
    )
    return RouterSpec(weight=router.weight, bias=None, correction_bias=None, top_k=router.top_k, routing=routing)


def deepseek_v3(*, scale_names: tuple[str, ...] = ("routed_scaling_factor",), renormalize: bool | None = None):
    """sigmoid scores; choice = scores + correction bias, grouped by the sum of each group's two best."""

    def read(block: nn.Module) -> RouterSpec:
        router = _router(block)
        groups = getattr(router, "num_group", None)
        renorm = bool(router.norm_topk_prob) if renormalize is None else renormalize
        routing = RoutingConfig(
            scoring_func="sigmoid",
            renormalize=renorm,
            num_expert_group=groups,
            topk_group=router.topk_group if groups is not None else None,
            group_score="top2_sum" if groups is not None else "max",
            correction_bias=True,
            routed_scaling_factor=_scale(block, router, *scale_names),
        )
        return RouterSpec(
            weight=router.weight,
            bias=None,
            correction_bias=router.e_score_correction_bias,
            top_k=router.top_k,
            routing=routing,
            fp32=True,
        )

    return read


def deepseek_v2(block: nn.Module) -> RouterSpec:
    router = _router(block)
    grouped = router.topk_method == "group_limited_greedy"
    if router.topk_method not in ("greedy", "group_limited_greedy"):
        raise NotImplementedError(f"topk_method={router.topk_method!r}")
    routing = RoutingConfig(
        scoring_func="softmax",
        num_expert_group=router.num_group if grouped else None,
        topk_group=router.topk_group if grouped else None,
        group_score="max",
        routed_scaling_factor=float(router.routed_scaling_factor),
    )
    return RouterSpec(
        weight=router.weight, bias=None, correction_bias=None, top_k=router.top_k, routing=routing, fp32=True
    )


def mistral4(*, fp32: bool, renormalize: bool | None = None):
    """softmax scores grouped by the sum of each group's two best (masked groups score 0, never picked)."""

    def read(block: nn.Module) -> RouterSpec:
        router = _router(block)
        routing = RoutingConfig(
            scoring_func="softmax",
            renormalize=bool(router.norm_topk_prob) if renormalize is None else renormalize,
            num_expert_group=router.num_group,
            topk_group=router.topk_group,
            group_score="top2_sum",
            routed_scaling_factor=float(router.routed_scaling_factor),
        )
        return RouterSpec(
            weight=router.weight, bias=None, correction_bias=None, top_k=router.top_k, routing=routing, fp32=fp32
        )

    return read


def sigmoid_bias(
    *,
    bias_on: str = "router",
    bias_name: str = "e_score_correction_bias",
    linear: str | None = None,
    renormalize: bool | str = True,
    scale_names: tuple[str, ...] = (),
    fp32: bool = False,
):
    """sigmoid scores; experts picked on scores + correction bias (read from the router or the block)."""

    def read(block: nn.Module) -> RouterSpec:
        router = _router(block)
        weight, bias = _weight(router, linear)
        owner = router if bias_on == "router" else block
        correction = getattr(owner, bias_name, None)
        if getattr(owner, "use_expert_bias", True) is False:
            correction = None
        softcap = getattr(router, "router_logit_softcapping", 0.0) or 0.0
        if softcap > 0:
            raise NotImplementedError(f"router logit softcapping ({softcap})")
        score_fn = getattr(router, "score_fn", None)
        if score_fn is not None and "Sigmoid" not in type(score_fn).__name__:
            raise NotImplementedError(f"scoring function {type(score_fn).__name__}")
        renorm = bool(getattr(router, renormalize)) if isinstance(renormalize, str) else renormalize
        routing = RoutingConfig(
            scoring_func="sigmoid",
            renormalize=renorm,
            correction_bias=correction is not None,
            routed_scaling_factor=_scale(block, router, *scale_names),
        )
        return RouterSpec(
            weight=weight, bias=bias, correction_bias=correction, top_k=_top_k(router, block), routing=routing, fp32=fp32
        )

    return read


def sigmoid_topk(block: nn.Module) -> RouterSpec:
    """sigmoid(logits) -> top-k [-> renormalize], fp32 logits (Flint)."""
    router = _router(block)
    routing = RoutingConfig(scoring_func="sigmoid", renormalize=bool(router.norm_topk_prob))
    return RouterSpec(
        weight=router.weight, bias=None, correction_bias=None, top_k=router.top_k, routing=routing, fp32=True
    )


def ernie(block: nn.Module) -> RouterSpec:
    router = _router(block)
    norm_min = float(getattr(router, "norm_min", 1e-12))
    if norm_min > 1e-12:
        # transformers divides the picked weights by max(sum, moe_norm_min); moekit by the sum alone, which agree
        # while no sum of picked weights falls below it (the default 1e-12 only in extreme underflow).
        raise NotImplementedError(f"moe_norm_min={norm_min} (the renormalization's floor; moekit's is the default "
                                  "1e-12)")
    correction = router.moe_statics.e_score_correction_bias
    if correction.shape[0] != 1:
        raise NotImplementedError(f"{correction.shape[0]} expert groups in moe_statics")
    routing = RoutingConfig(scoring_func="softmax", renormalize=True, correction_bias=True)
    return RouterSpec(
        weight=router.weight,
        bias=None,
        correction_bias=correction[0],
        top_k=router.top_k,
        routing=routing,
        fp32=True,
    )


def _top_k(router: nn.Module, block: nn.Module) -> int:
    for owner in (router, block):
        k = getattr(owner, "top_k", None)
        if isinstance(k, int):
            return k
    raise NotImplementedError("no top_k on the router or the block")

"""Routing: router logits -> (topk_weights float32 [T, K], topk_ids int32 [T, K]).

    scores    = softmax(logits) | sigmoid(logits)                          (fp32)
    choice    = scores + e_score_correction_bias                            (selection only)
    if grouped:   keep the topk_group best of num_expert_group groups, ranked by max(choice in group)
                  ("max", DeepSeek-V2) or sum of its two best (“top2_sum”, DeepSeek-V3); mask the rest
    ids       = topk(choice, K)
    weights   = scores[ids]; if renormalize: weights /= weights.sum(); weights *= routed_scaling_factor
                (the division is done as softmax(log scores[ids]), so underflowed scores never give 0/0)

``topk_before_score`` picks the K largest raw logits (+ correction bias, if given) first and scores only the
picked logits (gpt-oss: softmax over the K picked logits; Llama4: sigmoid of the picked logits; Kolibri:
sigmoid of the picked, chosen with a correction bias).

Non-finite logits: ``topk_ids`` are always valid expert indices in [0, E), so no kernel can read out of
bounds. A ``-inf`` logit means "never pick this expert" while K finite logits remain. A NaN logit (a diverged
model) gives that token NaN weights, which reach only that token's output row; so does a ``+inf`` logit under
softmax scoring (inf - inf). Under sigmoid scoring ``+inf`` is a valid saturated score, sigmoid(+inf) = 1: the
expert is picked with finite weights.

Sigmoid scoring without a correction bias ranks experts by their logits (sigmoid is monotone; the logits keep
the order that saturated scores lose), while transformers ranks by sigmoid(logit), which rounds to 1.0 in fp32
above ~17: among experts whose scores are all 1.0 the two may pick different ones (each with the same weight),
an expected difference, not a bug.

Non-finite correction bias: a NaN or ``+inf`` entry would win every token's choice with finite weights, so it
is a corrupted checkpoint. On the CPU ``select_experts`` raises a ``ValueError`` naming
``e_score_correction_bias`` and the experts (except while compiling). On a GPU, where checking values would cost a
device sync on every call, and while compiling, the tokens that picked such an expert get NaN in all their
weights (so their outputs are NaN, never finite and wrong); ``moekit.loading.load_moe`` refuses such a bias at
load. A ``-inf`` entry means "never pick this expert" while K others remain, as a ``-inf`` logit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moekit._checks import (
    check_bool,
    check_choice,
    check_dtype,
    check_int_dtype,
    check_ndim,
    check_positive,
    check_real,
    check_same_device,
    check_shape,
    values_checkable,
)
from moekit.config import GROUP_SCORES, SCORING_FUNCS, RoutingConfig, check_grouped_topk

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def select_experts(
    router_logits: torch.Tensor | None,
    top_k: int,
    *,
    scoring_func: str = "softmax",
    topk_before_score: bool = False,
    renormalize: bool = False,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    group_score: str = "max",
    e_score_correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    custom_routing_function: Callable | None = None,
    hidden_states: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``top_k`` experts per token (see the module docstring for the math).

    Args:
        router_logits: [T, E] float logits; may be None when ``topk_weights``/``topk_ids`` are given.
        top_k: K in [1, E].
        custom_routing_function: ``fn(hidden_states, router_logits, top_k, renormalize) -> (weights, ids)``;
            replaces the built-in selection (the routed scaling factor still applies).
        topk_weights, topk_ids: precomputed routing [T, K]; returned as float32/int32 after validation. They
            skip routing: every routing argument must keep its default (a ValueError names one that does not).
    Returns:
        topk_weights float32 [T, K], topk_ids int32 [T, K].
    """
    if topk_weights is not None or topk_ids is not None:
        _refuse_routing_arguments(
            "given with precomputed topk_weights/topk_ids, which skip routing (route first, then pass the result)",
            scoring_func=scoring_func, topk_before_score=topk_before_score, renormalize=renormalize,
            num_expert_group=num_expert_group, topk_group=topk_group, group_score=group_score,
            e_score_correction_bias=e_score_correction_bias, routed_scaling_factor=routed_scaling_factor,
            custom_routing_function=custom_routing_function,
        )
        return _check_precomputed(topk_weights, topk_ids, router_logits, top_k)
    check_ndim("router_logits", router_logits, 2, "[T, E]")
    check_dtype("router_logits", router_logits, _FLOAT_DTYPES)
    num_tokens, num_experts = router_logits.shape
    check_positive("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k: expected in [1, E={num_experts}] (E from router_logits [T, E]), got {top_k}")
    check_choice("scoring_func", scoring_func, SCORING_FUNCS)
    check_choice("group_score", group_score, GROUP_SCORES)
    check_bool("renormalize", renormalize)
    check_bool("topk_before_score", topk_before_score)
    grouped = check_grouped_topk(
        num_expert_group,
        topk_group,
        group_score=group_score,
        topk_before_score=topk_before_score,
        num_experts=num_experts,
        top_k=top_k,
    )
    routed_scaling_factor = check_real("routed_scaling_factor", routed_scaling_factor, positive=True)
    if e_score_correction_bias is not None:
        check_shape("e_score_correction_bias", e_score_correction_bias, (num_experts,), "[E]")
        check_dtype("e_score_correction_bias", e_score_correction_bias, _FLOAT_DTYPES)
        check_same_device("e_score_correction_bias", e_score_correction_bias, "router_logits", router_logits)

    if custom_routing_function is not None:
        # It receives only the logits, top_k and renormalize: any other routing argument would be ignored.
        _refuse_routing_arguments(
            "has no effect with custom_routing_function (it receives only router_logits, top_k and renormalize)",
            scoring_func=scoring_func, topk_before_score=topk_before_score, num_expert_group=num_expert_group,
            e_score_correction_bias=e_score_correction_bias,
        )
        weights, ids = custom_routing_function(hidden_states, router_logits, top_k, renormalize)
        weights, ids = _check_precomputed(weights, ids, router_logits, top_k, source="custom_routing_function")
        return _scale(weights, routed_scaling_factor), ids

    bad_bias_E = None if e_score_correction_bias is None else _nonfinite_bias(e_score_correction_bias)
    logits = router_logits.float()
    if topk_before_score:
        choice = logits if e_score_correction_bias is None else logits + e_score_correction_bias.float()
        ids = torch.topk(choice, top_k, dim=-1).indices
        picked = logits.gather(1, ids)
        weights = torch.softmax(picked, dim=-1) if scoring_func == "softmax" else torch.sigmoid(picked)
        if renormalize and scoring_func == "sigmoid":  # (softmax over the picked logits already sums to 1)
            # In log space, as below: sigmoid(picked) / sum underflows to 0/0 for logits below ~-104.
            weights = torch.softmax(F.logsigmoid(picked), dim=-1)
    else:
        scores = torch.softmax(logits, dim=-1) if scoring_func == "softmax" else torch.sigmoid(logits)
        if e_score_correction_bias is None and not (grouped and group_score == "top2_sum"):
            # softmax and sigmoid are monotone, so the logits rank experts exactly as their scores do, without
            # the fp32 underflow that makes scores tie at 0 (softmax far below the row max, sigmoid below ~-104;
            # topk breaks such ties arbitrarily, and a -inf logit would tie with the finite ones).
            choice = logits
        else:
            choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
            # A -inf logit scores 0, and the bias would make it selectable again: keep it out.
            choice = choice.masked_fill(logits == float("-inf"), float("-inf"))
        if grouped:
            choice = _mask_groups(choice, num_expert_group, topk_group, group_score)
        ids = torch.topk(choice, top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if renormalize:
            # weights / weights.sum() is 0/0 = NaN for finite logits whose scores all underflow to 0 in fp32
            # (sigmoid below ~-104); softmax of the log scores is the same ratio without underflow. log_softmax
            # over the whole row keeps a NaN/+inf logit's NaN in its token's weights.
            log_scores = torch.log_softmax(logits, dim=-1) if scoring_func == "softmax" else F.logsigmoid(logits)
            weights = torch.softmax(log_scores.gather(1, ids), dim=-1)
    if bad_bias_E is not None:
        # A NaN/+inf bias wins every token it can reach, so a token that picked such an expert has a wrong
        # choice; NaN in its whole row (the renormalized weights of its other experts are wrong too).
        weights = weights.masked_fill(bad_bias_E[ids].any(dim=-1, keepdim=True), float("nan"))
    return _scale(weights, routed_scaling_factor), ids.to(torch.int32)


def route(
    router_logits: torch.Tensor,
    top_k: int,
    routing: RoutingConfig,
    *,
    e_score_correction_bias: torch.Tensor | None = None,
    hidden_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_experts`` with the settings of a ``RoutingConfig``."""
    return select_experts(
        router_logits,
        top_k,
        scoring_func=routing.scoring_func,
        topk_before_score=routing.topk_before_score,
        renormalize=routing.renormalize,
        num_expert_group=routing.num_expert_group,
        topk_group=routing.topk_group,
        group_score=routing.group_score,
        e_score_correction_bias=e_score_correction_bias,
        routed_scaling_factor=routing.routed_scaling_factor,
        custom_routing_function=routing.custom_routing_function,
        hidden_states=hidden_states,
    )


def _mask_groups(choice_TE: torch.Tensor, num_expert_group: int, topk_group: int, group_score: str) -> torch.Tensor:
    """Set the scores of experts outside the ``topk_group`` best groups to -inf (arguments checked by
    ``check_grouped_topk``)."""
    num_tokens, num_experts = choice_TE.shape
    per_group = num_experts // num_expert_group
    grouped_TGe = choice_TE.view(num_tokens, num_expert_group, per_group)
    if group_score == "max":
        group_scores_TG = grouped_TGe.amax(dim=-1)
    else:
        top2_TG2 = grouped_TGe.topk(2, dim=-1).values
        # A masked (-inf) second best would make the sum -inf, tying a group that still has a selectable expert
        # with one that has none (and topk could keep the empty one: the token then loses its real experts).
        # Sum only the selectable part: the best alone when the second is -inf, -inf when both are.
        second_masked = top2_TG2[..., 1] == float("-inf")
        group_scores_TG = torch.where(second_masked, top2_TG2[..., 0], top2_TG2.sum(dim=-1))
    best_groups = group_scores_TG.topk(topk_group, dim=-1).indices
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, best_groups, True)
    return grouped_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)


def _nonfinite_bias(bias_E: torch.Tensor) -> torch.Tensor | None:
    """Reject a NaN/+inf correction bias (a corrupted checkpoint) where values can be checked without a device
    sync (a CPU tensor, not compiling); else return the [E] mask of such experts, for ``select_experts`` to put NaN in the weights of the tokens that picked one.
    ``-inf`` is allowed: "never pick this expert", as a -inf logit."""
    bad_E = torch.isnan(bias_E) | (bias_E == float("inf"))
    if bias_E.device.type != "cpu" or not values_checkable():  # no per-call device sync on the hot path
        return bad_E
    if bool(bad_E.any()):
        experts = bad_E.nonzero().flatten().tolist()
        shown = ", ".join(map(str, experts[:16])) + (f", ... ({len(experts)} in all)" if len(experts) > 16 else "")
        raise ValueError(
            f"e_score_correction_bias: expected finite values (or -inf: never pick the expert), got NaN/+inf at "
            f"experts [{shown}]; the checkpoint's correction bias is corrupted"
        )
    return None


def _scale(weights: torch.Tensor, factor: float) -> torch.Tensor:
    return weights if factor == 1.0 else weights * factor


# select_experts' routing arguments at their defaults: the only values that mean "no routing step".
_ROUTING_DEFAULTS = {"scoring_func": "softmax", "topk_before_score": False, "renormalize": False,
                     "num_expert_group": None, "topk_group": None, "group_score": "max",
                     "e_score_correction_bias": None, "routed_scaling_factor": 1.0, "custom_routing_function": None}


def _refuse_routing_arguments(why: str, **given: object) -> None:
    """Refuse every routing argument in ``given`` that is not its default: ``why`` says what would ignore it
    (precomputed weights/ids skip routing; a custom routing function sees only some arguments)."""
    if "routed_scaling_factor" in given:
        given["routed_scaling_factor"] = check_real("routed_scaling_factor", given["routed_scaling_factor"],
                                                    positive=True)
    for name, value in given.items():
        default = _ROUTING_DEFAULTS[name]
        if (value is not None) if default is None else (value != default):
            shown = "a tensor" if isinstance(value, torch.Tensor) else repr(value)
            raise ValueError(f"select_experts: {name}={shown} {why}; expected {default!r}")


def _check_precomputed(
    weights: torch.Tensor | None,
    ids: torch.Tensor | None,
    router_logits: torch.Tensor | None,
    top_k: int,
    source: str = "select_experts",
) -> tuple[torch.Tensor, torch.Tensor]:
    if weights is None or ids is None:
        raise ValueError(f"{source}: topk_weights and topk_ids must be given together")
    check_ndim("topk_weights", weights, 2, "[T, K]")
    check_ndim("topk_ids", ids, 2, "[T, K]")
    check_dtype("topk_weights", weights, _FLOAT_DTYPES)
    check_int_dtype("topk_ids", ids)
    if weights.shape != ids.shape:
        raise ValueError(f"topk_ids: expected the shape of topk_weights {tuple(weights.shape)}, got {tuple(ids.shape)}")
    if weights.shape[1] != top_k:
        raise ValueError(f"topk_ids: expected K = top_k = {top_k} columns, got shape {tuple(ids.shape)}")
    if router_logits is not None:
        check_ndim("router_logits", router_logits, 2, "[T, E]")  # only its shape is read here
        if router_logits.shape[0] != ids.shape[0]:
            raise ValueError(
                f"topk_ids: expected T = {router_logits.shape[0]} rows (router_logits [T, E]), got {ids.shape[0]}"
            )
        num_experts = router_logits.shape[1]
        if ids.numel() and values_checkable() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
            raise ValueError(f"topk_ids: expected values in [0, {num_experts}), got [{int(ids.min())}, {int(ids.max())}]")
    if ids.dtype == torch.int64:
        # Saturate rather than wrap (2**32 + 3 would become a valid 3): out-of-range ids stay out of range for the
        # checks after this one, without a device sync here.
        ids = ids.clamp(-(2**31), 2**31 - 1)
    return weights.float(), ids.to(torch.int32)

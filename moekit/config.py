"""Frozen, validated configuration for a MoE layer.

``MoEConfig`` describes one layer: sizes, activation, routing (``RoutingConfig``), shared experts and biases;
``ParallelConfig`` how the layer is spread over ranks (expert parallelism). Every field is checked in ``__post_init__`` and errors name the field, so a bad config fails where it is built,
not deep inside a kernel.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from moekit._checks import check_bool, check_choice, check_positive, check_real
from moekit.ops.activation import Activation, resolve_activation

SCORING_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")
BACKENDS = ("auto", "torch", "triton")
# Expert placements (moekit.distributed.determine_expert_map) and expert-parallel dispatches (moekit.distributed).
PLACEMENTS = ("linear", "round_robin")
DISPATCHES = ("allgather_reducescatter", "all_to_all")


def check_grouped_topk(
    num_expert_group: int | None,
    topk_group: int | None,
    *,
    group_score: str = "max",
    topk_before_score: bool = False,
    num_experts: int | None = None,
    top_k: int | None = None,
    prefix: str = "",
) -> bool:
    """The rules of grouped top-k, in one place for ``RoutingConfig``, ``MoEConfig`` and ``select_experts``.

    Returns whether routing is grouped. ``num_experts``/``top_k`` None skip the rules that need them (a
    ``RoutingConfig`` knows neither); ``prefix`` (``"routing."``) is put before the argument names in errors.
    """
    if num_expert_group is None and topk_group is None:
        if group_score != "max":
            # Likely a config whose n_group/topk_group went missing: the score of groups would be ignored.
            raise ValueError(f"{prefix}group_score: {group_score!r} scores expert groups, but no num_expert_group/"
                             "topk_group is set (ungrouped routing takes the default 'max')")
        return False
    if num_expert_group is None or topk_group is None:
        raise ValueError(
            f"{prefix}num_expert_group/topk_group: set both for grouped top-k or neither, got "
            f"num_expert_group={num_expert_group}, topk_group={topk_group}"
        )
    check_positive(f"{prefix}num_expert_group", num_expert_group)
    check_positive(f"{prefix}topk_group", topk_group)
    if topk_group > num_expert_group:
        raise ValueError(f"{prefix}topk_group: expected <= num_expert_group={num_expert_group}, got {topk_group}")
    if topk_before_score:
        raise ValueError(f"{prefix}topk_before_score: not supported together with grouped top-k")
    if num_experts is None:
        return True
    if num_experts % num_expert_group:
        raise ValueError(
            f"{prefix}num_expert_group: expected a divisor of num_experts={num_experts}, got {num_expert_group}"
        )
    per_group = num_experts // num_expert_group
    if group_score == "top2_sum" and per_group < 2:
        raise ValueError(f"{prefix}group_score: 'top2_sum' needs >= 2 experts per group, got {per_group}")
    if top_k is not None and top_k > topk_group * per_group:
        raise ValueError(f"top_k: expected <= topk_group * experts_per_group = {topk_group * per_group}, got {top_k}")
    return True


@dataclass(frozen=True, kw_only=True)
class RoutingConfig:
    """How router logits become ``topk_weights``/``topk_ids``; see ``moekit.select_experts`` for the semantics.

    Families:  Mixtral/Qwen3/OLMoE-with-norm: softmax + renormalize;  Qwen2-MoE/OLMoE: softmax;
    gpt-oss: softmax with ``topk_before_score``;  Llama4: sigmoid with ``topk_before_score`` and
    ``apply_weights_on_input``;  DeepSeek-V2: softmax, groups with ``group_score="max"``;
    DeepSeek-V3: sigmoid, groups with ``group_score="top2_sum"``, ``correction_bias``, scaling factor.
    """

    scoring_func: str = "softmax"
    topk_before_score: bool = False
    renormalize: bool = False
    num_expert_group: int | None = None
    topk_group: int | None = None
    group_score: str = "max"
    correction_bias: bool = False
    routed_scaling_factor: float = 1.0
    apply_weights_on_input: bool = False
    custom_routing_function: Callable | None = None  # compared by identity

    def __post_init__(self) -> None:
        for flag in ("topk_before_score", "renormalize", "correction_bias", "apply_weights_on_input"):
            check_bool(f"routing.{flag}", getattr(self, flag))
        check_choice("routing.scoring_func", self.scoring_func, SCORING_FUNCS)
        check_choice("routing.group_score", self.group_score, GROUP_SCORES)
        check_grouped_topk(
            self.num_expert_group,
            self.topk_group,
            group_score=self.group_score,
            topk_before_score=self.topk_before_score,
            prefix="routing.",
        )
        factor = check_real("routing.routed_scaling_factor", self.routed_scaling_factor, positive=True)
        object.__setattr__(self, "routed_scaling_factor", factor)
        if self.custom_routing_function is not None:
            if not callable(self.custom_routing_function):
                raise TypeError("routing.custom_routing_function: expected a callable")
            # The function receives only (hidden_states, logits, top_k, renormalize): anything else it would ignore.
            for name, default in (("scoring_func", "softmax"), ("topk_before_score", False),
                                  ("num_expert_group", None), ("correction_bias", False)):
                if getattr(self, name) != default:
                    raise ValueError(f"routing.{name}: {getattr(self, name)!r} has no effect with a "
                                     f"custom_routing_function (it receives only the logits, top_k and renormalize); "
                                     f"expected {default!r}")

    @property
    def grouped(self) -> bool:
        return self.num_expert_group is not None


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """One MoE layer.

    Args:
        num_experts: E, routed experts.
        top_k: K, experts per token, in [1, E].
        hidden_size: H.
        intermediate_size: I, per routed expert.
        activation: name or ``moekit.Activation`` (``silu``, ``gelu``, ``gelu_tanh``, ``relu2``, ``swigluoai``).
        routing: a ``RoutingConfig``.
        shared_intermediate_size: intermediate size of the always-on shared MLP; 0 = no shared experts.
        shared_expert_gate: multiply the shared MLP's output by ``sigmoid(x @ w_gate)`` per token (Qwen2-MoE).
        bias: routed experts carry ``w13_bias`` [E, 2I] and ``w2_bias`` [E, H] (gpt-oss).
        router_bias: the router Linear has a bias (gpt-oss).
        router_fp32: compute router logits in fp32 from an fp32 copy of the input (DeepSeek-V3 does this).
        backend: ``auto`` (Triton on CUDA when available, else torch), ``torch`` or ``triton``.
    """

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: str | Activation = "silu"
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False
    bias: bool = False
    router_bias: bool = False
    router_fp32: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "hidden_size", "intermediate_size"):
            check_positive(name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: expected in [1, num_experts={self.num_experts}], got {self.top_k}")
        object.__setattr__(self, "activation", resolve_activation(self.activation))
        if not isinstance(self.routing, RoutingConfig):
            raise TypeError(f"routing: expected a moekit.RoutingConfig, got {type(self.routing).__name__}")
        if isinstance(self.shared_intermediate_size, bool) or not isinstance(self.shared_intermediate_size, int):
            raise TypeError(f"shared_intermediate_size: expected an int, got {type(self.shared_intermediate_size).__name__}")
        if self.shared_intermediate_size < 0:
            raise ValueError(f"shared_intermediate_size: expected >= 0 (0 = none), got {self.shared_intermediate_size}")
        for flag in ("shared_expert_gate", "bias", "router_bias", "router_fp32"):
            check_bool(flag, getattr(self, flag))
        if self.shared_expert_gate and self.shared_intermediate_size == 0:
            raise ValueError("shared_expert_gate: needs shared_intermediate_size > 0")
        check_choice("backend", self.backend, BACKENDS)
        r = self.routing
        check_grouped_topk(
            r.num_expert_group,
            r.topk_group,
            group_score=r.group_score,
            topk_before_score=r.topk_before_score,
            num_experts=self.num_experts,
            top_k=self.top_k,
            prefix="routing.",
        )

    @classmethod
    def from_hf(cls, config: str | os.PathLike | Mapping, layer: int | None = None) -> MoEConfig:
        """The config of the sparse MoE blocks of a transformers model, read from its ``config.json``.

        Args:
            config: the config dict, a ``config.json`` path or the checkpoint directory holding it; a multimodal
                config's ``text_config`` is read. transformers is not imported.
            layer: a decoder layer index; when given, it must be one of the model's sparse layers.
        Raises:
            ValueError: an unknown ``model_type``, a missing or ill-typed field, a dense ``layer``, or a setting
                moekit cannot express (the message names the field).

        Families: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss (``moekit.families``). The weight
        format is not part of a MoEConfig: ``moekit.quant.get_quant_method(cfg["quantization_config"])``.
        """
        # Imported here: moekit.families builds MoEConfigs, so it imports this module.
        from moekit.families import moe_config_from_hf

        return moe_config_from_hf(config, layer)

    @property
    def has_shared_experts(self) -> bool:
        return self.shared_intermediate_size > 0


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How one MoE layer is spread over the ranks of a process group (``MoE(config, parallel=...)``).

    Args:
        ep_size: ranks the routed experts are split over (expert parallelism); 1 = every expert on every rank.
        ep_rank: this rank's index in [0, ep_size).
        tp_size: ranks each expert's intermediate dimension I is split over (tensor parallelism; I divisible by it;
            biases are sliced with I or added on one rank; a quant method allows the splits its blocks and groups
            permit, ``check_tp_split``).
        tp_rank: this rank's index in [0, tp_size). Ranks are laid out TP-innermost, as in vLLM: the rank in the
            process group is ``ep_rank * tp_size + tp_rank``.
        placement: which experts a rank holds: ``linear`` (contiguous ranges, the first ``E % ep_size`` ranks one
            more) or ``round_robin`` (expert e on rank ``e % ep_size``).
        dispatch: how tokens reach the experts' ranks: ``allgather_reducescatter`` (every rank sees every token)
            or ``all_to_all`` (each token travels once to each rank that owns one of its experts).
        num_redundant_experts: r, extra expert replicas for load balancing (EPLB): the layer then holds
            R = E + r physical slots (R divisible by ep_size), slot p holding expert p % E until a rearrangement
            (``MoE.rearrange``); needs ep_size > 1, the ``linear`` placement and tp_size = 1.
    """

    ep_size: int = 1
    ep_rank: int = 0
    tp_size: int = 1
    tp_rank: int = 0
    placement: str = "linear"
    dispatch: str = "allgather_reducescatter"
    num_redundant_experts: int = 0

    def __post_init__(self) -> None:
        for size, rank in (("ep_size", "ep_rank"), ("tp_size", "tp_rank")):
            check_positive(size, getattr(self, size))
            value = getattr(self, rank)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{rank}: expected an int, got {type(value).__name__}")
            if not 0 <= value < getattr(self, size):
                raise ValueError(f"{rank}: expected in [0, {size}={getattr(self, size)}), got {value}")
        check_choice("placement", self.placement, PLACEMENTS)
        check_choice("dispatch", self.dispatch, DISPATCHES)
        redundant = self.num_redundant_experts
        if isinstance(redundant, bool) or not isinstance(redundant, int):
            raise TypeError(f"num_redundant_experts: expected an int, got {type(redundant).__name__}")
        if redundant < 0:
            raise ValueError(f"num_redundant_experts: expected >= 0, got {redundant}")
        if redundant > 0:
            # Replicas live in physical slots laid out rank-major over the EP ranks (what a rebalancing plan and
            # rearrange_expert_weights assume): without EP there is nothing to balance, and round_robin would
            # put the slots elsewhere. Refused rather than ignored: the layer would hold another layout.
            if self.ep_size == 1:
                raise ValueError(f"num_redundant_experts: expected 0 without expert parallelism (ep_size=1), "
                                 f"got {redundant}")
            if self.placement != "linear":
                raise ValueError(f"placement: expected 'linear' with num_redundant_experts={redundant} (physical "
                                 f"slots are rank-major), got {self.placement!r}")
            if self.tp_size > 1:
                raise NotImplementedError(f"num_redundant_experts: redundant experts with tensor-parallel experts "
                                          f"(tp_size={self.tp_size}) are not implemented yet, got {redundant}")

    @property
    def world_size(self) -> int:
        """Ranks of the layer's process group: ``ep_size * tp_size``."""
        return self.ep_size * self.tp_size

    @property
    def rank(self) -> int:
        """This rank's index in the layer's process group (TP-innermost)."""
        return self.ep_rank * self.tp_size + self.tp_rank

"""MoEConfig / RoutingConfig validation: errors name the field."""

import dataclasses

import pytest

from moekit import Activation, MoEConfig, RoutingConfig

BASE = {"num_experts": 8, "top_k": 2, "hidden_size": 64, "intermediate_size": 32}


def test_defaults_and_frozen():
    cfg = MoEConfig(**BASE)
    assert cfg.activation == Activation(name="silu")
    assert not cfg.has_shared_experts and cfg.backend == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3


@pytest.mark.parametrize(
    "change, err, match",
    [
        ({"top_k": 0}, ValueError, "top_k: expected a positive int, got 0"),
        ({"top_k": 9}, ValueError, r"top_k: expected in \[1, num_experts=8\], got 9"),
        ({"num_experts": -1}, ValueError, "num_experts: expected a positive int"),
        ({"hidden_size": 0}, ValueError, "hidden_size: expected a positive int"),
        ({"intermediate_size": 2.5}, TypeError, "intermediate_size: expected an int"),
        ({"activation": "swish"}, ValueError, "activation: expected one of"),
        ({"shared_intermediate_size": -4}, ValueError, "shared_intermediate_size: expected >= 0"),
        ({"shared_expert_gate": True}, ValueError, "shared_expert_gate: needs shared_intermediate_size > 0"),
        ({"backend": "cuda"}, ValueError, "backend: expected one of"),
        ({"routing": {}}, TypeError, "routing: expected a moekit.RoutingConfig"),
        ({"routing": RoutingConfig(num_expert_group=3, topk_group=1)}, ValueError, "routing.num_expert_group: expected a divisor"),
        ({"routing": RoutingConfig(num_expert_group=4, topk_group=1), "top_k": 3}, ValueError, r"top_k: expected <= topk_group \* experts_per_group = 2"),
        ({"routing": RoutingConfig(num_expert_group=8, topk_group=2, group_score="top2_sum")}, ValueError, "top2_sum' needs >= 2 experts per group"),
    ],
)
def test_moe_config_errors(change, err, match):
    with pytest.raises(err, match=match):
        MoEConfig(**{**BASE, **change})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scoring_func": "tanh"}, "routing.scoring_func"),
        ({"group_score": "mean"}, "routing.group_score"),
        ({"num_expert_group": 4}, "set both"),
        ({"num_expert_group": 4, "topk_group": 5}, "routing.topk_group: expected <= num_expert_group=4"),
        ({"num_expert_group": 4, "topk_group": 2, "topk_before_score": True}, "topk_before_score"),
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
    ],
)
def test_routing_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoutingConfig(**kwargs)


def test_activation_errors():
    with pytest.raises(ValueError, match="activation.limit"):
        Activation(name="swigluoai", limit=0.0)
    assert Activation(name="relu2").w13_rows(10) == 10
    assert Activation(name="silu").w13_rows(10) == 20


@pytest.mark.parametrize("flag", ["topk_before_score", "renormalize", "correction_bias", "apply_weights_on_input"])
def test_routing_flags_must_be_bools(flag):
    with pytest.raises(TypeError, match=f"routing.{flag}: expected a bool"):
        RoutingConfig(**{flag: None if flag == "correction_bias" else "yes"})


@pytest.mark.parametrize("flag", ["bias", "router_bias", "shared_expert_gate", "router_fp32"])
def test_moe_config_flags_must_be_bools(flag):
    # "no" is truthy: it silently switched the feature on.
    with pytest.raises(TypeError, match=f"{flag}: expected a bool, got str 'no'"):
        MoEConfig(**BASE, shared_intermediate_size=16, **{flag: "no"})


@pytest.mark.parametrize(
    "change, err, match",
    [
        ({"top_k": True}, TypeError, "top_k: expected an int, got bool"),
        ({"top_k": 2.0}, TypeError, "top_k: expected an int, got float"),
        ({"routing": RoutingConfig(num_expert_group=2, topk_group=1, group_score="top2_sum")}, None, None),
    ],
)
def test_moe_config_types(change, err, match):
    if err is None:
        MoEConfig(**{**BASE, **change})
    else:
        with pytest.raises(err, match=match):
            MoEConfig(**{**BASE, **change})


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"routed_scaling_factor": "2.5"}, TypeError, "routing.routed_scaling_factor: expected a float, got str"),
        ({"routed_scaling_factor": True}, TypeError, "routing.routed_scaling_factor: expected a float, got bool"),
        ({"routed_scaling_factor": float("nan")}, ValueError, "routing.routed_scaling_factor: expected a finite"),
        ({"num_expert_group": 2.0, "topk_group": 1}, TypeError, "routing.num_expert_group: expected an int"),
        ({"num_expert_group": 2, "topk_group": "1"}, TypeError, "routing.topk_group: expected an int"),
    ],
)
def test_routing_config_types(kwargs, err, match):
    with pytest.raises(err, match=match):
        RoutingConfig(**kwargs)


def test_grouped_topk_rules_live_in_one_place():
    # RoutingConfig, MoEConfig and select_experts apply the same validator, so they cannot drift apart.
    import moekit.config
    import moekit.router

    assert moekit.router.check_grouped_topk is moekit.config.check_grouped_topk
    assert moekit.config.check_grouped_topk(None, None) is False
    with pytest.raises(ValueError, match=r"num_expert_group: expected a divisor of num_experts=8, got 3"):
        moekit.config.check_grouped_topk(3, 1, num_experts=8)


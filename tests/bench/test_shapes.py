"""MoE shapes read from a transformers config.json: dimensions, the experts' activation and biases, refusals."""

import json

import pytest

from moekit.bench.shapes import PRESETS, experts_activation, shape_from_hf_config
from moekit.ops.activation import Activation

BASE = {"hidden_size": 64, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


def _read(tmp_path, cfg):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return shape_from_hf_config(path)


def test_presets_match_measuring_table():
    assert set(PRESETS) == {"mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3", "gpt-oss-120b", "olmoe-1b-7b"}
    ds = PRESETS["deepseek-v3"]
    assert (ds.num_experts, ds.hidden_size, ds.intermediate_size, ds.top_k) == (256, 7168, 2048, 8)


def test_dimensions_and_shared_experts(tmp_path):
    s = _read(tmp_path, {**BASE, "model_type": "qwen2_moe", "hidden_act": "silu", "intermediate_size": 128,
                         "shared_expert_intermediate_size": 48})
    dims = (s.num_experts, s.hidden_size, s.intermediate_size, s.top_k, s.shared_intermediate_size)
    assert dims == (8, 64, 32, 2, 48)
    assert s.activation == Activation(name="silu") and not s.bias
    ds = _read(tmp_path, {"model_type": "deepseek_v3", "hidden_size": 7168, "n_routed_experts": 256,
                          "hidden_act": "silu", "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
                          "n_shared_experts": 1})
    assert ds.shared_intermediate_size == 2048


def test_nemotron_h_relu2_is_not_gated(tmp_path):
    # Nemotron-H: up_proj only (I rows), relu2 from mlp_hidden_act; hidden_act-less; its shared expert has its own
    # size, and mlp_bias belongs to that shared MLP, not to the routed experts.
    cfg = {"model_type": "nemotron_h", "hidden_size": 64, "n_routed_experts": 8, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32, "mlp_hidden_act": "relu2", "mlp_bias": True, "n_shared_experts": 1,
           "moe_shared_expert_intermediate_size": 48, "moe_latent_size": None, "intermediate_size": 128}
    s = _read(tmp_path, cfg)
    assert s.activation == Activation(name="relu2") and s.activation.w13_rows(s.intermediate_size) == 32
    assert s.shared_intermediate_size == 48 and not s.bias
    # A latent MoE runs its experts in the latent space: that is their input width.
    assert _read(tmp_path, {**cfg, "moe_latent_size": 16}).hidden_size == 16
    with pytest.raises(ValueError, match="mlp_hidden_act"):  # a non-gated silu: moekit has none
        _read(tmp_path, {**cfg, "mlp_hidden_act": "silu"})


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"hidden_act": "gelu_pytorch_tanh"}, Activation(name="gelu_tanh")),
        ({"hidden_act": "gelu"}, Activation(name="gelu")),
        ({"hidden_act": "swish"}, Activation(name="silu")),
        ({"model_type": "foo_moe", "mlp_hidden_act": "relu2", "hidden_act": "silu"}, Activation(name="relu2")),
        ({"model_type": "deepseek_v4", "hidden_act": "silu", "swiglu_limit": 10.0},
         Activation(name="silu", limit=10.0)),
        ({"model_type": "gpt_oss", "hidden_act": "silu"}, Activation(name="swigluoai")),
        ({"model_type": "gpt_oss", "swiglu_limit": 5.0}, Activation(name="swigluoai", limit=5.0)),
        ({"model_type": "minimax_m3_vl", "hidden_act": "swigluoai", "swiglu_alpha": 1.5, "swiglu_limit": 7.0},
         Activation(name="swigluoai", alpha=1.5, limit=7.0)),
    ],
)
def test_activation_from_config(tmp_path, extra, expected):
    assert _read(tmp_path, {**BASE, **extra}).activation == expected


def test_gpt_oss_has_biases(tmp_path):
    s = _read(tmp_path, {"model_type": "gpt_oss", "hidden_size": 2880, "num_local_experts": 128,
                         "num_experts_per_tok": 4, "intermediate_size": 2880})
    assert s.activation.name == "swigluoai" and s.bias and s.num_experts == 128


@pytest.mark.parametrize(
    "extra, field",
    [
        ({}, "hidden_act"),  # no activation at all: silu would be a guess
        ({"hidden_act": "quick_gelu"}, "hidden_act"),
        ({"hidden_act": ["silu"]}, "hidden_act"),
        ({"hidden_act": "silu", "swiglu_limit": 7.0}, "swiglu_limit"),  # clamped silu or swigluoai: family-specific
        ({"hidden_act": "silu", "mlp_bias": True}, "mlp_bias"),  # whether the experts have biases: unknown
        ({"model_type": "deepseek_v4", "hidden_act": "gelu", "swiglu_limit": 10.0}, "hidden_act"),
    ],
)
def test_refuses_what_it_cannot_map(tmp_path, extra, field):
    with pytest.raises(ValueError, match=field):
        _read(tmp_path, {**BASE, **extra})


def test_refuses_missing_dimensions(tmp_path):
    with pytest.raises(ValueError, match="no expert count"):
        _read(tmp_path, {"hidden_size": 64, "intermediate_size": 128, "hidden_act": "silu"})


@pytest.mark.parametrize("family, name", [("hy_v4_vl_text", "silu"), ("glm5_next_text", "silu"),
                                          ("minimax_m3_vl_text", "swigluoai")])
def test_multimodal_text_configs_map_like_their_family(family, name):
    # --hf-config follows text_config, whose model_type carries a _text suffix.
    act, _ = experts_activation({"model_type": family, "hidden_act": "silu", "swiglu_limit": 7.0})
    assert act.name == name and act.limit == 7.0

"""MoEConfig.from_hf: a transformers config.json -> the MoEConfig that moekit.hf reads from the live blocks of the
same model (the ground truth), per family; dense layers, nested text_config and inexpressible settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import moekit.hf as mh  # noqa: E402
from moekit import MoEConfig  # noqa: E402
from tests.hf.tiny_models import build, tiny_config  # noqa: E402

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "olmoe", "gpt_oss"]


def _block_config(model) -> MoEConfig:
    # bf16 blocks: the router's fp32 logits are then the family's own choice, not an fp32 tiny model's weights.
    model = model.to(torch.bfloat16)
    return mh.moe_from_hf(model.model.layers[-1].mlp).config


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_the_blocks_of_the_same_model(family, tmp_path):
    model = build(family)
    expected = _block_config(model)
    assert MoEConfig.from_hf(model.config.to_dict()) == expected
    # config.json as save_pretrained writes it (only the fields that differ from the class defaults)
    model.config.save_pretrained(tmp_path)
    assert MoEConfig.from_hf(tmp_path) == expected
    assert MoEConfig.from_hf(tmp_path / "config.json", layer=1) == expected


def test_does_not_import_transformers(tmp_path):
    code = ("import sys, moekit; cfg = moekit.MoEConfig.from_hf({'model_type': 'mixtral', 'hidden_size': 8, "
            "'intermediate_size': 4, 'num_local_experts': 4, 'num_experts_per_tok': 2, 'num_hidden_layers': 1}); "
            "assert 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path),
                   env={"PYTHONPATH": str(Path(__file__).parents[1])})


def test_nested_text_config():
    text = tiny_config("qwen3_moe").to_dict()
    cfg = MoEConfig.from_hf({"model_type": "some_vl", "text_config": text})
    assert cfg == MoEConfig.from_hf(text)


def test_deepseek_dense_layers_and_defaults():
    cfg = tiny_config("deepseek_v3", first_k_dense_replace=1).to_dict()
    assert MoEConfig.from_hf(cfg, layer=1).num_experts == 8
    with pytest.raises(ValueError, match=r"layer: decoder layer 0 of this deepseek_v3 config is dense .*"
                                         "first_k_dense_replace"):
        MoEConfig.from_hf(cfg, layer=0)
    with pytest.raises(ValueError, match=r"layer: expected a decoder layer in \[0, num_hidden_layers=2\), got 2"):
        MoEConfig.from_hf(cfg, layer=2)
    with pytest.raises(ValueError, match="config: no sparse MoE layer among the 2 layers"):
        MoEConfig.from_hf({**cfg, "first_k_dense_replace": 2})
    qwen = tiny_config("qwen3_moe", mlp_only_layers=[0]).to_dict()
    with pytest.raises(ValueError, match="layer: decoder layer 0 .* mlp_only_layers"):
        MoEConfig.from_hf(qwen, layer=0)


@pytest.mark.parametrize(("change", "match"), [
    ({"model_type": "llama"}, "config.model_type: 'llama' is not a family moekit reads"),
    ({"hidden_act": "relu"}, "config.hidden_act: 'relu'"),
    ({"scoring_func": "softmax"}, "config.scoring_func: DeepSeek-V3 routing is sigmoid"),
    ({"topk_method": "greedy"}, "config.topk_method"),
    ({"n_routed_experts": None, "num_local_experts": None}, "config.n_routed_experts: missing"),
    ({"hidden_size": "big"}, "config.hidden_size: expected an int, got 'big'"),
    ({"norm_topk_prob": "yes"}, "config.norm_topk_prob: expected true or false"),
    ({"topk_group": 3}, "routing.topk_group: expected <= num_expert_group=2"),
    ({"routed_scaling_factor": None}, r"config.routed_scaling_factor: expected a real number .*, got None"),
    ({"routed_scaling_factor": True}, r"config.routed_scaling_factor: expected a real number .*, got True"),
])
def test_inexpressible_settings_name_the_field(change, match):
    cfg = {**tiny_config("deepseek_v3").to_dict(), **change}
    with pytest.raises(ValueError, match=match):
        MoEConfig.from_hf(cfg)


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="config: expected a dict, a config.json path"):
        MoEConfig.from_hf(3)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        MoEConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        MoEConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        MoEConfig.from_hf(tmp_path)


def test_config_json_spellings_of_real_checkpoints():
    # Qwen3-30B-A3B's config.json writes num_experts; gpt-oss writes experts_per_token too; no swiglu_alpha there.
    qwen = {"model_type": "qwen3_moe", "hidden_size": 2048, "moe_intermediate_size": 768, "num_experts": 128,
            "num_experts_per_tok": 8, "norm_topk_prob": True, "num_hidden_layers": 48, "hidden_act": "silu"}
    cfg = MoEConfig.from_hf(qwen)
    assert (cfg.num_experts, cfg.top_k, cfg.intermediate_size, cfg.routing.renormalize) == (128, 8, 768, True)
    oss = {"model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880, "num_local_experts": 32,
           "experts_per_token": 4, "num_experts_per_tok": 4, "swiglu_limit": 7.0, "num_hidden_layers": 24}
    cfg = MoEConfig.from_hf(oss)
    assert cfg.activation.name == "swigluoai" and cfg.activation.alpha == 1.702 and cfg.bias and cfg.router_bias


@pytest.mark.parametrize("field", ["swiglu_alpha", "swiglu_limit"])
@pytest.mark.parametrize("value", [True, "7", [7.0], None, float("nan")], ids=["bool", "str", "list", "null", "nan"])
def test_gpt_oss_swiglu_settings_are_real_numbers(field, value):
    # `true` read as 1.0 silently, and a string or a list failed without naming the field; null breaks the
    # transformers block (clamp without bounds), so it is refused rather than read as the default.
    cfg = {**tiny_config("gpt_oss").to_dict(), field: value}
    with pytest.raises(ValueError, match=rf"config\.{field}: expected a real number"):
        MoEConfig.from_hf(cfg)


def test_deepseek_null_settings():
    # transformers reads `"norm_topk_prob": null` as False (`if self.norm_topk_prob:`); moekit read it as the
    # default, True. A null group count or dense-layer count cannot run in transformers: refused, named.
    cfg = tiny_config("deepseek_v3").to_dict()
    assert MoEConfig.from_hf({**cfg, "norm_topk_prob": None}).routing.renormalize is False
    absent = {k: v for k, v in cfg.items() if k != "norm_topk_prob"}
    assert MoEConfig.from_hf(absent).routing.renormalize is True  # absent: DeepseekV3Config's default
    for field in ("n_group", "topk_group", "first_k_dense_replace"):
        with pytest.raises(ValueError, match=rf"config\.{field}: expected an int, got None"):
            MoEConfig.from_hf({**cfg, field: None})


@pytest.mark.parametrize(("change", "match"), [
    ({"decoder_sparse_step": 0}, r"config\.decoder_sparse_step: expected a positive int, got 0"),
    ({"decoder_sparse_step": -2}, r"config\.decoder_sparse_step: expected a positive int, got -2"),
    ({"decoder_sparse_step": None}, r"config\.decoder_sparse_step: expected an int, got None"),
    ({"mlp_only_layers": 1}, r"config\.mlp_only_layers: expected a list of ints, got 1"),
    ({"mlp_only_layers": "0"}, r"config\.mlp_only_layers: expected a list of ints, got '0'"),
    ({"mlp_only_layers": [0.0]}, r"config\.mlp_only_layers: expected a list of ints, got \[0.0\]"),
    ({"mlp_only_layers": [True]}, r"config\.mlp_only_layers: expected a list of ints, got \[True\]"),
])
def test_qwen_sparse_layer_fields_are_checked(change, match):
    # A step <= 0 read as 1 (transformers divides by it); a non-list mlp_only_layers failed unnamed (or, a string,
    # was searched by character).
    cfg = {**tiny_config("qwen2_moe").to_dict(), **change}
    with pytest.raises(ValueError, match=match):
        MoEConfig.from_hf(cfg)


def test_qwen_null_mlp_only_layers_is_empty():
    cfg = {**tiny_config("qwen3_moe").to_dict(), "mlp_only_layers": None}  # transformers: None -> []
    assert MoEConfig.from_hf(cfg, layer=0).num_experts == 8


@pytest.mark.parametrize("freq", [0, -1])
def test_deepseek_moe_layer_freq_must_be_positive(freq):
    # Read as 1 before (max(freq, 1)): every layer past the dense ones became an MoE layer; transformers divides by it.
    cfg = tiny_config("deepseek_v3").to_dict()
    with pytest.raises(ValueError, match=rf"config\.moe_layer_freq: expected a positive int, got {freq}"):
        MoEConfig.from_hf({**cfg, "moe_layer_freq": freq, "first_k_dense_replace": 0}, layer=1)

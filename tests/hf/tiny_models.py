"""Tiny random transformers MoE models, built from each family's own config class (no downloads).

``build(family)`` takes the folder name under ``transformers/models/``, picks its text config class (multimodal
families contribute only their text model), shrinks every size it knows to a few dozen units (2 layers, hidden 32,
8 experts, top-2, 2 expert groups), makes every layer sparse, and randomizes the correction biases so that
routing-by-bias is exercised.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import torch

SIZES = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=24,
    shared_expert_intermediate_size=40,
    moe_shared_expert_intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=8,
    num_experts=8,
    n_routed_experts=8,
    num_local_experts=8,
    moe_num_experts=8,
    num_experts_per_tok=2,
    moe_topk=2,
    moe_top_k=2,
    top_k_experts=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=0,
    decoder_sparse_step=1,
    moe_layer_freq=1,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    max_position_embeddings=64,
    n_shared_experts=1,
    num_shared_experts=1,
    sliding_window=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# Fields a family needs beyond SIZES for its tiny config to validate or to contain MoE layers.
OVERRIDES = {
    "gemma4": dict(enable_moe_block=True, vocab_size_per_layer_input=96, hidden_size_per_layer_input=8),
    "lfm2_moe": dict(num_dense_layers=0, layer_types=["full_attention"] * 2),  # its default mixes in conv layers
    "flint": dict(mlp_only_layers=[]),  # its default makes every tiny layer dense
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=16, mamba_expand=2, mamba_n_groups=1, mamba_d_state=8),
    "zaya": dict(num_experts_per_tok=1),
    # weights on the input need K = 1; layer 0 dense, layer 1 sparse
    "llama4": dict(num_experts_per_tok=1, moe_layers=[1], intermediate_size_mlp=40),
    "dbrx": dict(
        d_model=32,
        n_heads=4,
        n_layers=2,
        max_seq_len=64,
        attn_config=dict(kv_n_heads=4, rope_theta=10000.0, clip_qkv=8.0),  # clip_qkv=None fails in clamp
        ffn_config=dict(ffn_hidden_size=24, moe_num_experts=8, moe_top_k=2),
    ),
    "hy_v4_vl": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])),
    "glm5_next": dict(
        qk_rope_head_dim=0, linear_num_heads=4, linear_head_dim=8, index_n_heads=4, index_head_dim=8, index_topk=16
    ),
}


def _classes(module, base):
    return [
        c for c in vars(module).values() if inspect.isclass(c) and issubclass(c, base) and c.__module__ == module.__name__
    ]


def pick(family: str):
    """(config class, model class) for ``family``: the text config and its causal-LM (else base) model."""
    from transformers import PreTrainedConfig, PreTrainedModel

    cmod = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    mmod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    configs = _classes(cmod, PreTrainedConfig)
    text = [c for c in configs if "Text" in c.__name__ and "Vision" not in c.__name__]
    plain = [c for c in configs if not any(s in c.__name__ for s in ("Vision", "Audio", "Talker", "Code"))]
    all_models = _classes(mmod, PreTrainedModel)
    for cfg_cls in [*text, *plain, *configs]:  # the first with a model of its own (DBRX: not its sub-configs)
        models = [c for c in all_models if getattr(c, "config_class", None) is cfg_cls]
        if models:
            break
    models.sort(key=lambda c: (not c.__name__.endswith("ForCausalLM"), not c.__name__.endswith("Model"), len(c.__name__)))
    return cfg_cls, models[0]


def tiny_config(family: str, **overrides):
    cfg_cls, _ = pick(family)
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    kw = {k: v for k, v in SIZES.items() if k in names}
    kw.update({k: v for k, v in OVERRIDES.get(family, {}).items() if k in names})
    if "mlp_layer_types" in names:
        sparse = [t for t in (cfg_cls().mlp_layer_types or []) if "dense" not in str(t)]
        if sparse:
            kw["mlp_layer_types"] = [sparse[0]] * SIZES["num_hidden_layers"]
    kw.update(overrides)
    return cfg_cls(**kw)


def build(family: str, *, seed: int = 0, **overrides):
    """A tiny random model of ``family`` in eval mode, fp32, with randomized correction biases."""
    _, model_cls = pick(family)
    torch.manual_seed(seed)
    model = model_cls(tiny_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, t in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                t.uniform_(-0.1, 0.1)
    return model


def input_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, SIZES["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))

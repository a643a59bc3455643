"""Generate with a transformers MoE model, then with moekit, and compare.

    python examples/hf_generate.py                          # a tiny random Qwen3-MoE built from its config
    python examples/hf_generate.py --family mixtral         # any of FAMILIES below (or another MoE model_type)
    python examples/hf_generate.py --model /path/to/checkpoint --tokens 64

Runs greedy generation three ways from the same prompt: transformers' own experts, transformers routing with
moekit's experts (``set_experts_implementation("moekit")``), and every MoE block converted to a ``moekit.MoE``
(``moekit.hf.convert``; skipped, with the reason, for a family whose blocks moekit does not convert). Prints the
tokens each agrees on with the first and the time per generated token. A model without MoE blocks is refused.
Needs ``pip install 'moekit[hf]'``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import moekit.hf

# The families this example is checked with (tests/test_examples.py); phimoe runs the experts path only.
FAMILIES = (
    "qwen3_moe", "mixtral", "qwen2_moe", "qwen3_next", "olmoe", "deepseek_v3", "gpt_oss", "dbrx", "llama4", "phimoe",
)  # fmt: skip

# Every size field a family may carry, shrunk to a 2-layer model (hidden 64, 8 experts, top-2). Only the fields a
# config has are set, on the config and on its nested sub-configs (DBRX's ffn_config / attn_config).
SIZES = dict(
    vocab_size=512, hidden_size=64, d_model=64, intermediate_size=128, intermediate_size_mlp=128,
    moe_intermediate_size=64, ffn_hidden_size=64, shared_expert_intermediate_size=128, num_hidden_layers=2,
    n_layers=2, num_attention_heads=4, n_heads=4, num_key_value_heads=4, kv_n_heads=4, head_dim=16,
    num_experts=8, num_local_experts=8, n_routed_experts=8, moe_num_experts=8, num_experts_per_tok=2, moe_top_k=2,
    first_k_dense_replace=0, n_group=2, topk_group=1, max_position_embeddings=256, max_seq_len=256,
    kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
    linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
)  # fmt: skip

# What a family needs beyond SIZES: DBRX's default attention config has no rope_theta and its clip_qkv=None fails
# in clamp; Qwen3-Next puts full attention every 4th layer (2 layers of linear attention cannot generate with a
# cache).
OVERRIDES = {
    "dbrx": dict(attn_config=dict(kv_n_heads=4, rope_theta=10000.0, clip_qkv=8.0)),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"]),
}


def tiny_model(family: str) -> torch.nn.Module:
    """A random 2-layer model of ``family`` (the text model of a multimodal one) built from its config class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family)
    text = getattr(config, "text_config", None)
    if text is not None:  # Llama4: generate with the text model; its config is the one to shrink
        family = text.model_type
        config = text
    kwargs = {k: v for k, v in SIZES.items() if hasattr(config, k)}
    for name, value in vars(config).items():  # nested sub-configs (DBRX) get the sizes they know too
        if hasattr(value, "to_dict") and name != "text_config":
            kwargs[name] = {**value.to_dict(), **{k: v for k, v in SIZES.items() if hasattr(value, k)}}
    for name, value in OVERRIDES.get(family, {}).items():
        kwargs[name] = {**kwargs.get(name, {}), **value} if isinstance(value, dict) else value
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs)).eval()


def generate(model, ids: torch.Tensor, tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy tokens and seconds per generated token."""
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        if ids.is_cuda:
            torch.cuda.synchronize()
    return out[0, ids.shape[1] :], (time.perf_counter() - start) / tokens


def moe_modules(model: torch.nn.Module) -> int:
    """How many sparse MoE blocks (known to moekit) or experts modules (decorated by transformers) ``model`` has."""
    return sum(
        type(m).__name__ in moekit.hf.SUPPORTED_BLOCKS or hasattr(m, "_apply_gate") for m in model.modules()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--family", default="qwen3_moe", help=f"transformers model_type for a tiny random model: {', '.join(FAMILIES)}"
    )
    parser.add_argument("--model", help="a checkpoint directory to load instead (from_pretrained)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32

    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    else:
        model = tiny_model(args.family)
    if not moe_modules(model):
        name = args.model or args.family
        print(f"{name}: {type(model).__name__} has no MoE block, so moekit has nothing to run", file=sys.stderr)
        return 2
    model.to(device=args.device, dtype=dtype)
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = None
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)

    moekit.hf.register()
    results = {"transformers (eager experts)": generate(model, ids, args.tokens)}
    model.set_experts_implementation("moekit")
    results["transformers + moekit experts"] = generate(model, ids, args.tokens)
    model.set_experts_implementation("eager")
    converted = copy.deepcopy(model)
    try:
        blocks = moekit.hf.convert(converted)
    except NotImplementedError as err:
        print(f"moekit.hf.convert skipped: {err}")
    else:
        results[f"moekit.hf.convert ({blocks} blocks)"] = generate(converted, ids, args.tokens)

    baseline = next(iter(results.values()))[0]
    print(f"{type(model).__name__} on {args.device} ({dtype}), {args.tokens} greedy tokens")
    for label, (tokens, seconds) in results.items():
        agree = int((tokens == baseline).sum())
        print(f"  {label:<36} agrees on {agree:>3}/{len(baseline)} tokens, {seconds * 1e3:7.2f} ms/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())

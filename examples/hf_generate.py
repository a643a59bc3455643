"""Generate with a transformers MoE model, then with moekit, and compare.

    python examples/hf_generate.py                          # a tiny random Qwen3-MoE built from its config
    python examples/hf_generate.py --family mixtral
    python examples/hf_generate.py --model /path/to/checkpoint --tokens 64

Runs greedy generation three ways from the same prompt: transformers' own experts, transformers routing with
moekit's experts (``set_experts_implementation("moekit")``), and every MoE block converted to a ``moekit.MoE``
(``moekit.hf.convert``). Prints the tokens each agrees on with the first and the time per generated token.
Needs ``pip install moekit[hf]``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import moekit.hf


def tiny_model(family: str) -> torch.nn.Module:
    """A random 2-layer model of ``family`` (hidden 64, 8 experts, top-2) built from its config class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        shared_expert_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        head_dim=16, num_experts=8, num_local_experts=8, n_routed_experts=8, num_experts_per_tok=2,
        first_k_dense_replace=0, n_group=2, topk_group=1, max_position_embeddings=256,
    )  # fmt: skip
    config = AutoConfig.for_model(family)
    config = AutoConfig.for_model(family, **{k: v for k, v in sizes.items() if hasattr(config, k)})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def generate(model, ids: torch.Tensor, tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy tokens and seconds per generated token."""
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        if ids.is_cuda:
            torch.cuda.synchronize()
    return out[0, ids.shape[1] :], (time.perf_counter() - start) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen3_moe", help="transformers model_type for a tiny random model")
    parser.add_argument("--model", help="a checkpoint directory to load instead (from_pretrained)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    else:
        model = tiny_model(args.family)
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
    blocks = moekit.hf.convert(converted)
    results[f"moekit.hf.convert ({blocks} blocks)"] = generate(converted, ids, args.tokens)

    baseline = next(iter(results.values()))[0]
    print(f"{type(model).__name__} on {args.device} ({dtype}), {args.tokens} greedy tokens")
    for name, (tokens, seconds) in results.items():
        agree = int((tokens == baseline).sum())
        print(f"  {name:<36} agrees on {agree:>3}/{len(baseline)} tokens, {seconds * 1e3:7.2f} ms/token")


if __name__ == "__main__":
    main()

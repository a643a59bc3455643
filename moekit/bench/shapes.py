"""Benchmark shapes: the presets of MEASURING.md and MoE dimensions read from a transformers config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moekit.ops.activation import Activation


@dataclass(frozen=True, kw_only=True)
class MoEShape:
    name: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    top_k: int
    shared_intermediate_size: int = 0
    activation: str = "silu"
    bias: bool = False

    @property
    def act(self) -> Activation:
        return Activation(name=self.activation)


PRESETS: dict[str, MoEShape] = {
    s.name: s
    for s in (
        MoEShape(name="mixtral-8x7b", num_experts=8, hidden_size=4096, intermediate_size=14336, top_k=2),
        MoEShape(name="qwen3-30b-a3b", num_experts=128, hidden_size=2048, intermediate_size=768, top_k=8),
        MoEShape(name="deepseek-v3", num_experts=256, hidden_size=7168, intermediate_size=2048, top_k=8,
                 shared_intermediate_size=2048),
        MoEShape(name="gpt-oss-120b", num_experts=128, hidden_size=2880, intermediate_size=2880, top_k=4,
                 activation="swigluoai", bias=True),
        MoEShape(name="olmoe-1b-7b", num_experts=64, hidden_size=2048, intermediate_size=1024, top_k=8),
    )
}

# config.json keys, first match wins; they differ between transformers MoE families.
_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOPK_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k")
_INTER_KEYS = ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size")


def shape_from_hf_config(path: str | Path) -> MoEShape:
    """MoE dimensions from a transformers ``config.json`` (nested ``text_config`` is followed)."""
    cfg = json.loads(Path(path).read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"--hf-config {path}: expected a JSON object, got {type(cfg).__name__}")
    cfg = cfg.get("text_config") or cfg

    def first(keys: tuple[str, ...], what: str) -> int:
        for k in keys:
            value = cfg.get(k)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                # e.g. per-layer lists: guessing one layer's value (or falling through to a dense size) would
                # benchmark a shape the model does not have.
                raise ValueError(f"--hf-config {path}: {k} must be a positive int, got {value!r}")
            return value
        raise ValueError(f"--hf-config {path}: no {what} (looked for {', '.join(keys)})")

    num_experts = first(_EXPERTS_KEYS, "expert count")
    inter = first(_INTER_KEYS, "expert intermediate size")
    shared = int(cfg.get("shared_expert_intermediate_size") or 0)
    if not shared and cfg.get("n_shared_experts"):
        shared = int(cfg["n_shared_experts"]) * inter
    gpt_oss = cfg.get("model_type") == "gpt_oss"
    top_k = first(_TOPK_KEYS, "top-k")
    if top_k > num_experts:
        raise ValueError(f"--hf-config {path}: top-k {top_k} exceeds the expert count {num_experts}")
    return MoEShape(
        name=str(cfg.get("model_type", Path(path).stem)),
        num_experts=num_experts,
        hidden_size=first(("hidden_size",), "hidden_size"),
        intermediate_size=inter,
        top_k=top_k,
        shared_intermediate_size=shared,
        activation="swigluoai" if gpt_oss else "silu",
        bias=gpt_oss,
    )

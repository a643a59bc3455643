"""Benchmark shapes: the presets of MEASURING.md and MoE dimensions read from a transformers config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moekit.ops.activation import Activation, resolve_activation


@dataclass(frozen=True, kw_only=True)
class MoEShape:
    """One benchmarked MoE: routed experts' dims, their activation (a name or ``Activation``) and biases."""

    name: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    top_k: int
    shared_intermediate_size: int = 0
    activation: Activation = Activation()
    bias: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation", resolve_activation(self.activation))


PRESETS: dict[str, MoEShape] = {
    s.name: s
    for s in (
        MoEShape(name="mixtral-8x7b", num_experts=8, hidden_size=4096, intermediate_size=14336, top_k=2),
        MoEShape(name="qwen3-30b-a3b", num_experts=128, hidden_size=2048, intermediate_size=768, top_k=8),
        MoEShape(name="deepseek-v3", num_experts=256, hidden_size=7168, intermediate_size=2048, top_k=8,
                 shared_intermediate_size=2048),
        MoEShape(name="gpt-oss-120b", num_experts=128, hidden_size=2880, intermediate_size=2880, top_k=4,
                 activation=Activation(name="swigluoai"), bias=True),
        MoEShape(name="olmoe-1b-7b", num_experts=64, hidden_size=2048, intermediate_size=1024, top_k=8),
    )
}

# config.json keys, first match wins; they differ between transformers MoE families.
_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOPK_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k")
_INTER_KEYS = ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size")
_SHARED_KEYS = ("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size")
# Where a config names its MLP activation: mlp_hidden_act first, as configs with several (Nemotron-H) give the
# MLPs' there.
_ACT_KEYS = ("mlp_hidden_act", "hidden_act", "hidden_activation")
# transformers' ACT2FN names -> moekit's. A generic family's experts are gated (act(gate) * up) except with
# relu2, which every transformers family using it (Nemotron, Nemotron-H) applies without a gate, as moekit does.
_ACT_NAMES = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
              "gelu_new": "gelu_tanh", "relu2": "relu2"}
# Families (model_type) whose experts hidden_act alone does not describe: a swiglu_limit means a clamped silu in
# some and gpt-oss's swiglu in others, and Nemotron-H's mlp_bias belongs to its shared MLP only.
_SWIGLUOAI_FAMILIES = {"gpt_oss": True, "openai_privacy_filter": True, "minimax_m3_vl": False}  # -> has biases
_CLAMPED_SILU_FAMILIES = ("deepseek_v4", "hy_v4", "hy_v4_vl", "glm5_next")
_NON_GATED_FAMILIES = ("nemotron_h",)


def experts_activation(cfg: dict) -> tuple[Activation, bool]:
    """(activation, biases) of the routed experts described by a transformers config dict (``text_config``'s).

    Raises ``ValueError`` naming the field when the config does not say how its experts compute in a way moekit
    reproduces: a guessed activation would benchmark a different GEMM1 (2I rows instead of I) or epilogue.
    """
    if not isinstance(cfg, dict):
        raise TypeError(f"cfg: expected a dict, got {type(cfg).__name__}")
    family = cfg.get("model_type")
    if isinstance(family, str) and family.endswith("_text"):
        family = family.removesuffix("_text")  # a multimodal model's text_config (hy_v4_vl_text, minimax_m3_vl_text)
    if family in _SWIGLUOAI_FAMILIES:
        # Their hidden_act says "silu" (gpt-oss) or "swigluoai" (MiniMax-M3): the gate is computed inline from
        # swiglu_alpha (gpt-oss: fixed 1.702) and swiglu_limit.
        alpha = _positive_float(cfg, "swiglu_alpha", 1.702)
        limit = _positive_float(cfg, "swiglu_limit", 7.0)
        return Activation(name="swigluoai", alpha=alpha, limit=limit), _SWIGLUOAI_FAMILIES[family]
    key, name = _activation_name(cfg)
    if family in _CLAMPED_SILU_FAMILIES:
        if name != "silu":
            raise ValueError(f"{key}: {family} experts clamp a silu gate; expected 'silu', got {cfg[key]!r}")
        return Activation(name="silu", limit=_positive_float(cfg, "swiglu_limit", None)), False
    for field in ("swiglu_limit", "swiglu_alpha"):
        if cfg.get(field) is not None:
            raise ValueError(f"{field}: model_type {family!r} is not known to moekit's benchmark, and {field} means a "
                             "clamped silu in some families and gpt-oss's swiglu in others")
    if family in _NON_GATED_FAMILIES:
        if name != "relu2":
            raise ValueError(f"{key}: {family} experts have no gate; moekit runs relu2 there, got {cfg[key]!r}")
        return Activation(name="relu2"), False  # mlp_bias: the shared MLP's (its experts are bare parameters)
    if cfg.get("mlp_bias"):
        raise ValueError(f"mlp_bias: model_type {family!r} is not known to moekit's benchmark, and whether mlp_bias "
                         "gives its routed experts biases differs between families")
    return Activation(name=name), False


def _activation_name(cfg: dict) -> tuple[str, str]:
    """(config key, moekit activation name) of the first activation field present."""
    for key in _ACT_KEYS:
        value = cfg.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or value not in _ACT_NAMES:
            raise ValueError(f"{key}: expected one of {sorted(_ACT_NAMES)} (activations moekit runs), got {value!r}")
        return key, _ACT_NAMES[value]
    raise ValueError(f"hidden_act: no experts activation in the config (looked for {', '.join(_ACT_KEYS)}); "
                     "assuming silu could benchmark the wrong GEMM1")


def _positive_float(cfg: dict, key: str, default: float | None) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{key}: expected a positive number, got {value!r}")
    return float(value)


def shape_from_hf_config(path: str | Path) -> MoEShape:
    """MoE dimensions, activation and biases from a transformers ``config.json`` (``text_config`` is followed).

    Every error is a ``ValueError`` that names the file (and the field, where one is at fault).
    """
    try:
        cfg = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--hf-config {path}: not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--hf-config {path}: expected a JSON object, got {type(cfg).__name__}")
    cfg = cfg.get("text_config") or cfg
    if not isinstance(cfg, dict):
        raise ValueError(f"--hf-config {path}: text_config must be a JSON object, got {type(cfg).__name__}")

    def first(keys: tuple[str, ...], what: str, required: bool = True) -> int:
        for k in keys:
            value = cfg.get(k)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                # e.g. per-layer lists: guessing one layer's value (or falling through to a dense size) would
                # benchmark a shape the model does not have.
                raise ValueError(f"--hf-config {path}: {k} must be a positive int, got {value!r}")
            return value
        if not required:
            return 0
        raise ValueError(f"--hf-config {path}: no {what} (looked for {', '.join(keys)})")

    num_experts = first(_EXPERTS_KEYS, "expert count")
    inter = first(_INTER_KEYS, "expert intermediate size")
    shared = first(_SHARED_KEYS, "shared expert size", required=False)
    if not shared and cfg.get("n_shared_experts"):
        shared = first(("n_shared_experts",), "shared experts") * inter
    top_k = first(_TOPK_KEYS, "top-k")
    if top_k > num_experts:
        raise ValueError(f"--hf-config {path}: top-k {top_k} exceeds the expert count {num_experts}")
    try:
        activation, bias = experts_activation(cfg)
    except ValueError as err:
        raise ValueError(f"--hf-config {path}: {err}") from None
    return MoEShape(
        name=str(cfg.get("model_type", Path(path).stem)),
        num_experts=num_experts,
        # A latent MoE (Nemotron-H's moe_latent_size) runs its experts in the latent space: their input width.
        hidden_size=first(("moe_latent_size", "hidden_size"), "hidden_size"),
        intermediate_size=inter,
        top_k=top_k,
        shared_intermediate_size=shared,
        activation=activation,
        bias=bias,
    )

"""transformers ``config.json`` -> the ``MoEConfig`` of the model's sparse MoE blocks (``MoEConfig.from_hf``).

Reads the JSON dict only (transformers is never imported). Each family's fields, as its transformers config class
names them (aliases in brackets are the spellings its ``attribute_map`` accepts in a config.json):

    family        E                              K                    I                       routing
    mixtral       num_local_experts              num_experts_per_tok  intermediate_size       softmax, renormalize
    qwen2_moe     num_experts                    num_experts_per_tok  moe_intermediate_size   softmax, norm_topk_prob;
                                                                      shared: shared_expert_intermediate_size + gate
    qwen3_moe     num_experts [num_local_experts] num_experts_per_tok moe_intermediate_size   softmax, norm_topk_prob
    olmoe         num_experts [num_local_experts] num_experts_per_tok intermediate_size       softmax, norm_topk_prob
    deepseek_v3   n_routed_experts               num_experts_per_tok  moe_intermediate_size   sigmoid + correction bias,
                  [num_local_experts]                                 shared: x n_shared_experts  grouped top2_sum
                                                                                              (n_group, topk_group),
                                                                                              norm_topk_prob,
                                                                                              routed_scaling_factor
    gpt_oss       num_local_experts [num_experts] num_experts_per_tok intermediate_size       top-k then softmax;
                                                                      swigluoai(swiglu_alpha, swiglu_limit), biases

Which decoder layers are sparse: qwen2/3: ``layer not in mlp_only_layers and (layer + 1) % decoder_sparse_step
== 0``; deepseek_v3: ``layer >= first_k_dense_replace`` (and ``layer % moe_layer_freq == 0``, as vLLM reads it);
the others: every layer. The router's fp32 logits follow what moekit.hf reads from the same blocks (DeepSeek-V3
computes them in fp32). A setting moekit cannot express is refused with the field named.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from moekit.config import MoEConfig, RoutingConfig
from moekit.ops.activation import Activation

# transformers' ACT2FN names -> moekit's (gelu_new/gelu_pytorch_tanh are the tanh approximation)
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh"}


def read_hf_config(config: str | os.PathLike | Mapping) -> dict:
    """The config dict of ``config``: a dict as it is, a directory's ``config.json``, or a JSON file."""
    if isinstance(config, Mapping):
        return dict(config)
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config: expected a dict, a config.json path or a checkpoint directory, got "
                        f"{type(config).__name__}")
    path = Path(config)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"config: {file} not found")
    return read_json(file)


def read_json(file: Path) -> dict:
    """A JSON object from ``file``; errors name the file (checkpoint indexes and config.json alike)."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def text_config(cfg: Mapping) -> Mapping:
    """The text model's config of a multimodal config (``text_config``), else ``cfg`` itself."""
    text = cfg.get("text_config")
    return text if isinstance(text, Mapping) else cfg


def moe_config_from_hf(config: str | os.PathLike | Mapping, layer: int | None = None) -> MoEConfig:
    """See ``MoEConfig.from_hf``."""
    cfg = text_config(read_hf_config(config))
    family = cfg.get("model_type")
    reader = FAMILIES.get(family)
    if reader is None:
        raise ValueError(f"config.model_type: {family!r} is not a family moekit reads; expected one of "
                         f"{sorted(FAMILIES)}")
    num_layers = _int(cfg, "num_hidden_layers")
    sparse = [i for i in range(num_layers) if _SPARSE.get(family, _every_layer)(cfg, i)]
    if layer is not None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"layer: expected a decoder layer in [0, num_hidden_layers={num_layers}), got {layer!r}")
        if layer not in sparse:
            raise ValueError(f"layer: decoder layer {layer} of this {family} config is dense (sparse layers: "
                             f"{_short(sparse)}; {_SPARSE_FIELDS.get(family, '')})")
    elif not sparse:
        raise ValueError(f"config: no sparse MoE layer among the {num_layers} layers of this {family} config "
                         f"({_SPARSE_FIELDS.get(family, '')})")
    return reader(cfg)


def _get(cfg: Mapping, *names: str, default: object = ...) -> object:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    if default is ...:
        raise ValueError(f"config.{names[0]}: missing")
    return default


def _int(cfg: Mapping, *names: str, default: object = ..., nullable: bool = True) -> int:
    """An int field; ``nullable=False``: an explicit null is refused rather than read as ``default`` (where the
    transformers module would fail on it)."""
    if not nullable:
        for name in names:
            if name in cfg and cfg[name] is None:
                raise ValueError(f"config.{name}: expected an int, got None (null)")
    value = _get(cfg, *names, default=default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config.{names[0]}: expected an int, got {value!r}")
    return value


def _real(cfg: Mapping, name: str, default: float) -> float:
    """A finite real number; an explicit null is refused (the transformers module would fail on it), absent is
    ``default``; JSON ``true`` is not 1.0."""
    value = cfg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"config.{name}: expected a real number (finite, not a bool), got {value!r}")
    return float(value)


def _flag(cfg: Mapping, name: str, default: bool) -> bool:
    """A boolean field, ``default`` when absent; an explicit null is False, as the modeling code reads it
    (``if config.norm_topk_prob:``)."""
    value = cfg.get(name, default)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"config.{name}: expected true or false, got {value!r}")
    return value


def _activation(cfg: Mapping) -> str:
    act = cfg.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.hidden_act: {act!r} is not an activation moekit has; expected one of "
                         f"{sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[act]


def _short(values: list[int]) -> str:
    return str(values[:16])[:-1] + (", ...]" if len(values) > 16 else "]")


def _softmax_family(*, experts: tuple[str, ...], inter: str, renormalize: bool | None) -> Callable:
    """softmax -> top-k [-> renormalize]: ``renormalize`` None reads ``norm_topk_prob``."""

    def read(cfg: Mapping) -> MoEConfig:
        renorm = _flag(cfg, "norm_topk_prob", False) if renormalize is None else renormalize
        return MoEConfig(
            num_experts=_int(cfg, *experts),
            top_k=_int(cfg, "num_experts_per_tok"),
            hidden_size=_int(cfg, "hidden_size"),
            intermediate_size=_int(cfg, inter),
            activation=_activation(cfg),
            routing=RoutingConfig(scoring_func="softmax", renormalize=renorm),
        )

    return read


def _qwen2_moe(cfg: Mapping) -> MoEConfig:
    base = _softmax_family(experts=("num_experts",), inter="moe_intermediate_size", renormalize=None)(cfg)
    shared = _int(cfg, "shared_expert_intermediate_size")
    # The block always has its shared MLP and its sigmoid gate.
    return _replace(base, shared_intermediate_size=shared, shared_expert_gate=shared > 0)


def _deepseek_v3(cfg: Mapping) -> MoEConfig:
    scoring = cfg.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise ValueError(f"config.scoring_func: DeepSeek-V3 routing is sigmoid, got {scoring!r}")
    method = cfg.get("topk_method", "noaux_tc")
    if method != "noaux_tc":
        raise ValueError(f"config.topk_method: DeepSeek-V3 routing is 'noaux_tc' (grouped, with a correction "
                         f"bias), got {method!r}")
    # Absent fields take the defaults of transformers' DeepseekV3Config (DeepSeek-V3's own values).
    groups = _int(cfg, "n_group", default=8, nullable=False)
    topk_group = _int(cfg, "topk_group", default=4, nullable=False)
    inter = _int(cfg, "moe_intermediate_size")
    factor = _real(cfg, "routed_scaling_factor", default=2.5)
    return MoEConfig(
        num_experts=_int(cfg, "n_routed_experts", "num_local_experts"),
        top_k=_int(cfg, "num_experts_per_tok"),
        hidden_size=_int(cfg, "hidden_size"),
        intermediate_size=inter,
        activation=_activation(cfg),
        routing=RoutingConfig(
            scoring_func="sigmoid",
            renormalize=_flag(cfg, "norm_topk_prob", True),
            num_expert_group=groups,
            topk_group=topk_group,
            group_score="top2_sum",
            correction_bias=True,
            routed_scaling_factor=factor,
        ),
        shared_intermediate_size=inter * _int(cfg, "n_shared_experts", default=1),
        router_fp32=True,
    )


def _gpt_oss(cfg: Mapping) -> MoEConfig:
    alpha = _real(cfg, "swiglu_alpha", default=1.702)
    limit = _real(cfg, "swiglu_limit", default=7.0)
    return MoEConfig(
        num_experts=_int(cfg, "num_local_experts", "num_experts"),
        top_k=_int(cfg, "num_experts_per_tok", "experts_per_token"),
        hidden_size=_int(cfg, "hidden_size"),
        intermediate_size=_int(cfg, "intermediate_size"),
        activation=Activation(name="swigluoai", alpha=alpha, limit=limit),
        routing=RoutingConfig(scoring_func="softmax", topk_before_score=True),
        bias=True,
        router_bias=True,
    )


def _replace(cfg: MoEConfig, **changes: object) -> MoEConfig:
    from dataclasses import replace

    return replace(cfg, **changes)


def _every_layer(cfg: Mapping, layer: int) -> bool:
    return True


def _qwen_sparse(cfg: Mapping, layer: int) -> bool:
    step = _int(cfg, "decoder_sparse_step", default=1, nullable=False)
    if step <= 0:  # transformers takes (layer + 1) % step: no layer pattern to read from 0 or less
        raise ValueError(f"config.decoder_sparse_step: expected a positive int, got {step!r}")
    only_mlp = cfg.get("mlp_only_layers")
    only_mlp = [] if only_mlp is None else only_mlp  # as transformers' config reads null
    if not isinstance(only_mlp, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in only_mlp):
        raise ValueError(f"config.mlp_only_layers: expected a list of ints, got {only_mlp!r}")
    return layer not in only_mlp and (layer + 1) % step == 0


def _deepseek_sparse(cfg: Mapping, layer: int) -> bool:
    # DeepSeek's own model code and vLLM take moe_layer_freq (layer % freq == 0); transformers' DeepseekV3 ignores
    # it (every layer from first_k_dense_replace on is sparse). They differ only for freq > 1, which no released
    # checkpoint uses; moekit follows the model's authors.
    first = _int(cfg, "first_k_dense_replace", default=3, nullable=False)
    freq = _int(cfg, "moe_layer_freq", default=1)
    if freq < 1:  # transformers' layer % freq fails on 0; a negative one means nothing
        raise ValueError(f"config.moe_layer_freq: expected a positive int, got {freq}")
    return layer >= first and layer % freq == 0


FAMILIES: dict[str, Callable[[Mapping], MoEConfig]] = {
    "mixtral": _softmax_family(experts=("num_local_experts", "num_experts"), inter="intermediate_size",
                               renormalize=True),
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _softmax_family(experts=("num_experts", "num_local_experts"), inter="moe_intermediate_size",
                                 renormalize=None),
    "olmoe": _softmax_family(experts=("num_experts", "num_local_experts"), inter="intermediate_size",
                             renormalize=None),
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": _gpt_oss,
}
_SPARSE = {"qwen2_moe": _qwen_sparse, "qwen3_moe": _qwen_sparse, "deepseek_v3": _deepseek_sparse}
_SPARSE_FIELDS = {"qwen2_moe": "mlp_only_layers, decoder_sparse_step", "qwen3_moe": "mlp_only_layers, "
                  "decoder_sparse_step", "deepseek_v3": "first_k_dense_replace, moe_layer_freq"}

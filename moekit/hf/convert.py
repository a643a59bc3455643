"""Whole-block conversion: a transformers sparse MoE block -> a ``moekit.MoE`` sharing its parameters.

    block (router + experts [+ shared MLP [+ its sigmoid gate]] [+ output bias])
      router        -> MoE.gate (weight/bias shared), e_score_correction_bias (shared), RoutingConfig
      experts       -> RoutedExperts.w13/w2 (+ biases): shared, as views when stored transposed; copied only
                       where gate/up rows must be reordered or joined (gpt-oss, DBRX)
      shared MLP    -> SharedExperts: down_proj and gate shared; gate_proj|up_proj concatenated into gate_up_proj;
                       its activation probed through its own forward (it may differ from the experts', HY-V4)
      output bias   -> HFMoE.output_bias (shared), added after routed + shared (JetMoE)

``SUPPORTED_BLOCKS`` maps each block class (by name) to the readers of its router (``routers.py``) and of its
experts' layout (``layouts.py``); activation and shared experts are read from the modules themselves and checked.
A block whose math moekit cannot reproduce raises ``NotImplementedError`` naming the class and the supported
families. The ``HFMoE`` saves and loads under the block's own names and layouts (``saving.py``): after
``convert``, ``save_pretrained`` writes the checkpoint the unconverted model would write.
"""

from __future__ import annotations

import math
import warnings

from dataclasses import dataclass

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.hf import layouts, saving
from moekit.hf import routers as r
from moekit.hf.spec import gate_probe, match_activation
from moekit.layer import MoE
from moekit.ops.activation import Activation
from moekit.shared_experts import SharedExperts


@dataclass(frozen=True)
class BlockAdapter:
    """``family``: the transformers model folder; ``router``/``experts``: the readers of its router and its
    experts' layout; ``returns_tuple``: the block returns ``(hidden_states, router_scores)`` and its decoder layer
    unpacks two values; ``output_bias``: the name of a [H] bias the block adds to its output."""

    family: str
    router: r.RouterReader
    experts: layouts.ExpertsReader = layouts.decorated
    returns_tuple: bool = False
    output_bias: str | None = None


# Blocks convert refuses by class, with why (docs/HF.md lists them; their experts may still run on moekit through
# the experts implementation).
UNSUPPORTED_BLOCKS: dict[str, str] = {
    "PhimoeSparseMoeBlock": "sparsemixer routing",
    "ZayaSparseMoeBlock": "a router MLP with state carried between layers and a skip expert",
    "InklingMoE": "shared experts that take part in the router's normalization",
    "AXK1MoE": "a norm after the MoE inside the block",
    "DeepseekV4SparseMoeBlock": "hash routing",
}

_QWEN = r.softmax_topk()
_DSV3 = r.deepseek_v3()

SUPPORTED_BLOCKS: dict[str, BlockAdapter] = {
    # softmax -> top-k [-> renormalize]
    "MixtralSparseMoeBlock": BlockAdapter("mixtral", r.softmax_topk(renormalize=True)),
    "MiniMaxSparseMoeBlock": BlockAdapter("minimax", r.softmax_topk(renormalize=True)),
    "Qwen2MoeSparseMoeBlock": BlockAdapter("qwen2_moe", _QWEN),
    "Qwen3MoeSparseMoeBlock": BlockAdapter("qwen3_moe", _QWEN),
    "Qwen3NextSparseMoeBlock": BlockAdapter("qwen3_next", _QWEN),
    "Qwen3OmniMoeThinkerTextSparseMoeBlock": BlockAdapter("qwen3_omni_moe", _QWEN),
    "Qwen3OmniMoeTalkerTextSparseMoeBlock": BlockAdapter("qwen3_omni_moe", _QWEN),
    "Qwen4ExpTextSparseMoeBlock": BlockAdapter("qwen4_exp", _QWEN),
    "Qwen3_5MoeSparseMoeBlock": BlockAdapter("qwen3_5_moe", r.softmax_topk(renormalize=True)),
    "Qwen3VLMoeTextSparseMoeBlock": BlockAdapter("qwen3_vl_moe", r.softmax_topk(renormalize=True)),
    "OlmoeSparseMoeBlock": BlockAdapter("olmoe", _QWEN),
    "FlexOlmoSparseMoeBlock": BlockAdapter("flex_olmo", _QWEN),
    "MellumSparseMoeBlock": BlockAdapter("mellum", _QWEN),
    "LaraMiniSparseMoeBlock": BlockAdapter("lara_mini", r.softmax_topk(fp32=True)),
    "JambaSparseMoeBlock": BlockAdapter("jamba", r.softmax_topk(renormalize=False)),
    "HunYuanMoEV1Moe": BlockAdapter("hunyuan_v1_moe", r.softmax_topk(renormalize=True, linear="wg")),
    # top-k over logits -> softmax over the picked
    "GptOssMLP": BlockAdapter("gpt_oss", r.topk_softmax(), returns_tuple=True),
    "OpenAIPrivacyFilterMLP": BlockAdapter("openai_privacy_filter", r.topk_softmax(fp32=True), returns_tuple=True),
    "GraniteMoeMoE": BlockAdapter("granitemoe", r.topk_softmax()),
    "GraniteMoeSWAMoE": BlockAdapter("granitemoe_swa", r.topk_softmax()),
    "GraniteMoeSharedMoE": BlockAdapter("granitemoeshared", r.topk_softmax()),
    "GraniteMoeHybridMoE": BlockAdapter("granitemoehybrid", r.topk_softmax()),
    "AriaTextMoELayer": BlockAdapter("aria", r.topk_softmax()),
    "JetMoeMoE": BlockAdapter(
        "jetmoe",
        r.softmax_topk(renormalize=False, topk_before_score=True, linear="layer"),
        experts=layouts.jetmoe,
        output_bias="bias",
    ),
    "Cohere2MoeSparseMoeBlock": BlockAdapter("cohere2_moe", r.cohere2),
    # top-k over logits (+ correction bias) -> sigmoid of the picked
    "Llama4TextMoe": BlockAdapter(
        "llama4", r.topk_sigmoid(weights_on_input=True), experts=layouts.llama4, returns_tuple=True
    ),
    "Kolibri1SparseMoeBlock": BlockAdapter("kolibri1", r.topk_sigmoid(fp32=True)),
    # softmax -> top-k -> p-norm
    "DbrxFFN": BlockAdapter("dbrx", r.dbrx, experts=layouts.dbrx),
    # DeepSeek-V3 routing: sigmoid + correction bias, grouped top2_sum, scaling factor
    "DeepseekV3MoE": BlockAdapter("deepseek_v3", _DSV3),
    "DeepseekV32MoE": BlockAdapter("deepseek_v32", _DSV3),
    "Dots1MoE": BlockAdapter("dots1", _DSV3),
    "Dots3NoteTextMoE": BlockAdapter("dots3_note", _DSV3),
    "Glm4MoeMoE": BlockAdapter("glm4_moe", _DSV3),
    "Glm4MoeLiteMoE": BlockAdapter("glm4_moe_lite", _DSV3),
    "Glm4vMoeTextMoE": BlockAdapter("glm4v_moe", _DSV3),
    "GlmMoeDsaMoE": BlockAdapter("glm_moe_dsa", _DSV3),
    "SolarOpenMoE": BlockAdapter("solar_open", _DSV3),
    "KimiLinearMoE": BlockAdapter("kimi_linear", _DSV3),
    "BailingHybridMoE": BlockAdapter("bailing_hybrid", _DSV3),
    "MiMoV2FlashMoE": BlockAdapter("mimo_v2_flash", _DSV3),
    "ExaoneMoeSparseMoEBlock": BlockAdapter("exaone_moe", _DSV3),
    "BeamMoE": BlockAdapter("beam", _DSV3),
    "NemotronHMoE": BlockAdapter("nemotron_h", _DSV3),
    "HYV4MoE": BlockAdapter("hy_v4", _DSV3),  # clamped-SiLU experts, plain-SiLU shared MLP
    "HYV4VLMoE": BlockAdapter("hy_v4_vl", _DSV3),
    "Glm5NextTextMoE": BlockAdapter("glm5_next", _DSV3),  # clamped SiLU in the experts and the shared MLP
    # DeepSeek-V2 / Mistral-4 routing: softmax, grouped
    "DeepseekV2Moe": BlockAdapter("deepseek_v2", r.deepseek_v2),
    "DeepseekOcr2TextMoe": BlockAdapter("deepseek_ocr2", r.deepseek_v2),
    "UnlimitedOcrTextMoe": BlockAdapter("unlimited_ocr", r.deepseek_v2),
    "Mistral4MoE": BlockAdapter("mistral4", r.mistral4(fp32=False)),
    "MistralLarge4TextMoE": BlockAdapter("mistral_large4", r.mistral4(fp32=True, renormalize=True)),
    # sigmoid + correction bias -> top-k -> renormalize [x scaling]
    "MiniMaxM2SparseMoeBlock": BlockAdapter("minimax_m2", r.sigmoid_bias(bias_on="block")),
    "MiniMaxM3VLSparseMoeBlock": BlockAdapter("minimax_m3_vl", r.sigmoid_bias(scale_names=("routed_scaling_factor",))),
    "AfmoeSparseMoeBlock": BlockAdapter(
        "afmoe", r.sigmoid_bias(bias_on="block", bias_name="expert_bias", linear="gate", scale_names=("route_scale",))
    ),
    "HYV3MoE": BlockAdapter("hy_v3", r.sigmoid_bias(bias_on="block", scale_names=("router_scaling_factor",), fp32=True)),
    "Dots3NoteVisionMoE": BlockAdapter(
        "dots3_note", r.sigmoid_bias(bias_on="block", scale_names=("router_scaling_factor",), fp32=True)
    ),
    "Inkling2SparseMoeBlock": BlockAdapter("inkling2", r.sigmoid_bias(scale_names=("routed_scaling_factor",), fp32=True)),
    "Inkling2LoopSparseMoeBlock": BlockAdapter(
        "inkling2_loop", r.sigmoid_bias(scale_names=("routed_scaling_factor",), fp32=True)
    ),
    "LagunaSparseMoeBlock": BlockAdapter("laguna", r.sigmoid_bias(scale_names=("routed_scaling_factor",))),
    "Lfm2MoeSparseMoeBlock": BlockAdapter(
        "lfm2_moe",
        r.sigmoid_bias(
            bias_on="block", bias_name="expert_bias", renormalize="norm_topk_prob", scale_names=("routed_scaling_factor",)
        ),
    ),
    "FlintSparseMoeBlock": BlockAdapter("flint", r.sigmoid_topk),
    "Ernie4_5_MoeSparseMoeBlock": BlockAdapter("ernie4_5_moe", r.ernie),
}


def supported_families() -> list[str]:
    """The transformers model folders whose sparse MoE blocks ``convert`` replaces."""
    return sorted({a.family for a in SUPPORTED_BLOCKS.values()})


class HFMoE(MoE):
    """A ``moekit.MoE`` standing in for a transformers block: called as ``block(hidden_states)``, returning
    what the block returned (``hidden_states``, or ``(hidden_states, None)`` for blocks that return a pair).

    ``output_bias`` [H], when set, is added to the output (JetMoE's block bias)."""

    def __init__(self, config: MoEConfig, *, returns_tuple: bool = False, source: str = "", jitter_noise: float = 0.0,
                 **kwargs) -> None:
        super().__init__(config, **kwargs)
        self.returns_tuple = returns_tuple
        self.source = source
        self.jitter_noise = jitter_noise
        self.register_parameter("output_bias", None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, None]:  # type: ignore[override]
        if self.training and self.jitter_noise > 0:
            # The block's router jitter (Mixtral, MiniMax: router_jitter_noise), drawn as it draws it, so a seeded
            # run gets the same noise; multiplied out of place (the block scales its input in place).
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        out = super().forward(hidden_states)
        if self.output_bias is not None:
            out = out + self.output_bias
        return (out, None) if self.returns_tuple else out

    def extra_repr(self) -> str:
        return f"from={self.source}" if self.source else ""


def moe_from_hf(block: nn.Module, backend: str = "auto", *, act_dtype: torch.dtype | None = None) -> MoE:
    """A ``moekit.MoE`` that computes what ``block`` computes, sharing its parameters where layouts agree, in the
    block's train/eval mode.

    ``act_dtype``: the dtype the block's inputs arrive in, for blocks whose experts hold 8-bit codes (``convert``
    passes the model's embedding dtype); by default a 16/32-bit weight of the block other than its router, else
    the router's dtype.

    Raises:
        NotImplementedError: ``block`` is not a supported sparse MoE block (the message names its class and lists
            the supported families), or uses a setting moekit cannot express (the message names it).
    """
    if not isinstance(block, nn.Module):
        raise TypeError(f"block: expected a transformers MoE block (torch.nn.Module), got {type(block).__name__}")
    name = type(block).__name__
    adapter = SUPPORTED_BLOCKS.get(name)
    if adapter is None:
        why = f" ({UNSUPPORTED_BLOCKS[name]})" if name in UNSUPPORTED_BLOCKS else ""
        raise NotImplementedError(
            f"moekit.hf: {name} is not a supported MoE block{why}; supported families: "
            f"{', '.join(supported_families())}"
        )
    try:
        return _build(block, adapter, backend, act_dtype)
    except NotImplementedError as err:
        raise NotImplementedError(f"moekit.hf: {name} ({adapter.family}) uses {err}, which moekit cannot express") from None


def convert(model: nn.Module, *, backend: str = "auto") -> int:
    """Replace every sparse MoE block of ``model`` with a ``moekit.MoE``; returns how many were replaced.

    All blocks are converted before any is swapped in, so an unsupported block leaves ``model`` untouched.
    Converted blocks produce no router logits: a model configured to output them (``output_router_logits``, for
    the auxiliary loss) is refused; the experts implementation (``register``) keeps the family's router and its
    logits. Finding no block warns (the model runs as it was).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if getattr(config, "output_router_logits", False) is True:
            # transformers' load-balancing loss would index an empty tuple of logits (an IndexError in the first
            # forward, generate() included).
            raise NotImplementedError(
                f"moekit.hf.convert: {name or type(model).__name__}.config.output_router_logits is True, but converted "
                "blocks return no router logits; set it to False, or keep the model's blocks and run their experts "
                "on moekit (moekit.hf.register(); model.set_experts_implementation('moekit'))"
            )
    if _is_moe_block(model):
        raise TypeError(f"model: {type(model).__name__} is a MoE block itself; convert() replaces the blocks inside a "
                        "model (moekit.hf.moe_from_hf(block) builds one block's MoE)")
    found = [(n, m) for n, m in model.named_modules() if _is_moe_block(m)]
    act_dtype = _embedding_dtype(model)
    built = [(n, moe_from_hf(m, backend=backend, act_dtype=act_dtype)) for n, m in found if n and not _inside(n, found)]
    for name, moe in built:
        # In the model the block's names are gone: its checkpoint must still speak them (a block from
        # moe_from_hf alone, beside its source, keeps moekit's names).
        saving.install(moe, moe._moekit_saved_as)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, moe)
    # Every module with a config above a converted block (the model, its inner base model, a multimodal model's
    # language model) can be called on its own with output_router_logits: each refuses it.
    guarded = {""} | {name[:i] for name, _ in built for i, c in enumerate(name) if c == "."}
    for prefix in sorted(guarded):
        module = model.get_submodule(prefix)
        if getattr(module, "config", None) is not None and not getattr(module, "_moekit_router_logits_hook", False):
            module.register_forward_pre_hook(_no_router_logits, with_kwargs=True)
            module._moekit_router_logits_hook = True
    if not built:
        if any(isinstance(m, HFMoE) for m in model.modules()):
            warnings.warn(f"moekit.hf.convert: {type(model).__name__} is already converted; nothing was converted",
                          RuntimeWarning, stacklevel=2)
        else:
            warnings.warn(f"moekit.hf.convert: no sparse MoE block found in {type(model).__name__}; nothing was "
                          f"converted (supported families: {', '.join(supported_families())})", RuntimeWarning,
                          stacklevel=2)
    return len(built)


def _no_router_logits(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Converted blocks return no router logits: a call asking for them (or a config switched on after convert)
    would end in transformers' load-balancing loss indexing an empty tuple."""
    if kwargs.get("output_router_logits") or _asks_router_logits(getattr(model, "config", None)):
        raise NotImplementedError(
            f"moekit.hf.convert: {type(model).__name__} was called with output_router_logits, but converted blocks "
            "return no router logits; keep the model's blocks and run their experts on moekit instead "
            "(moekit.hf.register(); model.set_experts_implementation('moekit'))")


def _asks_router_logits(config: object, depth: int = 2) -> bool:
    """``output_router_logits`` set on ``config`` or a config nested in it (a multimodal model's ``text_config``)."""
    if config is None:
        return False
    if getattr(config, "output_router_logits", False) is True:
        return True
    return depth > 0 and any(_asks_router_logits(v, depth - 1) for v in getattr(config, "__dict__", {}).values()
                             if hasattr(v, "to_dict") and hasattr(v, "model_type"))


def _embedding_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype hidden states arrive in: the input embeddings' (never 8-bit codes), when the model has them."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
    weight = getattr(emb, "weight", None)
    return _float_dtype(weight) if isinstance(weight, torch.Tensor) else None


def _is_moe_block(module: nn.Module) -> bool:
    if type(module).__name__ in SUPPORTED_BLOCKS:
        return True
    experts = getattr(module, "experts", None)
    return isinstance(experts, nn.Module) and hasattr(experts, "down_proj") and not isinstance(module, MoE)


def _inside(name: str, found: list[tuple[str, nn.Module]]) -> bool:
    return any(name.startswith(other + ".") for other, _ in found if other)


def _build(block: nn.Module, adapter: BlockAdapter, backend: str, act_dtype: torch.dtype | None = None) -> HFMoE:
    experts = adapter.experts(block)
    _check_block(block)
    router = adapter.router(block)
    w13, w2 = experts.w13, experts.w2
    num_experts, _, hidden = w13.shape
    inter = w2.shape[2]
    shared_name, shared, shared_gate = _shared_modules(block)
    shared_w13 = shared_w2 = shared_activation = None
    saved = list(experts.saved)
    if shared is not None:
        shared_w13, shared_w2, shared_activation = _shared_weights(shared, experts.activation)
        if shared_activation.is_gated:
            half = tuple(shared.up_proj.weight.shape)
            sources = (f"{shared_name}.gate_proj.weight", f"{shared_name}.up_proj.weight")
            entry = saving.split_rows(
                "shared_experts.gate_up_proj.weight", sources, dim=0, half_shape=half, source_shape=half
            )
            saved.append(entry)
    if router.weight.shape != (num_experts, hidden):
        raise NotImplementedError(f"a router weight of shape {tuple(router.weight.shape)} for {num_experts} experts")
    config = MoEConfig(
        num_experts=num_experts,
        top_k=router.top_k,
        hidden_size=hidden,
        intermediate_size=inter,
        activation=experts.activation,
        routing=router.routing,
        shared_intermediate_size=0 if shared_w2 is None else shared_w2.shape[1],
        shared_expert_gate=shared_gate is not None,
        bias=experts.w13_bias is not None or experts.w2_bias is not None,
        router_bias=router.bias is not None,
        router_fp32=router.fp32 or router.weight.dtype == torch.float32,
        backend=backend,
    )
    # Quantized experts hold codes: the layer computes in the model's activation dtype -- the embeddings' when
    # convert() knows the model, else a 16/32-bit weight of the block other than the router (models keep routers
    # in fp32 while computing in bf16: DeepSeek-V3, GLM-4.5), else the router's.
    dtype = w13.dtype
    if experts.quant_method is not None:
        dtype = act_dtype or _float_dtype(shared_w13, shared_w2) or router.weight.dtype
    # The router's input jitter (Mixtral, MiniMax: block.jitter_noise; DBRX: router.moe_jitter_eps, which scales
    # the input the experts see too, in place): the same meaning.
    jitter = getattr(block, "jitter_noise", None) or getattr(getattr(block, "router", None), "moe_jitter_eps", None)
    moe = HFMoE(
        config,
        returns_tuple=adapter.returns_tuple,
        source=type(block).__name__,
        jitter_noise=float(jitter or 0.0),
        dtype=dtype,
        device="meta",
        quant_method=experts.quant_method,
    )
    _share(moe.gate, "weight", router.weight)
    if router.bias is not None:
        _share(moe.gate, "bias", router.bias)
    if router.correction_bias is not None:
        moe.register_buffer("e_score_correction_bias", router.correction_bias.detach())
    for attr in ("w13", "w2", "w13_bias", "w2_bias", "w13_scale", "w2_scale"):
        value = getattr(experts, attr)
        if value is not None:
            _share(moe.routed_experts, attr, value)
    if adapter.output_bias is not None:
        _share(moe, "output_bias", getattr(block, adapter.output_bias))
    if shared is not None:
        if shared_activation != experts.activation:
            moe.shared_experts = SharedExperts(
                hidden,
                shared_w2.shape[1],
                activation=shared_activation,
                gate=shared_gate is not None,
                dtype=shared_w2.dtype,
                device="meta",
            )
        _share(moe.shared_experts.gate_up_proj, "weight", shared_w13)
        _share(moe.shared_experts.down_proj, "weight", shared_w2)
        if shared_gate is not None:
            _share(moe.shared_experts.gate, "weight", shared_gate.weight)
    left = [n for n, t in [*moe.named_parameters(), *moe.named_buffers()] if t.is_meta]
    if left:
        raise NotImplementedError(f"parameters moekit could not fill from the block: {left}")
    entries = saving.views(block, moe, saved)
    _train_as_sources(block, moe, entries)
    moe._moekit_saved_as = tuple(entries)
    moe.train(block.training)  # a new module trains by default: an eval model's block would draw router jitter
    return moe


def _float_dtype(*tensors: torch.Tensor | None) -> torch.dtype | None:
    """The dtype of the first 16/32-bit float tensor among ``tensors`` (not 8-bit codes), if any."""
    for t in tensors:
        if t is not None and t.is_floating_point() and t.element_size() >= 2:
            return t.dtype
    return None


def _train_as_sources(block: nn.Module, moe: MoE, entries: list[saving.SavedAs]) -> None:
    """Views and copies of the block's weights replace them in a converted model: each trains as the tensors it
    is made from (a router-only recipe freezes the experts before converting; the transposed views and the
    de-interleaved or joined copies must stay frozen). Parameters shared with the block keep their own flag."""
    sources = {e.name: e.sources for e in entries}
    block_params = dict(block.named_parameters(remove_duplicate=False))
    shared_ids = {id(p) for p in block_params.values()}
    for name, param in moe.named_parameters():
        if id(param) in shared_ids:
            continue
        flags = {block_params[s].requires_grad if s in block_params else False for s in sources[name]}
        if len(flags) != 1:  # one joined weight cannot train only the rows of one of its sources
            joined = " and ".join(sources[name])
            raise NotImplementedError(f"{joined} with different requires_grad (joined into {name})")
        param.requires_grad_(flags.pop())


def _share(owner: nn.Module, attr: str, value: torch.Tensor) -> None:
    """Put ``value`` on ``owner.attr``: the same Parameter object when it is one (no copy), else a new one."""
    if not isinstance(value, nn.Parameter):
        value = nn.Parameter(value.detach(), requires_grad=False)  # trainability set by _build, from the block
    setattr(owner, attr, value)


def _check_block(block: nn.Module) -> None:
    strategy = getattr(block, "shared_expert_combination_strategy", "sum")
    if getattr(block, "num_shared_experts", 0) and strategy != "sum":
        raise NotImplementedError(f"shared_expert_combination_strategy={strategy!r}")
    for name in ("fc1_latent_proj", "fc2_latent_proj"):
        proj = getattr(block, name, None)
        if proj is not None and not isinstance(proj, nn.Identity):
            raise NotImplementedError(f"a latent projection ({name})")


def _shared_modules(block: nn.Module) -> tuple[str | None, nn.Module | None, nn.Linear | None]:
    shared_name = shared = None
    for name in ("shared_experts", "shared_expert", "shared_mlp"):
        candidate = getattr(block, name, None)
        if isinstance(candidate, nn.Module):
            shared_name, shared = name, candidate
            break
    gate = getattr(block, "shared_expert_gate", None)
    down = getattr(shared, "down_proj", None)
    if isinstance(down, nn.Linear) and down.in_features == 0:
        # It adds nothing, but its empty tensors are in the checkpoint the converted model must keep writing.
        raise NotImplementedError(f"a shared MLP of width 0 ({shared_name}.down_proj is {tuple(down.weight.shape)}; "
                                  "set its size to None / leave it out instead)")
    if gate is not None and (gate.bias is not None or gate.out_features != 1):
        raise NotImplementedError("a shared-expert gate other than Linear(H, 1, bias=False)")
    return shared_name, shared, gate


def _shared_weights(mlp: nn.Module, experts_activation: Activation) -> tuple[torch.Tensor, torch.Tensor, Activation]:
    """(gate_up [2Is, H] or up [Is, H] when non-gated, down [H, Is], activation) of a shared MLP."""
    down = getattr(mlp, "down_proj", None)
    gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    gated = gate is not None
    linears = [gate, up, down] if gated else [up, down]
    if not all(isinstance(m, nn.Linear) for m in linears):
        raise NotImplementedError(f"a shared MLP {type(mlp).__name__} without gate_proj/up_proj/down_proj Linears")
    if any(m.weight.element_size() < 2 or hasattr(m, "weight_scale_inv") for m in linears):
        # e.g. transformers' FP8Linear (an nn.Linear holding e4m3 codes and block scales): read as values, its codes
        # would be a wrong MLP.
        raise NotImplementedError(f"a quantized shared MLP ({type(linears[0]).__name__} with "
                                  f"{str(linears[0].weight.dtype).removeprefix('torch.')} weights); convert the "
                                  "model before quantizing it, or load the block with MoE.from_pretrained")
    if any(m.bias is not None for m in linears):
        raise NotImplementedError(f"a shared MLP {type(mlp).__name__} with biases")
    activation = _mlp_activation(mlp, gated, experts_activation)
    if activation is None:
        raise NotImplementedError(f"a shared MLP {type(mlp).__name__} with an activation moekit lacks")
    if gated:
        return torch.cat((gate.weight.detach(), up.weight.detach()), dim=0), down.weight, activation
    return up.weight, down.weight, activation


class _Captured(Exception):
    """Stops a probed MLP's forward once ``down_proj``'s input is captured."""


@torch.no_grad()
def _mlp_activation(mlp: nn.Module, gated: bool, experts_activation: Activation) -> Activation | None:
    """The activation ``mlp.forward`` applies between its projections, else None.

    Runs the MLP's own forward with ``gate_proj``/``up_proj`` outputs replaced by a fixed probe (forward hooks)
    and stops it at ``down_proj``'s input, so whatever the forward does in between (a clamp, the act_fn under any
    attribute name) is what gets compared. The experts' activation is tried first.
    """
    width = mlp.down_proj.in_features
    limits = [getattr(mlp, name, None) for name in ("swiglu_limit", "limit")]
    # An infinite limit means "no clamp" (and would make the probe infinite), as in spec._candidates.
    limits = [limit for limit in limits
              if isinstance(limit, (int, float)) and not isinstance(limit, bool) and 0 < limit < math.inf]
    if gated:
        candidates = [experts_activation, *(Activation(name=n) for n in ("silu", "gelu", "gelu_tanh"))]
        candidates += [Activation(name="silu", limit=float(limit)) for limit in limits]
    else:
        candidates = [experts_activation, Activation(name="relu2")]
    top = max([0.0, *limits, *(a.limit or 0.0 for a in candidates)])
    weight = mlp.down_proj.weight
    probe = gate_probe(2 * width if gated else width, limit=top)
    probe = probe if weight.is_meta else probe.to(weight.device)
    outputs = {"gate_proj": probe[:, :width], "up_proj": probe[:, width:]} if gated else {"up_proj": probe}
    captured: list[torch.Tensor] = []

    def stop(module, args):
        captured.append(args[0])
        raise _Captured

    hooks = [getattr(mlp, n).register_forward_hook(lambda m, a, o, v=v: v) for n, v in outputs.items()]
    hooks.append(mlp.down_proj.register_forward_pre_hook(stop))
    try:
        mlp(torch.zeros(probe.shape[0], mlp.down_proj.out_features, dtype=weight.dtype, device=weight.device))
    except _Captured:
        pass
    except Exception:  # a forward that cannot take the probe cannot be matched either
        return None
    finally:
        for hook in hooks:
            hook.remove()
    if len(captured) != 1:
        return None
    return match_activation(captured[0].cpu(), probe.cpu(), [a for a in candidates if a.is_gated == gated])

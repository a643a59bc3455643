"""MoE layer: forward = router -> routed experts (+ shared experts), shapes, precomputed routing, errors."""

import pytest
import torch

from moekit import MoE, MoEConfig, RoutingConfig, select_experts
from moekit.router import route
from moekit.ops.activation import activation_ref
from moekit.testing import assert_close, reference_experts


def _config(**kw):
    base = {"num_experts": 8, "top_k": 2, "hidden_size": 32, "intermediate_size": 24,
            "routing": RoutingConfig(renormalize=True), "backend": "torch"}
    return MoEConfig(**{**base, **kw})


def _manual(moe, x_TH):
    """The layer written out by hand from its parameters."""
    cfg = moe.config
    logits = moe.gate(x_TH) if not cfg.router_fp32 else x_TH.float() @ moe.gate.weight.float().t()
    r = cfg.routing
    w, ids = select_experts(logits, cfg.top_k, scoring_func=r.scoring_func, renormalize=r.renormalize,
                            num_expert_group=r.num_expert_group, topk_group=r.topk_group, group_score=r.group_score,
                            e_score_correction_bias=moe.e_score_correction_bias,
                            routed_scaling_factor=r.routed_scaling_factor)
    re = moe.routed_experts
    out = reference_experts(x_TH, re.w13, re.w2, w, ids, activation=cfg.activation,
                            w13_bias_E2I=re.w13_bias, w2_bias_EH=re.w2_bias)
    se = moe.shared_experts
    if se is not None:
        h = x_TH.double() @ se.gate_up_proj.weight.double().t()
        s = activation_ref(h, cfg.activation) @ se.down_proj.weight.double().t()
        if se.gate is not None:
            s = torch.sigmoid(x_TH.double() @ se.gate.weight.double().t()) * s
        out = out + s
    return out


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"shared_intermediate_size": 16},
        {"shared_intermediate_size": 16, "shared_expert_gate": True},
        {"routing": RoutingConfig(scoring_func="sigmoid", renormalize=True, num_expert_group=4, topk_group=2,
                                  group_score="top2_sum", correction_bias=True, routed_scaling_factor=2.5),
         "shared_intermediate_size": 16, "router_fp32": True},
        {"activation": "swigluoai", "bias": True, "router_bias": True},
    ],
    ids=["plain", "shared", "shared+gate", "deepseek-v3-like", "gpt-oss-like"],
)
def test_forward_matches_manual(kw):
    moe = MoE(_config(**kw))
    if moe.e_score_correction_bias is not None:
        moe.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(2, 5, 32)
    out = moe(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close(out.view(-1, 32), _manual(moe, x.view(-1, 32)), torch.float32)


def test_forward_with_router_logits_and_precomputed_topk():
    moe = MoE(_config())
    x = torch.randn(7, 32)
    logits = moe.gate(x)
    torch.testing.assert_close(moe(x, logits), moe(x))
    w, ids = select_experts(logits, 2, renormalize=True)
    torch.testing.assert_close(moe(x, topk_weights=w, topk_ids=ids), moe(x))


def test_llama4_style_weights_on_input():
    cfg = _config(top_k=1, routing=RoutingConfig(scoring_func="sigmoid", topk_before_score=True,
                                                 apply_weights_on_input=True))
    moe = MoE(cfg)
    x = torch.randn(6, 32)
    logits = moe.gate(x)
    w, ids = select_experts(logits, 1, scoring_func="sigmoid", topk_before_score=True)
    ref = reference_experts(x, moe.routed_experts.w13, moe.routed_experts.w2, w, ids, apply_router_weight_on_input=True)
    assert_close(moe(x), ref, torch.float32)


@pytest.mark.parametrize("T", [0, 1, 3])
def test_token_counts_and_1d_input(T):
    moe = MoE(_config(shared_intermediate_size=8))
    assert moe(torch.randn(T, 32)).shape == (T, 32)
    assert moe(torch.randn(32)).shape == (32,)


def test_fp32_router_stays_fp32_under_autocast():
    # torch.autocast ran the fp32 router's linear in bf16: its logits came back bf16 and ~2% of tokens of a
    # DeepSeek-V3-like router chose other experts.
    moe = MoE(_config(router_fp32=True), dtype=torch.bfloat16)
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = moe.router_logits(x)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, moe.router_logits(x))


def test_fp32_router_logits_on_the_meta_device():
    # The autocast guard of router_fp32 refused the meta device (no autocast there): a layer built on meta to be
    # materialized later computed no router logits.
    moe = MoE(_config(router_fp32=True), device="meta")
    assert moe.router_logits(torch.empty(4, 32, device="meta")).shape == (4, 8)


def test_fp32_router_serves_a_bf16_layer():
    moe = MoE(_config(router_fp32=True), dtype=torch.bfloat16)
    assert moe.gate.weight.dtype == torch.float32  # checkpoints of such models keep the router weight in fp32
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    logits = x.float() @ moe.gate.weight.t()
    torch.testing.assert_close(moe(x), moe(x, logits))
    plain = MoE(_config(), dtype=torch.bfloat16)
    plain.gate.float()
    assert plain(x).dtype == torch.bfloat16


def test_dtype_and_device_arguments():
    moe = MoE(_config(), dtype=torch.float16)
    assert moe.routed_experts.w13.dtype == torch.float16 and moe.gate.weight.dtype == torch.float16
    assert moe(torch.randn(3, 32, dtype=torch.float16)).dtype == torch.float16


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.float16), lambda m: m.half()], ids=["to", "half"])
def test_layer_cast_after_construction(cast):
    # MoE(cfg).to(dtype) is the usual idiom; the layer kept expecting its construction dtype and rejected both the
    # new dtype (its own check) and the old one (the kernel's weight-dtype check).
    moe = cast(MoE(_config(shared_intermediate_size=16)))
    x = torch.randn(4, 32, dtype=torch.float16)
    out = moe(x)
    assert out.dtype == torch.float16
    assert_close(out, _manual(moe, x), torch.float16)


def test_correction_bias_stays_fp32_through_a_cast():
    # The bias only ranks experts, by differences far below bf16's resolution: it is created fp32 whatever the
    # layer's dtype (like DeepSeek-V3 and vLLM keep it), and a later .to(bfloat16) must not round it.
    cfg = _config(routing=RoutingConfig(scoring_func="sigmoid", correction_bias=True))
    moe = MoE(cfg)
    bias = torch.linspace(1.0, 1.001, 8)
    moe.e_score_correction_bias.copy_(bias)
    moe.to(torch.bfloat16)
    assert moe.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(moe.e_score_correction_bias, bias)
    assert moe.routed_experts.w13.dtype == torch.bfloat16 and moe.gate.weight.dtype == torch.bfloat16
    assert "e_score_correction_bias" in dict(moe.named_buffers())
    assert moe(torch.randn(3, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_fp32_router_stays_fp32_through_a_cast():
    # router_fp32 (DeepSeek-V3): .to(bfloat16) rounded the router weight, and ~1% of tokens went to other experts.
    cfg = _config(router_fp32=True)
    moe = MoE(cfg)
    weight = torch.randn(8, 32) * (1 + torch.linspace(0, 1e-3, 32))  # values bf16 would round
    moe.gate.weight.data.copy_(weight)
    moe.to(torch.bfloat16)
    assert moe.gate.weight.dtype == torch.float32 and torch.equal(moe.gate.weight, weight)
    assert moe.routed_experts.w13.dtype == torch.bfloat16
    assert moe(torch.randn(3, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bad_inputs():
    moe = MoE(_config())
    with pytest.raises(ValueError, match=r"hidden_states: expected shape \[..., H=32\], got \(3, 31\)"):
        moe(torch.randn(3, 31))
    with pytest.raises(TypeError, match=r"hidden_states: expected dtype float32 \(the experts' dtype\), got float16"):
        moe(torch.randn(3, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"router_logits: expected shape \(3, 8\)"):
        moe(torch.randn(3, 32), torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"topk_ids: expected shape \(3, 2\)"):
        moe(torch.randn(3, 32), topk_weights=torch.rand(4, 2), topk_ids=torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"topk_ids: expected values in \[0, E=8\)"):
        moe(torch.randn(3, 32), topk_weights=torch.rand(3, 2), topk_ids=torch.full((3, 2), 8))
    with pytest.raises(TypeError, match="config: expected a moekit.MoEConfig"):
        MoE({"num_experts": 8})


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 33, 300])
@pytest.mark.parametrize(
    "kw",
    [
        {"routing": RoutingConfig(scoring_func="sigmoid", renormalize=True, num_expert_group=4, topk_group=2,
                                  group_score="top2_sum", correction_bias=True, routed_scaling_factor=2.5),
         "shared_intermediate_size": 64, "router_fp32": True},
        {"activation": "swigluoai", "bias": True, "router_bias": True,
         "routing": RoutingConfig(topk_before_score=True)},
        {"top_k": 2, "routing": RoutingConfig(scoring_func="sigmoid", topk_before_score=True,
                                              apply_weights_on_input=True), "shared_intermediate_size": 64},
    ],
    ids=["deepseek-v3-like", "gpt-oss-like", "llama4-like-top2"],
)
def test_gpu_triton_layer_matches_torch_layer(kw, T):
    cfg = _config(**{"hidden_size": 128, "intermediate_size": 96, "num_experts": 16, "top_k": 4, **kw},
                  backend="triton")
    moe = MoE(cfg, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(T, 128, device="cuda", dtype=torch.bfloat16)
    triton_out = moe(x)
    moe.routed_experts.backend = "torch"
    assert_close(triton_out, moe(x).float(), torch.bfloat16)


@pytest.mark.parametrize(
    "dtype, err, match",
    [
        # the layer runs fp16/bf16/fp32 activations: a float64 layer rejected every input at its first call
        (torch.float64, ValueError, r"dtype: expected one of \(float16, bfloat16, float32\), got float64"),
        (torch.float8_e4m3fn, ValueError, r"got float8_e4m3fn; quantized weights come from a quant_method"),
        ("bfloat16", TypeError, "dtype: expected a torch.dtype, got str"),
    ],
)
def test_unsupported_layer_dtype_is_refused_at_construction(dtype, err, match):
    with pytest.raises(err, match=match):
        MoE(_config(), dtype=dtype)


def test_unsupported_default_dtype_is_refused_at_construction():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(ValueError, match=r"got float64 \(torch's default dtype; pass dtype=\)"):
            MoE(_config())
    finally:
        torch.set_default_dtype(previous)


def test_load_recorder_counts_logical_ids_and_deep_copies_share_it():
    # A single-process layer records its routed ids too; a deep copy (e.g. a copied model) keeps counting into
    # the same recorder instead of a private copy nobody reads.
    import copy

    from moekit.distributed import ExpertLoadRecorder

    moe = MoE(MoEConfig(num_experts=6, top_k=2, hidden_size=16, intermediate_size=8))
    recorder = ExpertLoadRecorder(num_layers=3, num_experts=6)
    moe.record_load(recorder, 2)
    x = torch.randn(5, 16)
    weights, ids = route(moe.router_logits(x), 2, moe.config.routing)
    with torch.no_grad():
        moe(x)
        copy.deepcopy(moe)(x)
    counts = torch.bincount(ids.flatten(), minlength=6)
    assert recorder.current[2].tolist() == (2 * counts).tolist() and not recorder.current[:2].any()
    with pytest.raises(ValueError, match="recorder: expected num_experts=6"):
        moe.record_load(ExpertLoadRecorder(num_layers=1, num_experts=7))
    moe.record_load(None)
    with torch.no_grad():
        moe(x)
    assert recorder.current[2].tolist() == (2 * counts).tolist()


def test_a_cast_to_a_dtype_the_layer_cannot_run_is_refused_before_anything_moves():
    # .double() was accepted and left a layer that refused every input (float64 hidden_states) at its first call.
    moe = MoE(_config(), dtype=torch.float32)
    before = {n: p.dtype for n, p in moe.named_parameters()}
    with pytest.raises(ValueError, match=r"dtype: expected one of \(float16, bfloat16, float32\), got float64"):
        moe.double()
    with pytest.raises(ValueError, match="got float64"):
        moe.to(torch.float64)
    assert {n: p.dtype for n, p in moe.named_parameters()} == before  # nothing converted
    moe.half()  # the layer dtypes still cast
    assert moe.routed_experts.w13.dtype == torch.float16
    moe.to("cpu")  # device moves pass the probe

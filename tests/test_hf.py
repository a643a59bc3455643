"""moekit.hf against transformers' own MoE blocks: tiny random models of each family, CPU, logits compared.

Two paths per family: ``set_experts_implementation("moekit")`` (transformers routes, moekit runs the experts) and
``convert`` (every block replaced by a moekit.MoE). fp32 logits must match the eager model to 1e-5 relative; bf16
logits must match the fp32 reference within the tolerance table, as the bf16 eager model does.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import moekit  # noqa: E402
import moekit.hf as mh  # noqa: E402
from moekit.hf.convert import HFMoE, convert, moe_from_hf  # noqa: E402
from moekit.hf.experts import _WARNED
from moekit.testing import assert_close, rel_errors  # noqa: E402
from tests.hf.tiny_models import build, input_ids, tiny_config  # noqa: E402

# The six families the issue names; each is checked in fp32 and bf16 through both paths.
CORE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss"]

# Every other family whose blocks `convert` replaces (and whose tiny config builds on the CPU).
CONVERT_FAMILIES = [
    "afmoe", "aria", "bailing_hybrid", "beam", "deepseek_v2", "deepseek_v32", "dots1", "dots3_note",
    "ernie4_5_moe", "exaone_moe", "flex_olmo", "flint", "lfm2_moe", "glm4_moe", "glm4_moe_lite", "glm5_next", "glm_moe_dsa", "granitemoe",
    "granitemoe_swa", "granitemoeshared", "granitemoehybrid", "hunyuan_v1_moe", "hy_v3", "hy_v4", "hy_v4_vl", "jamba",
    "kimi_linear", "kolibri1", "laguna", "lara_mini", "mellum", "minimax", "minimax_m2", "mistral4", "mistral_large4",
    "nemotron_h", "openai_privacy_filter", "qwen3_5_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_vl_moe", "qwen4_exp",
    "solar_open", "unlimited_ocr",
]  # fmt: skip

# Families whose experts transformers does not decorate: only `convert` reaches them (fp32 and bf16).
CONVERT_ONLY_FAMILIES = ["dbrx", "jetmoe", "llama4"]

# Every converted family is also compared block by block on large random weights and inputs, so that clamps
# (HY-V4's clamped-SiLU experts beside a plain-SiLU shared MLP), weights on the input, expert and output biases
# and routers whose tiny-model weights start at zero are exercised where the tiny models' activations stay small.
BLOCK_FAMILIES = CORE_FAMILIES + CONVERT_FAMILIES + CONVERT_ONLY_FAMILIES

# Decorated experts moekit runs through the experts interface but whose block `convert` does not take
# (a router or block quirk moekit cannot express); the experts path must still match.
IMPL_ONLY_FAMILIES = [
    "axk1", "axk2", "cohere2_moe", "deepseek_v4", "gemma4", "phimoe", "zaya", "inkling",
    "diffusion_gemma", "minimax_m3_vl",
]

# Decorated experts whose activation (a two-input act_fn) or post-expert norm moekit lacks: the experts
# interface falls back to transformers' grouped_mm with a warning, and stays exact.
FALLBACK_FAMILIES = ["inkling2", "muse_spark"]

FP32_TOL = 1e-5
FP32_GRAD_TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _registered():
    mh.register()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits if hasattr(model, "lm_head") else _hidden(model, ids)


def _hidden(model, ids):
    return model(input_ids=ids, use_cache=False).last_hidden_state


def _moe_blocks(model) -> list:
    return [m for m in model.modules() if isinstance(m, HFMoE)]


def _transformers_experts(model) -> list[str]:
    """Names of modules still dispatching through transformers' experts interface."""
    return [n for n, m in model.named_modules() if hasattr(m, "has_gate") and hasattr(m, "_apply_gate")]


def _check_impl(family: str, dtype: torch.dtype = torch.float32) -> None:
    model = build(family)
    ids = input_ids()
    reference = _logits(model, ids)
    model.to(dtype)
    eager = _logits(model, ids)
    model.set_experts_implementation("moekit")
    if dtype != torch.float32:
        assert_close(eager.float(), reference, dtype, name=f"{family} eager {dtype}")
    _compare(_logits(model, ids), reference, dtype, f"{family} with moekit experts")


def _check_convert(family: str, dtype: torch.dtype = torch.float32) -> None:
    model = build(family)
    ids = input_ids()
    reference = _logits(model, ids)
    model.to(dtype)
    count = mh.convert(model)
    assert count == len(_moe_blocks(model)) > 0
    assert _transformers_experts(model) == []
    _compare(_logits(model, ids), reference, dtype, f"{family} converted")


def _compare(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """fp32: max relative error <= 1e-5 against the eager fp32 logits; else the tolerance table."""
    if dtype == torch.float32:
        max_err, _ = rel_errors(actual, reference)
        assert max_err <= FP32_TOL, f"{name}: max rel err {max_err:.3g} vs eager"
    else:
        assert_close(actual.float(), reference, dtype, name=f"{name} {dtype}")


@pytest.mark.parametrize("family", CORE_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_core_family_experts_implementation(family, dtype):
    _check_impl(family, dtype)


@pytest.mark.parametrize("family", CORE_FAMILIES + CONVERT_ONLY_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_core_and_convert_only_family_convert(family, dtype):
    _check_convert(family, dtype)


@pytest.mark.parametrize("family", CONVERT_FAMILIES)
def test_family_convert_and_experts_implementation(family):
    _check_convert(family)
    _check_impl(family)


@pytest.mark.parametrize("family", BLOCK_FAMILIES)
def test_converted_block_matches_on_large_weights(family):
    model = build(family)
    block = next(m for m in model.modules() if type(m).__name__ in mh.SUPPORTED_BLOCKS)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)  # pre-activations reach the clamps (limit 10)
        moe = mh.moe_from_hf(block)
        for shape in ((2, 5), (1, 1)):  # T = 10 and T = 1
            x = torch.randn(*shape, moe.config.hidden_size, generator=gen) * 3
            expected, actual = block(x), moe(x)
            if isinstance(expected, tuple):
                expected, actual = expected[0], actual[0]
            assert rel_errors(actual.reshape(expected.shape), expected)[0] <= FP32_TOL, shape


def test_convert_llama4_settings_and_copies():
    model = build("llama4")
    block = model.model.layers[1].feed_forward
    moe = mh.moe_from_hf(block)
    routing = moe.config.routing
    assert routing.scoring_func == "sigmoid" and routing.topk_before_score and routing.apply_weights_on_input
    assert moe.gate.weight is block.router.weight
    assert moe.shared_experts.down_proj.weight is block.shared_expert.down_proj.weight
    gate_up = block.experts.gate_up_proj  # [E, H, 2I], gate columns then up columns
    torch.testing.assert_close(moe.routed_experts.w13, gate_up.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(moe.routed_experts.w2, block.experts.down_proj.transpose(1, 2), rtol=0, atol=0)
    out, logits = moe(torch.randn(2, 3, model.config.hidden_size))
    assert logits is None and out.shape == (2, 3, model.config.hidden_size)
    assert type(model.model.layers[0].feed_forward).__name__ == "Llama4TextMLP"  # the dense layer stays


def test_convert_llama4_top_k_above_one():
    # Each of a token's K experts sees x scaled by its own weight: the local prepare expands x to T·K rows.
    model = build("llama4", num_experts_per_tok=2)
    ids = input_ids()
    reference = _logits(model, ids)
    assert mh.convert(model) == 1
    assert rel_errors(_logits(model, ids), reference)[0] <= FP32_TOL


@pytest.mark.parametrize("p", [None, 2.0], ids=["no-norm", "p2"])
def test_convert_dbrx_expert_weight_norms(p):
    # p = 1 (the default) is renormalize; None leaves the softmax weights, p = 2 runs as a custom routing function
    ffn = {"ffn_hidden_size": 24, "moe_num_experts": 8, "moe_top_k": 2, "moe_normalize_expert_weights": p}
    model = build("dbrx", ffn_config=ffn)
    ids = input_ids()
    reference = _logits(model, ids)
    assert mh.convert(model) == 2
    assert (_moe_blocks(model)[0].config.routing.custom_routing_function is None) == (p is None)
    _compare(_logits(model, ids), reference, torch.float32, f"dbrx p={p}")


def test_convert_jetmoe_shares_weights_and_output_bias():
    model = build("jetmoe")
    block = model.model.layers[0].mlp
    moe = mh.moe_from_hf(block)
    assert moe.routed_experts.w13 is block.input_linear.weight and moe.routed_experts.w2 is block.output_linear.weight
    assert moe.output_bias is block.bias and moe.gate.weight is block.router.layer.weight


@pytest.mark.parametrize("family", IMPL_ONLY_FAMILIES)
def test_family_experts_implementation_only(family):
    _check_impl(family)
    with pytest.raises(NotImplementedError, match="moekit"):
        mh.convert(build(family))


@pytest.mark.parametrize("family", FALLBACK_FAMILIES)
def test_family_falls_back_with_a_warning(family):
    model = build(family)
    ids = input_ids()
    reference = _logits(model, ids)
    model.set_experts_implementation("moekit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = _logits(model, ids)
    assert rel_errors(actual, reference)[0] <= FP32_TOL
    experts = [m for m in model.modules() if hasattr(m, "_apply_gate")]
    assert experts and all(mh.experts_spec(m).activation is None and mh.experts_spec(m).reason for m in experts)
    warned = any("grouped_mm" in str(w.message) for w in caught)
    assert warned or type(experts[0]).__name__ in _WARNED  # warned once per class and process


def test_register_is_idempotent_and_from_pretrained_accepts_the_name(tmp_path):
    from transformers import AutoModelForCausalLM

    mh.register()
    mh.register()
    model = build("qwen3_moe")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moekit")
    assert loaded.config._experts_implementation == "moekit"
    ids = input_ids()
    assert rel_errors(_logits(loaded, ids), _logits(model, ids))[0] <= FP32_TOL


def test_convert_shares_parameters_without_copies():
    model = build("mixtral")
    block = model.model.layers[0].mlp
    gate_up, down, router = block.experts.gate_up_proj, block.experts.down_proj, block.gate.weight
    moe = mh.moe_from_hf(block)
    assert moe.routed_experts.w13 is gate_up and moe.routed_experts.w2 is down and moe.gate.weight is router


def test_convert_deepseek_v3_settings():
    model = build("deepseek_v3")
    block = model.model.layers[0].mlp
    moe = mh.moe_from_hf(block)
    routing = moe.config.routing
    assert routing.scoring_func == "sigmoid" and routing.group_score == "top2_sum" and routing.correction_bias
    assert routing.routed_scaling_factor == model.config.routed_scaling_factor
    assert moe.e_score_correction_bias.data_ptr() == block.gate.e_score_correction_bias.data_ptr()
    assert moe.config.router_fp32 and moe.config.shared_intermediate_size == model.config.moe_intermediate_size


def test_convert_gpt_oss_rearranges_interleaved_transposed_experts():
    model = build("gpt_oss")
    block = model.model.layers[0].mlp
    moe = mh.moe_from_hf(block)
    gate_up = block.experts.gate_up_proj  # [E, H, 2I], columns interleaved g0 u0 g1 u1 ...
    inter = gate_up.shape[2] // 2
    torch.testing.assert_close(moe.routed_experts.w13[:, :inter], gate_up[:, :, 0::2].transpose(1, 2))
    torch.testing.assert_close(moe.routed_experts.w13[:, inter:], gate_up[:, :, 1::2].transpose(1, 2))
    assert moe.config.activation.name == "swigluoai" and moe.config.router_bias and moe.config.bias
    out = moe(torch.randn(2, 3, model.config.hidden_size))
    assert isinstance(out, tuple) and out[0].shape == (2, 3, model.config.hidden_size)


def test_unsupported_block_names_class_and_families():
    model = build("phimoe")
    block = model.model.layers[0].mlp
    with pytest.raises(NotImplementedError, match="PhimoeSparseMoeBlock.*supported families: .*mixtral"):
        mh.moe_from_hf(block)
    before = [type(m).__name__ for m in model.modules()]
    with pytest.raises(NotImplementedError):
        mh.convert(model)
    assert [type(m).__name__ for m in model.modules()] == before  # nothing swapped in


def test_unsupported_block_says_why():
    with pytest.raises(NotImplementedError, match=r"PhimoeSparseMoeBlock is not a supported MoE block \(sparsemixer"):
        mh.moe_from_hf(build("phimoe").model.layers[0].mlp)


def test_convert_refuses_a_model_that_outputs_router_logits_and_warns_when_nothing_converts():
    # Converted blocks return no router logits: transformers' load-balancing loss then indexed an empty tuple
    # (an IndexError in the first forward, generate() included).
    model = build("mixtral", output_router_logits=True)
    with pytest.raises(NotImplementedError, match="config.output_router_logits is True"):
        mh.convert(model)
    assert not any(isinstance(m, HFMoE) for m in model.modules())
    with pytest.warns(RuntimeWarning, match="no sparse MoE block found in Linear"):
        assert mh.convert(torch.nn.Linear(4, 4)) == 0


def test_converted_block_applies_the_router_jitter_in_training():
    # Mixtral's router_jitter_noise scales the block's input by uniform noise in training: drawn the same way,
    # the seeded noise is the same, so the converted block matches the block (it ignored the jitter).
    model = build("mixtral", router_jitter_noise=0.5)
    block = model.model.layers[0].mlp
    moe = mh.moe_from_hf(block).train()
    block.train()
    x = torch.randn(2, 5, block.experts.gate_up_proj.shape[-1])
    torch.manual_seed(3)
    want = block(x.clone())
    torch.manual_seed(3)
    got = moe(x)
    assert_close(got, want, torch.float32)
    assert rel_errors(moe.eval()(x), want)[0] > 1e-3  # no jitter in eval: a different result


def test_experts_forward_checks_ids_unless_told_not_to():
    # Called directly, out-of-range ids dropped their slot silently; the registered implementation skips the check
    # (its ids come from the family's router).
    model = build("mixtral")
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(3, experts.gate_up_proj.shape[-1])
    ids = torch.tensor([[0, 1], [2, 8], [0, 3]])
    with pytest.raises(ValueError, match="topk_ids"):
        mh.experts_forward(experts, x, ids, torch.rand(3, 2))


def test_convert_cohere2_moe_with_summed_shared_experts():
    # Its default ("average") is refused (below); "sum" is the shared MLP added to the routed experts' output.
    model = build("cohere2_moe", shared_expert_combination_strategy="sum")
    ids = input_ids()
    reference = _logits(model, ids)
    assert mh.convert(model) == len(_moe_blocks(model)) > 0
    _compare(_logits(model, ids), reference, torch.float32, "cohere2_moe converted")


def test_unsupported_setting_is_named():
    model = build("cohere2_moe")
    with pytest.raises(NotImplementedError, match="shared_expert_combination_strategy"):
        mh.moe_from_hf(model.model.layers[0].mlp)
    # ERNIE's renormalization floor: moekit divides by the sum alone (the same with the default 1e-12).
    with pytest.raises(NotImplementedError, match="moe_norm_min=1.0"):
        mh.moe_from_hf(build("ernie4_5_moe", moe_norm_min=1.0).model.layers[1].mlp)


def test_experts_cache_follows_weight_updates():
    model = build("gpt_oss")
    model.set_experts_implementation("moekit")
    ids = input_ids()
    _logits(model, ids)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj.mul_(0.5)
    actual = _logits(model, ids)
    model.set_experts_implementation("eager")
    assert rel_errors(actual, _logits(model, ids))[0] <= FP32_TOL


def test_weights_changed_drops_the_cached_copy_after_a_data_write():
    # A write through .data (PEFT's merge, an EMA update) moves neither storage nor version counter: the cached
    # de-interleaved copy stayed in use (0.64 off) until moekit.hf.weights_changed().
    model = build("gpt_oss")
    model.set_experts_implementation("moekit")
    ids = input_ids()
    _logits(model, ids)
    for layer in model.model.layers:
        layer.mlp.experts.gate_up_proj.data.mul_(3)
    mh.weights_changed(model)
    actual = _logits(model, ids)
    model.set_experts_implementation("eager")
    assert rel_errors(actual, _logits(model, ids))[0] <= FP32_TOL
    with pytest.raises(TypeError, match="module: expected a torch.nn.Module or None"):
        mh.weights_changed("model")


def test_experts_cache_follows_a_fused_optimizer_step():
    # A fused step writes gate_up_proj without moving its version counter: the cached de-interleaved copy of an
    # evaluation before it was used after it (0.1 off in the logits); every optimizer step drops the copies.
    model = build("gpt_oss")
    model.set_experts_implementation("moekit")
    ids = input_ids()
    _logits(model, ids)  # an evaluation call caches the copy
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    model.train()
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    actual = _logits(model, ids)
    model.set_experts_implementation("eager")
    assert rel_errors(actual, _logits(model, ids))[0] <= FP32_TOL


def test_supported_families_cover_the_tests():
    assert set(CORE_FAMILIES + CONVERT_FAMILIES + CONVERT_ONLY_FAMILIES) <= set(mh.supported_families())


def test_import_moekit_does_not_import_transformers():
    code = "import sys, moekit; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert moekit.MoE is not None



def test_convert_keeps_fp32_router_of_a_bf16_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    build("deepseek_v3").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)  # gate.weight stays fp32
    ids = input_ids()
    reference = _logits(model, ids)
    mh.convert(model)
    assert_close(_logits(model, ids).float(), reference.float(), torch.bfloat16)


def test_clamp_beyond_the_default_probe_range_is_kept():
    # A clamped-SiLU limit (16) above the probe's default +-12 must still be identified: a probe that never
    # reaches the clamp matches plain silu first and the clamp is lost where activations grow large.
    model = build("hy_v4", swiglu_limit=16.0)
    block = next(m for m in model.modules() if type(m).__name__ == "HYV4MoE")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))  # pre-activations of std ~17: the clamp is active
        x = torch.randn(2, 5, model.config.hidden_size, generator=gen) * 3
        expected = block(x)
        converted = mh.moe_from_hf(block)(x)
        model.set_experts_implementation("moekit")
        through_experts = block(x)
    assert mh.experts_spec(block.experts).activation.limit == 16.0
    assert rel_errors(through_experts, expected)[0] <= FP32_TOL
    assert rel_errors(converted, expected)[0] <= FP32_TOL


def test_bad_arguments_are_named_up_front():
    # A bad backend used to register fine and fail inside the first forward of every model using it.
    with pytest.raises(ValueError, match="backend"):
        mh.register(backend="cuda")
    mh.register()  # the fixture's registration stays in place
    with pytest.raises(TypeError, match="model"):
        mh.convert("not a model")


def test_failed_convert_leaves_no_weight_copies_behind():
    # convert promises an untouched model when a block is unsupported. Rearranging gpt-oss's experts through the
    # experts-path cache left a full de-interleaved copy of every earlier block's experts on the model.
    model = build("gpt_oss")
    model.model.layers[1].mlp = build("phimoe").model.layers[0].mlp  # unsupported: convert must give up
    with torch.no_grad(), pytest.raises(NotImplementedError):
        mh.convert(model)
    assert "_moekit_weights" not in vars(model.model.layers[0].mlp.experts)


@pytest.mark.parametrize("family", ["aria", "openai_privacy_filter", "llama4"])
def test_transposed_experts_are_read_in_place(family):
    # The kernels take any strides on w13/w2: experts stored [E, H, 2I] / [E, I, H] are transposed views, not a
    # second copy (the experts path used to cache one per module, doubling expert memory).
    model = build(family)
    block = next(m for m in model.modules() if type(m).__name__ in mh.SUPPORTED_BLOCKS)
    experts = block.experts
    if family != "llama4":  # llama4's experts are not decorated: convert only
        model.set_experts_implementation("moekit")
        _logits(model, input_ids())
        assert "_moekit_weights" not in vars(experts)
    moe = mh.moe_from_hf(block)
    assert moe.routed_experts.w13.data_ptr() == experts.gate_up_proj.data_ptr()
    assert moe.routed_experts.w2.data_ptr() == experts.down_proj.data_ptr()


def test_transposed_views_run_on_the_triton_backend():
    model = build("aria")
    ids = input_ids(batch=1, seq=3)
    reference = _logits(model, ids)
    assert not mh.moe_from_hf(model.model.layers[0].mlp).routed_experts.w13.is_contiguous()
    mh.convert(model, backend="triton")
    assert_close(_logits(model, ids), reference, torch.float32, name="aria on triton")


@pytest.mark.parametrize("backend", [b for b in ("torch", "triton") if b in moekit.kernel.available_backends("cpu")])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3", "llama4"])
@pytest.mark.parametrize("path", ["experts_implementation", "convert"])
def test_fine_tuning_gradients_match_transformers(family, path, backend):
    # Through either path every parameter trains and gets the gradient transformers' eager model gives it: on
    # Triton the routed experts used to get none (the output came back detached), and convert froze the copies and
    # views it made (gpt-oss's de-interleaved w13, shared gate|up weights, transposed experts). One SGD step on
    # both, compared through the state dict (the block's own names and layouts), compares every gradient.
    if path == "experts_implementation" and family == "llama4":
        pytest.skip("llama4's experts are not decorated: only convert reaches them")
    ref = build(family)
    model = build(family)
    model.load_state_dict(ref.state_dict())
    if path == "convert":
        assert mh.convert(model, backend=backend) > 0
    else:
        mh.register(backend=backend)
        model.set_experts_implementation("moekit")
    ids = input_ids()
    before = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    try:
        for m in (ref, model):
            m.train()
            m(input_ids=ids, use_cache=False).logits.square().mean().backward()
            torch.optim.SGD(m.parameters(), lr=1e4).step()  # steps far larger than the weights: no cancellation
    finally:
        mh.register()  # the module's registration (backend auto) for the other tests
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    after_ref, after = ref.state_dict(), model.state_dict()
    assert after.keys() == after_ref.keys()
    for k, v in after.items():
        if v.is_floating_point():
            # Gradients through whole decoder layers: fp32 summation orders differ (moekit groups rows by expert),
            # so compare like the logits (max relative error), with a bound for two layers of backprop.
            err = rel_errors(v - before[k], after_ref[k] - before[k])[0]
            assert err <= FP32_GRAD_TOL, f"{k}: max rel err {err:.3g}"


def test_converted_model_pickles_and_standalone_blocks_keep_moekit_names():
    # The save hooks hold plain data (no closures), so torch.save of a whole converted model works; a block from
    # moe_from_hf, beside its source, keeps moekit's own names.
    import io

    model = build("gpt_oss")
    moe = mh.moe_from_hf(model.model.layers[0].mlp)
    assert "routed_experts.w13" in moe.state_dict()
    mh.convert(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert_close(_logits(loaded, input_ids()), _logits(model, input_ids()).double(), torch.float32)


def test_shared_mlp_with_an_infinite_limit_is_plain_silu():
    # An infinite clamp means "no clamp" (Step-3.7 style); it reached Activation(limit=inf), which now refuses it.
    from torch import nn

    from moekit.hf.convert import _mlp_activation

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False)
            self.down_proj = nn.Linear(4, 8, bias=False)
            self.limit = float("inf")

        def forward(self, x):
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    assert _mlp_activation(MLP(), True, moekit.Activation(name="silu")) == moekit.Activation(name="silu")


def _block_prefixes(model) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ in mh.SUPPORTED_BLOCKS]


@pytest.mark.parametrize("family", ["gpt_oss", "llama4", "aria", "dbrx"])
def test_convert_keeps_frozen_experts_frozen(family):
    # Router-only training: the experts are frozen before convert. The transposed views (llama4, aria) and the
    # de-interleaved or joined copies (gpt-oss, DBRX) that replace them used to take the flag of the whole block
    # (any parameter trainable -> all trainable) and trained the experts.
    model = build(family)
    blocks = _block_prefixes(model)
    for name, p in model.named_parameters():
        if any(name.startswith(f"{b}.experts.") for b in blocks):
            p.requires_grad_(False)
    assert mh.convert(model) > 0
    for moe in _moe_blocks(model):
        assert not moe.routed_experts.w13.requires_grad and not moe.routed_experts.w2.requires_grad
        assert moe.gate.weight.requires_grad


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_convert_keeps_a_frozen_shared_mlp_frozen(family):
    # The shared MLP's gate_proj | up_proj join is a copy: it takes its sources' flag, not the block's.
    model = build(family)
    for name, p in model.named_parameters():
        p.requires_grad_(".shared_expert" not in name)
    assert mh.convert(model) > 0
    for moe in _moe_blocks(model):
        assert not moe.shared_experts.gate_up_proj.weight.requires_grad
        assert not moe.shared_experts.down_proj.weight.requires_grad
        assert moe.routed_experts.w13.requires_grad


def test_convert_refuses_a_joined_weight_of_mixed_trainability():
    # gate_proj frozen, up_proj trainable: one joined weight cannot train half of its rows.
    model = build("qwen2_moe")
    model.model.layers[0].mlp.shared_expert.gate_proj.weight.requires_grad_(False)
    with pytest.raises(NotImplementedError, match="requires_grad"):
        mh.convert(model)


def test_convert_keeps_eval_mode_and_applies_jitter_only_in_training():
    # A converted block starts in its block's mode: an eval model drew router jitter at inference before.
    model = build("mixtral", router_jitter_noise=0.05)
    model.eval()
    ids = input_ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        convert(model)
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not any(m.training for m in model.modules())
    assert torch.equal(a, b)
    assert_close(a, want, name="eval logits with jitter configured")
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_convert_takes_dbrx_router_jitter():
    model = build("dbrx", ffn_config=dict(moe_jitter_eps=0.2))
    convert(model)
    moes = [m for m in model.modules() if isinstance(m, HFMoE)]
    assert moes and all(m.jitter_noise == pytest.approx(0.2) for m in moes)


def test_convert_refuses_router_logits_asked_for_later():
    model = build("mixtral")
    convert(model)
    ids = input_ids()
    with pytest.raises(NotImplementedError, match="called with output_router_logits"):
        model(input_ids=ids, output_router_logits=True)
    model.config.output_router_logits = True
    with pytest.raises(NotImplementedError, match="called with output_router_logits"):
        model(input_ids=ids)
    # The inner base model, called on its own, returned an empty tuple of router logits silently.
    model.config.output_router_logits = False
    with pytest.raises(NotImplementedError, match="called with output_router_logits"):
        model.model(input_ids=ids, output_router_logits=True)


def test_convert_refuses_router_logits_asked_for_in_a_nested_config():
    # A multimodal model keeps the flag in text_config: switched on after convert, transformers' load-balancing loss
    # indexed an empty tuple (IndexError) instead of the guard's message.
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3VLMoeForConditionalGeneration"):
        pytest.skip("this transformers has no Qwen3-VL-MoE")
    text = tiny_config("qwen3_vl_moe").to_dict()
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=4, out_hidden_size=32,
                  deepstack_visual_indexes=[0])
    torch.manual_seed(0)
    model = transformers.Qwen3VLMoeForConditionalGeneration(
        transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision)).eval()
    assert convert(model, backend="torch") > 0
    model.config.text_config.output_router_logits = True
    ids = input_ids()
    with pytest.raises(NotImplementedError, match="called with output_router_logits"):
        model(input_ids=ids, labels=ids)


@pytest.mark.parametrize("family, kw", [("deepseek_v3", dict(n_shared_experts=0)),
                                        ("qwen2_moe", dict(shared_expert_intermediate_size=0))])
def test_convert_refuses_a_shared_mlp_of_width_zero_by_name(family, kw):
    # It computes nothing, but its empty tensors belong to the checkpoint: refused naming it (it crashed in the
    # activation probe's max() of an empty tensor).
    with pytest.raises(NotImplementedError, match=r"a shared MLP of width 0 \(shared_experts?\.down_proj"):
        convert(build(family, **kw))


def test_convert_names_a_block_passed_as_the_model_and_a_second_convert():
    model = build("mixtral")
    block = next(m for m in model.modules() if type(m).__name__ == "MixtralSparseMoeBlock")
    with pytest.raises(TypeError, match="is a MoE block itself"):
        convert(block)
    convert(model)
    with pytest.warns(RuntimeWarning, match="already converted"):
        assert convert(model) == 0
    with pytest.raises(TypeError, match="block: expected a transformers MoE block"):
        moe_from_hf("x")


def test_router_logits_guard_reads_configs_of_any_kind():
    # The guard sits on every module above a converted block that has a config; a wrapper holding a plain dict (or
    # an object without __dict__) as its config failed every forward with a TypeError.
    from moekit.hf.convert import _asks_router_logits

    assert not _asks_router_logits({"output_router_logits": True})  # not a transformers config: not read
    assert not _asks_router_logits(3)
    assert _asks_router_logits(build("mixtral", output_router_logits=True).config)

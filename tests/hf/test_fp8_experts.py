"""moekit.hf on transformers' fine-grained fp8 experts (``FP8Experts``), CPU.

transformers cannot produce an fp8 model on CPU: ``FineGrainedFP8Config`` refuses to quantize without a GPU (and
a pre-quantized checkpoint is dequantized to bf16), and ``FP8Experts``' own forwards need the ``kernels`` package's
CUDA kernels. So each test builds the fp8 experts the way loading does: transformers' ``FP8Experts`` class (with
its experts-interface decorator), filled by transformers' own ``Fp8Quantize`` from a tiny Qwen3-MoE's bf16 experts.
transformers' fp8 math is checked through its ``_dequantize_fp8_weight`` (the weights its kernels multiply).
"""

from __future__ import annotations

import re
import types
import warnings

import pytest
import torch

pytest.importorskip("transformers")
fg = pytest.importorskip("transformers.integrations.finegrained_fp8")

import moekit.hf as mh  # noqa: E402
from moekit.hf.fp8 import fp8_unsupported, fp8_weights  # noqa: E402
from moekit.ops.quantize import dequantize_weight, quantize_weight  # noqa: E402
from moekit.testing import (  # noqa: E402
    QUANT_REFERENCE_TOLERANCE,
    QUANT_TOLERANCES,
    assert_close,
    reference_quantized_experts,
)
from tests.hf.tiny_models import build, input_ids  # noqa: E402

HIDDEN = 256
FP8 = QUANT_TOLERANCES["fp8_e4m3"]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    mh.register()


def _fp8_experts(experts, config, *, scale_fmt="float", activation_scheme="dynamic", block=(128, 128)):
    """transformers' ``FP8Experts`` holding ``experts``' weights quantized by transformers' ``Fp8Quantize``."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.moe import use_experts_implementation

    cls = use_experts_implementation(
        experts_class=fg.FP8Experts, experts_interface=fg.ALL_FP8_EXPERTS_FUNCTIONS, has_bias=False, has_gate=True
    )
    qconfig = FineGrainedFP8Config(weight_block_size=list(block))
    fp8 = cls(config=config, block_size=block, activation_scheme=activation_scheme, scale_fmt=scale_fmt)
    quantize = fg.Fp8Quantize(types.SimpleNamespace(quantization_config=qconfig))
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            value = getattr(experts, name).data
            out = quantize._quantize_one(name, value)
            if f"{name}_scale_inv" not in out:
                # Fp8Quantize leaves a weight whose dims are not whole blocks unquantized (down_proj with I = 64);
                # a pre-quantized checkpoint has it in short edge blocks, as moekit quantizes it.
                codes, scale = quantize_weight(value.float(), "fp8_e4m3", "block", block)
                out = {name: codes, f"{name}_scale_inv": scale}
            getattr(fp8, name).copy_(out[name])
            scale = getattr(fp8, f"{name}_scale_inv")
            # min_sf_out=2 leaves room for a second gate/up scale row that transformers never reads when
            # 2I <= 128: a huge value there shows at once if moekit read it.
            scale.fill_(1e6)
            rows = out[f"{name}_scale_inv"].shape[1]
            scale[:, :rows].copy_(out[f"{name}_scale_inv"])
    return fp8


def _model(inter: int, family: str = "qwen3_moe", **kw):
    model = build(family, hidden_size=HIDDEN, moe_intermediate_size=inter, num_hidden_layers=1)
    block = model.model.layers[0].mlp
    fp8 = _fp8_experts(block.experts, model.config, **kw)
    return model, block, fp8


def _inputs(n_experts: int, tokens: int = 9, top_k: int = 2):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    ids = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    return x, ids, weights


@pytest.mark.parametrize("inter", [128, 256, 64])
def test_fp8_experts_run_on_moekit(inter):
    """128 and 256: transformers' and moekit's scale rows agree; 64: 2I = 128, one transformers row block,
    the min_sf_out=2 second row unread."""
    model, block, fp8 = _model(inter)
    model.config._experts_implementation = "moekit"
    x, ids, w = _inputs(fp8.num_experts)
    with torch.no_grad():
        out = fp8(x, ids, w)
        model.config._experts_implementation = "eager"
        bf16 = block.experts(x, ids, w)
    assert_close(out, bf16, name="fp8 experts vs unquantized", tol=FP8)
    # The mapped scales dequantize to exactly the weights transformers' fp8 kernels multiply.
    w13, w2, quant = fp8_weights(fp8)
    assert w13.data_ptr() == fp8.gate_up_proj.data_ptr() and w2.data_ptr() == fp8.down_proj.data_ptr()
    theirs = fg._dequantize_fp8_weight(fp8.gate_up_proj, fp8.gate_up_proj_scale_inv, [128, 128], torch.float32)
    ours = dequantize_weight(w13, quant.w13_scale, "block", (128, 128), gate_rows=inter)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    theirs = fg._dequantize_fp8_weight(fp8.down_proj, fp8.down_proj_scale_inv, [128, 128], torch.float32)
    torch.testing.assert_close(dequantize_weight(w2, quant.w2_scale, "block", (128, 128)), theirs, rtol=0, atol=0)
    ref = reference_quantized_experts(x, w13, w2, w, ids, quant)
    assert_close(out, ref.float(), name="fp8 experts vs quantized reference", tol=QUANT_REFERENCE_TOLERANCE)


def test_fp8_model_logits_with_moekit_experts():
    model, block, fp8 = _model(128)
    ids = input_ids()
    with torch.no_grad():
        bf16 = model(input_ids=ids, use_cache=False).logits
        block.experts = fp8
        model.set_experts_implementation("moekit")
        out = model(input_ids=ids, use_cache=False).logits
    assert_close(out, bf16, name="fp8 model logits", tol=FP8)


def _unsupported_cases():
    yield "intermediate size 192, not a multiple of 128", dict(inter=192)
    yield "activation_scheme='static'", dict(inter=128, activation_scheme="static")
    yield "weight_block_size=(64, 64)", dict(inter=128, block=(64, 64))
    if hasattr(torch, "float8_e8m0fnu"):
        yield "float8_e8m0fnu weight scales (scale_fmt='ue8m0')", dict(inter=128, scale_fmt="ue8m0")


@pytest.mark.parametrize("expected, kw", list(_unsupported_cases()), ids=lambda v: str(v)[:30])
def test_fp8_variants_moekit_cannot_express_fall_back_naming_why(expected, kw, monkeypatch):
    inter = kw.pop("inter")
    model, _, fp8 = _model(inter, **kw) if "scale_fmt" not in kw else _ue8m0_model(inter)
    reason = fp8_unsupported(fp8)
    assert reason is not None and expected in reason, reason
    with pytest.raises(NotImplementedError, match=re.escape(expected)):
        fp8_weights(fp8)
    called = []
    monkeypatch.setattr(fg, "fp8_grouped_mm_experts_forward", lambda m, x, i, w: called.append(m) or x)
    monkeypatch.setattr(mh.experts, "_WARNED", set())
    model.config._experts_implementation = "moekit"
    x, ids, w = _inputs(fp8.num_experts)
    with pytest.warns(RuntimeWarning, match="grouped_mm"):
        fp8(x, ids, w)
    assert called == [fp8]


def _ue8m0_model(inter: int):
    """ue8m0 scales: Fp8Quantize rounds them to powers of two stored as float8_e8m0fnu."""
    model, block, fp8 = _model(inter)
    e8m0 = torch.float8_e8m0fnu
    for name in ("gate_up_proj_scale_inv", "down_proj_scale_inv"):
        scale = getattr(fp8, name)
        setattr(fp8, name, torch.nn.Parameter(scale.data.clamp(max=1.0).to(e8m0), requires_grad=False))
    return model, block, fp8


def test_fp8_quiet_when_supported():
    model, _, fp8 = _model(128)
    model.config._experts_implementation = "moekit"
    x, ids, w = _inputs(fp8.num_experts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            fp8(x, ids, w)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_convert_fp8_block_shares_codes_and_scales(family):
    from moekit.hf.convert import HFMoE
    from moekit.quant.fp8 import Fp8BlockMoEMethod

    model, block, fp8 = _model(128, family)
    ids = input_ids()
    with torch.no_grad():
        bf16 = model(input_ids=ids, use_cache=False).logits
        block.experts = fp8
        model.config._experts_implementation = "moekit"
        on_moekit = model(input_ids=ids, use_cache=False).logits
        assert mh.convert(model) == 1
        out = model(input_ids=ids, use_cache=False).logits
    moe = model.model.layers[0].mlp
    assert isinstance(moe, HFMoE) and isinstance(moe.routed_experts.quant_method, Fp8BlockMoEMethod)
    routed = moe.routed_experts
    # The fp8 codes and fp32 scales are the block's own tensors: no dequantized copy, memory not doubled.
    assert routed.w13 is fp8.gate_up_proj and routed.w2 is fp8.down_proj
    assert routed.w13_scale is fp8.gate_up_proj_scale_inv and routed.w2_scale is fp8.down_proj_scale_inv
    assert {p.dtype for p in routed.parameters()} == {torch.float8_e4m3fn, torch.float32}
    assert_close(out, bf16, name="converted fp8 logits", tol=FP8)
    assert_close(out, on_moekit, name="converted vs experts implementation", tol=QUANT_REFERENCE_TOLERANCE)
    # Saved under the block's names and layout, and loaded back.
    state = model.state_dict()
    prefix = "model.layers.0.mlp.experts."
    for name in ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv"):
        assert state[prefix + name].data_ptr() == getattr(fp8, name).data_ptr(), name
    assert not any("routed_experts" in k for k in state)
    model.load_state_dict(state)


@pytest.mark.parametrize(
    "expected, kw",
    [
        ("intermediate size 64, not a multiple of 128", dict(inter=64)),
        ("intermediate size 192, not a multiple of 128", dict(inter=192)),
        ("activation_scheme='static'", dict(inter=128, activation_scheme="static")),
    ],
)
def test_convert_refuses_fp8_variants_naming_why(expected, kw):
    inter = kw.pop("inter")
    model, block, fp8 = _model(inter, **kw)
    block.experts = fp8
    with pytest.raises(NotImplementedError, match=re.escape(expected)):
        mh.convert(model)
    assert block.experts is fp8  # the model is left untouched


def test_convert_fp8_in_a_bf16_model_with_an_fp32_router():
    # from_pretrained keeps DeepSeek-V3's gate.weight in fp32 in a bf16 model (_keep_in_fp32_modules_strict): the
    # converted layer computes in the model's bf16 (its embeddings'), not the router's fp32, and runs.
    model, block, fp8 = _model(128, "deepseek_v3")
    model.to(torch.bfloat16)
    block.gate.weight.data = block.gate.weight.data.float()
    ids = input_ids()
    with torch.no_grad():
        block.experts = fp8
        model.config._experts_implementation = "moekit"
        on_moekit = model(input_ids=ids, use_cache=False).logits
        assert mh.convert(model) == 1
        moe = model.model.layers[0].mlp
        assert moe.routed_experts.params_dtype == torch.bfloat16 and moe.gate.weight.dtype == torch.float32
        out = model(input_ids=ids, use_cache=False).logits
    assert_close(out.float(), on_moekit.float(), name="converted vs experts implementation, bf16", tol=FP8)


def test_convert_refuses_a_quantized_shared_mlp_by_name():
    # transformers' fp8 DeepSeek-V3 quantizes its shared MLP too (FP8Linear: an nn.Linear holding e4m3 codes and
    # weight_scale_inv); read as values its codes would be a wrong MLP. Refused up front, naming it.
    from transformers.integrations.finegrained_fp8 import FP8Linear

    model, block, fp8 = _model(128, "deepseek_v3")
    block.experts = fp8
    shared = block.shared_experts
    quantized = FP8Linear(shared.gate_proj.in_features, shared.gate_proj.out_features, block_size=(128, 128))
    shared.gate_proj = quantized
    with pytest.raises(NotImplementedError, match=r"a quantized shared MLP \(FP8Linear with float8_e4m3fn weights\)"):
        mh.convert(model)
    assert block.experts is fp8 and shared.gate_proj is quantized  # the model is left untouched

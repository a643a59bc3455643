"""fused_experts on every available backend: edge cases against the fp64 reference, and bad inputs."""

import pytest
import torch

from moekit import Activation, fused_experts
from moekit.kernel import available_backends
from moekit.testing import assert_close, make_moe_inputs, reference_experts

BACKENDS = available_backends("cpu")
# Small shapes: the Triton backend runs in the interpreter on CPU. fp16/fp32 only (bf16 tl.dot is wrong there).
CASES = [
    # (T, E, H, I, K, comment)
    (1, 4, 32, 16, 2, "single token"),
    (7, 8, 48, 40, 2, "odd T"),
    (33, 8, 40, 24, 1, "top_k = 1"),
    (5, 6, 32, 16, 6, "top_k = E"),
    (9, 256, 32, 16, 8, "E >= 256, most experts empty"),
    (13, 8, 33, 17, 3, "odd H and I"),
]


def _run(inputs, backend, **kw):
    return fused_experts(**inputs, backend=backend, **kw)


def _ref(inputs, **kw):
    keys = {"hidden_states": "x_TH", "w13": "w13_E2IH", "w2": "w2_EHI", "topk_weights": "topk_weights_TK",
            "topk_ids": "topk_ids_TK", "w13_bias": "w13_bias_E2I", "w2_bias": "w2_bias_EH"}
    return reference_experts(**{keys[k]: v for k, v in inputs.items()}, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,E,H,I,K,comment", CASES, ids=[c[-1] for c in CASES])
def test_matches_reference(backend, dtype, T, E, H, I, K, comment):
    inputs = make_moe_inputs(T, E, H, I, K, dtype=dtype, seed=T * 31 + E)
    out = _run(inputs, backend)
    assert out.dtype == dtype and out.shape == (T, H)
    assert_close(out, _ref(inputs), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu2", "swigluoai",
                                        Activation(name="silu", limit=0.5)], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_activations_and_biases(backend, activation, bias):
    inputs = make_moe_inputs(11, 8, 32, 24, 2, activation=activation, bias=bias, seed=3)
    out = _run(inputs, backend, activation=activation)
    assert_close(out, _ref(inputs, activation=activation), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_with_no_tokens(backend):
    inputs = make_moe_inputs(16, 8, 32, 16, 2, empty_experts=(0, 3, 7), seed=4)
    assert not torch.isin(inputs["topk_ids"], torch.tensor([0, 3, 7], dtype=torch.int32)).any()
    assert_close(_run(inputs, backend), _ref(inputs), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_on_one_expert(backend):
    inputs = make_moe_inputs(37, 8, 32, 16, 1, seed=5)
    inputs["topk_ids"] = torch.full_like(inputs["topk_ids"], 5)
    assert_close(_run(inputs, backend), _ref(inputs), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend):
    inputs = make_moe_inputs(0, 8, 32, 16, 2)
    out = _run(inputs, backend)
    assert out.shape == (0, 32) and out.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_map_skips_remote_experts(backend):
    inputs = make_moe_inputs(19, 8, 32, 16, 3, seed=6)
    expert_map = torch.tensor([-1, 0, -1, 1, 2, -1, 3, -1], dtype=torch.int32)
    local = {k: v for k, v in inputs.items()}
    local["w13"] = inputs["w13"][[1, 3, 4, 6]]
    local["w2"] = inputs["w2"][[1, 3, 4, 6]]
    out = _run(local, backend, expert_map=expert_map)
    assert_close(out, _ref(local, expert_map=expert_map), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [1, 3])  # K > 1: x is expanded to one scaled row per (token, expert)
def test_apply_router_weight_on_input(backend, top_k):
    inputs = make_moe_inputs(9, 4, 32, 16, top_k, seed=7)
    out = _run(inputs, backend, apply_router_weight_on_input=True)
    assert_close(out, _ref(inputs, apply_router_weight_on_input=True), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_modified(backend):
    inputs = make_moe_inputs(10, 8, 32, 16, 2, bias=True, seed=8)
    before = {k: v.clone() for k, v in inputs.items()}
    _run(inputs, backend, apply_router_weight_on_input=False)
    for k, v in inputs.items():
        assert torch.equal(v, before[k]), k


def test_bf16_on_torch_backend():
    inputs = make_moe_inputs(21, 8, 64, 32, 2, dtype=torch.bfloat16, seed=9)
    assert_close(_run(inputs, "torch"), _ref(inputs), torch.bfloat16)


def test_nan_in_one_token_stays_in_that_row():
    inputs = make_moe_inputs(6, 4, 32, 16, 2, seed=10)
    inputs["hidden_states"][2, 0] = float("nan")
    out = _run(inputs, "torch")
    assert torch.isnan(out[2]).all()
    assert torch.isfinite(out[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", ["fp8_block", "fp8_channel", "int8_channel", "fp8_tensor"])
def test_nan_in_one_token_of_an_8bit_layer(backend, scheme):
    # The activation quantization dropped a NaN: its group took the all-zero branch (scale 0), or the kernel's max
    # and clamp ignored it; a per-tensor scale then zeroed every token. Now the token's output is NaN and the
    # others are what they are without it (per-tensor scaling: one NaN makes every token NaN, as one scale serves
    # all).
    _check_nan_token(backend, scheme, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["fp8_block", "fp8_channel", "int8_channel", "fp8_tensor"])
def test_gpu_nan_in_one_token_of_an_8bit_layer(scheme):
    _check_nan_token("triton", scheme, "cuda")


def _check_nan_token(backend, scheme, device):
    import moekit
    from moekit import MoE, MoEConfig

    moe = MoE(MoEConfig(num_experts=4, top_k=2, hidden_size=128, intermediate_size=128, backend=backend),
              device=device)
    moekit.quantize(moe.requires_grad_(False), scheme)
    x = torch.randn(6, 128, device=device)
    with torch.no_grad():
        clean = moe(x)
        x[2, 7] = float("nan")
        out = moe(x)
    if scheme == "fp8_tensor":
        assert torch.isnan(out).all()
    else:
        assert torch.isnan(out[2]).all()
        # (not bit for bit: token 2's routing changed, and with it the other tokens' GEMM batches)
        assert_close(out[[0, 1, 3, 4, 5]], clean[[0, 1, 3, 4, 5]].double(), torch.float32)


# ---- bad inputs: each error names the argument and the expected vs actual -------------------------------
def _good():
    return make_moe_inputs(4, 8, 32, 16, 2)


@pytest.mark.parametrize(
    "change, err, match",
    [
        (lambda d: d.update(hidden_states=d["hidden_states"][:, :31]), ValueError, r"hidden_states: expected hidden size H = 32"),
        (lambda d: d.update(hidden_states=d["hidden_states"][0]), ValueError, r"hidden_states: expected a 2-d tensor \[T, H\], got shape \(32,\)"),
        (lambda d: d.update(hidden_states=d["hidden_states"].half()), TypeError, r"w13: expected dtype float16 \(the dtype of hidden_states\), got float32"),
        (lambda d: d.update(w2=d["w2"][:, :, :15]), ValueError, r"w2: expected shape \(8, 32, 16\)"),
        (lambda d: d.update(w13=d["w13"][:, :31]), ValueError, r"w13: gated activation 'silu' needs an even row count"),
        (lambda d: d.update(topk_ids=d["topk_ids"].clone().fill_(8)), ValueError, r"topk_ids: expected values in \[0, E=8\), got values in \[8, 8\]"),
        (lambda d: d.update(topk_ids=d["topk_ids"] - d["topk_ids"].max() - 1), ValueError, r"topk_ids: expected values in \[0, E=8\), got values in \[-"),
        (lambda d: d.update(topk_ids=d["topk_ids"].float()), TypeError, r"topk_ids: expected an integer dtype"),
        (lambda d: d.update(topk_ids=d["topk_ids"][:, :1]), ValueError, r"topk_ids: expected the shape of topk_weights \(4, 2\), got \(4, 1\)"),
        (lambda d: d.update(topk_ids=d["topk_ids"][:3], topk_weights=d["topk_weights"][:3]), ValueError, r"topk_ids: expected T = 4 rows"),
        (lambda d: d.update(w13_bias=torch.zeros(8, 31)), ValueError, r"w13_bias: expected shape \(8, 32\)"),
        (lambda d: d.update(w2_bias=torch.zeros(8)), ValueError, r"w2_bias: expected a 2-d tensor"),
        (lambda d: d.update(hidden_states=[[1.0]]), TypeError, r"hidden_states: expected a torch.Tensor, got list"),
        (lambda d: d.update(hidden_states=d["hidden_states"].int()), TypeError, r"hidden_states: expected dtype in"),
    ],
)
def test_bad_inputs(change, err, match):
    d = _good()
    change(d)
    with pytest.raises(err, match=match):
        fused_experts(**d, backend="torch")


def test_bad_activation_and_backend():
    d = _good()
    with pytest.raises(ValueError, match=r"activation: expected one of \['silu'"):
        fused_experts(**d, activation="swish")
    with pytest.raises(ValueError, match="backend: expected one of"):
        fused_experts(**d, backend="cutlass")
    for quant in ("fp8", None):  # an AttributeError naming nothing before
        with pytest.raises(TypeError, match="quant: expected a moekit QuantParams"):
            fused_experts(**d, quant=quant)


def _strided(t):
    """The same values as ``t`` in a view whose every stride is doubled (no dense copy hides a stride bug)."""
    return torch.stack([t, torch.full_like(t, 7)], dim=-1)[..., 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_layouts(backend):
    # Strided x, routing, biases and expert map; column-major w13/w2 (a transposed checkpoint viewed back).
    d = make_moe_inputs(7, 8, 32, 16, 2, bias=True, seed=11)
    expert_map = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7], dtype=torch.int32).flip(0)
    ref = _ref(d, expert_map=expert_map)
    for k in ("hidden_states", "topk_ids", "topk_weights", "w13_bias", "w2_bias"):
        d[k] = _strided(d[k])
    d["w13"] = d["w13"].transpose(1, 2).contiguous().transpose(1, 2)
    d["w2"] = d["w2"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(d[k].is_contiguous() for k in d)
    assert_close(_run(d, backend, expert_map=_strided(expert_map)), ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_on_input_with_expert_map_and_biases(backend):
    d = make_moe_inputs(6, 8, 32, 16, 2, bias=True, seed=12)
    expert_map = torch.tensor([-1, 0, -1, 1, -1, 2, -1, 3], dtype=torch.int32)
    for k in ("w13", "w2", "w13_bias", "w2_bias"):
        d[k] = d[k][[1, 3, 5, 7]]
    kw = {"expert_map": expert_map, "apply_router_weight_on_input": True}
    assert_close(_run(d, backend, **kw), _ref(d, **kw), torch.float32)


def test_bad_expert_map():
    d = _good()
    with pytest.raises(ValueError, match=r"expert_map: expected values in \[-1, 8\)"):
        fused_experts(**d, expert_map=torch.tensor([0, 9, -1, 1, 2, 3, 4, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="expert_map: each local expert id may appear once"):
        fused_experts(**d, expert_map=torch.tensor([0, 0, 1, 2, 3, 4, 5, 6], dtype=torch.int32))
    with pytest.raises(TypeError, match="expert_map: expected int32 or int64"):
        fused_experts(**d, expert_map=torch.arange(8, dtype=torch.uint8))


@pytest.mark.parametrize("flag", ["apply_router_weight_on_input", "check_ids"])
def test_bool_flags_reject_non_bools(flag):
    # "no" is truthy: it switched weights-on-input on (and a falsy 0 would have skipped the id check).
    d = make_moe_inputs(3, 4, 16, 8, 2)
    with pytest.raises(TypeError, match=f"{flag}: expected a bool, got str 'no'"):
        fused_experts(d["hidden_states"], d["w13"], d["w2"], d["topk_weights"], d["topk_ids"], **{flag: "no"})

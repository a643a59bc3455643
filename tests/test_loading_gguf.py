"""moekit.loading_gguf and MoE.from_pretrained on a .gguf file: tiny files written with gguf.GGUFWriter, every loaded
weight checked bit-exactly against gguf.quants.dequantize (the independent reference), the layer's output against
fp64 einsums on those weights."""

import warnings

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from moekit import MoE  # noqa: E402
from moekit.checkpoint_gguf import GGUFCheckpoint, gguf_config  # noqa: E402
from moekit.loading import load_moe  # noqa: E402
from moekit import loading_gguf  # noqa: E402
from moekit.loading_gguf import gguf_quant_method, load_gguf  # noqa: E402
from moekit.quant.wna16 import dequantized_weights  # noqa: E402
from moekit.testing import (  # noqa: E402
    QUANT_REFERENCE_TOLERANCE,
    TOLERANCES,
    Tolerance,
    assert_close,
    reference_experts,
)
from tests.gguf_files import E, H, I, K, T, gguf_dequantize, write_gguf  # noqa: E402


def _expected_weights(path, block="blk.1"):
    gate, up, down = (gguf_dequantize(path, f"{block}.ffn_{p}_exps.weight") for p in ("gate", "up", "down"))
    return torch.cat([gate, up], dim=1), down


def _inputs(moe, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(9, moe.config.hidden_size, generator=g) / 10).to(dtype)  # T = 9: odd, several per expert
    logits = torch.randn(9, E, generator=g)
    weights, ids = torch.softmax(logits, -1).topk(K, dim=-1)
    return x, weights, ids.to(torch.int32)


def _check_output(moe, w13, w2, dtype):
    x, weights, ids = _inputs(moe, dtype)
    with torch.no_grad():
        out = moe(x, topk_weights=weights, topk_ids=ids)
    expected = reference_experts(x, w13, w2, weights, ids, activation=moe.routed_experts.activation)
    rounding = TOLERANCES[dtype]
    tol = Tolerance(max=max(QUANT_REFERENCE_TOLERANCE.max, rounding.max),
                    rms=max(QUANT_REFERENCE_TOLERANCE.rms, rounding.rms))
    assert_close(out, expected, tol=tol, name="vs fp64 on gguf-dequantized weights")


@pytest.mark.parametrize(("types", "scheme"), [
    ((T.Q4_0, T.Q4_0, T.Q4_0), "w4a16_g32"),
    ((T.Q8_0, T.Q8_0, T.Q8_0), "w8a16_g32"),
    ((T.Q4_0, T.Q4_0, T.Q8_0), "w8a16_g32"),   # down in a higher type: Q4_0 widened to 8-bit codes, exact
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("hidden", "inter"), [(H, I), (256, 512)])  # I != H: a swapped [N, K] shows
def test_from_pretrained_packed_bit_exact(tmp_path, types, scheme, dtype, hidden, inter):
    path = tmp_path / "model.gguf"
    write_gguf(path, types=types, hidden=hidden, inter=inter)
    moe = MoE.from_pretrained(path, layer=1, dtype=dtype)
    experts = moe.routed_experts
    assert experts.quant_method.name == scheme
    assert experts.w13.dtype == torch.uint8 and experts.w13_scale.shape == (E, 2 * inter, hidden // 32)
    assert experts.w2_scale.shape == (E, hidden, inter // 32)
    w13, w2 = _expected_weights(path)
    got13, got2 = dequantized_weights(experts)
    assert torch.equal(got13, w13) and torch.equal(got2, w2)
    assert torch.equal(moe.gate.weight.float(), gguf_dequantize(path, "blk.1.ffn_gate_inp.weight").to(dtype).float())
    _check_output(moe, w13, w2, dtype)


@pytest.mark.parametrize(("hidden", "inter"), [(H, I), (256, 512)])  # I != H: a swapped [N, K] shows
def test_from_pretrained_dequantizes_k_quants_and_says_so(tmp_path, hidden, inter):
    path = tmp_path / "model.gguf"
    write_gguf(path, types=(T.Q8_0, T.Q8_0, T.Q4_K), hidden=hidden, inter=inter)  # Q4_K_M-like: K-quant down
    assert gguf_quant_method(GGUFCheckpoint(path), "blk.1") is None
    with pytest.warns(UserWarning, match=r"blk.1.ffn_down_exps.weight \(Q4_K -> torch.float32\)"):
        moe = MoE.from_pretrained(path)  # the only MoE block
    assert moe.routed_experts.quant_method.name == "unquantized"
    w13, w2 = _expected_weights(path)
    assert torch.equal(moe.routed_experts.w13, w13) and torch.equal(moe.routed_experts.w2, w2)
    _check_output(moe, w13, w2, torch.float32)


@pytest.mark.parametrize("kind", [T.Q4_0, T.Q8_0, T.F16])
def test_load_into_an_unquantized_layer_dequantizes(tmp_path, kind):
    # The dequantize-at-load path forced on packable types: the values are gguf's, bit for bit.
    path = tmp_path / "model.gguf"
    write_gguf(path, types=(kind,) * 3)
    moe = MoE(gguf_config(path, 1), dtype=torch.float32)
    report = load_moe(moe, path, "blk.1")
    assert report.ok and report.layout == "gguf" and not report.packed
    assert report.types["blk.1.ffn_up_exps.weight"] == kind.name
    assert sorted(report.dequantized) == sorted(f"blk.1.ffn_{p}_exps.weight" for p in ("gate", "up", "down"))
    w13, w2 = _expected_weights(path)
    assert torch.equal(moe.routed_experts.w13, w13) and torch.equal(moe.routed_experts.w2, w2)


def test_slots_load_their_logical_experts(tmp_path):
    # EPLB-style slots (a permutation with one replica): each slot reads its logical expert's rows, as an
    # expert-parallel rank reads only its own.
    path = tmp_path / "model.gguf"
    write_gguf(path, types=(T.Q4_0,) * 3)
    moe = MoE(gguf_config(path, 1), quant_method=gguf_quant_method(path, "blk.1"))
    held = [5, 5, 3, 2, 1, 0]
    moe.routed_experts.set_slot_experts(held, num_logical=E)
    load_gguf(moe, path, "blk.1")
    w13, w2 = _expected_weights(path)
    got13, got2 = dequantized_weights(moe.routed_experts)
    assert torch.equal(got13, w13[held]) and torch.equal(got2, w2[held])


def test_shared_experts_and_gate_qwen2moe(tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, arch="qwen2moe", shared=128, meta={"expert_shared_feed_forward_length": 128})
    cfg = gguf_config(path, 1)
    assert cfg.shared_intermediate_size == 128 and cfg.shared_expert_gate and not cfg.routing.renormalize
    with pytest.warns(UserWarning, match="ffn_gate_shexp.weight \\(Q8_0"):
        moe = MoE.from_pretrained(path, layer=1)
    shared = moe.shared_experts
    gate, up, down = (gguf_dequantize(path, f"blk.1.ffn_{p}_shexp.weight") for p in ("gate", "up", "down"))
    assert torch.equal(shared.gate_up_proj.weight, torch.cat([gate, up]))
    assert torch.equal(shared.down_proj.weight, down)
    assert torch.equal(shared.gate.weight[0], gguf_dequantize(path, "blk.1.ffn_gate_inp_shexp.weight"))


def test_deepseek_correction_bias_loads(tmp_path):
    path = tmp_path / "ds.gguf"
    write_gguf(path, arch="deepseek2", types=(T.Q8_0,) * 3, extra=[("exp_probs_b.bias", ((E,), T.F32))],
               meta={"expert_gating_func": 2})
    moe = MoE.from_pretrained(path, layer=1)
    assert torch.equal(moe.e_score_correction_bias.float(), gguf_dequantize(path, "blk.1.exp_probs_b.bias"))


def test_deepseek_correction_bias_may_rule_out_an_expert(tmp_path):
    # -inf in the correction bias means "never this expert" (the safetensors loader allows it too): not a NaN/inf
    # weight to refuse.
    bias = np.zeros(E, dtype=np.float32)
    bias[1] = -np.inf
    path = tmp_path / "ds.gguf"
    write_gguf(path, arch="deepseek2", types=(T.Q8_0,) * 3, extra=[("exp_probs_b.bias", (bias, T.F32))],
               meta={"expert_gating_func": 2})
    moe = MoE.from_pretrained(path, layer=1)
    assert moe.e_score_correction_bias[1].item() == float("-inf")


def test_load_refusals(tmp_path):
    write_gguf(tmp_path / "m.gguf", layers=(1, 3))
    with pytest.raises(ValueError, match="2 MoE blocks"):
        MoE.from_pretrained(tmp_path / "m.gguf")
    write_gguf(tmp_path / "missing.gguf", skip=("ffn_up_exps.weight",))
    with pytest.raises(KeyError, match=r"missing \['blk.1.ffn_up_exps.weight'\]"):
        MoE.from_pretrained(tmp_path / "missing.gguf", layer=1)
    write_gguf(tmp_path / "odd.gguf", types=(T.Q8_1,) * 3)
    moe = MoE(gguf_config(tmp_path / "odd.gguf"))
    before = moe.routed_experts.w13.clone()
    with pytest.raises(ValueError, match="Q8_1 cannot be dequantized"):
        load_moe(moe, tmp_path / "odd.gguf", "blk.1")
    assert torch.equal(moe.routed_experts.w13, before)  # nothing copied


def test_packed_layer_refuses_what_it_cannot_hold(tmp_path):
    from moekit.quant import WNA16MoEMethod

    path = tmp_path / "model.gguf"
    write_gguf(path, types=(T.Q8_0, T.Q8_0, T.Q4_K))
    cfg = gguf_config(path)
    with pytest.raises(ValueError, match="holds Q8_0 blocks, which w4a16_g32 cannot hold exactly"):
        load_gguf(MoE(cfg, quant_method=WNA16MoEMethod(bits=4, group_size=32)), path, "blk.1")
    with pytest.raises(ValueError, match="holds Q4_K blocks"):
        load_gguf(MoE(cfg, quant_method=WNA16MoEMethod(bits=8, group_size=32)), path, "blk.1")
    with pytest.raises(ValueError, match="group-32 WNA16 layer"):
        load_gguf(MoE(cfg, quant_method=WNA16MoEMethod(bits=8, group_size=128)), path, "blk.1")


def test_no_warning_when_everything_runs_packed(tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, types=(T.Q8_0,) * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoE.from_pretrained(tmp_path, layer=1, dtype=torch.bfloat16)  # a directory holding one .gguf



def test_gpt_oss_biases_load_beside_packed_experts(tmp_path):
    path = tmp_path / "oss.gguf"
    biases = [("ffn_gate_inp.bias", ((E,), T.F32)), ("ffn_gate_exps.bias", ((E, I), T.F32)),
              ("ffn_up_exps.bias", ((E, I), T.F32)), ("ffn_down_exps.bias", ((E, H), T.F32))]
    write_gguf(path, arch="gpt-oss", types=(T.Q8_0,) * 3, extra=biases)
    moe = MoE.from_pretrained(path, prefix="blk.1")
    experts = moe.routed_experts
    assert experts.quant_method.name == "w8a16_g32"
    gate_b, up_b, down_b = (gguf_dequantize(path, f"blk.1.ffn_{p}_exps.bias") for p in ("gate", "up", "down"))
    assert torch.equal(experts.w13_bias, torch.cat([gate_b, up_b], dim=1)) and torch.equal(experts.w2_bias, down_b)
    assert torch.equal(moe.gate.bias, gguf_dequantize(path, "blk.1.ffn_gate_inp.bias"))


def test_from_pretrained_block_choice(tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, types=(T.Q4_0,) * 3, layers=(0, 2))
    assert MoE.from_pretrained(path, prefix="blk.2").routed_experts.quant_method.name == "w4a16_g32"
    with pytest.raises(ValueError, match="layer/prefix: give one"):
        MoE.from_pretrained(path, layer=2, prefix="blk.2")
    with pytest.raises(ValueError, match="prefix: expected a GGUF block name"):
        MoE.from_pretrained(path, prefix="model.layers")
    with pytest.raises(ValueError, match=r"layer: decoder layer 1 .* MoE layers: \[0, 2\]"):
        MoE.from_pretrained(path, layer=1)


def _load_recording(path, device):
    """``MoE.from_pretrained`` of block 1 in bf16 on ``device``, and the warnings it gave (dequantized tensors)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moe = MoE.from_pretrained(path, layer=1, dtype=torch.bfloat16, device=device)
    return moe, sorted(str(w.message) for w in caught)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("arch", "types", "scheme"), [
    ("qwen3moe", (T.Q4_0, T.Q4_0, T.Q4_0), "w4a16_g32"),
    ("qwen3moe", (T.Q8_0, T.Q8_0, T.Q8_0), "w8a16_g32"),
    ("qwen3moe", (T.Q4_0, T.Q4_0, T.Q8_0), "w8a16_g32"),     # Q4_0 widened to 8-bit codes beside Q8_0
    ("qwen2moe", (T.Q8_0, T.Q8_0, T.Q4_K), "unquantized"),   # a K-quant dequantized at load; Q8_0 shared experts
])
def test_gpu_from_pretrained_matches_the_cpu_layer(tmp_path, arch, types, scheme):
    # GGUF blocks loaded straight onto CUDA: the same bytes as a CPU load, and the same output ('auto': the Triton
    # backend there, the torch backend on CPU) for the same router logits, which routing then runs on each device.
    path = tmp_path / "model.gguf"
    shared = 128 if arch == "qwen2moe" else 0
    write_gguf(path, arch=arch, types=types, shared=shared,
               meta={"expert_shared_feed_forward_length": shared} if shared else None)
    cpu, cpu_warnings = _load_recording(path, "cpu")
    gpu, gpu_warnings = _load_recording(path, "cuda")
    assert gpu.routed_experts.quant_method.name == cpu.routed_experts.quant_method.name == scheme
    assert gpu_warnings == cpu_warnings and bool(gpu_warnings) == (scheme == "unquantized" or bool(shared))
    cpu_state, gpu_state = cpu.state_dict(), gpu.state_dict()
    assert sorted(gpu_state) == sorted(cpu_state)
    for name, tensor in gpu_state.items():
        assert tensor.device.type == "cuda", name
        assert tensor.dtype == cpu_state[name].dtype and torch.equal(tensor.cpu(), cpu_state[name]), name
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, H, generator=g) / 10).bfloat16()  # T = 37: odd, several tokens per expert
    with torch.no_grad():
        assert_close(gpu.router_logits(x.cuda()).cpu(), cpu.router_logits(x).double(), name="router logits")
        logits = cpu.router_logits(x)
        want = cpu(x, logits)
        got = gpu(x.cuda(), logits.cuda())
    assert got.device.type == "cuda" and got.dtype == torch.bfloat16 and bool(torch.isfinite(got).all())
    rounding = TOLERANCES[torch.bfloat16]  # the same weights on both sides: only the dots' order and rounding differ
    tol = Tolerance(max=max(QUANT_REFERENCE_TOLERANCE.max, rounding.max),
                    rms=max(QUANT_REFERENCE_TOLERANCE.rms, rounding.rms))
    assert_close(got.cpu(), want.double(), tol=tol, name=f"{scheme} on cuda vs cpu")


@pytest.mark.parametrize("types", [(T.Q4_0,) * 3, (T.Q8_0, T.Q8_0, T.Q4_0)])
def test_packed_load_keeps_every_parameter_on_the_layer_device(tmp_path, types, monkeypatch):
    # meta stands in for CUDA: the scales gathered on the CPU and swapped in with `param.data =` raised here, after
    # the codes were copied. Every parameter stays a Parameter of its device, with its loader. (load_gguf refuses
    # meta layers, which hold no values: that check is bypassed here to follow the device through the steps.)
    monkeypatch.setattr(loading_gguf, "check_materialized", lambda moe: None)
    path = tmp_path / "model.gguf"
    write_gguf(path, types=types)
    moe = MoE(gguf_config(path, 1), dtype=torch.bfloat16, quant_method=gguf_quant_method(path, "blk.1"),
              device="meta")
    experts = moe.routed_experts
    before = {n: (tuple(p.shape), p.dtype) for n, p in experts.named_parameters()}
    load_gguf(moe, path, "blk.1")
    for name, param in experts.named_parameters():
        assert param.device.type == "meta" and not param.requires_grad, name
        assert (tuple(param.shape), param.dtype) == before[name], name  # a meta layer has no values to narrow
    for name in ("w13_scale", "w2_scale"):
        assert getattr(experts, name).weight_loader is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_load_without_a_projection_keeps_its_rows(tmp_path, dtype):
    # strict=False with ffn_up_exps missing: its rows of w13 and w13_scale keep what they held (no uninitialised
    # scales), the others are the file's, exactly.
    path = tmp_path / "model.gguf"
    write_gguf(path, types=(T.Q8_0,) * 3, skip=("ffn_up_exps.weight",))
    moe = MoE(gguf_config(path, 1), dtype=dtype, quant_method=gguf_quant_method(path, "blk.1"))
    experts = moe.routed_experts
    with torch.no_grad():
        experts.w13[:, I:] = 7
        experts.w13_scale[:, I:] = 2.0 ** -30  # a bf16 value fp16 cannot hold: the scales widen, never round
    up_codes, up_scales = experts.w13[:, I:].clone(), experts.w13_scale[:, I:].float()
    report = load_gguf(moe, path, "blk.1", strict=False)
    assert report.missing == ["blk.1.ffn_up_exps.weight"]
    assert torch.equal(experts.w13[:, I:], up_codes)
    assert torch.equal(experts.w13_scale[:, I:].float(), up_scales)
    got13, got2 = dequantized_weights(experts)
    assert torch.equal(got13[:, :I], gguf_dequantize(path, "blk.1.ffn_gate_exps.weight"))
    assert torch.equal(got2, gguf_dequantize(path, "blk.1.ffn_down_exps.weight"))


def test_packed_blocks_that_do_not_fit_fail_before_any_copy(tmp_path, monkeypatch):
    # down's blocks read one block short per row (a truncated file): refused before gate/up are copied.
    path = tmp_path / "model.gguf"
    write_gguf(path, types=(T.Q4_0,) * 3)
    raw = GGUFCheckpoint.raw
    monkeypatch.setattr(GGUFCheckpoint, "raw", lambda self, key, index=None: (
        raw(self, key, index)[..., :-18] if "down" in key else raw(self, key, index)))
    moe = MoE(gguf_config(path, 1), quant_method=gguf_quant_method(path, "blk.1"))
    before = {n: p.clone() for n, p in moe.routed_experts.named_parameters()}
    with pytest.raises(ValueError, match=r"ffn_down_exps.weight'.* codes of shape \(256, 112\)"):
        load_gguf(moe, path, "blk.1")
    for name, param in moe.routed_experts.named_parameters():
        assert torch.equal(param, before[name]), name


def test_dequantized_nonfinite_weights_are_refused(tmp_path, monkeypatch):
    # Dequantized at load (a K-quant), a NaN from a corrupted block scale reached the layer: every token routed to
    # that expert came out NaN.
    path = tmp_path / "model.gguf"
    write_gguf(path, types=(T.Q8_0, T.Q8_0, T.Q4_K))
    dequantize = GGUFCheckpoint.dequantize

    def poisoned(self, key, index=None):
        t = dequantize(self, key, index)
        if "down" in key and index == 2:
            t = t.clone()
            t[0, 0] = float("nan")
        return t

    monkeypatch.setattr(GGUFCheckpoint, "dequantize", poisoned)
    with pytest.raises(ValueError, match=r"ffn_down_exps.weight' \(expert 2\): NaN or inf"):
        MoE.from_pretrained(path)


@pytest.mark.parametrize(("kind", "d"), [(T.Q4_0, 0x7E00), (T.Q8_0, 0x7C00)])  # fp16 NaN, +inf
def test_packed_nonfinite_block_scale_is_refused(tmp_path, monkeypatch, kind, d):
    # A NaN/inf fp16 d makes its block's 32 weights NaN: a corrupted file. (A negative d is not refused: Q4_0
    # stores one by design, llama.cpp's d = max / -8 for the signed value of largest magnitude.)
    path = tmp_path / "model.gguf"
    write_gguf(path, types=(kind,) * 3)
    raw = GGUFCheckpoint.raw

    def poisoned(self, key, index=None):
        t = raw(self, key, index)
        if "down" in key and index == 3:
            t[5, 0:2] = torch.tensor([d & 255, d >> 8], dtype=torch.uint8)  # row 5's first block
        return t

    monkeypatch.setattr(GGUFCheckpoint, "raw", poisoned)
    moe = MoE(gguf_config(path, 1), quant_method=gguf_quant_method(path, "blk.1"))
    with pytest.raises(ValueError, match=rf"ffn_down_exps.weight': expert 3's {kind.name} blocks hold a NaN/inf"):
        load_gguf(moe, path, "blk.1")


def test_meta_layer_is_refused(tmp_path):
    # copy_ into a meta tensor is a no-op: the load reported success and the layer held nothing.
    path = tmp_path / "model.gguf"
    write_gguf(path, types=(T.Q4_0,) * 3)
    for method in (gguf_quant_method(path, "blk.1"), None):  # packed, dequantized
        moe = MoE(gguf_config(path, 1), quant_method=method, device="meta")
        with pytest.raises(ValueError, match=r"moe: gate\.weight is on the meta device .*moe\.to_empty"):
            load_moe(moe, path, "blk.1")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantized_weight_beyond_the_layer_dtype_is_refused(tmp_path, monkeypatch, dtype):
    # Finite in float32 after dequantization, 1e5 became inf in an fp16 layer; bf16 holds it.
    path = tmp_path / "model.gguf"
    write_gguf(path, types=(T.F32,) * 3)
    dequantize = GGUFCheckpoint.dequantize

    def big(self, key, index=None):
        t = dequantize(self, key, index)
        if "down" in key and index == 1:
            t = t.clone()
            t[0, 0] = 1e5
        return t

    monkeypatch.setattr(GGUFCheckpoint, "dequantize", big)
    if dtype == torch.bfloat16:
        assert MoE.from_pretrained(path, dtype=dtype).routed_experts.w2[1, 0, 0] == 99840
        return
    with pytest.raises(ValueError, match=r"ffn_down_exps.weight' \(expert 1\): values beyond the range of the "
                                         r"layer's float16 \(max \|x\| 100000\)"):
        MoE.from_pretrained(path, dtype=dtype)

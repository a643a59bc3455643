"""MoE.from_pretrained on tiny Qwen3-MoE and DeepSeek-V3 checkpoints saved by transformers in bf16, and on
quantized copies of them: fp8 blocks written by transformers' own Fp8Quantize (weight_scale_inv, fp32), and the
compressed-tensors / ModelOpt spellings (weight_scale in bf16 or fp32, per block, row or tensor, input_scale).

Each loaded layer holds exactly the codes and scales written, dequantizes to what transformers' Fp8Dequantize gives,
and computes what the bf16 model's block computes within the quantization tolerance."""

from __future__ import annotations

import json
import re
import types

import pytest
import torch

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from transformers import FineGrainedFP8Config  # noqa: E402
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize  # noqa: E402

from moekit import MoE  # noqa: E402
from moekit.loading import Checkpoint, expert_params_mapping, load_moe  # noqa: E402
from moekit.quant import (  # noqa: E402
    Fp8BlockMoEMethod,
    Fp8TensorMoEMethod,
    UnsupportedQuantization,
    get_quant_method,
)
from moekit.quant.w8a8 import dequantized_weights  # noqa: E402
from moekit.testing import QUANT_TOLERANCES, TOLERANCES, Tolerance, assert_close  # noqa: E402
from tests.hf.tiny_models import build  # noqa: E402

FAMILIES = ["qwen3_moe", "deepseek_v3"]
# Multiples of 128 where the block format needs them: H = 256 (2 blocks), I = 128 (1 block per gate/up half).
SIZES = dict(hidden_size=256, moe_intermediate_size=128, intermediate_size=128)
EXPERT = re.compile(r"\.experts\.\d+\.(gate|up|down)_proj\.weight$")
SHARED = re.compile(r"\.shared_experts\.(gate|up|down)_proj\.weight$")

FP8 = dict(num_bits=8, type="float", symmetric=True, dynamic=False)
CONFIGS = {
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]},
    "ct_block": {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
        "weights": {**FP8, "strategy": "block", "block_structure": [128, 128]},
        "input_activations": {**FP8, "strategy": "group", "group_size": 128, "dynamic": True}}}},
    "ct_channel": {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
        "weights": {**FP8, "strategy": "channel"}, "input_activations": {**FP8, "strategy": "token", "dynamic": True}}}},
    "ct_int8": {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"group_0": {
        "weights": {**FP8, "type": "int", "strategy": "channel"},
        "input_activations": {**FP8, "type": "int", "strategy": "token", "dynamic": True}}}},
    "ct_tensor": {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
        "weights": {**FP8, "strategy": "tensor"}, "input_activations": {**FP8, "strategy": "tensor"}}}},
    "modelopt": {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": None},
}
QDTYPE = {"ct_int8": "int8"}


def _hf_quantizer():
    return types.SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=[128, 128]))


def _scaled_codes(w: torch.Tensor, scale: torch.Tensor, int8: bool = False) -> torch.Tensor:
    """Codes of ``w`` for a given dequant multiplier (broadcast): the formats' own rule, written independently."""
    y = w.float() / scale.float()
    if int8:
        return y.round().clamp(-127, 127).to(torch.int8)
    return y.clamp(-448, 448).to(torch.float8_e4m3fn)


def _quantize(key: str, w: torch.Tensor, scheme: str, tied: float | None, gen: torch.Generator) -> dict:
    base = key.removesuffix("weight")
    if scheme == "fp8":  # transformers' producer, as DeepSeek-V3 / Qwen3-FP8 checkpoints store it
        return Fp8Quantize(_hf_quantizer()).convert({key: w})
    if scheme == "ct_block":  # bf16 block scales, codes made with the stored (rounded) scale
        blocks = w.float().reshape(w.shape[0] // 128, 128, w.shape[1] // 128, 128)
        s = (blocks.abs().amax(dim=(1, 3)) / 448).to(torch.bfloat16)
        full = s.float().repeat_interleave(128, 0).repeat_interleave(128, 1)
        return {key: _scaled_codes(w, full), base + "weight_scale": s}
    if scheme in ("ct_channel", "ct_int8"):
        qmax = 127 if scheme == "ct_int8" else 448
        s = (w.float().abs().amax(dim=1, keepdim=True) / qmax).to(torch.bfloat16)
        return {key: _scaled_codes(w, s, int8=scheme == "ct_int8"), base + "weight_scale": s}
    # per tensor: compressed-tensors [1] bf16 scales; ModelOpt 0-d fp32 with gate/up of an expert tied
    s = torch.tensor(tied if tied is not None else float(w.float().abs().amax()) / 448)
    x_scale = torch.rand((), generator=gen) * 0.02 + 0.01  # static activation scale, different per expert
    if scheme == "ct_tensor":
        s, x_scale = s.reshape(1).to(torch.bfloat16), x_scale.reshape(1).to(torch.bfloat16)
    return {key: _scaled_codes(w, s), base + "weight_scale": s, base + "input_scale": x_scale}


def write_quantized(src, dst, scheme: str) -> None:
    """A quantized copy of the bf16 checkpoint ``src``: routed experts (and DeepSeek's shared experts) quantized."""
    ckpt = Checkpoint(src)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for key in ckpt.keys():
        w = ckpt.get(key)
        if not (EXPERT.search(key) or SHARED.search(key)):
            tensors[key] = w
            continue
        tied = None
        if scheme == "modelopt" and not key.endswith("down_proj.weight"):
            other = ckpt.get(re.sub(r"(gate|up)_proj", lambda m: "up_proj" if m[1] == "gate" else "gate_proj", key))
            tied = float(torch.maximum(w.float().abs().amax(), other.float().abs().amax())) / 448
        tensors.update(_quantize(key, w, scheme, tied, gen))
    dst.mkdir()
    safetensors_torch.save_file(tensors, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": CONFIGS[scheme]}))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (bf16 model, its checkpoint dir, {scheme: quantized checkpoint dir})."""
    out = {}
    for family in FAMILIES:
        model = build(family, **SIZES).to(torch.bfloat16)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path / "bf16")
        quantized = {}
        for scheme in CONFIGS:
            write_quantized(path / "bf16", path / scheme, scheme)
            quantized[scheme] = path / scheme
        out[family] = model, path / "bf16", quantized
    return out


def _x(model):
    return torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)


@pytest.mark.parametrize("family", FAMILIES)
def test_unquantized_matches_the_block(saved, family):
    model, path, _ = saved[family]
    x = _x(model)
    for i, layer in enumerate(model.model.layers):
        moe = MoE.from_pretrained(path, layer=i)
        # config.json's dtype; DeepSeek-V3's router (router_fp32) stays fp32, as transformers keeps it
        assert moe.gate.weight.dtype == (torch.float32 if moe.config.router_fp32 else torch.bfloat16)
        with torch.no_grad():
            assert_close(moe(x), layer.mlp(x).float(), torch.bfloat16)


@pytest.mark.parametrize("scheme", list(CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_checkpoint_loads_exactly_and_runs(saved, family, scheme):
    model, _, quantized = saved[family]
    ckpt = Checkpoint(quantized[scheme])
    x = _x(model)
    for i, prefix in enumerate(ckpt.moe_prefixes()):
        moe = MoE.from_pretrained(quantized[scheme], layer=i)
        experts = moe.routed_experts
        inter = experts.intermediate_size
        w13, w2 = dequantized_weights(experts)
        for e in range(experts.num_experts):
            for proj, codes, scale, rows, deq in (("gate_proj", experts.w13[e, :inter], experts.w13_scale[e], 0, w13[e, :inter]),
                                                  ("up_proj", experts.w13[e, inter:], experts.w13_scale[e], 1, w13[e, inter:]),
                                                  ("down_proj", experts.w2[e], experts.w2_scale[e], None, w2[e])):
                base = f"{prefix}.experts.{e}.{proj}."
                stored = ckpt.get(base + "weight")
                s_key = base + ("weight_scale_inv" if scheme == "fp8" else "weight_scale")
                stored_scale = ckpt.get(s_key)
                if scheme == "ct_tensor" and proj != "down_proj":
                    continue  # w1/w3 scales differ: the smaller shard is requantized to the larger (checked below)
                assert torch.equal(codes.view(torch.uint8), stored.view(torch.uint8)), base
                if scheme in ("ct_block", "ct_channel", "fp8", "ct_int8") and proj != "down_proj":
                    half = scale.shape[0] // 2
                    scale = scale[:half] if rows == 0 else scale[half:]
                assert torch.equal(scale.reshape(stored_scale.shape), stored_scale.float()), s_key
                if scheme != "ct_int8":  # Fp8Dequantize reads the block from the scale grid: rows and tensors too
                    expected = Fp8Dequantize(_hf_quantizer())._dequantize_one(stored, stored_scale.float().reshape(
                        stored_scale.shape if stored_scale.dim() == 2 else (1, 1)), torch.float32)
                    assert torch.equal(deq, expected), base
        if scheme == "ct_tensor":
            gate, up = (ckpt.get(f"{prefix}.experts.0.{p}.weight_scale").float() for p in ("gate_proj", "up_proj"))
            assert experts.w13_scale[0] == torch.maximum(gate, up).squeeze()
        if scheme in ("ct_tensor", "modelopt"):
            inputs = [ckpt.get(k).float().reshape(()) for k in ckpt.keys()
                      if k.startswith(prefix + ".experts.") and k.endswith("input_scale") and "down_proj" not in k]
            assert experts.w13_input_scale == torch.stack(inputs).max()  # one static scale per layer: the max
        with torch.no_grad():
            out = moe(x)
            ref = model.model.layers[i].mlp(x).float()
        tol = QUANT_TOLERANCES[QDTYPE.get(scheme, "fp8_e4m3")]
        bf16 = TOLERANCES[torch.bfloat16]  # the reference block itself runs in bf16
        assert_close(out, ref, tol=Tolerance(max=tol.max + bf16.max, rms=tol.rms + bf16.rms))


def test_only_the_block_is_read(saved, monkeypatch):
    _, _, quantized = saved["deepseek_v3"]
    read = []
    original = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, key: read.append(key) or original(self, key))
    moe = MoE.from_pretrained(quantized["fp8"], prefix="model.layers.1.mlp", backend="torch")
    assert read and all(k.startswith("model.layers.1.mlp.") for k in read)
    assert moe.config.backend == "torch"


def test_mismatched_scales_are_refused_naming_the_tensor(saved, tmp_path):
    _, _, quantized = saved["qwen3_moe"]
    tensors = safetensors_torch.load_file(quantized["fp8"] / "model.safetensors")
    key = "model.layers.0.mlp.experts.3.up_proj.weight_scale_inv"
    tensors[key] = torch.ones(2, 2)  # [⌈128/128⌉, ⌈256/128⌉] = [1, 2] expected
    bad = tmp_path / "bad"
    bad.mkdir()
    safetensors_torch.save_file(tensors, bad / "model.safetensors")
    (bad / "config.json").write_text((quantized["fp8"] / "config.json").read_text())
    with pytest.raises(ValueError, match=re.escape(f"checkpoint key {key!r}: expected shape (1, 2), got (2, 2)")):
        MoE.from_pretrained(bad, layer=0)
    # codes read as values: a quantized checkpoint whose config.json lost its quantization_config
    config = json.loads((bad / "config.json").read_text())
    del config["quantization_config"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json has no quantization_config .*experts\.0\.\w+_proj\.weight' "
                                         r"holds F8_E4M3 codes"):
        MoE.from_pretrained(bad, layer=1)
    plain = MoE(MoE.from_pretrained(quantized["fp8"], layer=1).config, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"experts\.0\.gate_proj\.weight': holds 8-bit codes \(F8_E4M3\)"):
        load_moe(plain, bad, "model.layers.1.mlp")
    # a missing scale is named (both spellings: a compressed-tensors checkpoint stores weight_scale), also under
    # strict=False, which leaves out whole projections but never the scales of loaded codes
    del tensors["model.layers.1.mlp.experts.5.down_proj.weight_scale_inv"]
    safetensors_torch.save_file(tensors, bad / "model.safetensors")
    (bad / "config.json").write_text((quantized["fp8"] / "config.json").read_text())
    key = "model.layers.1.mlp.experts.5.down_proj"
    message = re.escape(f"{key}.weight_scale_inv | {key}.weight_scale: missing from the checkpoint while its codes "
                        f"{key}.weight are there")
    with pytest.raises(ValueError, match=message):
        MoE.from_pretrained(bad, layer=1)
    fresh = MoE.from_pretrained(quantized["fp8"], layer=1)
    before = {n: t.clone() for n, t in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_moe(fresh, bad, "model.layers.1.mlp", strict=False)
    assert all(torch.equal(before[n], t) for n, t in fresh.state_dict().items())  # refused before any copy


def test_unknown_quant_method_and_bad_arguments(saved, tmp_path):
    _, path, _ = saved["qwen3_moe"]
    other = tmp_path / "odd"
    other.mkdir()
    (other / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    config = json.loads((path / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fancy4"}}))
    with pytest.raises(UnsupportedQuantization, match="quant_method: unknown 'fancy4'"):
        MoE.from_pretrained(other, layer=0)
    with pytest.raises(ValueError, match="layer: the checkpoint has 2 MoE blocks; pick one with layer= .*model.layers.0.mlp"):
        MoE.from_pretrained(path)
    with pytest.raises(ValueError, match=r"layer: expected a decoder layer in \[0, num_hidden_layers=2\), got 2"):
        MoE.from_pretrained(path, layer=2)
    with pytest.raises(ValueError, match="layer/prefix: give one"):
        MoE.from_pretrained(path, layer=0, prefix="model.layers.0.mlp")
    with pytest.raises(FileNotFoundError, match="path: expected a checkpoint directory"):
        MoE.from_pretrained(path / "model.safetensors")
    with pytest.raises(ValueError, match="backend"):
        MoE.from_pretrained(path, layer=0, backend="cuda")
    assert MoE.from_pretrained(path, layer=1, dtype=torch.float32).gate.weight.dtype == torch.float32


def test_quantized_layers_load_per_expert_tensors_once(saved):
    _, path, quantized = saved["qwen3_moe"]
    moe = MoE.from_pretrained(quantized["modelopt"], layer=0)
    with pytest.raises(ValueError, match="moe: its per-shard scales were merged by an earlier load"):
        load_moe(moe, quantized["modelopt"], "model.layers.0.mlp")
    fresh = MoE(moe.config, dtype=torch.bfloat16, quant_method=Fp8BlockMoEMethod())
    with pytest.raises(ValueError, match="layout: quantized experts load from per-expert tensors"):
        load_moe(fresh, path, "model.layers.0.mlp", layout="fused")


def test_layer_is_the_decoder_layer_index(saved, tmp_path):
    # layer=i means decoder layer i (model.layers.i.mlp), as MoEConfig.from_hf reads it: with DeepSeek-V3's first
    # layer dense, layer=0 is refused as dense and layer=1 is model.layers.1.mlp, not "the second MoE block".
    model, path, _ = saved["deepseek_v3"]
    dense_first = tmp_path / "dense_first"
    dense_first.mkdir()
    (dense_first / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    config = json.loads((path / "config.json").read_text())
    (dense_first / "config.json").write_text(json.dumps({**config, "first_k_dense_replace": 1}))
    with pytest.raises(ValueError, match="layer: decoder layer 0 of this deepseek_v3 config is dense"):
        MoE.from_pretrained(dense_first, layer=0)
    moe = MoE.from_pretrained(dense_first, layer=1)
    x = _x(model)
    with torch.no_grad():
        assert_close(moe(x), model.model.layers[1].mlp(x).float(), torch.bfloat16)


def _edited(src, dst, edit) -> object:
    """A copy of the single-file checkpoint ``src`` (config.json included) with ``edit(tensors)`` applied."""
    tensors = safetensors_torch.load_file(src / "model.safetensors")
    edit(tensors)
    dst.mkdir()
    safetensors_torch.save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def _state(moe: MoE) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*moe.named_parameters(), *moe.named_buffers()]}


def _assert_state(moe: MoE, before: dict[str, torch.Tensor]) -> None:
    after = _state(moe)
    assert after.keys() == before.keys()
    for name, t in before.items():  # bytes compared: NaN == NaN, and codes exactly
        assert after[name].shape == t.shape and torch.equal(after[name].view(torch.uint8), t.view(torch.uint8)), name


@pytest.mark.parametrize(("scheme", "proj", "bad"), [
    ("fp8", "down_proj", float("nan")),  # a NaN block scale: NaN rows out of every token routed there
    ("fp8", "gate_proj", -1.0),  # a negated block scale flips its block's sign
    ("ct_channel", "up_proj", float("inf")),
    ("ct_tensor", "up_proj", float("nan")),  # the per-tensor merge (amax over w1/w3) would spread it
    ("modelopt", "down_proj", -1.0),
])
def test_bad_weight_scales_are_refused_before_anything_is_copied(saved, tmp_path, scheme, proj, bad):
    _, _, quantized = saved["qwen3_moe"]
    name = "weight_scale_inv" if scheme == "fp8" else "weight_scale"
    key = f"model.layers.0.mlp.experts.2.{proj}.{name}"

    def edit(tensors):
        s = tensors[key].float()
        s.view(-1)[0] = bad if bad != -1.0 else -s.view(-1)[0]
        tensors[key] = s.to(tensors[key].dtype)

    _assert_refused(quantized[scheme], _edited(quantized[scheme], tmp_path / "bad", edit), key, 0,
                    get_quant_method(CONFIGS[scheme]), "weight scales")


def _assert_refused(good, bad, key: str, layer: int, method, what: str) -> None:
    """``from_pretrained(bad)`` refuses ``key``'s values, and ``load_moe`` of it leaves a fresh layer as built."""
    with pytest.raises(ValueError, match=re.escape(f"checkpoint key {key!r}: expected finite non-negative {what}")):
        MoE.from_pretrained(bad, layer=layer)
    fresh = MoE(MoE.from_pretrained(good, layer=layer).config, dtype=torch.bfloat16, quant_method=method)
    before = _state(fresh)
    with pytest.raises(ValueError, match=re.escape(key)):
        load_moe(fresh, bad, f"model.layers.{layer}.mlp")
    _assert_state(fresh, before)


def test_bad_shared_expert_scale_is_refused(saved, tmp_path):
    # DeepSeek-V3 quantizes its shared experts too; dequantized at load, a NaN scale would make the Linear NaN.
    _, _, quantized = saved["deepseek_v3"]
    key = "model.layers.1.mlp.shared_experts.down_proj.weight_scale_inv"
    path = _edited(quantized["fp8"], tmp_path / "bad", lambda t: t[key].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(ValueError, match=re.escape(f"checkpoint key {key!r}: expected finite non-negative weight")):
        MoE.from_pretrained(path, layer=1)


def test_shared_expert_beyond_an_fp16_layer_is_refused(saved, tmp_path):
    # Dequantized into an fp16 layer, codes up to 448 times a scale of 400 exceed fp16's range: the Linear would
    # hold inf. Refused naming the tensor, as a plain float weight beyond the layer's dtype is.
    _, _, quantized = saved["deepseek_v3"]
    key = "model.layers.1.mlp.shared_experts.up_proj.weight_scale_inv"
    path = _edited(quantized["fp8"], tmp_path / "big", lambda t: t[key].view(-1).__setitem__(0, 400.0))
    with pytest.raises(ValueError, match=r"shared_experts\.up_proj\.weight': holds values beyond the range of the "
                                         r"layer's dtype .*the layer is float16"):
        MoE.from_pretrained(path, layer=1, dtype=torch.float16)
    MoE.from_pretrained(path, layer=1)  # bf16 holds them


def test_zero_weight_scale_block_loads(saved, tmp_path):
    # An all-zero block legitimately has scale 0 (its codes are 0): loaded, and the block computes zeros.
    _, _, quantized = saved["qwen3_moe"]
    key = "model.layers.0.mlp.experts.2.down_proj.weight_scale_inv"

    def edit(tensors):
        tensors[key] = torch.zeros_like(tensors[key])
        tensors[key.removesuffix("_scale_inv")] = torch.zeros_like(tensors[key.removesuffix("_scale_inv")])

    moe = MoE.from_pretrained(_edited(quantized["fp8"], tmp_path / "zero", edit), layer=0)
    assert not moe.routed_experts.w2_scale[2].any() and moe.routed_experts.w2_scale[1].all()


@pytest.mark.parametrize("scheme", ["ct_tensor", "modelopt"])
def test_static_input_scales_are_checked_before_anything_is_copied(saved, tmp_path, scheme):
    _, _, quantized = saved["qwen3_moe"]
    prefix = "model.layers.0.mlp"
    good = MoE.from_pretrained(quantized[scheme], layer=0)
    fresh = MoE(good.config, dtype=torch.bfloat16, quant_method=Fp8TensorMoEMethod(static_input_scales=True))
    before = _state(fresh)
    num = good.config.num_experts
    down = [f"{prefix}.experts.{e}.down_proj.input_scale" for e in range(num)]

    # One expert never hit in calibration stores 0: harmless under the layer's max over experts (vLLM loads it).
    zero = _edited(quantized[scheme], tmp_path / "zero", lambda t: t.__setitem__(down[5], torch.zeros_like(t[down[5]])))
    moe = MoE.from_pretrained(zero, layer=0)
    ckpt = Checkpoint(zero)
    assert moe.routed_experts.w2_input_scale == torch.stack([ckpt.get(k).float().reshape(()) for k in down]).max()

    # All zero: no usable scale (every activation would quantize to 0); NaN/inf/negative: refused, the key named.
    def all_zero(t):
        for k in down:
            t[k] = torch.zeros_like(t[k])

    refusals = [(all_zero, r"w2_input_scale: every static activation scale is 0 .*down_proj.input_scale")]
    for i, bad in enumerate((float("nan"), float("inf"), -0.01)):
        key = f"{prefix}.experts.{3 + i}.up_proj.input_scale"
        refusals.append((lambda t, key=key, bad=bad: t.__setitem__(key, torch.full_like(t[key], bad)),
                         re.escape(f"checkpoint key {key!r}: expected finite non-negative static activation scales")))
    for i, (edit, match) in enumerate(refusals):
        bad = _edited(quantized[scheme], tmp_path / f"bad{i}", edit)
        with pytest.raises(ValueError, match=match):
            load_moe(fresh, bad, prefix)
        _assert_state(fresh, before)  # nothing copied, nothing merged
    load_moe(fresh, quantized[scheme], prefix)  # the refused loads left a layer that still loads
    assert fresh.routed_experts.w2_input_scale == good.routed_experts.w2_input_scale


# ---- weight-only 4-bit checkpoints (GPTQ v1, AWQ gemm, compressed-tensors pack-quantized and MXFP4A16), packed
# ---- here by the formats' documented formulas (tests/quant/test_wna16.py), against transformers on the dequantized
# ---- weights

_G = 64
WNA16_CONFIGS = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": _G, "sym": False, "desc_act": False,
             "checkpoint_format": "gptq"},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": _G, "version": "gemm", "zero_point": True},
    "ct_w4a16": {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": _G,
                                           "symmetric": True, "actorder": None}}}},
    "ct_mxfp4": {"quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "strategy": "group",
                                                       "group_size": 32, "symmetric": True}}}},
}
WNA16_NAMES = {"gptq": "w4a16_g64_asym", "awq": "w4a16_g64_asym", "ct_w4a16": "w4a16_g64", "ct_mxfp4": "mxfp4"}


def _write_wna16(src, dst, deq_dst, scheme: str) -> None:
    """A 4-bit copy of ``src`` (routed and shared experts, as GPTQ/AWQ quantize every Linear) and a bf16 copy
    holding the weights its codes mean."""
    from moekit.ops.quantize_mxfp4 import dequantize_mxfp4, quantize_mxfp4
    from moekit.ops.quantize_wna16 import quantize_wna16
    from tests.ops.test_quantize_wna16 import formula
    from tests.quant.test_wna16_loading import _checkpoint_tensors

    fmt = {"ct_w4a16": "compressed-tensors"}.get(scheme, scheme)
    sym = scheme == "ct_w4a16"
    ckpt = Checkpoint(src)
    tensors, dequantized = {}, {}
    for key in ckpt.keys():
        w = ckpt.get(key)
        dequantized[key] = w
        if not (EXPERT.search(key) or SHARED.search(key)):
            tensors[key] = w
            continue
        base = key.removesuffix("weight")
        if scheme == "ct_mxfp4":  # compressed-tensors MXFP4A16 (quantize_mxfp4 makes its producer's bytes)
            codes, scales = quantize_mxfp4(w)
            tensors.update({base + "weight_packed": codes, base + "weight_scale": scales})
            dequantized[key] = dequantize_mxfp4(codes, scales).to(torch.bfloat16)
            continue
        qw = quantize_wna16(w, 4, _G, sym)
        q = torch.stack((qw.qweight & 15, qw.qweight >> 4), dim=-1).flatten(-2)[:, : w.shape[1]].to(torch.int32)
        z = (torch.full_like(qw.scales, 8, dtype=torch.int32) if sym else qw.zeros.to(torch.int32))
        s = qw.scales if fmt == "compressed-tensors" else qw.scales.to(torch.float16)  # GPTQ/AWQ store fp16
        tensors.update({base + k: v for k, v in _checkpoint_tensors(fmt, q, z, s, _G, 4, sym).items()})
        dequantized[key] = formula(q, z, s, _G).to(torch.bfloat16)
    for d, t in ((dst, tensors), (deq_dst, dequantized)):
        d.mkdir()
        safetensors_torch.save_file(t, d / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": WNA16_CONFIGS[scheme]}))
    (deq_dst / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("scheme", list(WNA16_CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)  # deepseek_v3: quantized shared experts, dequantized at load
def test_wna16_checkpoint_matches_transformers_on_dequantized_weights(saved, family, scheme, tmp_path):
    model, path, _ = saved[family]
    _write_wna16(path, tmp_path / scheme, tmp_path / "dequantized", scheme)
    reference = type(model).from_pretrained(tmp_path / "dequantized", dtype=torch.bfloat16).eval()
    x = _x(model)
    for i, layer in enumerate(reference.model.layers):
        moe = MoE.from_pretrained(tmp_path / scheme, layer=i)
        assert moe.routed_experts.quant_method.name == WNA16_NAMES[scheme]
        assert moe.routed_experts.w13.dtype == torch.uint8
        with torch.no_grad():
            assert_close(moe(x), layer.mlp(x).float(), torch.bfloat16)


@pytest.mark.parametrize(("scheme", "name", "bad"), [("gptq", "scales", float("nan")),
                                                   ("awq", "scales", -1.0),
                                                   ("ct_w4a16", "weight_scale", float("inf"))])
@pytest.mark.parametrize("where", ["experts.3.up_proj", "shared_experts.gate_proj"])
def test_bad_wna16_group_scales_are_refused_before_anything_is_copied(saved, tmp_path, scheme, name, bad, where):
    # A NaN/inf group scale gives NaN weights (routed experts, or a shared Linear dequantized at load), a negative
    # one flips its group's sign.
    _, path, _ = saved["deepseek_v3"]
    _write_wna16(path, tmp_path / "good", tmp_path / "dequantized", scheme)
    key = f"model.layers.1.mlp.{where}.{name}"
    edited = _edited(tmp_path / "good", tmp_path / "bad", lambda t: t[key].view(-1).__setitem__(0, bad))
    _assert_refused(tmp_path / "good", edited, key, 1, get_quant_method(WNA16_CONFIGS[scheme]), "group scales")


def test_gptq_act_order_checkpoint_loads_dequantized_on_request(saved, tmp_path):
    # desc_act=True with groups: refused by default; with dequantize_act_order=True the experts load as floats
    # (here g_idx is k // g, so the weights are those of the packed checkpoint).
    model, path, _ = saved["qwen3_moe"]
    _write_wna16(path, tmp_path / "gptq", tmp_path / "dequantized", "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    config["quantization_config"]["desc_act"] = True
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="dequantize_act_order=True"):
        MoE.from_pretrained(tmp_path / "gptq", layer=0)
    with pytest.warns(UserWarning, match="dequantized to torch.bfloat16 at load"):
        moe = MoE.from_pretrained(tmp_path / "gptq", layer=0, dequantize_act_order=True)
    assert moe.routed_experts.quant_method.name == "unquantized" and moe.routed_experts.w13.dtype == torch.bfloat16
    reference = type(model).from_pretrained(tmp_path / "dequantized", dtype=torch.bfloat16).eval()
    x = _x(model)
    with torch.no_grad():
        assert_close(moe(x), reference.model.layers[0].mlp(x).float(), torch.bfloat16)


def _write_gpt_oss_mxfp4(src, dst, deq_dst) -> None:
    """gpt-oss's mxfp4 checkpoint layout of the bf16 checkpoint ``src`` (experts as ``*_blocks`` / ``*_scales`` of
    their [E, N, K] rows, gate/up interleaved as gpt-oss stores them), and a bf16 copy holding what transformers'
    own decoder (``convert_moe_packed_tensors``) reads from those bytes."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moekit.ops.quantize_mxfp4 import quantize_mxfp4

    ckpt = Checkpoint(src)
    tensors, dequantized = {}, {}
    for key in ckpt.keys():
        w = ckpt.get(key)
        if not key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[key] = dequantized[key] = w
            continue
        codes, scales = quantize_mxfp4(w.transpose(1, 2))  # transformers stores [E, K, N]; gpt-oss [E, N, K]
        blocks = codes.unflatten(-1, (codes.shape[-1] // 16, 16))
        tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
        dequantized[key] = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # back to [E, K, N]
    for d, t in ((dst, tensors), (deq_dst, dequantized)):
        d.mkdir()
        safetensors_torch.save_file({k: v.contiguous() for k, v in t.items()}, d / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    quant = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                 "model.layers.*.mlp.router", "lm_head"]}
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    (deq_dst / "config.json").write_text(json.dumps(config))


def test_gpt_oss_mxfp4_nan_scale_is_refused_before_anything_is_copied(tmp_path):
    # e8m0 255 is NaN: a whole group of 32 weights NaN. Refused in the load plan, naming the key (it was refused
    # only after the copy, leaving the layer loaded with it).
    model = build("gpt_oss", hidden_size=64, intermediate_size=96).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    _write_gpt_oss_mxfp4(tmp_path / "bf16", tmp_path / "good", tmp_path / "dequantized")
    key = "model.layers.0.mlp.experts.down_proj_scales"
    bad = _edited(tmp_path / "good", tmp_path / "bad", lambda t: t[key].view(-1).__setitem__(5, 255))
    with pytest.raises(ValueError, match=re.escape(f"checkpoint key {key!r}: e8m0 255")):
        MoE.from_pretrained(bad, layer=0)
    fresh = MoE(MoE.from_pretrained(tmp_path / "good", layer=0).config, dtype=torch.bfloat16,
                quant_method=get_quant_method({"quant_method": "mxfp4"}))
    before = _state(fresh)
    with pytest.raises(ValueError, match=re.escape(key)):
        load_moe(fresh, bad, "model.layers.0.mlp")
    _assert_state(fresh, before)


def test_gpt_oss_mxfp4_checkpoint_matches_transformers_on_dequantized_weights(tmp_path):
    # H and I multiples of 32 (one e8m0 scale per 32 columns); 2I != H, so no layout guess is involved.
    model = build("gpt_oss", hidden_size=64, intermediate_size=96).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    _write_gpt_oss_mxfp4(tmp_path / "bf16", tmp_path / "mxfp4", tmp_path / "dequantized")
    reference = type(model).from_pretrained(tmp_path / "dequantized", dtype=torch.bfloat16).eval()
    x = _x(model)
    for i, layer in enumerate(reference.model.layers):
        moe = MoE.from_pretrained(tmp_path / "mxfp4", layer=i)
        experts = moe.routed_experts
        assert experts.quant_method.name == "mxfp4" and experts.w13.dtype == torch.uint8
        assert experts.w13.shape == (8, 192, 32) and experts.w13_scale.shape == (8, 192, 2)
        with torch.no_grad():
            out = layer.mlp(x)
            assert_close(moe(x), (out[0] if isinstance(out, tuple) else out).float(), torch.bfloat16)


def test_an_engine_loads_8bit_experts_through_expert_params_mapping(saved):
    # An engine driving weight_loader itself with the rows expert_params_mapping lists: given the method's
    # checkpoint_tensors the experts equal MoE.from_pretrained's bit for bit; given only the codes (the default
    # rows), the scales would keep their initial values, and process_weights_after_loading refuses, naming them.
    _, _, quantized = saved["qwen3_moe"]
    want = MoE.from_pretrained(quantized["fp8"], layer=0)
    method = want.routed_experts.quant_method
    tensors = safetensors_torch.load_file(quantized["fp8"] / "model.safetensors")
    prefix = "model.layers.0.mlp."
    for rows, ok in ((method.checkpoint_tensors("weight_scale_inv"), True), ((("", "weight"),), False)):
        moe = MoE(want.config, dtype=torch.bfloat16, quant_method=type(method)())
        for row in expert_params_mapping(want.config.num_experts, tensors=rows):
            param = moe.get_parameter(row.param_name)
            param.weight_loader(param, tensors[prefix + row.weight_name], row.shard_id, row.expert_id)
        if not ok:
            with pytest.raises(ValueError, match=r"w13_scale: expert 0 shard w1: not loaded through weight_loader while "
                                                 r"the tensors it goes with were"):
                moe.routed_experts.process_weights_after_loading()
            continue
        moe.routed_experts.process_weights_after_loading()
        for name in ("w13", "w2", "w13_scale", "w2_scale"):
            got, expected = getattr(moe.routed_experts, name), getattr(want.routed_experts, name)
            assert torch.equal(got.view(torch.uint8) if got.element_size() == 1 else got,
                               expected.view(torch.uint8) if expected.element_size() == 1 else expected), name
    with pytest.raises(ValueError, match="scale_name: expected 'weight_scale' or 'weight_scale_inv'"):
        method.checkpoint_tensors("scale")

"""load_moe / MoE.from_pretrained at the edges of what a checkpoint directory holds: layers on the meta device,
float weights that are not finite in the layer's dtype, integer scales, quantization stated only in ModelOpt's
hf_quant_config.json, config.json dtypes moekit does not build layers in."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors.torch")

from moekit import MoE  # noqa: E402
from moekit.loading import load_moe  # noqa: E402
from moekit.quant import UnsupportedQuantization, get_quant_method  # noqa: E402
from tests.hf.tiny_models import build  # noqa: E402
from tests.test_from_pretrained import CONFIGS, SIZES, _assert_state, _edited, _state, write_quantized  # noqa: E402

PREFIX = "model.layers.1.mlp"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A directory holding bf16/ (a bf16 qwen3_moe, one file) and its ct_channel/ and modelopt/ fp8 copies."""
    model = build("qwen3_moe", **SIZES).to(torch.bfloat16)
    root = tmp_path_factory.mktemp("edges")
    model.save_pretrained(root / "bf16")
    for scheme in ("ct_channel", "modelopt"):
        write_quantized(root / "bf16", root / scheme, scheme)
    return root


def test_meta_layer_is_refused(root):
    # copy_ into a meta tensor is a no-op: the load reported success and the layer held nothing.
    config = MoE.from_pretrained(root / "bf16", layer=1).config
    moe = MoE(config, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match=r"moe: gate\.weight is on the meta device .*materialize it first "
                                         r"\(moe\.to_empty\(device=\.\.\.\)\)"):
        load_moe(moe, root / "bf16", PREFIX)
    for device in ("meta", torch.device("meta")):
        with pytest.raises(ValueError, match="device: 'meta' holds no values"):
            MoE.from_pretrained(root / "bf16", layer=1, device=device)


@pytest.mark.parametrize(("key", "value", "what"), [
    ("experts.0.down_proj.weight", 1e5, "holds values beyond the range of the layer's dtype"),  # > fp16's 65504
    ("experts.3.up_proj.weight", float("nan"), "holds NaN or inf"),  # through RoutedExperts.weight_loader
    ("gate.weight", float("inf"), "holds NaN or inf"),  # the router, a plain copy
])
def test_float_weights_must_be_finite_in_the_layer_dtype(root, tmp_path, key, value, what):
    # A bf16 1e5 became inf in an fp16 layer, a stored NaN loaded as it was: NaN/inf out of every token routed there.
    def edit(tensors):
        tensors[f"{PREFIX}.{key}"][0, 0] = value

    bad = _edited(root / "bf16", tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=rf"checkpoint key '{PREFIX}\.{key}': {what}.*; the layer is float16"):
        MoE.from_pretrained(bad, layer=1, dtype=torch.float16)
    if value == 1e5:  # the value itself is fine where the layer holds it
        assert MoE.from_pretrained(bad, layer=1, dtype=torch.bfloat16).routed_experts.w2[0, 0, 0] == 99840


@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_nan_fp8_codes_are_refused(root, tmp_path, code):
    # e4m3fn's NaNs (0x7F, 0xFF) as weight codes: NaN out of every token routed there, like a NaN scale.
    def edit(tensors):
        tensors[f"{PREFIX}.experts.2.gate_proj.weight"].view(torch.uint8)[1, 3] = code

    bad = _edited(root / "ct_channel", tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=rf"checkpoint key '{PREFIX}\.experts\.2\.gate_proj\.weight': holds NaN fp8 "
                                         "codes"):
        MoE.from_pretrained(bad, layer=1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_integer_weight_scales_are_refused_before_anything_is_copied(root, tmp_path, dtype):
    # Cast into the fp32 scales, a U8 127 (an e8m0-like exponent byte) became 127.0: a silently 127x weight.
    def edit(tensors):
        for k in tensors:
            if ".experts." in k and k.endswith("weight_scale"):
                tensors[k] = torch.full_like(tensors[k], 2, dtype=dtype)

    bad = _edited(root / "ct_channel", tmp_path / "bad", edit)
    config = MoE.from_pretrained(root / "ct_channel", layer=1).config
    fresh = MoE(config, dtype=torch.bfloat16, quant_method=get_quant_method(CONFIGS["ct_channel"]))
    before = _state(fresh)
    name = str(dtype).removeprefix("torch.")
    stored = {"int32": "I32", "uint8": "U8"}[name]
    with pytest.raises(ValueError, match=rf"weight_scale': holds {stored} integers, expected float32 values"):
        load_moe(fresh, bad, PREFIX)
    _assert_state(fresh, before)


def test_modelopt_quantization_in_hf_quant_config_json(root, tmp_path):
    # ModelOpt exports may state their quantization only in hf_quant_config.json: read as unquantized, the fp8 codes
    # were then refused with a hint to do what from_pretrained had done.
    dst = tmp_path / "modelopt"
    shutil.copytree(root / "modelopt", dst)
    config = json.loads((dst / "config.json").read_text())
    algo = config.pop("quantization_config")["quant_algo"]
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedQuantization, match=r"config.json has no quantization_config \(and no "
                                                      r"hf_quant_config.json is beside it\).*holds F8_E4M3 codes"):
        MoE.from_pretrained(dst, layer=1)
    (dst / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt", "version": "0.19"},
        "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}}))
    moe, want = MoE.from_pretrained(dst, layer=1), MoE.from_pretrained(root / "modelopt", layer=1)
    assert moe.routed_experts.quant_method.name == want.routed_experts.quant_method.name == "fp8_tensor"
    got = _state(moe)
    for name, t in _state(want).items():  # the same codes and scales, byte for byte (0-d scales: reshaped)
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("named", ["auto", "float8_e4m3fn", ["bfloat16"]])
def test_config_dtype_moekit_does_not_build_in_warns(root, tmp_path, named):
    # It silently became torch's default dtype.
    dst = tmp_path / "ckpt"
    shutil.copytree(root / "bf16", dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "dtype": named}))
    with pytest.warns(UserWarning, match=rf"config.json dtype {re.escape(repr(named))} is not one of .*; the layer is "
                                         r"built in torch's default dtype float32"):
        moe = MoE.from_pretrained(dst, layer=1)
    assert moe.routed_experts.w13.dtype == torch.float32


def test_from_pretrained_does_not_randomly_initialize_what_it_loads(root, tmp_path, monkeypatch):
    # The strict load fills every routed weight (or raises): their nn.Linear-style uniform init cost ~10x the
    # load on a CPU. A layer built outside from_pretrained still gets random weights.
    want = MoE.from_pretrained(root / "bf16", layer=1)
    sizes = []
    real = torch.Tensor.uniform_

    def uniform_(self, *args, **kwargs):
        sizes.append(self.numel())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "uniform_", uniform_)
    got = MoE.from_pretrained(root / "bf16", layer=1)
    routed = {got.routed_experts.w13.numel(), got.routed_experts.w2.numel()}
    assert not routed & set(sizes)
    for name, t in got.routed_experts.named_parameters():
        assert torch.equal(t, getattr(want.routed_experts, name)), name
    sizes.clear()
    fresh = MoE(got.config, dtype=torch.bfloat16)
    assert routed <= set(sizes) and bool(fresh.routed_experts.w2.abs().sum() > 0)
    # A checkpoint missing one expert's weight: the load raises, no half-filled layer comes back.
    bad = _edited(root / "bf16", tmp_path / "bad", lambda tensors: tensors.pop(f"{PREFIX}.experts.2.down_proj.weight"))
    with pytest.raises(KeyError, match=r"missing .*experts\.2\.down_proj\.weight"):
        MoE.from_pretrained(bad, layer=1)


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.complex64])
def test_router_stored_as_another_float_type(root, tmp_path, dtype):
    # An 8-bit float router loads as its exact values; a complex one is refused naming the key (copy_ kept the real
    # part, silently).
    config = MoE.from_pretrained(root / "bf16", layer=1).config
    key = f"{PREFIX}.gate.weight"
    stored = {}

    def edit(tensors):
        tensors[key] = tensors[key].to(dtype)
        stored["t"] = tensors[key]

    bad = _edited(root / "bf16", tmp_path / "bad", edit)
    moe = MoE(config, dtype=torch.bfloat16)
    if dtype.is_complex:
        with pytest.raises(ValueError, match=rf"checkpoint key '{re.escape(key)}': holds C64 complex numbers"):
            load_moe(moe, bad, PREFIX)
    else:
        load_moe(moe, bad, PREFIX)
        assert torch.equal(moe.gate.weight, stored["t"].to(moe.gate.weight.dtype))

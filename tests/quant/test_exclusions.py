"""Exclusion lists of quantization configs (``moekit.quant.exclusions``): each spelling matched as its producer
matches it (transformers' ``should_convert_module`` and compressed-tensors' ``match_name`` are the oracles where
they exist), and checkpoints whose exclusion list keeps a block's experts unquantized load as float layers."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.quant import UnsupportedQuantization
from moekit.quant.exclusions import excluded, experts_excluded

NAMES = [
    "model.layers.1.mlp.experts.0.gate_proj",
    "model.layers.1.mlp.experts.7.down_proj",
    "model.layers.11.mlp.experts.0.up_proj",
    "model.layers.1.mlp.experts",
    "model.layers.1.mlp.gate",
    "model.layers.1.mlp.shared_experts.gate_proj",
    "model.layers.1.self_attn.q_proj",
    "lm_head",
]
PATTERNS = ["model.layers.1", "model.layers.1.mlp.experts", "mlp.gate", "gate", "lm_head", "gate_proj",
            "model.layers.*.self_attn", r"model.layers.\d+.mlp.experts.0", "experts.0.up_proj", "re:.*experts.*"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_modules_to_not_convert_matches_as_transformers_does(pattern):
    quantizers_utils = pytest.importorskip("transformers.quantizers.quantizers_utils")
    for name in NAMES:
        want = not quantizers_utils.should_convert_module(name, [pattern])
        for method in ("fp8", "mxfp4"):
            got = excluded({"quant_method": method, "modules_to_not_convert": [pattern]}, name) is not None
            assert got == want, (method, pattern, name)


@pytest.mark.parametrize("pattern", PATTERNS + ["re:model\\.layers\\.1\\.mlp\\.experts\\.\\d+\\.(gate|up)_proj$"])
def test_ignore_matches_as_compressed_tensors_does(pattern):
    match = pytest.importorskip("compressed_tensors.utils.match")
    for name in NAMES:
        want = match.match_name(name, pattern)
        for field in ("ignore", "ignored_layers"):
            assert (excluded({"quant_method": "fp8", field: [pattern]}, name) is not None) == want, (pattern, name)


def test_modelopt_wildcards_awq_substrings_and_gptq_dynamic():
    modelopt = {"quant_method": "modelopt", "quantization": {"quant_algo": "FP8",
                                                             "exclude_modules": ["lm_head", "model.layers.1.mlp*"]}}
    assert excluded(modelopt, "model.layers.1.mlp.experts.3.down_proj") == "quantization.exclude_modules: 'model.layers.1.mlp*'"
    assert excluded(modelopt, "model.layers.11.mlp.experts.3.down_proj") is None
    assert excluded({"quant_method": "modelopt", "exclude_modules": ["*experts*"]}, "model.layers.2.mlp.experts.0.w1")
    # AutoAWQ skips a module whose name contains an entry (transformers' boundary rule would not match here).
    awq = {"quant_method": "awq", "modules_to_not_convert": ["experts.1"]}
    assert excluded(awq, "model.layers.0.mlp.experts.12.gate_proj") is not None
    assert excluded(awq, "model.layers.0.mlp.experts.2.gate_proj") is None
    # GPTQModel's dynamic: "-:" keeps a module unquantized; an override of its format is refused, a no-op is not.
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True,
            "dynamic": {r"-:model\.layers\.1\..*": {}, r"+:.*\.experts\.0\..*": {"bits": 4},
                        r".*\.experts\.5\..*": {"bits": 8, "group_size": 128}}}
    assert excluded(gptq, "model.layers.1.mlp.experts.3.up_proj") == r"dynamic: '-:model\\.layers\\.1\\..*'"
    assert excluded(gptq, "model.layers.2.mlp.experts.0.up_proj") is None
    with pytest.raises(UnsupportedQuantization, match=r"dynamic: '\.\*\\\\.experts\\\\.5.*' gives module "
                                                      r"'model.layers.2.mlp.experts.5.up_proj' \{'bits': 8\}"):
        excluded(gptq, "model.layers.2.mlp.experts.5.up_proj")
    with pytest.raises(UnsupportedQuantization, match="modules_to_not_convert: expected a list of module names"):
        excluded({"quant_method": "fp8", "modules_to_not_convert": [3]}, "lm_head")


def test_modelopt_config_json_ignore_is_wildcards():
    # ModelOpt's config.json spells its exclusions "ignore", as wildcards (hf_quant_config.json: exclude_modules).
    qc = {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head", "model.layers.1.mlp*"]}
    assert experts_excluded(qc, "model.layers.1.mlp", ["model.layers.1.mlp.experts.0.w1"])
    assert experts_excluded(qc, "model.layers.11.mlp", ["model.layers.11.mlp.experts.0.w1"]) is None


def test_gptq_dynamic_first_match_decides():
    base = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    name = "model.layers.1.mlp.experts.0.gate_proj"
    # A matching "+:" without a format change keeps the module quantized, later "-:" patterns notwithstanding.
    assert excluded({**base, "dynamic": {r"+:.*mlp\.experts.*": {"bits": 4, "sym": True},
                                         r"-:model\.layers\.1\..*": {}}}, name) is None
    assert excluded({**base, "dynamic": {r"-:model\.layers\.1\..*": {},
                                         r"+:.*mlp\.experts.*": {"bits": 8}}}, name) is not None


@pytest.mark.parametrize(("qc", "message"), [
    ({"quant_method": "fp8", "modules_to_not_convert": {"model.layers.1.mlp.experts": 1}},
     "modules_to_not_convert: expected a list of module names"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": None}}},
     r"config_groups.g.targets: expected a list of module names, got None"),
    ({"quant_method": "gptq", "dynamic": {".*experts.*": [8]}}, r"dynamic\.\.\*experts\.\*: expected an object"),
    ({"quant_method": "compressed-tensors", "ignore": ["re:model.(layers"]}, r"ignore: 're:model.\(layers' is not a "
                                                                             "valid regex"),
    ({"quant_method": "modelopt", "quantization": {"exclude_modules": "lm_head,x"}}, None),
])
def test_malformed_fields_are_refused_naming_them(qc, message):
    name = "model.layers.1.mlp.experts.0.gate_proj"
    if message is None:  # a single string is one pattern, as the formats allow
        assert excluded(qc, name) is None
        return
    with pytest.raises(UnsupportedQuantization, match=message):
        excluded(qc, name)


def test_ignored_layers_has_no_class_names():
    assert excluded({"quant_method": "fp8", "ignored_layers": ["Linear"]}, "model.layers.0.mlp.experts.0.up_proj") \
        is None


def test_compressed_tensors_targets_decide_what_is_quantized():
    def ct(targets, ignore=()):
        return {"quant_method": "compressed-tensors", "ignore": list(ignore),
                "config_groups": {"group_0": {"targets": targets, "weights": {}}}}

    expert = "model.layers.0.mlp.experts.0.gate_proj"
    assert excluded(ct(["Linear"]), expert) is None
    assert excluded(ct(["Linear"], ignore=["re:.*experts.*"]), expert) == "ignore: 're:.*experts.*'"
    assert excluded(ct(["re:.*self_attn.*"]), expert).startswith("config_groups: no group targets it")
    assert excluded(ct(["re:.*mlp.experts.*"]), expert) is None
    with pytest.raises(UnsupportedQuantization, match=r"targets \['Qwen3MoeSparseMoeBlock'\] are class names"):
        excluded(ct(["re:.*self_attn.*", "Qwen3MoeSparseMoeBlock"]), expert)


def test_a_block_is_excluded_whole_or_refused():
    modules = [f"model.layers.1.mlp.experts.{e}.{p}" for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")]
    qc = {"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": ["Linear"]}}}
    assert not experts_excluded(qc, "model.layers.1.mlp", modules)
    assert experts_excluded({**qc, "ignore": modules}, "model.layers.1.mlp", modules)
    # compressed-tensors matches each linear's own name: ignoring the container keeps its linears quantized.
    assert not experts_excluded({**qc, "ignore": ["model.layers.1.mlp.experts"]}, "model.layers.1.mlp", modules)
    # Experts-only checkpoints (RedHatAI's targets) name the linears, never the container.
    experts_only = {**qc, "config_groups": {"g": {"targets": [r"re:.*mlp\.experts\..*(gate|up|down)_proj$"]}}}
    assert not experts_excluded(experts_only, "model.layers.1.mlp", modules)
    attention_only = {**qc, "config_groups": {"g": {"targets": ["re:.*self_attn.*"]}}}
    assert experts_excluded(attention_only, "model.layers.1.mlp", modules).startswith("every expert linear")
    # Rules that name containers exclude the block whatever its linears.
    assert experts_excluded({"quant_method": "fp8", "ignored_layers": ["model.layers.1.mlp.experts"]},
                            "model.layers.1.mlp", modules)
    fused = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.mlp.experts"]}
    assert experts_excluded(fused, "model.layers.1.mlp", ["model.layers.1.mlp.experts"])
    with pytest.raises(UnsupportedQuantization, match=r"3 of the 24 expert modules of 'model.layers.1.mlp' are kept "
                                                      r"unquantized \('model.layers.1.mlp.experts.0.gate_proj', by "
                                                      r"ignore: .*\) but 'model.layers.1.mlp.experts.1.gate_proj' is "
                                                      "quantized"):
        experts_excluded({**qc, "ignore": ["re:.*experts\\.0\\..*"]}, "model.layers.1.mlp", modules)


# --- checkpoints ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    pytest.importorskip("transformers")
    st = pytest.importorskip("safetensors.torch")
    from tests.hf.tiny_models import build
    from tests.test_from_pretrained import SIZES, write_quantized

    model = build("qwen3_moe", **SIZES).to(torch.bfloat16)
    root = tmp_path_factory.mktemp("exclusions")
    model.save_pretrained(root / "bf16")
    out = {}
    for scheme in ("fp8", "ct_block", "modelopt"):
        write_quantized(root / "bf16", root / scheme, scheme)
        out[scheme] = root / scheme
    return model, root, out, st


def _exclude_layer1(root, src, name: str, edit_config) -> object:
    """``src`` with layer 1's routed experts put back in bf16 (their scales dropped) and ``edit_config`` applied to
    its quantization_config."""
    st = pytest.importorskip("safetensors.torch")
    quantized = st.load_file(src / "model.safetensors")
    bf16 = st.load_file(root / "bf16" / "model.safetensors")
    head = "model.layers.1.mlp.experts."
    tensors = {k: v for k, v in quantized.items() if not k.startswith(head)}
    tensors.update({k: v for k, v in bf16.items() if k.startswith(head)})
    dst = root / name
    dst.mkdir()
    st.save_file(tensors, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = edit_config(dict(config["quantization_config"]))
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _with_config(src, dst, edit_config) -> object:
    """A copy of checkpoint ``src`` with ``edit_config`` applied to its quantization_config."""
    dst.mkdir()
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = edit_config(dict(config["quantization_config"]))
    (dst / "config.json").write_text(json.dumps(config))
    return dst


EXPERT_LINEARS = [f"model.layers.1.mlp.experts.{e}.{p}" for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")]


@pytest.mark.parametrize(("scheme", "edit"), [
    ("fp8", lambda qc: {**qc, "modules_to_not_convert": ["lm_head", "model.layers.1.mlp.experts"]}),
    ("ct_block", lambda qc: {**qc, "ignore": ["lm_head", *EXPERT_LINEARS]}),  # llm-compressor lists each linear
    ("modelopt", lambda qc: {**qc, "exclude_modules": ["lm_head", "model.layers.1.mlp*"]}),
])
def test_excluded_experts_load_unquantized(checkpoints, scheme, edit):
    from moekit import MoE
    from moekit.testing import assert_close

    model, root, out, _ = checkpoints
    assert model.config.num_experts == 8  # EXPERT_LINEARS
    path = _exclude_layer1(root, out[scheme], f"{scheme}_excluded", edit)
    moe = MoE.from_pretrained(path, layer=1)
    assert moe.routed_experts.quant_method.name == "unquantized"
    assert moe.routed_experts.w13.dtype == torch.bfloat16
    x = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        assert_close(moe(x), model.model.layers[1].mlp(x).float(), torch.bfloat16)
    # The other layer stays quantized.
    assert MoE.from_pretrained(path, layer=0).routed_experts.quant_method.name != "unquantized"


def test_an_exclusion_the_tensors_contradict_is_refused(checkpoints):
    from moekit import MoE

    _, root, out, _ = checkpoints
    # The config says float, the file holds codes.
    dst = _with_config(out["ct_block"], root / "ct_block_contradicted", lambda qc: {**qc, "ignore": EXPERT_LINEARS})
    with pytest.raises(UnsupportedQuantization, match=r"keeps the experts of 'model.layers.1.mlp' unquantized "
                                                      r"\(every expert linear .*\), but checkpoint key "
                                                      r"'model.layers.1.mlp.experts.0.down_proj.weight' holds F8_E4M3"):
        MoE.from_pretrained(dst, layer=1)


def test_experts_only_targets_load_quantized(checkpoints):
    # llm-compressor recipes that quantize only the experts target their linears by regex: still quantized.
    from moekit import MoE

    _, root, out, _ = checkpoints

    def experts_only(qc):
        group = {**qc["config_groups"]["group_0"], "targets": [r"re:.*mlp\.experts\..*(gate|up|down)_proj$"]}
        return {**qc, "config_groups": {"group_0": group}}

    dst = _with_config(out["ct_block"], root / "ct_block_experts_only", experts_only)
    assert MoE.from_pretrained(dst, layer=1).routed_experts.quant_method.name == "fp8_block"


def test_partly_excluded_experts_are_refused(checkpoints):
    from moekit import MoE

    _, root, out, _ = checkpoints
    path = _exclude_layer1(root, out["ct_block"], "ct_block_partly", lambda qc: {**qc, "ignore": EXPERT_LINEARS[:3]})
    with pytest.raises(UnsupportedQuantization, match="3 of the 24 expert modules of 'model.layers.1.mlp' are kept"):
        MoE.from_pretrained(path, layer=1)

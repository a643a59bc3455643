"""moekit.loading on checkpoints written by transformers' save_pretrained from tiny models (sharded, with an
index), and on a single-file checkpoint in the fused canonical layout. Each loaded MoE must compute what the
original transformers block computes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import moekit.hf as mh  # noqa: E402
from moekit import MoE  # noqa: E402
from moekit.loading import Checkpoint, expert_params_mapping, load_moe, load_moes  # noqa: E402
from moekit.testing import rel_errors  # noqa: E402
from tests.hf.tiny_models import build  # noqa: E402

# (family, block attribute in the decoder layer, layout save_pretrained writes)
SAVED = [
    ("mixtral", "mlp", "per_expert"),  # Mixtral's w1/w2/w3 names under block_sparse_moe
    ("qwen2_moe", "mlp", "per_expert"),  # + shared expert and its sigmoid gate
    ("deepseek_v3", "mlp", "per_expert"),  # + correction bias, shared experts
    ("gpt_oss", "mlp", "gpt_oss"),  # fused, transposed, interleaved, biased
    ("qwen3_moe", "mlp", "per_expert"),  # no shared expert, norm_topk_prob
    ("olmoe", "mlp", "per_expert"),
]


def _fresh_like(block) -> MoE:
    """A randomly initialized MoE with the block's config (nothing shared with the block)."""
    config = mh.moe_from_hf(block).config
    return MoE(config, dtype=torch.float32)


def _block_output(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (model, checkpoint dir written with several shards and model.safetensors.index.json)."""
    out = {}
    for family, _, _ in SAVED:
        model = build(family)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path, max_shard_size="50KB")
        out[family] = model, path
    return out


@pytest.mark.parametrize(("family", "attr", "layout"), SAVED, ids=[s[0] for s in SAVED])
def test_load_from_save_pretrained(saved, family, attr, layout):
    model, path = saved[family]
    assert (path / "model.safetensors.index.json").is_file()
    ckpt = Checkpoint(path)
    prefixes = ckpt.moe_prefixes()
    assert len(prefixes) == model.config.num_hidden_layers
    x = torch.randn(1, 5, model.config.hidden_size)  # transformers blocks take [B, S, H]
    for i, prefix in enumerate(prefixes):
        block = getattr(model.model.layers[i], attr)
        moe = _fresh_like(block)
        report = load_moe(moe, ckpt, prefix)
        assert report.ok and report.layout == layout
        assert rel_errors(moe(x), _block_output(block, x))[0] <= 1e-5


def test_fused_canonical_single_file(tmp_path):
    # transformers' in-memory state dict holds experts.gate_up_proj [E, 2I, H] and experts.down_proj [E, H, I].
    model = build("qwen3_moe")
    file = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    block = model.model.layers[1].mlp
    moe = _fresh_like(block)
    report = load_moe(moe, file, "model.layers.1.mlp")
    assert report.ok and report.layout == "fused"
    x = torch.randn(1, 4, model.config.hidden_size)
    assert rel_errors(moe(x), block(x))[0] <= 1e-5


def test_checkpoint_is_lazy(saved, monkeypatch):
    _, path = saved["mixtral"]
    ckpt = Checkpoint(path)
    read = []
    original = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, key: read.append(key) or original(self, key))
    moe = _fresh_like(saved["mixtral"][0].model.layers[0].mlp)
    prefix = ckpt.moe_prefixes()[0]  # Mixtral checkpoints name the block block_sparse_moe
    load_moe(moe, ckpt, prefix)
    assert read and all(k.startswith(prefix + ".") for k in read)


def test_shape_mismatch_names_the_key(saved):
    model, path = saved["qwen2_moe"]
    config = mh.moe_from_hf(model.model.layers[0].mlp).config
    wrong = MoE(type(config)(**{**config.__dict__, "intermediate_size": config.intermediate_size + 1}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight"):
        load_moe(wrong, path, "model.layers.0.mlp")


def test_missing_and_unexpected_keys_are_reported(saved):
    model, path = saved["qwen2_moe"]
    block = model.model.layers[0].mlp
    config = mh.moe_from_hf(block).config
    # No shared experts in this MoE: the checkpoint's shared-expert keys are unexpected.
    bare = MoE(type(config)(**{**config.__dict__, "shared_intermediate_size": 0, "shared_expert_gate": False}))
    report = load_moe(bare, path, "model.layers.0.mlp", strict=False)
    assert "model.layers.0.mlp.shared_expert_gate.weight" in report.unexpected and not report.missing
    with pytest.raises(KeyError, match="unexpected"):
        load_moe(bare, path, "model.layers.0.mlp")
    # A prefix with nothing under it: every tensor is missing, named by the key it was looked up under.
    report = load_moe(_fresh_like(block), path, "model.layers.9.mlp", strict=False)
    assert "model.layers.9.mlp.experts.0.gate_proj.weight" in report.missing
    assert "model.layers.9.mlp.gate.weight" in report.missing


def test_load_moes_over_all_blocks(saved):
    model, path = saved["deepseek_v3"]
    blocks = {f"model.layers.{i}.mlp": _fresh_like(layer.mlp) for i, layer in enumerate(model.model.layers)}
    assert all(r.ok for r in load_moes(path, blocks))


def test_expert_params_mapping_drives_weight_loader():
    rows = expert_params_mapping(2, gate="w1", up="w3", down="w2")
    assert [(r.param_name, r.weight_name, r.expert_id, r.shard_id) for r in rows[:3]] == [
        ("routed_experts.w13", "experts.0.w1.weight", 0, "w1"),
        ("routed_experts.w13", "experts.0.w3.weight", 0, "w3"),
        ("routed_experts.w2", "experts.0.w2.weight", 0, "w2"),
    ]
    assert len(rows) == 6 and rows[-1].expert_id == 1


def test_unknown_layout_and_path_are_rejected(tmp_path):
    moe = MoE(mh.moe_from_hf(build("olmoe").model.layers[0].mlp).config)
    with pytest.raises(ValueError, match="layout"):
        load_moe(moe, tmp_path, "x", layout="columnar")
    with pytest.raises(FileNotFoundError):
        Checkpoint(tmp_path / "absent.safetensors")


def _first_block(model):
    """(checkpoint prefix, block) of the model's first converted-family MoE block."""
    return next((n, m) for n, m in model.named_modules() if type(m).__name__ in mh.SUPPORTED_BLOCKS)


@pytest.mark.parametrize("family", ["llama4", "openai_privacy_filter"])
def test_transposed_concatenated_experts_load(tmp_path, family):
    # Llama4 and the privacy filter store gate_up_proj [E, H, 2I] like gpt-oss, but with the gate columns first
    # (concatenated); only gpt-oss interleaves them. Read as gpt_oss they were de-interleaved, silently wrong.
    model = build(family)
    model.save_pretrained(tmp_path)
    prefix, block = _first_block(model)
    moe = _fresh_like(block)
    report = load_moe(moe, tmp_path, prefix)
    assert report.ok and report.layout == "transposed"
    x = torch.randn(1, 5, moe.config.hidden_size)
    assert rel_errors(_block_output(moe, x).reshape(-1), _block_output(block, x).reshape(-1))[0] <= 1e-5


def test_transposed_experts_without_config_need_a_layout(tmp_path):
    # Without config.json nothing tells interleaved (gpt-oss) from concatenated gate/up columns: ask, don't guess.
    model = build("llama4")
    file = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    prefix, block = _first_block(model)
    moe = _fresh_like(block)
    with pytest.raises(ValueError, match="layout"):
        load_moe(moe, file, prefix)
    assert load_moe(moe, file, prefix, layout="transposed").ok
    x = torch.randn(1, 5, moe.config.hidden_size)
    assert rel_errors(_block_output(moe, x).reshape(-1), _block_output(block, x).reshape(-1))[0] <= 1e-5


def test_bad_arguments_are_named(saved):
    from moekit.loading import deinterleave

    _, path = saved["qwen2_moe"]
    with pytest.raises(TypeError, match="moe"):
        load_moe(object(), path, "model.layers.0.mlp")
    with pytest.raises(ValueError, match="num_experts"):
        expert_params_mapping(0)
    # An odd row count has no gate/up pairs; the old code returned a silently shuffled tensor.
    with pytest.raises(ValueError, match="t: "):
        deinterleave(torch.arange(5.0), dim=0)


def _params(moe):
    return {name: t.detach().clone() for name, t in moe.state_dict().items()}


def _assert_unchanged(moe, before):
    after = moe.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_gpt_oss_with_2i_equal_to_h_loads_by_config_json(tmp_path):
    # With 2I = H, gpt-oss's gate_up_proj [E, H, 2I] has the shape of a fused [E, 2I, H]: shapes alone read it as
    # fused (copied without de-interleaving). config.json says gpt_oss, and decides.
    model = build("gpt_oss", intermediate_size=16)  # H = 32 = 2I
    model.save_pretrained(tmp_path)
    block = model.model.layers[0].mlp
    moe = _fresh_like(block)
    report = load_moe(moe, tmp_path, "model.layers.0.mlp")
    assert report.ok and report.layout == "gpt_oss"
    x = torch.randn(1, 5, model.config.hidden_size)
    assert rel_errors(moe(x), _block_output(block, x))[0] <= 1e-5


@pytest.mark.parametrize("failure", ["unexpected", "shape"])
def test_failed_strict_load_leaves_the_module_unchanged(saved, failure):
    # The router and the first experts were copied before the failure was found: a half-loaded module.
    model, path = saved["qwen2_moe"]
    config = mh.moe_from_hf(model.model.layers[0].mlp).config
    if failure == "unexpected":  # no shared experts in this MoE: the checkpoint's are unexpected
        change = {"shared_intermediate_size": 0, "shared_expert_gate": False}
        err, match = KeyError, "unexpected"
    else:  # shared experts of another width: the routed experts fit, the shared ones do not
        change = {"shared_intermediate_size": config.shared_intermediate_size + 1}
        err, match = ValueError, r"shared_expert\.gate_proj\.weight"
    moe = MoE(type(config)(**{**config.__dict__, **change}))
    before = _params(moe)
    with pytest.raises(err, match=match):
        load_moe(moe, path, "model.layers.0.mlp")
    _assert_unchanged(moe, before)


@pytest.mark.parametrize("prefix", [
    "model.layers.9.mlp",  # nothing stored under it
    "model.layers.1",  # a decoder layer: keys, no experts (was a multi-kilobyte missing-keys KeyError)
    "model.layers.1.self_attn",  # a dense module
    "model.layers.1.mlp.experts",  # one level too deep
])
def test_wrong_prefix_lists_the_checkpoints_moe_prefixes(saved, prefix):
    model, path = saved["qwen2_moe"]
    moe = _fresh_like(model.model.layers[0].mlp)
    before = _params(moe)
    with pytest.raises(KeyError) as info:
        load_moe(moe, path, prefix)
    assert f"prefix {prefix!r}: no MoE block ('{prefix}.experts.' keys) in {path}" in str(info.value)
    assert "the checkpoint has MoE blocks at: model.layers.0.mlp, model.layers.1.mlp" in str(info.value)
    assert "missing" not in str(info.value)
    _assert_unchanged(moe, before)


@pytest.mark.parametrize("indexed", [True, False])
def test_truncated_shard_is_named(saved, tmp_path, indexed):
    import json
    import shutil

    model, path = saved["qwen2_moe"]
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    shard = tmp_path / json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.0.mlp.experts.3.up_proj.weight"
    ]
    shard.write_bytes(shard.read_bytes()[:-100])
    if not indexed:  # every shard's header is read when the checkpoint is opened
        (tmp_path / "model.safetensors.index.json").unlink()
    moe = _fresh_like(model.model.layers[0].mlp)
    before = _params(moe)
    with pytest.raises(ValueError, match=f"checkpoint file {shard}: not a readable safetensors file"):
        load_moe(moe, tmp_path, "model.layers.0.mlp")
    _assert_unchanged(moe, before)


def test_load_moe_argument_types(saved):
    model, path = saved["qwen2_moe"]
    moe = _fresh_like(model.model.layers[0].mlp)
    with pytest.raises(TypeError, match="strict: expected a bool"):
        load_moe(moe, path, "model.layers.0.mlp", strict="no")
    with pytest.raises(TypeError, match="prefix: expected a str"):
        load_moe(moe, path, 0)


def test_transposed_experts_with_2i_equal_to_h_without_config_need_a_layout(tmp_path):
    # gate_up_proj [E, H, 2I] = [E, 2I, H] here; down_proj [E, I, H] still shows it is transposed, and without
    # config.json nothing says whether gate/up are interleaved (it was read as fused, then failed on down_proj).
    model = build("gpt_oss", intermediate_size=16)
    file = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    moe = _fresh_like(model.model.layers[0].mlp)
    with pytest.raises(ValueError, match="layout: .* is stored transposed"):
        load_moe(moe, file, "model.layers.0.mlp")
    assert load_moe(moe, file, "model.layers.0.mlp", layout="gpt_oss").ok


def test_nonfinite_correction_bias_is_refused_at_load(saved, tmp_path):
    # Routing on a GPU only marks the affected tokens NaN (no per-call sync), so the loader refuses the corrupt
    # bias up front, naming the key and the experts, before it copies anything.
    model, path = saved["deepseek_v3"]
    block = model.model.layers[1].mlp
    prefix = "model.layers.1.mlp"
    ckpt = Checkpoint(path)
    tensors = {k: ckpt.get(k) for k in ckpt.keys() if k.startswith(prefix)}
    key = next(k for k in tensors if k.endswith("e_score_correction_bias"))
    tensors[key] = tensors[key].clone()
    tensors[key][3] = float("nan")
    file = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(file))
    moe = _fresh_like(block)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    with pytest.raises(ValueError, match=r"correction_bias'.*NaN/\+inf at experts \[3\]"):
        load_moe(moe, file, prefix)
    assert all(torch.equal(before[k], v) for k, v in moe.state_dict().items())


@pytest.mark.parametrize("router_fp32", [True, False], ids=["router_fp32", "plain"])
def test_fp32_router_of_a_bf16_layer_loads_bit_exact(tmp_path, router_fp32):
    # DeepSeek-V3 keeps its router weight fp32 in a bf16 checkpoint (transformers' _keep_in_fp32_modules_strict);
    # copied into a bf16 gate it was rounded and some tokens picked other experts. The gate stays fp32, from the
    # config (router_fp32) or from the checkpoint's own dtype.
    from moekit import MoEConfig, RoutingConfig

    E, H, I = 8, 64, 32
    gen = torch.Generator().manual_seed(0)
    routing = RoutingConfig(scoring_func="sigmoid", correction_bias=True) if router_fp32 else RoutingConfig()
    config = MoEConfig(num_experts=E, top_k=2, hidden_size=H, intermediate_size=I, routing=routing,
                       router_bias=not router_fp32, router_fp32=router_fp32)
    prefix = "model.layers.0.mlp"
    gate = torch.randn(E, H, generator=gen) * 0.01 + 1e-4 * torch.randn(E, H, generator=gen)
    tensors = {f"{prefix}.gate.weight": gate}
    if router_fp32:
        tensors[f"{prefix}.gate.e_score_correction_bias"] = torch.zeros(E)
    else:
        tensors[f"{prefix}.gate.bias"] = torch.randn(E, generator=gen)
    for e in range(E):
        for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            tensors[f"{prefix}.experts.{e}.{proj}.weight"] = torch.randn(shape, generator=gen).bfloat16()
    file = tmp_path / "model.safetensors"
    safetensors_torch.save_file(tensors, str(file))
    moe = MoE(config, dtype=torch.bfloat16)
    load_moe(moe, file, prefix)
    assert moe.gate.weight.dtype == torch.float32
    assert torch.equal(moe.gate.weight, gate)
    if not router_fp32:
        assert torch.equal(moe.gate.bias, tensors[f"{prefix}.gate.bias"])
    x = torch.randn(16, H, generator=gen).bfloat16()
    bias = moe.gate.bias
    reference = torch.nn.functional.linear(x.float(), gate, None if bias is None else bias.detach().float())
    torch.testing.assert_close(moe.router_logits(x), reference, rtol=0, atol=0)
    assert moe(x).dtype == torch.bfloat16

"""4/8-bit weight-only experts: checkpoint loaders (compressed-tensors pack-quantized, GPTQ v1, AWQ) driven as an
engine drives them and through ``load_moe``, tensor-parallel slices and loader edges (the quant method and torch
backend: test_wna16.py)."""

import pytest
import torch

from moekit import RoutedExperts
from moekit.quant import WNA16MoEMethod, get_quant_method
from moekit.loading import expert_params_mapping
from moekit.testing import assert_close, make_moe_inputs
from tests.ops.test_quantize_wna16 import _pack_words, awq_pack, formula, gptq_pack
from tests.quant.test_wna16 import _reference, _tol, _vllm_inputs, dequantized_weights


# ------------------------------------------------------------------------------- checkpoint loaders (engine-style)

def ct_pack(q_NK, z_NG, bits):
    """compressed-tensors pack-quantized, from its definition: weight_packed [N, ⌈K/pw⌉] along K (stored q + mid is
    the unsigned code), weight_zero_point [⌈N/pw⌉, G] along N."""
    pw = 32 // bits
    n, k = q_NK.shape
    q = torch.nn.functional.pad(q_NK, (0, -k % pw))
    packed = _pack_words(q.reshape(n, -1, pw), bits)
    zp = None
    if z_NG is not None:
        z = torch.nn.functional.pad(z_NG, (0, 0, 0, -n % pw))
        zp = _pack_words(z.reshape(-1, pw, z.shape[1]).permute(0, 2, 1), bits)
    return packed, zp


def _codes(n, k, g, bits, sym, dtype, gen):
    groups = -(-k // g)
    q = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.int32)
    z = (torch.full((n, groups), 1 << (bits - 1), dtype=torch.int32) if sym
         else torch.randint(0, 1 << bits, (n, groups), generator=gen, dtype=torch.int32))
    if not sym:  # a zero point of 0 in the top field of a packed word (GPTQ v1's borrow leaves the word)
        z[min(7, n - 1), 0] = 0
    s = (torch.rand(n, groups, generator=gen) * 0.02 + 1e-3).to(dtype)
    return q, z, s


def _checkpoint_tensors(fmt, q, z, s, g, bits, sym):
    """One projection's tensors as the format stores them (q, z unsigned [N, K] / [N, G]; s [N, G])."""
    n, k = q.shape
    if fmt == "compressed-tensors":
        packed, zp = ct_pack(q, None if sym else z, bits)
        out = {"weight_packed": packed, "weight_scale": s, "weight_shape": torch.tensor([n, k])}
        return out if sym else {**out, "weight_zero_point": zp}
    if fmt == "gptq":
        qweight, qzeros, scales = gptq_pack(q.t().contiguous(), z.t().contiguous(), s.t().contiguous(), bits)
        return {"qweight": qweight, "qzeros": qzeros, "scales": scales,
                "g_idx": (torch.arange(k) // g).to(torch.int32)}
    return {"qweight": awq_pack(q.t().contiguous()), "qzeros": awq_pack(z.t().contiguous()),
            "scales": s.t().contiguous()}


def load_layer(fmt, *, bits=4, sym=True, g=32, num_experts=3, hidden=64, inter=32, dtype=torch.bfloat16,
               scale_dtype=torch.float16, expert_map=None, seed=0, edit=None):
    """A layer loaded expert by expert, shard by shard, through each parameter's own weight_loader (as an engine
    drives it), and the float32 weights the codes mean (formula of QUANT_FORMATS.md)."""
    gen = torch.Generator().manual_seed(seed)
    method = WNA16MoEMethod(bits=bits, group_size=g, sym=sym, checkpoint_format=fmt)
    held = num_experts if expert_map is None else int((expert_map >= 0).sum())
    layer = RoutedExperts(held, hidden, inter, quant_method=method, dtype=dtype, expert_map=expert_map)
    w13, w2 = [], []
    for e in range(num_experts):
        parts = {}
        for shard, (n, k) in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
            q, z, s = _codes(n, k, g, bits, sym, scale_dtype, gen)
            parts[shard] = formula(q, z, s, g)
            tensors = _checkpoint_tensors(fmt, q, z, s, g, bits, sym)
            if edit is not None:
                edit(tensors, e, shard)
            for suffix, name in method.checkpoint_tensors():
                param = getattr(layer, ("w2" if shard == "w2" else "w13") + suffix)
                param.weight_loader(param, tensors[name], shard, e)
        w13.append(torch.cat((parts["w1"], parts["w3"])))
        w2.append(parts["w2"])
    return layer, torch.stack(w13), torch.stack(w2)


FORMATS = [
    ("compressed-tensors", 4, True, 32, 67, 37),   # odd H and I: K padding nibbles, zero points of 37 rows
    ("compressed-tensors", 4, False, 32, 67, 37),
    ("compressed-tensors", 8, True, 64, 128, 64),  # W8A16
    ("gptq", 4, True, 32, 64, 32),
    ("gptq", 4, False, 64, 64, 40),                # qzeros of 40 columns per shard: 5 words
    ("gptq", 8, False, 32, 64, 36),
    ("awq", 4, False, 32, 64, 32),
]


@pytest.mark.parametrize(("fmt", "bits", "sym", "g", "hidden", "inter"), FORMATS)
def test_checkpoint_loads_bit_exact_and_runs(fmt, bits, sym, g, hidden, inter):
    layer, w13, w2 = load_layer(fmt, bits=bits, sym=sym, g=g, hidden=hidden, inter=inter)
    packed = layer.w13_weight_packed.data if fmt == "compressed-tensors" else None
    with pytest.raises(RuntimeError, match="call layer.process_weights_after_loading"):
        layer.quant_method.quant_params(layer)
    layer.process_weights_after_loading()
    layer.process_weights_after_loading()  # once: a second call changes nothing
    if packed is not None:  # the int32 words themselves, read as bytes: no copy
        assert layer.w13.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
    q = layer.quant_method.quant_params(layer)
    assert q.scheme == f"w{bits}a16_g{g}" + ("" if sym else "_asym")
    assert layer.w13_scale.dtype == torch.float16  # fp16 checkpoint scales kept exactly (not rounded to bf16)
    deq13, deq2 = dequantized_weights(layer)
    assert torch.equal(deq13, w13) and torch.equal(deq2, w2)
    inputs = _vllm_inputs(make_moe_inputs(9, 3, hidden, inter, 2, dtype=torch.bfloat16))
    with torch.no_grad():
        out = layer(inputs["hidden_states"], inputs["topk_weights"], inputs["topk_ids"])
    assert_close(out, _reference(layer, inputs), tol=_tol(torch.bfloat16))


def test_loader_with_an_expert_map_keeps_only_local_experts():
    expert_map = torch.tensor([-1, 0, -1, 1], dtype=torch.int32)
    layer, w13, w2 = load_layer("gptq", sym=False, num_experts=4, expert_map=expert_map)
    layer.process_weights_after_loading()
    deq13, deq2 = dequantized_weights(layer)
    assert torch.equal(deq13, w13[[1, 3]]) and torch.equal(deq2, w2[[1, 3]])
    inputs = _vllm_inputs(make_moe_inputs(7, 4, 64, 32, 2, dtype=torch.bfloat16))
    with torch.no_grad():
        out = layer(inputs["hidden_states"], inputs["topk_weights"], inputs["topk_ids"])
    assert_close(out, _reference(layer, inputs), tol=_tol(torch.bfloat16))


def test_loader_refusals():
    def shuffle_g_idx(tensors, e, shard):  # act order: g_idx is not k // g
        if "g_idx" in tensors and e == 1 and shard == "w3":
            tensors["g_idx"] = tensors["g_idx"].flip(0)

    layer, _, _ = load_layer("gptq", edit=shuffle_g_idx)
    with pytest.raises(ValueError, match="g_idx: GPTQ group activation ordering"):
        layer.process_weights_after_loading()
    layer = RoutedExperts(2, 64, 32, quant_method=WNA16MoEMethod(checkpoint_format="gptq", group_size=32))
    p = layer.w13_scales
    with pytest.raises(ValueError, match=r"loaded_weight: expected shape \(2, 32\) for w13_scales\[0\]"):
        p.weight_loader(p, torch.ones(2, 64), "w1", 0)  # a scale of both shards, not one
    p = layer.w13_qweight
    with pytest.raises(TypeError, match="loaded_weight: expected dtype int32 for w13_qweight"):
        p.weight_loader(p, torch.ones(8, 32), "w3", 0)  # float values are not packed codes
    with pytest.raises(ValueError, match="shard_id: 'w2' does not load into 'w13_qweight'"):
        p.weight_loader(p, torch.ones(8, 32, dtype=torch.int32), "w2", 0)
    with pytest.raises(ValueError, match="checkpoint_format: GPTQ packs K in int32 words of 8 codes"):
        RoutedExperts(2, 60, 32, quant_method=WNA16MoEMethod(checkpoint_format="gptq"))
    with pytest.raises(ValueError, match="checkpoint_format: AWQ packs N in int32 words of 8 codes"):
        RoutedExperts(2, 64, 36, quant_method=WNA16MoEMethod(checkpoint_format="awq", sym=False))
    layer = RoutedExperts(2, 64, 32, quant_method=WNA16MoEMethod(checkpoint_format="compressed-tensors"))
    p = layer.w2_weight_shape
    p.weight_loader(p, torch.tensor([64, 31]), "w2", 0)  # not this layer's K
    with pytest.raises(ValueError, match=r"w2_weight_shape: expected \[N, K\] = \[64, 32\] for expert 0, got "
                                         r"\[64, 31\]"):
        layer.process_weights_after_loading()


def test_compressed_tensors_checkpoint_matches_its_own_decompress():
    ct_q = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    gen = torch.Generator().manual_seed(1)
    for preset, hidden, inter in (("W4A16", 256, 128), ("W4A16_ASYM", 256, 128), ("W8A16", 256, 128)):
        scheme = ct_q.preset_name_to_scheme(preset, ["Linear"])
        method = WNA16MoEMethod(bits=scheme.weights.num_bits, group_size=scheme.weights.group_size,
                                sym=scheme.weights.symmetric, checkpoint_format="compressed-tensors")
        layer = RoutedExperts(2, hidden, inter, quant_method=method, dtype=torch.bfloat16)
        expected13, expected2 = [], []
        for e in range(2):
            parts = {}
            for shard, (n, k) in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
                w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
                g = scheme.weights.group_size
                v = w.float().view(n, k // g, g)
                s, zp = calculate_qparams(v.amin(-1), v.amax(-1), scheme.weights)
                sd = PackedQuantizationCompressor.compress(
                    {"weight": w, "weight_scale": s.to(w.dtype), "weight_zero_point": zp}, scheme)
                parts[shard] = PackedQuantizationCompressor.decompress(dict(sd), scheme)["weight"].float()
                for suffix, name in method.checkpoint_tensors():
                    param = getattr(layer, ("w2" if shard == "w2" else "w13") + suffix)
                    param.weight_loader(param, sd[name], shard, e)
            expected13.append(torch.cat((parts["w1"], parts["w3"])))
            expected2.append(parts["w2"])
        layer.process_weights_after_loading()
        deq13, deq2 = dequantized_weights(layer)
        # decompress rounds to the weight dtype; ours is fp32 of the same product
        assert torch.equal(deq13.to(torch.bfloat16).float(), torch.stack(expected13)), preset
        assert torch.equal(deq2.to(torch.bfloat16).float(), torch.stack(expected2)), preset



@pytest.fixture
def bf16_default_dtype():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "awq"])
def test_checkpoint_scales_are_float32_whatever_the_default_dtype(fmt, bf16_default_dtype):
    # The scale parameters a checkpoint loads into are float32 (exact for any checkpoint dtype), not the global
    # default: a bf16 one would refuse fp16 scales it cannot hold.
    layer = RoutedExperts(2, 64, 32, dtype=torch.float16,
                          quant_method=WNA16MoEMethod(bits=4, group_size=32, sym=False, checkpoint_format=fmt))
    suffix = "_weight_scale" if fmt == "compressed-tensors" else "_scales"
    assert layer._parameters[f"w13{suffix}"].dtype == torch.float32
    assert layer._parameters[f"w2{suffix}"].dtype == torch.float32


@pytest.mark.parametrize(("cfg", "fmt", "bits", "sym", "g"), [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}, "gptq", 4, True, 128),
    ({"quant_method": "gptq", "bits": 8, "group_size": 64, "sym": False}, "gptq", 8, False, 64),
    ({"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": True}, "gptq", 4, True, -1),  # no groups
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}, "awq", 4, False,
     128),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": False,
                    "actorder": None}, "input_activations": None}}}, "compressed-tensors", 4, False, 128),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}}}},
     "compressed-tensors", 8, True, -1),
])
def test_get_quant_method(cfg, fmt, bits, sym, g):
    method = get_quant_method(cfg)
    assert isinstance(method, WNA16MoEMethod)
    assert (method.checkpoint_format, method.bits, method.sym, method.group_size) == (fmt, bits, sym, g)


def test_expert_params_mapping_lists_the_checkpoint_tensors():
    method = WNA16MoEMethod(checkpoint_format="gptq", sym=False)
    rows = expert_params_mapping(2, tensors=method.checkpoint_tensors())
    assert len(rows) == 2 * 3 * 4
    assert (rows[0].param_name, rows[0].weight_name, rows[0].shard_id) == (
        "routed_experts.w13_qweight", "experts.0.gate_proj.qweight", "w1")
    names = {(r.param_name, r.weight_name.split(".", 2)[2]) for r in rows if r.expert_id == 1}
    assert ("routed_experts.w2_g_idx", "down_proj.g_idx") in names
    assert ("routed_experts.w13_qzeros", "up_proj.qzeros") in names
    ct = WNA16MoEMethod(checkpoint_format="compressed-tensors").checkpoint_tensors()  # sym: no zero points
    assert [n for _, n in ct] == ["weight_packed", "weight_scale", "weight_shape"]


def test_load_moe_refusals(tmp_path):
    from moekit import MoE, MoEConfig
    from moekit.loading import load_moe

    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({"model.layers.0.mlp.gate.weight": torch.zeros(2, 64)}, tmp_path / "m.safetensors")
    cfg = MoEConfig(num_experts=2, top_k=1, hidden_size=64, intermediate_size=32)
    moe = MoE(cfg, quant_method=WNA16MoEMethod(checkpoint_format="gptq", group_size=32))
    moe.routed_experts.process_weights_after_loading()  # converted: the checkpoint tensors are gone
    with pytest.raises(ValueError, match="moe: its gptq tensors were converted by an earlier load"):
        load_moe(moe, tmp_path, "model.layers.0.mlp", layout="per_expert", strict=False)
    fresh = MoE(cfg, quant_method=WNA16MoEMethod(checkpoint_format="gptq", group_size=32))
    with pytest.raises(ValueError, match="layout: w4a16_g32 experts load from per-expert tensors"):
        load_moe(fresh, tmp_path, "model.layers.0.mlp", layout="fused", strict=False)


@pytest.mark.parametrize(("fmt", "sym"), [("compressed-tensors", False), ("gptq", True), ("awq", False)])
def test_dequantize_tensors_of_a_shared_expert(fmt, sym):
    # A quantized shared-expert linear, read into an unquantized Linear: the float32 weights its codes mean.
    gen = torch.Generator().manual_seed(5)
    q, z, s = _codes(48, 64, 32, 4, sym, torch.float16, gen)
    method = WNA16MoEMethod(group_size=32, sym=sym, checkpoint_format=fmt)
    tensors = _checkpoint_tensors(fmt, q, z, s, 32, 4, sym)
    assert torch.equal(method.dequantize_tensors(tensors, n=48, k=64), formula(q, z, s, 32))
    with pytest.raises(ValueError, match=r"expected a weight of shape \(64, 48\)"):
        method.dequantize_tensors(tensors, n=64, k=48)


# ------------------------------------------------------------------------------------------ tensor parallelism

@pytest.mark.parametrize(("fmt", "bits", "sym", "g"), [
    ("compressed-tensors", 4, False, 32), ("compressed-tensors", 8, True, 64), ("gptq", 4, False, 32),
    ("gptq", 8, True, 32), ("awq", 4, False, 32),
])
def test_tensor_parallel_slices_are_the_full_layer_sliced(fmt, bits, sym, g):
    """Each TP rank's checkpoint tensors cut by ``tp_slicer`` (what load_moe does before the weight_loader) give
    exactly the rank's share of I of the full layer's dequantized weights, and the ranks' outputs sum to it."""
    tp, hidden, inter = 2, 64, 128
    kept = {}
    full, w13, w2 = load_layer(fmt, bits=bits, sym=sym, g=g, hidden=hidden, inter=inter, dtype=torch.float32,
                               edit=lambda t, e, shard: kept.__setitem__((e, shard), dict(t)))
    full.process_weights_after_loading()
    inputs = _vllm_inputs(make_moe_inputs(9, 3, hidden, inter, 2, dtype=torch.float32))
    share, outs = inter // tp, []
    for r in range(tp):
        method = WNA16MoEMethod(bits=bits, group_size=g, sym=sym, checkpoint_format=fmt)
        part = RoutedExperts(3, hidden, share, quant_method=method, dtype=torch.float32)
        for (e, shard), tensors in kept.items():
            for suffix, name in method.checkpoint_tensors():
                cut = method.tp_slicer(suffix, shard, inter, tp, r)
                param = getattr(part, ("w2" if shard == "w2" else "w13") + suffix)
                param.weight_loader(param, tensors[name] if cut is None else cut(tensors[name]), shard, e)
        part.process_weights_after_loading()
        deq13, deq2 = dequantized_weights(part)
        mine = slice(r * share, (r + 1) * share)
        assert torch.equal(deq13, torch.cat((w13[:, :inter][:, mine], w13[:, inter:][:, mine]), dim=1))
        assert torch.equal(deq2, w2[:, :, mine])
        with torch.no_grad():
            outs.append(part(inputs["hidden_states"], inputs["topk_weights"], inputs["topk_ids"]))
    with torch.no_grad():
        assert_close(sum(outs), full(inputs["hidden_states"], inputs["topk_weights"], inputs["topk_ids"]),
                     torch.float32)


def test_tensor_parallel_split_refusals():
    method = WNA16MoEMethod(bits=4, group_size=64, sym=False, checkpoint_format="gptq")
    with pytest.raises(ValueError, match=r"multiple of 64.*tp_size=2.*intermediate_size=96"):
        method.check_tp_split(96, 2)  # 48 per rank: a 64-group would straddle the ranks
    with pytest.raises(ValueError, match=r"multiple of 64.*tp_size=2.*intermediate_size=96"):
        method.tp_slicer("_qweight", "w2", 96, 2, 0)
    channel = WNA16MoEMethod(bits=4, group_size=-1, checkpoint_format="compressed-tensors")
    assert channel.tp_slicer("_weight_scale", "w2", 64, 2, 1) is None  # one group a row: the whole row's scale
    with pytest.raises(ValueError, match=r"multiple of 8.*intermediate_size=36"):
        channel.check_tp_split(36, 2)  # 18 codes: not whole int32 words of 4-bit codes


# ------------------------------------------------------------------------------------------------ loader edges

def expert_tensors(fmt, prefix, names, num_experts, hidden, inter, g, sym, gen):
    """4-bit ``fmt`` checkpoint tensors of ``num_experts`` experts under ``{prefix}.experts.{e}.{proj}.`` (``names``:
    gate, up, down), and the float32 weights they dequantize to (the format's formula): (tensors, w13, w2)."""
    tensors, w13, w2 = {}, [], []
    for e in range(num_experts):
        parts = {}
        for shard, proj, (n, k) in (("w1", names[0], (inter, hidden)), ("w3", names[1], (inter, hidden)),
                                    ("w2", names[2], (hidden, inter))):
            q, z, s = _codes(n, k, g, 4, sym, torch.float16, gen)
            parts[shard] = formula(q, z, s, g)
            for name, t in _checkpoint_tensors(fmt, q, z, s, g, 4, sym).items():
                tensors[f"{prefix}.experts.{e}.{proj}.{name}"] = t
        w13.append(torch.cat((parts["w1"], parts["w3"])))
        w2.append(parts["w2"])
    return tensors, torch.stack(w13), torch.stack(w2)


def _save_experts(tmp_path, fmt, names, *, num_experts=2, hidden=64, inter=32, g=32, sym=False, edit=None):
    """A per-expert checkpoint of ``fmt`` with projection ``names`` (gate, up, down), its float32 weights."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    gen = torch.Generator().manual_seed(9)
    prefix = "model.layers.0.block_sparse_moe"
    tensors = {f"{prefix}.gate.weight": torch.randn(num_experts, hidden, generator=gen)}
    experts, w13, w2 = expert_tensors(fmt, prefix, names, num_experts, hidden, inter, g, sym, gen)
    tensors.update(experts)
    if edit is not None:
        edit(tensors, prefix)
    safetensors_torch.save_file(tensors, tmp_path / "model.safetensors")
    return prefix, w13, w2


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_mixtral_projection_names_load(tmp_path, fmt):
    # Mixtral's experts are w1/w3/w2 and a weight-only checkpoint has no `.weight` key to tell them by.
    from moekit import MoE, MoEConfig
    from moekit.loading import load_moe

    prefix, w13, w2 = _save_experts(tmp_path, fmt, ("w1", "w3", "w2"))
    moe = MoE(MoEConfig(num_experts=2, top_k=1, hidden_size=64, intermediate_size=32),
              quant_method=WNA16MoEMethod(group_size=32, sym=False, checkpoint_format=fmt))
    report = load_moe(moe, tmp_path, prefix, layout="per_expert")
    assert report.ok, report
    deq13, deq2 = dequantized_weights(moe.routed_experts)
    assert torch.equal(deq13, w13) and torch.equal(deq2, w2)


def test_refused_conversion_leaves_the_layer_as_loaded(tmp_path):
    # An act-order g_idx in expert 1's down_proj only: w13 converts, w2 does not -- nothing may be replaced.
    from moekit import MoE, MoEConfig
    from moekit.loading import load_moe

    def act_order(tensors, prefix):
        key = f"{prefix}.experts.1.down_proj.g_idx"
        tensors[key] = tensors[key].flip(0).contiguous()

    prefix, _, _ = _save_experts(tmp_path, "gptq", ("gate_proj", "up_proj", "down_proj"), inter=64, edit=act_order)
    moe = MoE(MoEConfig(num_experts=2, top_k=1, hidden_size=64, intermediate_size=64),
              quant_method=WNA16MoEMethod(group_size=32, sym=False, checkpoint_format="gptq"))
    with pytest.raises(ValueError, match="g_idx"):
        load_moe(moe, tmp_path, prefix, layout="per_expert")
    experts = moe.routed_experts
    assert "w13" not in experts._parameters and "w13_qweight" in experts._parameters
    with pytest.raises(ValueError, match="g_idx"):  # still refused, not skipped as "already converted"
        experts.process_weights_after_loading()


def test_scales_a_layer_dtype_cannot_hold_are_refused():
    method = WNA16MoEMethod(group_size=32)  # moekit's own layout: scales stored in the layer dtype
    layer = RoutedExperts(2, 64, 32, quant_method=method, dtype=torch.bfloat16)
    scale = torch.full((64, 1), 0.012345679)  # fp32: not a bf16 value (I = 32: one group a row)
    with pytest.raises(ValueError, match=r"w2_scale\[0\].*float32 values that bfloat16 cannot hold exactly"):
        layer.w2_scale.weight_loader(layer.w2_scale, scale, "w2", 0)
    layer.w2_scale.weight_loader(layer.w2_scale, scale.bfloat16().float(), "w2", 0)  # exact: loads


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_dequantize_tensors_refuses_an_asymmetric_weight_without_zero_points(fmt):
    gen = torch.Generator().manual_seed(6)
    q, z, s = _codes(48, 64, 32, 4, False, torch.float16, gen)
    method = WNA16MoEMethod(group_size=32, sym=False, checkpoint_format=fmt)
    tensors = _checkpoint_tensors(fmt, q, z, s, 32, 4, False)
    tensors.pop("weight_zero_point" if fmt == "compressed-tensors" else "qzeros")
    with pytest.raises(ValueError, match="is asymmetric and needs"):
        method.dequantize_tensors(tensors, n=48, k=64)


def test_per_expert_biases_load_and_a_missing_one_is_reported(tmp_path):
    from moekit import MoE, MoEConfig
    from moekit.loading import load_moe

    names = ("gate_proj", "up_proj", "down_proj")
    biases = {}

    def add_biases(tensors, prefix):
        gen = torch.Generator().manual_seed(4)
        for e in range(2):
            for proj, n in zip(names, (32, 32, 64)):
                biases[(e, proj)] = torch.randn(n, generator=gen)
                tensors[f"{prefix}.experts.{e}.{proj}.bias"] = biases[(e, proj)]

    prefix, _, _ = _save_experts(tmp_path, "gptq", names, edit=add_biases)
    cfg = MoEConfig(num_experts=2, top_k=1, hidden_size=64, intermediate_size=32, bias=True)
    moe = MoE(cfg, quant_method=WNA16MoEMethod(group_size=32, sym=False, checkpoint_format="gptq"),
              dtype=torch.float32)
    assert load_moe(moe, tmp_path, prefix, layout="per_expert").ok
    r = moe.routed_experts
    for e in range(2):
        assert torch.equal(r.w13_bias[e], torch.cat((biases[(e, "gate_proj")], biases[(e, "up_proj")])))
        assert torch.equal(r.w2_bias[e], biases[(e, "down_proj")])
    (tmp_path / "nobias").mkdir()
    _save_experts(tmp_path / "nobias", "gptq", names)
    fresh = MoE(cfg, quant_method=WNA16MoEMethod(group_size=32, sym=False, checkpoint_format="gptq"))
    report = load_moe(fresh, tmp_path / "nobias", prefix, layout="per_expert", strict=False)
    assert f"{prefix}.experts.0.gate_proj.bias" in report.missing


def test_gptq_act_order_refused_unless_dequantized_at_load():
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False}
    with pytest.raises(ValueError, match="dequantize_act_order=True"):
        get_quant_method(qc)
    with pytest.raises(TypeError, match="dequantize_act_order"):
        get_quant_method(qc, dequantize_act_order="yes")
    method = get_quant_method(qc, dequantize_act_order=True)
    with pytest.raises(ValueError, match="act-order.*tp_size=2"):
        method.check_tp_split(64, 2)
    gen = torch.Generator().manual_seed(3)
    e_num, hidden, inter, g = 2, 64, 64, 32
    layer = RoutedExperts(e_num, hidden, inter, quant_method=method, dtype=torch.float32)
    want13, want2 = [], []
    for e in range(e_num):
        parts = {}
        for shard, (n, k) in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
            q, z, s = _codes(n, k, g, 4, False, torch.float16, gen)  # [N, K], [N, G], [N, G]
            tensors = _checkpoint_tensors("gptq", q, z, s, g, 4, False)
            g_idx = (torch.randperm(k, generator=gen) % (k // g)).long()  # act order: groups scattered over K
            tensors["g_idx"] = g_idx.to(torch.int32)
            parts[shard] = (q - z[:, g_idx]).float() * s.float()[:, g_idx]  # GPTQ: W[n, k] by group g_idx[k]
            for suffix, name in method.checkpoint_tensors():
                param = getattr(layer, ("w2" if shard == "w2" else "w13") + suffix)
                param.weight_loader(param, tensors[name], shard, e)
        want13.append(torch.cat((parts["w1"], parts["w3"])))
        want2.append(parts["w2"])
    with pytest.warns(UserWarning, match="dequantized to torch.float32 at load"):
        layer.process_weights_after_loading()
    assert layer.quant_method.name == "unquantized"
    assert torch.equal(layer.w13, torch.stack(want13)) and torch.equal(layer.w2, torch.stack(want2))
    assert not any(n.endswith(("_qweight", "_qzeros", "_scales", "_g_idx")) for n, _ in layer.named_parameters())


@pytest.mark.parametrize("shared_name", ["shared_expert", "shared_experts", "shared_mlp"])
@pytest.mark.parametrize(("fmt", "sym"), [("gptq", False), ("compressed-tensors", True)])
def test_quantized_shared_expert_loads_under_each_prefix(tmp_path, shared_name, fmt, sym):
    # The shared expert's prefix was found only from `down_proj.weight` / `gate_up_proj.weight` keys: a quantized
    # one (qweight, weight_packed, ...) under Qwen2-MoE's `shared_expert.` fell back to `shared_experts.` and failed.
    from moekit import MoE, MoEConfig
    from moekit.loading import load_moe

    safetensors_torch = pytest.importorskip("safetensors.torch")
    gen = torch.Generator().manual_seed(0)
    E, H, I, Is, g = 2, 64, 32, 32, 32
    prefix = "model.layers.0.mlp"
    tensors = {f"{prefix}.gate.weight": torch.randn(E, H, generator=gen),
               f"{prefix}.shared_expert_gate.weight": torch.randn(1, H, generator=gen)}
    expected = {}
    projections = (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))
    bases = [f"{prefix}.experts.{e}" for e in range(E)] + [f"{prefix}.{shared_name}"]
    for base in bases:
        for proj, (n, k) in projections:
            q, z, s = _codes(n, k, g, 4, sym, torch.float16, gen)
            expected[f"{base}.{proj}"] = formula(q, z, s, g)
            stored = _checkpoint_tensors(fmt, q, z, s, g, 4, sym)
            tensors.update({f"{base}.{proj}.{name}": t for name, t in stored.items()})
    safetensors_torch.save_file(tensors, tmp_path / "model.safetensors")
    cfg = MoEConfig(num_experts=E, top_k=1, hidden_size=H, intermediate_size=I, shared_intermediate_size=Is,
                    shared_expert_gate=True)
    moe = MoE(cfg, dtype=torch.float16,
              quant_method=WNA16MoEMethod(checkpoint_format=fmt, group_size=g, sym=sym))
    load_moe(moe, tmp_path, prefix)
    shared, base = moe.shared_experts, f"{prefix}.{shared_name}"
    gate_up = torch.cat((expected[f"{base}.gate_proj"], expected[f"{base}.up_proj"]))
    assert torch.equal(shared.gate_up_proj.weight, gate_up.to(torch.float16))
    assert torch.equal(shared.down_proj.weight, expected[f"{base}.down_proj"].to(torch.float16))


@pytest.mark.parametrize("bad", [-0.01, float("nan"), float("inf")])
@pytest.mark.parametrize("fmt", ["moekit", "compressed-tensors", "gptq", "awq"])
def test_negative_or_nan_scales_are_refused_on_the_engine_path(fmt, bad):
    # Loaded through the parameters' own weight_loader and converted, a negative group scale (a sign flip) or a
    # NaN ran; the 8-bit method refuses both on the same path. A refused layer is left as loaded. moekit's own
    # layout holds negative scales (GGUF Q4_0's d is max / -8): only NaN/inf are refused there.
    suffix = {"moekit": "_scale", "compressed-tensors": "_weight_scale"}.get(fmt, "_scales")
    if fmt == "moekit":
        layer = RoutedExperts(2, 64, 32, quant_method=WNA16MoEMethod(group_size=32))
        scale = torch.ones(64, 1)
        scale[0, 0] = bad
        layer.w2.weight_loader(layer.w2, torch.zeros(64, 16, dtype=torch.uint8), "w2", 1)  # codes with their scales
        layer.w2_scale.weight_loader(layer.w2_scale, scale, "w2", 1)
    else:
        def edit(tensors, e, shard):
            if (e, shard) == (1, "w2"):
                tensors[suffix.removeprefix("_")][0, 0] = bad

        layer, _, _ = load_layer(fmt, sym=fmt != "awq", edit=edit)
    before = dict(layer._parameters)
    if fmt == "moekit" and bad < 0:
        layer.process_weights_after_loading()
        return
    with pytest.raises(ValueError, match=rf"w2{suffix}: expected finite .* at \[\[1, 0, 0\]\]"):
        layer.process_weights_after_loading()
    assert dict(layer._parameters) == before


@pytest.mark.parametrize(("fmt", "sym", "skipped"), [
    ("compressed-tensors", False, "weight_scale"), ("compressed-tensors", False, "weight_zero_point"),
    ("gptq", False, "scales"), ("gptq", False, "qzeros"), ("awq", False, "scales"), ("awq", False, "qzeros"),
    ("compressed-tensors", True, "weight_scale"), ("gptq", True, None)])
def test_an_engine_loading_codes_without_their_scales_is_refused(fmt, sym, skipped):
    # An engine loading expert_params_mapping(tensors=checkpoint_tensors()) row by row through each parameter's own
    # weight_loader, one tensor of expert 0's gate_proj left out: the codes would compute with scale 1 / zero point
    # 0. process_weights_after_loading refuses, naming the parameter; with everything loaded it converts.
    gen = torch.Generator().manual_seed(0)
    method = WNA16MoEMethod(bits=4, group_size=32, sym=sym, checkpoint_format=fmt)
    layer = RoutedExperts(2, 64, 32, quant_method=method, dtype=torch.bfloat16)
    tensors = {}
    for e in range(2):
        for proj, (n, k) in (("gate_proj", (32, 64)), ("up_proj", (32, 64)), ("down_proj", (64, 32))):
            q, z, s = _codes(n, k, 32, 4, sym, torch.float16, gen)
            for name, t in _checkpoint_tensors(fmt, q, z, s, 32, 4, sym).items():
                tensors[f"experts.{e}.{proj}.{name}"] = t
    for row in expert_params_mapping(2, tensors=method.checkpoint_tensors(), param_prefix=""):
        if row.weight_name != f"experts.0.gate_proj.{skipped}" and row.weight_name in tensors:
            param = getattr(layer, row.param_name)
            param.weight_loader(param, tensors[row.weight_name], row.shard_id, row.expert_id)
    if skipped is None:
        layer.process_weights_after_loading()
        return
    name = next(f"w13{s}" for s, n in method.checkpoint_tensors() if n == skipped)
    with pytest.raises(ValueError, match=rf"{name}: expert 0 shard w1: not loaded through weight_loader while"):
        layer.process_weights_after_loading()


def test_an_engine_loading_mxfp4_codes_without_their_scales_is_refused():
    from moekit.ops.quantize_mxfp4 import quantize_mxfp4
    from moekit.quant import MXFP4MoEMethod

    method = MXFP4MoEMethod()
    layer = RoutedExperts(2, 64, 64, quant_method=method, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for row in expert_params_mapping(2, tensors=method.checkpoint_tensors(), param_prefix=""):
        codes, scales = quantize_mxfp4(torch.randn(64, 64, generator=gen) * 0.01)
        if row.weight_name != "experts.0.gate_proj.weight_scale":
            param = getattr(layer, row.param_name)
            param.weight_loader(param, codes if row.weight_name.endswith("weight_packed") else scales, row.shard_id,
                                row.expert_id)
    with pytest.raises(ValueError, match=r"w13_scale: expert 0 shard w1: not loaded through weight_loader while"):
        layer.process_weights_after_loading()


@pytest.mark.parametrize(("fmt", "sym", "drop"), [("gptq", True, "scales"), ("gptq", False, "qzeros"),
                                                  ("gptq", True, "qweight"), ("awq", False, "scales"),
                                                  ("compressed-tensors", False, "weight_zero_point")])
def test_load_moe_refuses_part_of_a_projection_also_when_not_strict(tmp_path, fmt, sym, drop):
    # strict=False leaves out whole projections (reported as missing); codes with the initial scales, or scales with
    # the initial codes, compute a wrong projection: refused before any copy. A missing g_idx is harmless.
    from moekit import MoE, MoEConfig
    from moekit.loading import load_moe

    safetensors_torch = pytest.importorskip("safetensors.torch")
    gen = torch.Generator().manual_seed(1)
    prefix = "model.layers.0.mlp"
    tensors = {f"{prefix}.gate.weight": torch.randn(2, 64)}
    for e in range(2):
        for proj, (n, k) in (("gate_proj", (32, 64)), ("up_proj", (32, 64)), ("down_proj", (64, 32))):
            q, z, s = _codes(n, k, 32, 4, sym, torch.float16, gen)
            for name, t in _checkpoint_tensors(fmt, q, z, s, 32, 4, sym).items():
                tensors[f"{prefix}.experts.{e}.{proj}.{name}"] = t
    del tensors[f"{prefix}.experts.0.gate_proj.{drop}"]
    safetensors_torch.save_file(tensors, tmp_path / "model.safetensors")
    cfg = MoEConfig(num_experts=2, top_k=1, hidden_size=64, intermediate_size=32)
    moe = MoE(cfg, quant_method=WNA16MoEMethod(group_size=32, sym=sym, checkpoint_format=fmt), dtype=torch.bfloat16)
    before = {n: t.clone() for n, t in moe.state_dict().items()}
    with pytest.raises(ValueError, match=rf"experts\.0\.gate_proj\.\w+: missing from the checkpoint while .* is there"):
        load_moe(moe, tmp_path, prefix, strict=False)
    assert all(torch.equal(before[n], t) for n, t in moe.state_dict().items())


def test_a_shared_expert_beyond_an_fp16_layer_is_refused(tmp_path):
    # A GPTQ shared-expert linear dequantized into an fp16 layer: codes up to 8 times a scale of 1e4 exceed fp16's
    # range, and the Linear would hold inf. Refused naming the tensor, before any copy.
    from moekit import MoE, MoEConfig
    from moekit.loading import load_moe

    safetensors_torch = pytest.importorskip("safetensors.torch")
    gen = torch.Generator().manual_seed(0)
    prefix = "model.layers.0.mlp"
    tensors = {f"{prefix}.gate.weight": torch.randn(2, 64)}
    blocks = [f"experts.{e}" for e in range(2)] + ["shared_expert"]
    for block in blocks:
        for proj, (n, k) in (("gate_proj", (32, 64)), ("up_proj", (32, 64)), ("down_proj", (64, 32))):
            q, z, s = _codes(n, k, 32, 4, True, torch.float32, gen)
            for name, t in _checkpoint_tensors("gptq", q, z, s, 32, 4, True).items():
                tensors[f"{prefix}.{block}.{proj}.{name}"] = t
    tensors[f"{prefix}.shared_expert.up_proj.scales"][0, 0] = 1e4
    safetensors_torch.save_file(tensors, tmp_path / "model.safetensors")
    cfg = MoEConfig(num_experts=2, top_k=1, hidden_size=64, intermediate_size=32, shared_intermediate_size=32)
    moe = MoE(cfg, quant_method=WNA16MoEMethod(group_size=32, checkpoint_format="gptq"), dtype=torch.float16)
    with pytest.raises(ValueError, match=r"shared_expert\.up_proj\.\w+': holds values beyond the range of the "
                                         r"layer's dtype .*float16"):
        load_moe(moe, tmp_path, prefix)


def test_a_shared_expert_with_a_nan_e8m0_scale_is_refused(tmp_path):
    # An mxfp4 shared-expert linear whose scale byte is 255 (NaN in the OCP MX spec): its group of 32 weights would
    # be NaN, and every output with it. Refused naming the key, as the routed experts' scales are.
    from moekit import MoE, MoEConfig
    from moekit.loading import load_moe
    from moekit.ops.quantize_mxfp4 import quantize_mxfp4
    from moekit.quant import MXFP4MoEMethod

    safetensors_torch = pytest.importorskip("safetensors.torch")
    gen = torch.Generator().manual_seed(0)
    prefix = "model.layers.0.mlp"
    tensors = {f"{prefix}.gate.weight": torch.randn(2, 64, generator=gen)}
    for block in ("experts.0", "experts.1", "shared_expert"):
        for proj, (n, k) in (("gate_proj", (64, 64)), ("up_proj", (64, 64)), ("down_proj", (64, 64))):
            codes, scales = quantize_mxfp4(torch.randn(n, k, generator=gen) * 0.05)
            tensors[f"{prefix}.{block}.{proj}.weight_packed"] = codes
            tensors[f"{prefix}.{block}.{proj}.weight_scale"] = scales
    tensors[f"{prefix}.shared_expert.up_proj.weight_scale"][3, 1] = 255
    safetensors_torch.save_file(tensors, tmp_path / "model.safetensors")
    cfg = MoEConfig(num_experts=2, top_k=1, hidden_size=64, intermediate_size=64, shared_intermediate_size=64)
    moe = MoE(cfg, quant_method=MXFP4MoEMethod(), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"shared_expert\.up_proj\.weight_scale': e8m0 255 \(NaN in the OCP MX spec\)"):
        load_moe(moe, tmp_path, prefix)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_checkpoint_parameters_refuse_loads_after_conversion(fmt):
    # An engine that took the layer's parameters before loading and writes through them again after the conversion:
    # GPTQ's went to orphaned tensors (ignored), compressed-tensors' changed the codes but not the converted scales.
    method = WNA16MoEMethod(group_size=32, checkpoint_format=fmt)
    layer = RoutedExperts(2, 64, 32, quant_method=method, dtype=torch.bfloat16)
    held = dict(layer.named_parameters())
    layer.process_weights_after_loading()
    codes = next(n for n in held if n.startswith("w13") and n not in dict(layer.named_parameters()))
    param = held[codes]
    with pytest.raises(ValueError, match=f"{codes}: converted by process_weights_after_loading"):
        param.weight_loader(param, torch.zeros_like(param[0, :param.shape[1] // 2]), "w1", 0)

"""Tensor-parallel experts with biases and with 8-bit weights, run in the ranks that test_ep_layer.py spawns (one
spawn per world size for all): checkpoints load exactly this rank's slice of every tensor (codes, scales, biases),
quantizing a TP layer online gives the same codes and scales as slicing the quantized full layer, and block scales
that do not split along I are refused; mxfp4 experts load from gpt-oss's fused and compressed-tensors' per-expert
checkpoints. Also the layout helpers test_ep_layer.py cuts its TP layers with."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

import moekit
from moekit.distributed import local_experts
from moekit.quant import QUANT_SCHEMES
from moekit.testing import QUANT_TOLERANCES, assert_close

SCHEMES = ("fp8_block", "fp8_channel", "int8_channel", "fp8_tensor")
# H = 128, I = 256: with TP 2 each rank holds I/2 = 128, one 128-block of each of the gate and up halves.
QH, QI = 128, 256
PREFIX = "model.layers.0.mlp"


def parallel_for(world: int, rank: int, tp: int = 1, **kw) -> moekit.ParallelConfig:
    """Rank ``rank`` of ``world`` laid out TP-innermost: ep_size = world / tp."""
    ep_rank, tp_rank = divmod(rank, tp)
    return moekit.ParallelConfig(ep_size=world // tp, ep_rank=ep_rank, tp_size=tp, tp_rank=tp_rank, **kw)


def _cut(v: torch.Tensor, dim: int, parallel: moekit.ParallelConfig, halves: int = 1) -> torch.Tensor:
    """This TP rank's contiguous part of each of ``halves`` equal halves of dimension ``dim`` (written out here,
    not with moekit's helpers)."""
    size = v.shape[dim] // halves
    part = size // parallel.tp_size
    starts = [h * size + parallel.tp_rank * part for h in range(halves)]
    return torch.cat([v.narrow(dim, s, part) for s in starts], dim)


def local_state(full: moekit.MoE, parallel: moekit.ParallelConfig) -> dict[str, torch.Tensor]:
    """``full``'s state with the routed experts cut to this rank's experts and, under TP, its slice of I: gate and
    up rows alike (w13, w13_bias, per-row and block scales of w13), w2's columns and its block scales' columns.
    ``w2_bias`` [E, H] and per-tensor scales stay whole."""
    ids = local_experts(parallel.ep_size, parallel.ep_rank, full.config.num_experts, parallel.placement)
    method = full.routed_experts.quant_method
    # mxfp4's e8m0 groups run along K, like blocks: w13's go with its rows, w2's with its columns of I
    granularity = "block" if method.name == "mxfp4" else getattr(method, "granularity", None)
    state = {}
    for k, v in full.state_dict().items():
        name = k.removeprefix("routed_experts.")
        if name != k:
            v = v[ids]
            if name in ("w13", "w13_bias") or (name == "w13_scale" and granularity in ("channel", "block")):
                v = _cut(v, 1, parallel, halves=2)
            elif name == "w2" or (name == "w2_scale" and granularity == "block"):
                v = _cut(v, 2, parallel)
        state[k] = v
    return state


def _write_quantized(full: moekit.MoE, path: str, scheme: str) -> None:
    """``full`` (8-bit) as a per-expert checkpoint the way fp8 models store one: codes with ``weight_scale_inv``
    (DeepSeek-V3 blocks) or ``weight_scale`` (compressed-tensors rows, per tensor 0-d), and its config.json."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg, r = full.config, full.routed_experts
    scale_name = "weight_scale_inv" if scheme == "fp8_block" else "weight_scale"
    tensors = {f"{PREFIX}.gate.weight": full.gate.weight}
    for e in range(cfg.num_experts):
        base = f"{PREFIX}.experts.{e}."
        tensors[base + "gate_proj.weight"], tensors[base + "up_proj.weight"] = r.w13[e, :QI], r.w13[e, QI:]
        tensors[base + "down_proj.weight"] = r.w2[e]
        if scheme == "fp8_tensor":  # one merged scale per expert serves gate and up
            gate = up = r.w13_scale[e]
        else:  # the gate rows' scales, then the up rows' (I/128 block rows or I rows each)
            gate, up = r.w13_scale[e].chunk(2)
        tensors[base + "gate_proj." + scale_name], tensors[base + "up_proj." + scale_name] = gate, up
        tensors[base + "down_proj." + scale_name] = r.w2_scale[e]
    save_file({k: v.detach().clone() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    weights = {"num_bits": 8, "type": "int" if scheme.startswith("int8") else "float", "symmetric": True,
               "dynamic": False, "strategy": "channel"}
    tokens = {**weights, "strategy": "token", "dynamic": True}
    quant = ({"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
             if scheme == "fp8_block" else
             {"quant_method": "compressed-tensors", "format": f"{weights['type']}-quantized",
              "config_groups": {"group_0": {"weights": weights, "input_activations": tokens}}})
    config = {"model_type": "qwen3_moe", "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
              "hidden_size": QH, "moe_intermediate_size": QI, "norm_topk_prob": False, "num_hidden_layers": 1,
              "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu", "torch_dtype": "float32",
              "quantization_config": quant}
    if scheme != "fp8_tensor":  # (dynamic per-tensor activations: loaded with load_moe alone)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)


def _quant_checkpoint_case(rank: int, world: int, out_dir: str) -> None:
    """TP 2 (world 4: EP 2 x TP 2) of 8-bit experts: a full checkpoint loads exactly the sliced codes and scales
    (``load_moe``; ``from_pretrained`` where config.json names the scheme), which are also what quantizing the
    sliced float layer online gives where a scale's amax stays within the slice (blocks align: I/tp is a multiple
    of 128; w13's rows span H), and every layer computes what the single-process quantized layer does."""
    from moekit.loading import load_moe

    parallel = parallel_for(world, rank, 2, dispatch="all_to_all")
    cfg = moekit.MoEConfig(num_experts=6, top_k=2, hidden_size=QH, intermediate_size=QI)
    x_all = torch.randn(3 * parallel.ep_size, QH, generator=torch.Generator().manual_seed(3))
    mine = slice(3 * parallel.ep_rank, 3 * parallel.ep_rank + 3)
    fulls, onlines = {}, {}
    for scheme in SCHEMES:
        torch.manual_seed(11)
        fulls[scheme] = moekit.MoE(cfg)
        onlines[scheme] = moekit.MoE(cfg, parallel=parallel)
        onlines[scheme].load_state_dict(local_state(fulls[scheme], parallel))
        moekit.quantize(fulls[scheme], scheme)
        moekit.quantize(onlines[scheme], scheme)
        if rank == 0:
            _write_quantized(fulls[scheme], os.path.join(out_dir, f"tp_{scheme}"), scheme)
    dist.barrier()
    errors = []  # collected, not raised: every rank runs every layer, so the all-reduces stay paired
    for scheme, full in fulls.items():
        path = os.path.join(out_dir, f"tp_{scheme}")
        expected = local_state(full, parallel)
        tp = moekit.MoE(cfg, quant_method=QUANT_SCHEMES[scheme](), parallel=parallel)
        report = load_moe(tp, path, PREFIX)
        layers = {"load_moe": tp}
        if report.missing or report.unexpected:
            errors.append(f"{scheme}: missing {report.missing}, unexpected {report.unexpected}")
        if scheme != "fp8_tensor":  # (no config.json: dynamic per-tensor activations)
            layers["from_pretrained"] = moekit.MoE.from_pretrained(path, parallel=parallel, backend="torch")
        layers["quantize"] = onlines[scheme]
        for how, layer in layers.items():
            # Quantized online, a scale whose amax spans I (w2's per row, per tensor) is the slice's own, not the
            # full layer's sliced: different codes, within the quantization tolerance (checked below).
            exact = {"fp8_block": 4, "fp8_tensor": 0}.get(scheme, 2) if how == "quantize" else 4
            for name in ("w13", "w13_scale", "w2", "w2_scale")[:exact]:
                got, want = getattr(layer.routed_experts, name), expected[f"routed_experts.{name}"]
                if got.dtype != want.dtype or not torch.equal(got, want):
                    errors.append(f"{scheme} {how}: {name} {tuple(got.shape)} is not the sliced full tensor "
                                  f"{tuple(want.shape)}")
            with torch.no_grad():
                try:
                    assert_close(layer(x_all[mine]), full(x_all)[mine], name=f"{scheme} {how}",
                                 tol=QUANT_TOLERANCES["int8" if scheme.startswith("int8") else "fp8_e4m3"])
                except AssertionError as err:
                    errors.append(str(err))
    assert not errors, "\n".join(errors)


def _bias_checkpoint_case(rank: int, world: int, out_dir: str) -> None:
    """A gpt-oss checkpoint (gate/up columns and bias entries interleaved, transposed) under TP 2: this rank's
    experts, gate and up slices of w13 and w13_bias, w2's columns and the whole w2_bias; the output matches."""
    from safetensors.torch import save_file

    from moekit.loading import load_moe

    path = os.path.join(out_dir, "tp_gpt_oss.safetensors")
    torch.manual_seed(12)
    cfg = moekit.MoEConfig(num_experts=6, top_k=2, hidden_size=32, intermediate_size=16, bias=True,
                           activation=moekit.Activation(name="swigluoai", limit=0.5))
    full = moekit.MoE(cfg)
    if rank == 0:
        r = full.routed_experts
        gate_up = torch.stack([r.w13[:, :16], r.w13[:, 16:]], dim=2).flatten(1, 2)  # rows g0, u0, g1, u1, ...
        bias = torch.stack([r.w13_bias[:, :16], r.w13_bias[:, 16:]], dim=2).flatten(1, 2)
        save_file({"mlp.router.weight": full.gate.weight.detach(),
                   "mlp.experts.gate_up_proj": gate_up.transpose(1, 2).contiguous().detach(),
                   "mlp.experts.gate_up_proj_bias": bias.contiguous().detach(),
                   "mlp.experts.down_proj": r.w2.transpose(1, 2).contiguous().detach(),
                   "mlp.experts.down_proj_bias": r.w2_bias.detach()}, path)
    dist.barrier()
    parallel = parallel_for(world, rank, 2, dispatch="allgather_reducescatter")
    tp = moekit.MoE(cfg, parallel=parallel)
    report = load_moe(tp, path, "mlp", layout="gpt_oss")
    assert not report.missing and not report.unexpected, report
    expected = local_state(full, parallel)
    for name in ("w13", "w2", "w13_bias", "w2_bias"):
        assert torch.equal(getattr(tp.routed_experts, name), expected[f"routed_experts.{name}"]), name
    x_all = torch.randn(3 * parallel.ep_size, 32)
    mine = slice(3 * parallel.ep_rank, 3 * parallel.ep_rank + 3)
    with torch.no_grad():
        assert_close(tp(x_all[mine]), full(x_all)[mine], torch.float32)


def _wna16_checkpoint_case(rank: int, world: int, out_dir: str) -> None:
    """4-bit GPTQ (asymmetric) and compressed-tensors checkpoints under TP 2: ``load_moe`` cuts every packed tensor,
    scale, zero point, g_idx and weight_shape to this rank's share of I (exactly the full layer's weights, sliced)
    and the layer computes what the single-process float layer on the dequantized weights does."""
    from safetensors.torch import save_file

    from moekit.loading import load_moe
    from moekit.quant import WNA16MoEMethod
    from moekit.quant.wna16 import dequantized_weights
    from tests.quant.test_wna16_loading import expert_tensors

    parallel = parallel_for(world, rank, 2, dispatch="all_to_all")
    e_num, hidden, inter, g = 4, 64, 128, 32
    cfg = moekit.MoEConfig(num_experts=e_num, top_k=2, hidden_size=hidden, intermediate_size=inter)
    x_all = torch.randn(3 * parallel.ep_size, hidden, generator=torch.Generator().manual_seed(5))
    mine = slice(3 * parallel.ep_rank, 3 * parallel.ep_rank + 3)
    for fmt, sym in (("gptq", False), ("compressed-tensors", True)):
        gen = torch.Generator().manual_seed(21)
        full = moekit.MoE(cfg)
        tensors, w13, w2 = expert_tensors(fmt, PREFIX, ("gate_proj", "up_proj", "down_proj"), e_num, hidden, inter,
                                          g, sym, gen)
        tensors[f"{PREFIX}.gate.weight"] = full.gate.weight.detach().clone()
        full.routed_experts.w13.data.copy_(w13)
        full.routed_experts.w2.data.copy_(w2)
        path = os.path.join(out_dir, f"tp_{fmt}.safetensors")
        if rank == 0:
            save_file(tensors, path)
        dist.barrier()
        method = WNA16MoEMethod(bits=4, group_size=g, sym=sym, checkpoint_format=fmt)
        tp = moekit.MoE(cfg, quant_method=method, parallel=parallel)
        report = load_moe(tp, path, PREFIX)
        assert not report.missing and not report.unexpected, report
        expected = local_state(full, parallel)
        deq13, deq2 = dequantized_weights(tp.routed_experts)
        assert torch.equal(deq13, expected["routed_experts.w13"]), fmt
        assert torch.equal(deq2, expected["routed_experts.w2"]), fmt
        with torch.no_grad():
            assert_close(tp(x_all[mine]), full(x_all)[mine], torch.float32)


def _write_mxfp4(full: moekit.MoE, path: str, config: dict, layout: str) -> None:
    """``full`` (mxfp4, biases) as gpt-oss stores it (fused ``*_blocks`` / ``*_scales`` / ``*_bias``, gate/up rows
    interleaved) with its config.json, or as compressed-tensors' per-expert ``weight_packed`` / ``weight_scale``."""
    from safetensors.torch import save_file

    from moekit._layout import interleave

    os.makedirs(path, exist_ok=True)
    r, inter, pre = full.routed_experts, full.config.intermediate_size, f"{PREFIX}.experts."
    tensors = {f"{PREFIX}.router.weight": full.gate.weight, f"{PREFIX}.router.bias": full.gate.bias}
    if layout == "gpt_oss":
        for proj, w, b in (("gate_up_proj", "w13", "w13_bias"), ("down_proj", "w2", "w2_bias")):
            rows = interleave if w == "w13" else (lambda t, dim: t)
            codes = rows(getattr(r, w), dim=1)
            tensors[pre + proj + "_blocks"] = codes.unflatten(-1, (codes.shape[-1] // 16, 16))
            tensors[pre + proj + "_scales"] = rows(getattr(r, f"{w}_scale"), dim=1)
            tensors[pre + proj + "_bias"] = rows(getattr(r, b), dim=1)
    else:
        for e in range(full.config.num_experts):
            for proj, w, rows in (("gate_proj", "w13", slice(0, inter)), ("up_proj", "w13", slice(inter, None)),
                                  ("down_proj", "w2", slice(None))):
                tensors[f"{pre}{e}.{proj}.weight_packed"] = getattr(r, w)[e, rows]
                tensors[f"{pre}{e}.{proj}.weight_scale"] = getattr(r, f"{w}_scale")[e, rows]
                tensors[f"{pre}{e}.{proj}.bias"] = (r.w2_bias if w == "w2" else r.w13_bias)[e, rows]
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def _mxfp4_checkpoint_case(rank: int, world: int, out_dir: str) -> None:
    """mxfp4 experts with biases under TP 2 (world 4: EP 2 x TP 2): gpt-oss's fused checkpoint (``load_moe`` and
    ``from_pretrained``) and compressed-tensors' per-expert one load exactly the full layer's codes, e8m0 scales
    and w13_bias sliced along I, w2_bias whole; ``moekit.quantize`` of the TP layer's float slice gives the same
    bytes (w2's groups of 32 align: I/tp = 64); every layer computes what the single-process layer does."""
    from moekit.loading import load_moe
    from moekit.quant import MXFP4MoEMethod

    parallel = parallel_for(world, rank, 2, dispatch="allgather_reducescatter")
    config = {"model_type": "gpt_oss", "num_local_experts": 4, "num_experts_per_tok": 2, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 1, "swiglu_limit": 7.0, "torch_dtype": "float32",
              "quantization_config": {"quant_method": "mxfp4"}}
    cfg = moekit.MoEConfig.from_hf(config, 0)
    torch.manual_seed(13)
    full = moekit.MoE(cfg)
    with torch.no_grad():  # biases big enough to matter, and distinct per rank's slice
        full.routed_experts.w13_bias.normal_(0, 0.1)
        full.routed_experts.w2_bias.normal_(0, 0.1)
    online = moekit.MoE(cfg, parallel=parallel)
    online.load_state_dict(local_state(full, parallel))
    moekit.quantize(full, "mxfp4")
    moekit.quantize(online, "mxfp4")
    paths = {layout: os.path.join(out_dir, f"tp_mxfp4_{layout}") for layout in ("gpt_oss", "per_expert")}
    if rank == 0:
        for layout, path in paths.items():
            _write_mxfp4(full, path, config, layout)
    dist.barrier()
    layers = {"quantize": online, "from_pretrained": moekit.MoE.from_pretrained(paths["gpt_oss"], parallel=parallel)}
    errors = []  # collected, not raised: every rank runs every layer, so the all-reduces stay paired
    for layout, path in paths.items():
        layer = moekit.MoE(cfg, quant_method=MXFP4MoEMethod(), parallel=parallel)
        report = load_moe(layer, path, PREFIX)
        if report.missing or report.unexpected or report.layout != layout:
            errors.append(f"{layout}: {report}")
        layers[f"load_moe {layout}"] = layer
    expected = local_state(full, parallel)
    x_all = torch.randn(3 * parallel.ep_size, 64, generator=torch.Generator().manual_seed(6))
    mine = slice(3 * parallel.ep_rank, 3 * parallel.ep_rank + 3)
    for how, layer in layers.items():
        for name in ("w13", "w13_scale", "w2", "w2_scale", "w13_bias", "w2_bias"):
            got, want = getattr(layer.routed_experts, name), expected[f"routed_experts.{name}"]
            if got.dtype != want.dtype or not torch.equal(got, want):
                errors.append(f"{how}: {name} {tuple(got.shape)} is not the sliced full tensor {tuple(want.shape)}")
        with torch.no_grad():
            try:
                assert_close(layer(x_all[mine]), full(x_all)[mine], torch.float32, name=how)
            except AssertionError as err:
                errors.append(str(err))
    assert not errors, "\n".join(errors)


def _refusals(rank: int, world: int) -> None:
    """Block scales and groups must split along I: I/tp a multiple of the 128-block (fp8_block, w4a16_g128) or of
    mxfp4's group of 32, at construction and online."""
    from moekit.quant import MXFP4MoEMethod

    parallel = parallel_for(world, rank, 2)
    cfg = moekit.MoEConfig(num_experts=4, top_k=2, hidden_size=QH, intermediate_size=128)  # I/tp = 64
    with pytest.raises(ValueError, match=r"tp_size=2.*intermediate_size=128.*128"):
        moekit.MoE(cfg, parallel=parallel, quant_method=QUANT_SCHEMES["fp8_block"]())
    layer = moekit.MoE(cfg, parallel=parallel)
    with pytest.raises(ValueError, match=r"tp_size=2.*intermediate_size=128.*128"):
        moekit.quantize(layer, "fp8_block")
    with pytest.raises(ValueError, match=r"tp_size=2.*intermediate_size=128.*128"):
        moekit.quantize(layer.routed_experts, "fp8_block")
    assert layer.routed_experts.quant_method.name == "unquantized"  # refused before anything changed
    with pytest.raises(ValueError, match=r"multiple of 128.*tp_size=2.*intermediate_size=128"):  # 64 a rank
        moekit.quantize(layer, "w4a16_g128")
    moekit.quantize(layer, "fp8_channel")  # per-row scales split anywhere
    odd = moekit.MoEConfig(num_experts=4, top_k=2, hidden_size=QH, intermediate_size=96)  # 48 a rank
    with pytest.raises(ValueError, match=r"multiple of 32.*tp_size=2 and intermediate_size=96"):
        moekit.MoE(odd, parallel=parallel, quant_method=MXFP4MoEMethod())  # a group of 32 across two ranks
    with pytest.raises(ValueError, match=r"multiple of 32.*tp_size=2 and intermediate_size=96"):
        moekit.quantize(moekit.MoE(odd, parallel=parallel), "mxfp4")


def cases(rank: int, world: int, out_dir: str) -> list[tuple[str, Callable[[], None]]]:
    """The TP steps of a rank (names are the pytest case ids)."""
    return [("tp_quant_checkpoint_loads_slices", lambda: _quant_checkpoint_case(rank, world, out_dir)),
            ("tp_bias_checkpoint_loads_slices", lambda: _bias_checkpoint_case(rank, world, out_dir)),
            ("tp_wna16_checkpoint_loads_slices", lambda: _wna16_checkpoint_case(rank, world, out_dir)),
            ("tp_mxfp4_checkpoint_loads_slices", lambda: _mxfp4_checkpoint_case(rank, world, out_dir)),
            ("tp_quant_refusals", lambda: _refusals(rank, world))]


NAMES = ("tp_quant_checkpoint_loads_slices", "tp_bias_checkpoint_loads_slices", "tp_wna16_checkpoint_loads_slices",
         "tp_mxfp4_checkpoint_loads_slices", "tp_quant_refusals")

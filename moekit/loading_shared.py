"""Shared experts from a checkpoint (``load_moe``'s last step): moekit's shared experts are unquantized Linears,
so a checkpoint that quantized them (DeepSeek-V3 FP8 blocks or rows, GPTQ/AWQ/compressed-tensors/mxfp4 tensors
beside the routed experts' codes) is dequantized into the layer's dtype here, checked before anything is copied.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from moekit.checkpoint import CODE_DTYPES
from moekit.loading_checks import finite_in
from moekit.ops.quantize import dequantize_weight
from moekit.quant.mxfp4 import MXFP4MoEMethod, check_e8m0_scales
from moekit.quant.w8a8 import WEIGHT_SCALES, W8A8MoEMethod, check_scales
from moekit.quant.wna16 import WNA16MoEMethod

if TYPE_CHECKING:
    from moekit.layer import MoE
    from moekit.loading import _Plan

_SHARED_NAMES = ("shared_experts", "shared_expert", "shared_mlp")
# Checkpoint names of weight-only group scales (GPTQ/AWQ ``scales``; compressed-tensors and moekit ``weight_scale``),
# checked like 8-bit weight scales before any copy; mxfp4's e8m0 bytes are checked for 255 (NaN) the same way.
_GROUP_SCALES = ("scales", "weight_scale")


def is_group_scale(method: object, key: str) -> bool:
    """Whether ``key`` holds float group scales of a weight-only ``method`` (``check_group_scale`` applies)."""
    return isinstance(method, WNA16MoEMethod) and key.rpartition(".")[2] in _GROUP_SCALES


def is_e8m0_scale(method: object, key: str) -> bool:
    """Whether ``key`` holds mxfp4's e8m0 scale bytes for ``method`` (``check_e8m0_scale`` applies)."""
    return isinstance(method, MXFP4MoEMethod) and key.rpartition(".")[2] in ("weight_scale", "gate_up_proj_scales",
                                                                            "down_proj_scales")


def check_e8m0_scale(key: str, scale: torch.Tensor) -> None:
    check_e8m0_scales(f"checkpoint key {key!r}", scale)


def check_group_scale(key: str, scale: torch.Tensor) -> None:
    # A NaN/inf group scale gives NaN weights, a negative one flips its group's sign: a corrupted checkpoint.
    check_scales(f"checkpoint key {key!r}", scale, "finite non-negative group scales")


def load_shared(moe: MoE, plan: _Plan, prefix: str) -> None:
    """The shared experts of ``moe`` (and their gate) from the checkpoint under ``prefix``."""
    shared = moe.shared_experts
    gate_up = shared.gate_up_proj.weight
    # The prefix from any key under it: a quantized shared expert stores qweight/weight_packed/..., no `.weight`.
    stored = set()
    for key in plan.ckpt.keys():
        if key.startswith(prefix):
            name, dot, _ = key[len(prefix):].partition(".")
            if dot:
                stored.add(name)
    base = prefix + next((n for n in _SHARED_NAMES if n in stored), _SHARED_NAMES[0]) + "."
    if base + "gate_up_proj.weight" in plan.ckpt or not shared.activation.is_gated:
        _copy_shared(moe, plan, gate_up, [base + "gate_up_proj.weight", base + "up_proj.weight"])
    else:
        inter = shared.intermediate_size
        _copy_shared(moe, plan, gate_up[:inter], [base + "gate_proj.weight"])
        _copy_shared(moe, plan, gate_up[inter:], [base + "up_proj.weight"])
    _copy_shared(moe, plan, shared.down_proj.weight, [base + "down_proj.weight"])
    if shared.gate is not None:
        plan.copy(shared.gate.weight, [prefix + "shared_expert_gate.weight", base + "gate.weight"])


def _copy_shared(moe: MoE, plan: _Plan, dest: torch.Tensor, keys: list[str]) -> None:
    """``plan.copy``, except that 8-bit shared weights (DeepSeek-V3 FP8 quantizes its shared experts) are
    dequantized into the layer's dtype: moekit's shared experts are unquantized Linears."""
    key = plan.first(keys)
    method = moe.routed_experts.quant_method
    packed = isinstance(method, (WNA16MoEMethod, MXFP4MoEMethod))
    if key is None and packed and _copy_shared_wna16(plan, dest, keys[0], method):
        return
    if key is None or plan.ckpt.dtype(key) not in CODE_DTYPES:
        plan.copy(dest, keys)
        return
    base = key.removesuffix("weight")
    scale_key = plan.first([base + "weight_scale_inv", base + "weight_scale"])
    if scale_key is None:
        plan.report.missing.append(base + "weight_scale_inv")
        return
    n, k = dest.shape
    block = method.block_shape if isinstance(method, W8A8MoEMethod) and method.block_shape else (128, 128)
    scale_shape = plan.ckpt.shape(scale_key)
    # The scale's shape says the granularity: one element per tensor, [N, 1] per row, else blocks.
    if math.prod(scale_shape) == 1:
        granularity, expected = "tensor", scale_shape
    elif scale_shape == (n, 1):
        granularity, expected = "channel", (n, 1)
    else:
        granularity, expected = "block", (math.ceil(n / block[0]), math.ceil(k / block[1]))
    if plan.ckpt.shape(key) != (n, k) or scale_shape != expected:
        raise ValueError(f"checkpoint key {scale_key!r}: expected shape {expected} for {key!r} "
                         f"{plan.ckpt.shape(key)} -> {(n, k)} ({granularity}), got {scale_shape}")
    ckpt = plan.ckpt

    def apply(q: torch.Tensor) -> None:
        s = ckpt.get(scale_key).float()
        s = s.reshape(()) if granularity == "tensor" else s
        w = dequantize_weight(q, s, granularity, block if granularity == "block" else None)
        dest.copy_(finite_in(key, dest.dtype)(w))  # 448 x a large scale can overflow an fp16 layer

    # A NaN/inf/negative scale would dequantize into a NaN or sign-flipped Linear: refused before any copy.
    plan.check_values([scale_key], lambda k, s: check_scales(f"checkpoint key {k!r}", s, WEIGHT_SCALES))
    plan.add(key, (n, k), apply)
    plan.report.loaded.append(scale_key)
    if base + "input_scale" in ckpt:  # the activation scale of a quantized shared MLP, unused unquantized
        plan.report.loaded.append(base + "input_scale")


def _copy_shared_wna16(plan: _Plan, dest: torch.Tensor, key: str, method: WNA16MoEMethod) -> bool:
    """A shared-expert linear stored as the routed experts' 4/8-bit tensors (GPTQ/AWQ checkpoints quantize every
    Linear), dequantized into ``dest``; False when it is not stored that way."""
    base = key.removesuffix("weight")
    keys = {name: base + name for _, name in method.checkpoint_tensors()}
    if not any(k in plan.ckpt for k in keys.values()):
        return False
    missing = [k for k in keys.values() if k not in plan.ckpt]
    if missing:
        plan.report.missing += missing
        return True
    first, ckpt, done = next(iter(keys.values())), plan.ckpt, {}

    def dequantize(_key: str, _t: torch.Tensor) -> None:  # before any copy: a failure leaves the layer as it was
        for key in keys.values():
            if is_group_scale(method, key):
                check_group_scale(key, ckpt.get(key))
            elif is_e8m0_scale(method, key):
                check_e8m0_scale(key, ckpt.get(key))
        try:
            w = method.dequantize_tensors({n: ckpt.get(k) for n, k in keys.items()}, n=dest.shape[0],
                                          k=dest.shape[1])
        except (ValueError, KeyError) as err:
            raise ValueError(f"checkpoint key {first!r} ({method.name}): {err}") from None
        done["w"] = finite_in(first, dest.dtype)(w)  # codes times a large scale can overflow an fp16 layer

    plan.check_values([first], dequantize)
    plan.add(first, ckpt.shape(first), lambda _t: dest.copy_(done.pop("w")))
    plan.report.loaded += [k for k in keys.values() if k != first]
    return True

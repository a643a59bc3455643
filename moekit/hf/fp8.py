"""transformers' fine-grained fp8 experts (``FineGrainedFP8Config`` -> ``FP8Experts``) on moekit's fp8 block method.

``FP8Experts`` keeps the codes and scales moekit's ``Fp8BlockMoEMethod`` takes, under other names:

    gate_up_proj            fp8 e4m3 [E, 2I, H]   (gate rows, then up rows)       -> w13
    gate_up_proj_scale_inv  fp32 [E, max(⌈2I/bn⌉, 2), ⌈H/bk⌉]                       -> w13_scale
    down_proj               fp8 e4m3 [E, H, I]                                     -> w2
    down_proj_scale_inv     fp32 [E, ⌈H/bn⌉, ⌈I/bk⌉]                                -> w2_scale
    activations             dynamic, per token per bk columns                      -> moekit's "group" activations

Both multiply each (bn, bk) block of codes by its scale (``weight_scale_inv``); the one difference is where the
row blocks of gate_up_proj start. transformers blocks the 2I rows as one tensor, moekit blocks gate and up apart
(``moekit.ops.quantize.expert_scale_shapes``: 2·⌈I/bn⌉ rows). They agree when bn divides I. When 2I <= bn all
2I rows fall in transformers' first row block (the second scale row, there only because of ``min_sf_out=2``, is
never read), which is moekit's layout with that scale repeated for gate and up. For any other I a block straddles
gate and up rows, which moekit cannot express.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.quant.params import QuantParams

FP8_BLOCK = (128, 128)


def is_fp8_experts(module: nn.Module) -> bool:
    """True for experts holding fp8 codes with ``*_scale_inv`` scales (transformers' ``FP8Experts``)."""
    return hasattr(module, "down_proj_scale_inv")


def fp8_unsupported(module: nn.Module, *, allow_scale_copy: bool = True) -> str | None:
    """Why moekit's fp8 block method cannot run ``module`` (an ``FP8Experts``) on its own codes, or None.

    ``allow_scale_copy=False`` also refuses the 2I <= 128 layout, whose w13 scale is a (small) derived tensor
    rather than the module's own.
    """
    w13 = _w13_name(module)
    codes = (getattr(module, w13, None), getattr(module, "down_proj", None))
    scales = (getattr(module, f"{w13}_scale_inv", None), getattr(module, "down_proj_scale_inv", None))
    if any(not isinstance(t, torch.Tensor) for t in (*codes, *scales)):
        return f"no {w13}/down_proj codes with *_scale_inv scales"
    if any(t.dtype != torch.float8_e4m3fn for t in codes):
        return f"expert codes in {codes[0].dtype} (moekit's fp8 block method takes float8_e4m3fn; fp4 experts are not)"
    bad = next((t.dtype for t in scales if t.dtype != torch.float32), None)
    if bad is not None:
        hint = " (scale_fmt='ue8m0')" if bad == getattr(torch, "float8_e8m0fnu", None) else ""
        return f"{bad} weight scales{hint}: moekit's fp8 block method takes float32 scales"
    scheme = getattr(module, "activation_scheme", "dynamic")
    if scheme != "dynamic":
        return f"activation_scheme={scheme!r} (moekit quantizes block-fp8 activations dynamically, per 128 columns)"
    block = getattr(module, "block_size", None)
    if block is None or tuple(block) != FP8_BLOCK:
        return f"weight_block_size={block!r} (moekit's fp8 block method is {FP8_BLOCK[0]}x{FP8_BLOCK[1]})"
    if getattr(module, "has_bias", False):
        return "expert biases"
    num_experts, rows, hidden = codes[0].shape
    inter = codes[1].shape[2]
    gated = getattr(module, "has_gate", True)
    bn, bk = FP8_BLOCK
    if gated and inter % bn != 0 and (2 * inter > bn or not allow_scale_copy):
        return (f"intermediate size {inter}, not a multiple of {bn}: transformers blocks the fused gate/up rows as "
                f"one tensor, so a scale block covers gate and up rows; moekit blocks gate and up apart")
    w13_rows = max(-(-rows // bn), 2) if gated else -(-rows // bn)
    expected = ((num_experts, w13_rows, -(-hidden // bk)), (num_experts, -(-hidden // bn), -(-inter // bk)))
    for name, scale, shape in zip((f"{w13}_scale_inv", "down_proj_scale_inv"), scales, expected, strict=True):
        if tuple(scale.shape) != shape:
            return f"{name} of shape {tuple(scale.shape)}, expected {shape} for {bn}x{bk} blocks"
    return None


def fp8_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, QuantParams]:
    """``(w13, w2, quant)`` of an ``FP8Experts`` in moekit's fp8 block layout: the module's own codes and scales
    (for 2I <= 128 the w13 scale is its first row, repeated for gate and up: E x 2 x ⌈H/128⌉ floats).

    Raises:
        NotImplementedError: what ``fp8_unsupported`` names.
    """
    reason = fp8_unsupported(module)
    if reason is not None:
        raise NotImplementedError(reason)
    w13_name = _w13_name(module)
    w13, w2 = getattr(module, w13_name), module.down_proj
    w13_scale = getattr(module, f"{w13_name}_scale_inv")
    inter = w2.shape[2]
    if getattr(module, "has_gate", True) and inter % FP8_BLOCK[0] != 0:
        # 2I <= 128: every row reads transformers' first scale row (see the module docstring).
        w13_scale = w13_scale[:, :1].expand(-1, 2, -1).contiguous()
    quant = QuantParams(
        weight_dtype="fp8_e4m3",
        act_dtype="fp8_e4m3",
        w13_scale=w13_scale,
        w2_scale=module.down_proj_scale_inv,
        block_shape=FP8_BLOCK,
        granularity="block",
    )
    return w13, w2, quant


def _w13_name(module: nn.Module) -> str:
    return "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"

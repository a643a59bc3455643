"""Both expert GEMMs of a MoE in one launch, for decode: a program per (routed row, slice of I).

Shapes: T tokens, K top-k, N = T·K routed rows (row n = t·K + k), E local experts, H hidden, I intermediate,
S = ⌈I / block_i⌉ slices.

    for routed row n (expert e = ids[n], or expert_map[ids[n]]: -1 = another rank's, nothing written),
    for slice j of I (columns c = [j·block_i, (j+1)·block_i)):
        a = act(x[t] @ w13[e, gate c | up c].T + b13[e, c])     # GEMM 1: the whole H reduction, so act is exact
        y[j, n] = weight[n] · (a.to(x.dtype) @ w2[e][:, c].T + (b2[e] if j == 0))    # GEMM 2 split over I

The top-k reduction (``moekit.ops.reduce.topk_reduce``) then sums y over S and K in a fixed order, as it sums
GEMM 2's split-K partials in the unfused pipeline: the same math, with two launches instead of three (T = 1)
or four, and no intermediate [N, I] round trip. Why it exists: at decode the small-expert presets spend more
time in the ramps and tails of the separate launches than in streaming their weights (docs/perf/NOTES.md).
Every routed row reads its expert's weights on its own, so it pays only while rows rarely share an expert.
"""

from __future__ import annotations

import torch

from moekit._checks import (
    check_dot_operand, check_dtype, check_int_dtype, check_ndim, check_same_device, check_same_dtype, check_shape,
    check_signed_int_dtype,
)
from moekit.ops._kernels.fused_decode import fused_decode_kernel
from moekit.ops.activation import Activation, activation_code, activation_ref
from moekit.ops.heuristics import FusedDecodeConfig


def fused_decode_slices(inter: int, config: FusedDecodeConfig) -> int:
    """S, the number of partial sums ``fused_decode`` writes per routed row."""
    return -(-inter // config.block_i)


def fused_decode(
    x_TH: torch.Tensor,
    w13_E2IH: torch.Tensor,
    w2_EHI: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    y_SNH: torch.Tensor,
    config: FusedDecodeConfig,
    *,
    activation: Activation,
    w13_bias_E2I: torch.Tensor | None = None,
    w2_bias_EH: torch.Tensor | None = None,
    expert_map_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write the partial sums of the module docstring into ``y_SNH`` [S, N, H] (fp32 or x's dtype) and return it.

    ``topk_ids_TK`` holds expert ids (global ids when ``expert_map_E`` maps them to local ones, -1 = not here).
    The ids' values are not checked here (a device sync): ``ModularKernel.apply`` checks them; an id outside
    [0, E) without a map reads weights at its offset, anywhere in memory. Rows of other ranks' experts are not
    written: reduce with the same ``expert_map``.
    """
    check_ndim("x_TH", x_TH, 2, "[T, H]")
    check_ndim("w13_E2IH", w13_E2IH, 3, "[E, 2I or I, H]")
    check_ndim("w2_EHI", w2_EHI, 3, "[E, H, I]")
    num_tokens, hidden = x_TH.shape
    num_experts, _, inter = w2_EHI.shape
    gated = activation.is_gated
    check_shape("w13_E2IH", w13_E2IH, (num_experts, (2 if gated else 1) * inter, hidden),
                "[E, 2I, H]" if gated else "[E, I, H]")
    check_shape("w2_EHI", w2_EHI, (num_experts, hidden, inter), "[E, H, I]")
    check_same_dtype("w13_E2IH", w13_E2IH, "x_TH", x_TH)
    check_same_dtype("w2_EHI", w2_EHI, "x_TH", x_TH)
    check_dot_operand("x_TH", x_TH)
    check_ndim("topk_ids_TK", topk_ids_TK, 2, "[T, K]")
    top_k = topk_ids_TK.shape[1]
    check_shape("topk_ids_TK", topk_ids_TK, (num_tokens, top_k), "[T, K]")
    check_shape("topk_weights_TK", topk_weights_TK, (num_tokens, top_k), "[T, K]")
    check_int_dtype("topk_ids_TK", topk_ids_TK)
    check_dtype("topk_weights_TK", topk_weights_TK, (torch.float32, torch.float16, torch.bfloat16))
    check_dtype("y_SNH", y_SNH, sorted({torch.float32, x_TH.dtype}, key=str))
    for name, t in (("w13_E2IH", w13_E2IH), ("w2_EHI", w2_EHI), ("topk_weights_TK", topk_weights_TK),
                    ("topk_ids_TK", topk_ids_TK), ("y_SNH", y_SNH), ("w13_bias_E2I", w13_bias_E2I),
                    ("w2_bias_EH", w2_bias_EH), ("expert_map_E", expert_map_E)):
        if t is not None:
            check_same_device(name, t, "x_TH", x_TH)
    num_rows = num_tokens * top_k
    slices = fused_decode_slices(inter, config)
    check_shape("y_SNH", y_SNH, (slices, num_rows, hidden), "[S, N, H]")
    if y_SNH.stride(-1) != 1:
        raise ValueError(f"y_SNH: expected a contiguous last dim, got strides {y_SNH.stride()}")
    if x_TH.stride(-1) != 1:
        raise ValueError(f"x_TH: expected a contiguous last dim, got strides {x_TH.stride()}")
    # Biases, routing and the map are read as dense arrays.
    if w13_bias_E2I is not None:
        check_shape("w13_bias_E2I", w13_bias_E2I, w13_E2IH.shape[:2], "[E, 2I]")
        w13_bias_E2I = w13_bias_E2I.contiguous()
    if w2_bias_EH is not None:
        check_shape("w2_bias_EH", w2_bias_EH, (num_experts, hidden), "[E, H]")
        w2_bias_EH = w2_bias_EH.contiguous()
    if expert_map_E is not None:
        check_ndim("expert_map_E", expert_map_E, 1, "[E_global]")
        check_signed_int_dtype("expert_map_E", expert_map_E)
        expert_map_E = expert_map_E.contiguous()
    if num_rows == 0:
        return y_SNH
    ids, weights = topk_ids_TK.contiguous().reshape(-1), topk_weights_TK.contiguous().reshape(-1)
    fused_decode_kernel[(num_rows, slices)](
        x_TH, w13_E2IH, w2_EHI, y_SNH,
        w13_bias_E2I if w13_bias_E2I is not None else x_TH, w2_bias_EH if w2_bias_EH is not None else x_TH,
        weights, ids, expert_map_E if expert_map_E is not None else ids,
        num_rows, top_k, num_experts, hidden, inter,
        x_TH.stride(0), *w13_E2IH.stride(), *w2_EHI.stride(), y_SNH.stride(0), y_SNH.stride(1),
        w13_bias_E2I.stride(0) if w13_bias_E2I is not None else 0,
        w2_bias_EH.stride(0) if w2_bias_EH is not None else 0,
        activation.alpha, activation.limit if activation.limit is not None else 0.0,
        ACTIVATION=activation_code(activation), GATED=gated, HAS_B13=w13_bias_E2I is not None,
        HAS_B2=w2_bias_EH is not None, HAS_MAP=expert_map_E is not None,
        BLOCK_I=config.block_i, BLOCK_K=config.block_k, BLOCK_H=config.block_h,
        EVEN_K=hidden % config.block_k == 0, EVEN_H=hidden % config.block_h == 0, EVEN_I=inter % config.block_i == 0,
        DOT_PRECISION="ieee" if x_TH.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y_SNH


def fused_decode_ref(
    x_TH: torch.Tensor,
    w13_E2IH: torch.Tensor,
    w2_EHI: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    y_SNH: torch.Tensor,
    config: FusedDecodeConfig,
    *,
    activation: Activation,
    w13_bias_E2I: torch.Tensor | None = None,
    w2_bias_EH: torch.Tensor | None = None,
    expert_map_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch twin of ``fused_decode`` (fp32 math, the intermediate rounded to x's dtype)."""
    num_tokens, _ = x_TH.shape
    top_k = topk_ids_TK.shape[1]
    num_experts, _, inter = w2_EHI.shape
    ids = topk_ids_TK.reshape(-1).long()
    if expert_map_E is not None:
        ids = expert_map_E.long()[ids]
    weights = topk_weights_TK.reshape(-1).float()
    for n in range(num_tokens * top_k):
        e = int(ids[n])
        if not 0 <= e < num_experts:
            continue
        h = x_TH[n // top_k].float() @ w13_E2IH[e].float().t()
        if w13_bias_E2I is not None:
            h = h + w13_bias_E2I[e].float()
        a = activation_ref(h[None], activation)[0].to(x_TH.dtype).float()
        for j in range(y_SNH.shape[0]):
            c = slice(j * config.block_i, min((j + 1) * config.block_i, inter))
            part = a[c] @ w2_EHI[e][:, c].float().t()
            if j == 0 and w2_bias_EH is not None:
                part = part + w2_bias_EH[e].float()
            y_SNH[j, n] = (part * weights[n]).to(y_SNH.dtype)
    return y_SNH

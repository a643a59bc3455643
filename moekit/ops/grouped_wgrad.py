"""Grouped weight-gradient GEMM over the padded expert layout of ``moekit.ops.align``: the backward of
``grouped_gemm`` with respect to its expert weights (and biases).

Shapes: N routed rows, E local experts, M = BLOCK_M, ``n``/``k`` the weight's output/input width.

    for e in experts:
        rows_e = routed rows of expert e (from sorted_ids/expert_ids)
        g_r    = G[r // g_row_div] · weights[r]                 (weights: optional, per routed row)
        out[e]       = sum_{r in rows_e} g_r^T X[r // x_row_div]      # [n, k], fp32 accumulate
        bias_grad[e] = sum_{r in rows_e} g_r                          # optional, [n]

In a MoE backward, dW2[e] = sum (w · dout[t])^T a and dW13[e] = sum dh^T x[t]: the same alignment metadata as the
forward, the reduction running over an expert's rows instead of over K. An expert with no rows gets zeros.
"""

from __future__ import annotations

import torch

from moekit._checks import check_dot_operand, check_ndim, check_same_dtype, check_shape
from moekit.ops._kernels.grouped_wgrad import grouped_wgrad_kernel
from moekit.ops.align import AlignResult
from moekit.ops.heuristics import GemmConfig, wgrad_config


def expert_block_start(layout: AlignResult, num_experts: int) -> torch.Tensor:
    """[E + 1] int32: expert e owns row blocks [start[e], start[e + 1]) of ``layout`` (no host sync).

    ``align`` lays experts out in ascending order and marks unused blocks -1, so a search over the block ids with
    the unused ones moved past every expert finds each expert's first block.
    """
    ids = layout.expert_ids
    keys = torch.where(ids < 0, num_experts, ids)
    probes = torch.arange(num_experts + 1, dtype=keys.dtype, device=keys.device)
    return torch.searchsorted(keys, probes).to(torch.int32)


def grouped_wgrad(
    g: torch.Tensor,
    x: torch.Tensor,
    layout: AlignResult,
    out_ENK: torch.Tensor,
    *,
    num_rows: int,
    g_row_div: int = 1,
    x_row_div: int = 1,
    weights_N: torch.Tensor | None = None,
    bias_grad_EN: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Write every expert's weight gradient into ``out_ENK`` [E, n, k] (see the module docstring); return it.

    Args:
        g: [rows, n] output gradients, last dim contiguous; row ``sorted_ids[j] // g_row_div`` is read.
        x: [rows, k] the GEMM's inputs, same dtype as ``g``; row ``sorted_ids[j] // x_row_div`` is read.
        layout: from ``align`` (not the row-per-block layout).
        out_ENK: [E, n, k], last dim contiguous; every element is written.
        weights_N: optional [N] per-row scale of ``g`` (applied before the product, then rounded to g's dtype).
        bias_grad_EN: optional [E, n] contiguous, receives the per-expert column sums of the scaled ``g``.
        config: the [block_n, block_k] output tile, warps and stages (``split_k``/``group_m`` unused); default
            ``heuristics.wgrad_config``.
    """
    check_ndim("g", g, 2, "[rows, n]")
    check_ndim("x", x, 2, "[rows, k]")
    check_ndim("out_ENK", out_ENK, 3, "[E, n, k]")
    check_same_dtype("x", x, "g", g)  # tl.dot takes one dtype
    check_dot_operand("x", x)
    num_experts, n_dim, k_dim = out_ENK.shape
    if layout.row_per_block:
        raise ValueError("layout: grouped_wgrad needs the padded layout of align, got a row-per-block layout")
    if g.shape[1] != n_dim or x.shape[1] != k_dim:
        raise ValueError(f"out_ENK: expected [E, {g.shape[1]}, {x.shape[1]}] (g is [rows, n], x is [rows, k]), "
                         f"got shape {tuple(out_ENK.shape)}")
    for name, t in (("g", g), ("x", x), ("out_ENK", out_ENK)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a contiguous last dim, got strides {t.stride()}")
    for name, t, div in (("g", g, g_row_div), ("x", x, x_row_div)):
        # Row sorted_ids // div is read for every routed row: fewer rows are out-of-bounds reads.
        if t.shape[0] < -(-num_rows // div):
            raise ValueError(f"{name}: expected at least {-(-num_rows // div)} rows (N = {num_rows}, row_div = {div}), "
                             f"got shape {tuple(t.shape)}")
    if weights_N is not None:
        check_shape("weights_N", weights_N, (num_rows,), "[N]")
        weights_N = weights_N.contiguous()
    if bias_grad_EN is not None:
        check_shape("bias_grad_EN", bias_grad_EN, (num_experts, n_dim), "[E, n]")
        if bias_grad_EN.stride(-1) != 1:
            raise ValueError(f"bias_grad_EN: expected a contiguous last dim, got strides {bias_grad_EN.stride()}")
    if out_ENK.numel() == 0:
        # No tile to launch (n or k is 0), but with n > 0 the bias gradient still sums g's rows: the twin does it.
        if bias_grad_EN is not None:
            grouped_wgrad_ref(g, x, layout, out_ENK, num_rows=num_rows, g_row_div=g_row_div, x_row_div=x_row_div,
                              weights_N=weights_N, bias_grad_EN=bias_grad_EN)
        return out_ENK
    cfg = config or wgrad_config(n_dim, k_dim)
    block_start = expert_block_start(layout, num_experts)
    grid = (num_experts, -(-n_dim // cfg.block_n) * -(-k_dim // cfg.block_k))
    grouped_wgrad_kernel[grid](
        g, x, out_ENK,
        bias_grad_EN if bias_grad_EN is not None else out_ENK,
        weights_N if weights_N is not None else g,
        layout.sorted_ids, block_start,
        num_rows, n_dim, k_dim, g_row_div, x_row_div,
        g.stride(0), x.stride(0), out_ENK.stride(0), out_ENK.stride(1),
        bias_grad_EN.stride(0) if bias_grad_EN is not None else 0,
        HAS_WEIGHTS=weights_N is not None, HAS_BIAS_GRAD=bias_grad_EN is not None,
        BLOCK_M=layout.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_PRECISION="ieee" if g.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out_ENK


def grouped_wgrad_ref(
    g: torch.Tensor,
    x: torch.Tensor,
    layout: AlignResult,
    out_ENK: torch.Tensor,
    *,
    num_rows: int,
    g_row_div: int = 1,
    x_row_div: int = 1,
    weights_N: torch.Tensor | None = None,
    bias_grad_EN: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch twin of ``grouped_wgrad``, in fp32."""
    num_experts = out_ENK.shape[0]
    acc = torch.zeros(out_ENK.shape, dtype=torch.float32, device=out_ENK.device)
    bias_acc = torch.zeros(out_ENK.shape[:2], dtype=torch.float32, device=out_ENK.device)
    m = layout.block_m
    sorted_ids = layout.sorted_ids.long()
    for i_b in range(int(layout.num_padded.item()) // m):
        rows = sorted_ids[i_b * m : (i_b + 1) * m]
        rows = rows[rows < num_rows]
        e = int(layout.expert_ids[i_b])
        if rows.numel() == 0 or not 0 <= e < num_experts:
            continue
        g_rows = g[rows // g_row_div].float()
        if weights_N is not None:
            g_rows = (g_rows * weights_N[rows].float()[:, None]).to(g.dtype).float()
        acc[e] += g_rows.t() @ x[rows // x_row_div].float()
        bias_acc[e] += g_rows.sum(dim=0)
    out_ENK.copy_(acc.to(out_ENK.dtype))
    if bias_grad_EN is not None:
        bias_grad_EN.copy_(bias_acc.to(bias_grad_EN.dtype))
    return out_ENK

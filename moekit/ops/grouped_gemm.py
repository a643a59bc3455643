"""Grouped GEMM over the padded expert layout of ``moekit.ops.align``, gathering A rows by index.

Shapes: N routed rows, E local experts, M = BLOCK_M, ``n_out`` output columns (I for GEMM1, H for GEMM2).

    for block b with e = expert_ids[b], for slot j in block b with row = sorted_ids[b·M + j] < N:
        h = A[row // a_row_div] @ B[e].T + bias[e]                  # fp32 accumulate
        gated:  h = act(h[:n_out], h[n_out:])    (B rows: gate [0, n_out), then up [n_out, 2·n_out))
        C[s, row] = h · weights[row]                                # weights: optional, per routed row

GEMM1 of a MoE gathers token rows (``a_row_div`` = K) and fuses the activation; GEMM2 reads the intermediate
rows one to one (``a_row_div`` = 1) and applies the routing weight. With ``split_k`` = S, C holds S partial sums
[S, N, n_out] (bias in split 0), which the top-k reduction adds up with no atomics. Rows of C that no slot maps
to are left untouched.
"""

from __future__ import annotations

import torch

from moekit._checks import check_dot_operand, check_ndim, check_same_dtype, check_shape
from moekit.ops._kernels.grouped_gemm import grouped_gemm_kernel
from moekit.ops.activation import Activation, activation_code, activation_ref
from moekit.ops.align import AlignResult
from moekit.ops.heuristics import GemmConfig


def grouped_gemm(
    a: torch.Tensor,
    b_ENK: torch.Tensor,
    layout: AlignResult,
    out: torch.Tensor,
    config: GemmConfig,
    *,
    num_rows: int,
    a_row_div: int = 1,
    bias_EN: torch.Tensor | None = None,
    weights_N: torch.Tensor | None = None,
    activation: Activation | None = None,
) -> torch.Tensor:
    """Run one grouped GEMM (see the module docstring) into ``out`` and return it.

    Args:
        a: [rows, k] activations, last dim contiguous; row ``sorted_ids[j] // a_row_div`` is read.
        b_ENK: [E, n_b, k] weights (n_b = 2·n_out for a gated activation, else n_out).
        layout: from ``align`` with the same ``block_m``.
        out: [N, n_out], or [split_k, N, n_out] when ``config.split_k`` > 1; last dim contiguous.
        num_rows: N, the sentinel of ``layout.sorted_ids``.
        bias_EN: optional [E, n_b].  weights_N: optional [N] fp32 per-row scale applied last.
        activation: applied in the epilogue (gated ones read gate and up halves of B); None = identity.
    """
    check_ndim("a", a, 2, "[rows, k]")
    check_ndim("b_ENK", b_ENK, 3, "[E, n, k]")
    k_dim = a.shape[-1]
    gated = activation is not None and activation.is_gated
    n_out = b_ENK.shape[1] // 2 if gated else b_ENK.shape[1]
    if a.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("grouped_gemm: a and out need a contiguous last dim")
    if b_ENK.shape[2] != k_dim:
        raise ValueError(f"b_ENK: expected [E, n, {k_dim}], got shape {tuple(b_ENK.shape)}")
    # tl.dot takes one dtype: a mismatch failed inside the compiler with no argument named.
    check_same_dtype("a", a, "b_ENK", b_ENK)
    check_dot_operand("a", a)
    if gated and b_ENK.shape[1] % 2:
        # An odd row count has no gate|up halves (the kernel would pair rows n_out.. with the wrong gates).
        raise ValueError(
            f"b_ENK: gated activation {activation.name!r} needs an even row count 2·n_out, got {tuple(b_ENK.shape)}"
        )
    # The kernel reads row sorted_ids // a_row_div of a for every routed row: fewer rows are out-of-bounds reads.
    min_a_rows = -(-num_rows // a_row_div)
    if a.shape[0] < min_a_rows:
        raise ValueError(f"a: expected at least {min_a_rows} rows (N = {num_rows}, a_row_div = {a_row_div}), "
                         f"got shape {tuple(a.shape)}")
    split = config.split_k
    out_3d = check_epilogue_args("grouped_gemm", b_ENK, out, split, num_rows=num_rows, n_out=n_out, bias_EN=bias_EN,
                                 weights_N=weights_N, activation=activation)
    block_k = config.block_k
    # Each split covers a whole number of K tiles, so only the last tile of the last split can be ragged.
    k_per_split = -(-k_dim // (split * block_k)) * block_k
    num_blocks = layout.expert_ids.numel()
    out_n = config.block_n // 2 if gated else config.block_n  # a gated tile holds gate and up rows
    grid = (num_blocks * -(-n_out // out_n), split)
    grouped_gemm_kernel[grid](
        a, b_ENK, out_3d,
        bias_EN if bias_EN is not None else a,
        weights_N if weights_N is not None else a,
        layout.sorted_ids, layout.expert_ids, layout.num_padded,
        num_rows, n_out, k_dim, a_row_div, n_out, k_per_split,
        a.stride(0), b_ENK.stride(0), b_ENK.stride(1), b_ENK.stride(2),
        out_3d.stride(0), out_3d.stride(1),
        bias_EN.stride(0) if bias_EN is not None else 0,
        activation.alpha if activation is not None else 0.0,
        activation.limit if activation is not None and activation.limit is not None else 0.0,
        ACTIVATION=activation_code(activation),
        GATED=gated, HAS_BIAS=bias_EN is not None, HAS_WEIGHTS=weights_N is not None,
        BLOCK_M=layout.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, GROUP_M=config.group_m,
        EVEN_K=k_dim % block_k == 0, EVEN_N=n_out % out_n == 0, ROW_PER_BLOCK=layout.row_per_block,
        HALF_TAIL=config.half_tail and not layout.row_per_block and layout.block_m >= 32,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def check_epilogue_args(
    op: str,
    b_ENK: torch.Tensor,
    out: torch.Tensor,
    split: int,
    *,
    num_rows: int,
    n_out: int,
    bias_EN: torch.Tensor | None,
    weights_N: torch.Tensor | None,
    activation: Activation | None,
) -> torch.Tensor:
    """Checks of the epilogue's inputs shared by the grouped GEMMs; returns ``out`` as [split, N, n_out]."""
    # Bias rows and the per-row weights are read as dense vectors (no column stride is passed): a strided view
    # would be read at the wrong addresses.
    if bias_EN is not None:
        check_shape("bias_EN", bias_EN, (b_ENK.shape[0], b_ENK.shape[1]), "[E, n]")
        if bias_EN.stride(-1) != 1:
            raise ValueError(f"bias_EN: expected a contiguous last dim, got strides {bias_EN.stride()}")
    if weights_N is not None:
        check_shape("weights_N", weights_N, (num_rows,), "[N]")
        if num_rows > 1 and weights_N.stride(0) != 1:
            raise ValueError(f"weights_N: expected a contiguous [N] tensor, got stride {weights_N.stride()}")
    if split > 1 and activation is not None:
        raise ValueError(f"{op}: split_k > 1 cannot fuse an activation (it needs the whole sum)")
    out_3d = out if out.dim() == 3 else out.unsqueeze(0)
    # Every routed row is written at row sorted_ids[j] of out: fewer than N rows are out-of-bounds writes.
    if out_3d.dim() != 3 or tuple(out_3d.shape) != (split, num_rows, n_out):
        raise ValueError(f"out: expected [{split}, {num_rows}, {n_out}] (or [{num_rows}, {n_out}] when split_k = 1), "
                         f"got shape {tuple(out.shape)}")
    return out_3d


def grouped_gemm_ref(
    a: torch.Tensor,
    b_ENK: torch.Tensor,
    layout: AlignResult,
    out: torch.Tensor,
    *,
    num_rows: int,
    a_row_div: int = 1,
    bias_EN: torch.Tensor | None = None,
    weights_N: torch.Tensor | None = None,
    activation: Activation | None = None,
) -> torch.Tensor:
    """Pure-torch twin of ``grouped_gemm`` with ``split_k`` = 1 (``out`` [N, n_out]), in fp32."""
    expert_ids = layout.expert_ids.long()
    if layout.row_per_block:
        m = 1
        sorted_ids = torch.arange(num_rows, device=expert_ids.device)
        num_padded = num_rows
    else:
        m = layout.block_m
        sorted_ids = layout.sorted_ids.long()
        num_padded = int(layout.num_padded.item())
    for i_b in range(num_padded // m):
        rows = sorted_ids[i_b * m : (i_b + 1) * m]
        rows = rows[rows < num_rows]
        if rows.numel() == 0:
            continue
        e = int(expert_ids[i_b])
        h = a[rows // a_row_div].float() @ b_ENK[e].float().t()
        if bias_EN is not None:
            h = h + bias_EN[e].float()
        if activation is not None:
            h = activation_ref(h, activation)
        if weights_N is not None:
            h = h * weights_N[rows].float()[:, None]
        out[rows] = h.to(out.dtype)
    return out

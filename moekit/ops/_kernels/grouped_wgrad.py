"""Triton body of ``moekit.ops.grouped_wgrad``: one [BLOCK_N, BLOCK_K] tile of an expert's weight gradient.

Names: ``i_`` index, ``o_`` offset vector, ``m_`` mask, ``p_`` pointer, ``b_`` register block.
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_rows"])
def grouped_wgrad_kernel(
    p_g, p_x, p_out, p_bias_grad, p_weights, p_sorted_ids, p_block_start,
    num_rows, n_dim, k_dim, g_row_div, x_row_div,
    stride_gm, stride_xm, stride_oe, stride_on, stride_bias_e,
    HAS_WEIGHTS: tl.constexpr, HAS_BIAS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[e, n-tile, k-tile] = sum over expert e's rows r of (w[r] · G[r // g_row_div, n]) X[r // x_row_div, k].

    Expert e owns the row blocks [block_start[e], block_start[e + 1]) of the padded layout, so the reduction runs
    over its rows alone and an expert with no rows writes zeros. The (k-tile 0) program also writes the column
    sums of its scaled G tile: the bias gradient.
    """
    i_e = tl.program_id(0)
    i_pid = tl.program_id(1)
    num_pid_k = tl.cdiv(k_dim, BLOCK_K)
    i_n = i_pid // num_pid_k
    i_k = i_pid % num_pid_k
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_n = o_n < n_dim
    m_k = o_k < k_dim
    block_lo = tl.load(p_block_start + i_e)
    block_hi = tl.load(p_block_start + i_e + 1)
    b_acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    b_colsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i_b in range(block_lo, block_hi):
        b_rows = tl.load(p_sorted_ids + i_b * BLOCK_M + tl.arange(0, BLOCK_M))
        m_rows = b_rows < num_rows
        # G is loaded transposed ([BLOCK_N, BLOCK_M]) so the dot reduces over the rows; int64 row offsets.
        o_g = (b_rows // g_row_div).to(tl.int64) * stride_gm
        b_g = tl.load(p_g + o_g[None, :] + o_n[:, None], mask=m_rows[None, :] & m_n[:, None], other=0.0)
        if HAS_WEIGHTS:
            b_w = tl.load(p_weights + b_rows, mask=m_rows, other=0.0).to(tl.float32)
            b_g = (b_g.to(tl.float32) * b_w[None, :]).to(p_g.dtype.element_ty)
        if HAS_BIAS_GRAD:
            b_colsum += tl.sum(b_g.to(tl.float32), axis=1)
        o_x = (b_rows // x_row_div).to(tl.int64) * stride_xm
        b_x = tl.load(p_x + o_x[:, None] + o_k[None, :], mask=m_rows[:, None] & m_k[None, :], other=0.0)
        b_acc = tl.dot(b_g, b_x, b_acc, input_precision=DOT_PRECISION)
    p_out_tile = p_out + i_e.to(tl.int64) * stride_oe + o_n[:, None].to(tl.int64) * stride_on + o_k[None, :]
    tl.store(p_out_tile, b_acc.to(p_out.dtype.element_ty), mask=m_n[:, None] & m_k[None, :])
    if HAS_BIAS_GRAD:
        if i_k == 0:
            tl.store(p_bias_grad + i_e * stride_bias_e + o_n, b_colsum.to(p_bias_grad.dtype.element_ty), mask=m_n)

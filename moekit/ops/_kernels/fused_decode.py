"""Triton body of ``moekit.ops.fused_decode``: both expert GEMMs of one routed row, for one slice of I.

Names: ``i_`` index, ``o_`` offset vector, ``m_`` mask, ``p_`` pointer, ``b_`` register block.
"""

import triton
import triton.language as tl

from moekit.ops._kernels.grouped_gemm import _activate_tile

# tl.dot needs 16 rows: the routed row is row 0 of a 16-row tile whose other rows are masked to zero (the
# weight stream, not the MMA, is what a decode call waits on).
_ROWS = tl.constexpr(16)


# Row counts change with every batch: specializing on them would recompile as T moves.
@triton.jit(do_not_specialize=["num_rows"])
def fused_decode_kernel(
    p_x, p_w13, p_w2, p_y, p_b13, p_b2, p_weights, p_ids, p_map,
    num_rows, top_k, num_experts, hidden, inter,
    stride_xt, stride_w13e, stride_w13n, stride_w13k, stride_w2e, stride_w2n, stride_w2k,
    stride_ys, stride_yn, stride_b13e, stride_b2e,
    alpha, limit,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_B13: tl.constexpr, HAS_B2: tl.constexpr,
    HAS_MAP: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_H: tl.constexpr, EVEN_I: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """y[j, n, :] = weight[n] · (act(x[t] @ w13[e, slice j].T + b13) @ w2[e][:, slice j].T (+ b2 if j == 0)).

    Program (n, j): routed row n = t·K + k of expert e = ids[n] (mapped by ``p_map`` if HAS_MAP; a row of
    another rank's expert writes nothing, the reduction skips it), I columns [j·BLOCK_I, (j+1)·BLOCK_I).
    GEMM 1's slice keeps the whole H reduction, so the activation is exact here; GEMM 2 is then split over I
    into the slices' partial sums, which the top-k reduction adds in a fixed order.
    """
    ROWS: tl.constexpr = _ROWS
    i_n = tl.program_id(0)
    i_j = tl.program_id(1)
    i_e = tl.load(p_ids + i_n).to(tl.int64)
    if HAS_MAP:
        i_e = tl.load(p_map + i_e).to(tl.int64)
        if (i_e < 0) | (i_e >= num_experts):
            return
    i_t = (i_n // top_k).to(tl.int64)
    m_r = tl.arange(0, ROWS) == 0

    # GEMM 1: [ROWS, H] @ [H, W1], W1 = gate columns then up columns of this I slice.
    W1: tl.constexpr = 2 * BLOCK_I if GATED else BLOCK_I
    o_c = tl.arange(0, W1)
    o_i = i_j * BLOCK_I + o_c % BLOCK_I
    if EVEN_I:
        o_i_ld = o_i
    else:
        o_i_ld = o_i % inter  # columns past I re-read valid rows; their outputs are zeroed below
    o_bn = o_i_ld
    if GATED:
        o_bn += tl.where(o_c < BLOCK_I, 0, inter)
    o_k = tl.arange(0, BLOCK_K)
    p_x_tile = p_x + i_t * stride_xt + o_k[None, :] + tl.zeros([ROWS, BLOCK_K], dtype=tl.int64)
    p_b_tile = p_w13 + i_e * stride_w13e + o_bn[None, :].to(tl.int64) * stride_w13n + o_k[:, None] * stride_w13k
    b_acc = tl.zeros([ROWS, W1], dtype=tl.float32)
    for k in range(0, hidden, BLOCK_K):
        if EVEN_K:
            b_a = tl.load(p_x_tile, mask=m_r[:, None], other=0.0)
            b_b = tl.load(p_b_tile)
        else:
            m_k = (k + o_k) < hidden
            b_a = tl.load(p_x_tile, mask=m_r[:, None] & m_k[None, :], other=0.0)
            b_b = tl.load(p_b_tile, mask=m_k[:, None], other=0.0)
        b_acc = tl.dot(b_a, b_b, b_acc, input_precision=DOT_PRECISION)
        p_x_tile += BLOCK_K
        p_b_tile += BLOCK_K * stride_w13k
    if HAS_B13:
        b_acc += tl.load(p_b13 + i_e * stride_b13e + o_bn).to(tl.float32)[None, :]
    b_h = _activate_tile(b_acc, alpha, limit, ACTIVATION, GATED, ROWS, BLOCK_I)
    # The unfused pipeline stores the intermediate in the activation dtype: round the same way.
    o_i2 = i_j * BLOCK_I + tl.arange(0, BLOCK_I)
    m_i2 = o_i2 < inter
    b_h = tl.where(m_i2[None, :], b_h, 0.0).to(p_x.dtype.element_ty)

    # GEMM 2: [ROWS, BLOCK_I] @ [BLOCK_I, H] in chunks of BLOCK_H output columns.
    b_w = tl.load(p_weights + i_n).to(tl.float32)
    o_h = tl.arange(0, BLOCK_H)
    p_w2_tile = p_w2 + i_e * stride_w2e + o_h[None, :].to(tl.int64) * stride_w2n + o_i2[:, None] * stride_w2k
    p_y_row = p_y + i_j.to(tl.int64) * stride_ys + i_n.to(tl.int64) * stride_yn
    for h in range(0, hidden, BLOCK_H):
        m_h = (h + o_h) < hidden
        if EVEN_I and EVEN_H:
            b_b2 = tl.load(p_w2_tile)
        else:
            b_b2 = tl.load(p_w2_tile, mask=m_i2[:, None] & m_h[None, :], other=0.0)
        b_out = tl.dot(b_h, b_b2, input_precision=DOT_PRECISION)
        if HAS_B2:
            if i_j == 0:  # the bias belongs to exactly one partial sum
                b_out += tl.load(p_b2 + i_e * stride_b2e + h + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
        b_out = b_out * b_w
        tl.store(p_y_row + h + o_h[None, :] + tl.zeros([ROWS, BLOCK_H], dtype=tl.int64),
                 b_out.to(p_y.dtype.element_ty), mask=m_r[:, None] & m_h[None, :])
        p_w2_tile += BLOCK_H * stride_w2n

"""Triton body of ``moekit.ops.grouped_gemm_wna16``: the grouped GEMM on 4-/8-bit weight codes with group scales,
activations in their float dtype.

A sibling of ``grouped_gemm_kernel`` (same row layout, grid order, gate|up tile, half tail and epilogue). Each
K tile of BLOCK_K columns runs as BLOCK_K / SUB_K sub-tiles that each lie in one scale group (the wrapper picks
SUB_K: BLOCK_K when a group holds the whole tile, else the group size), for weight row n = ``o_bn`` of the tile:

    q    = codes of row n, columns [k, k + SUB_K)                 (4 bits: SUB_K/2 bytes, low nibble = even column)
    part = dot(a[:, k : k + SUB_K], (q - z[n, kg]).to(a.dtype))   (exact: |q - z| <= 255 fits fp16/bf16)
    acc += part * s[n, kg]                                        (fp32, one factor per column)

The scale multiplies the fp32 product rather than the weights: BLOCK_M·BLOCK_N multiplies per sub-tile instead
of SUB_K·BLOCK_N (a decode tile has 16 rows against 128-256 columns of K), and the dot's inputs are exact.
4 bits: a byte tile's low nibbles are the even columns and its high nibbles the odd ones. Rather than interleave
them back into a [SUB_K, BLOCK_N] tile, A's sub-tile is split into its even and odd columns and the product is two
dots of SUB_K/2: the shuffle touches the A tile (16 rows at decode), never the weight tile.
Symmetric codes (no zero points) subtract 2^(bits-1). Names: ``i_`` index, ``o_`` offset vector, ``m_`` mask,
``p_`` pointer, ``b_`` register block.
"""

import triton
import triton.language as tl

from moekit.ops._kernels.grouped_gemm import _epilogue, _program_tile, _rows_and_columns


@triton.jit
def _tile(
    p_a, p_b, p_s, p_z, p_c, p_bias, p_weights, p_sorted_ids,
    i_m, i_n, i_s, i_e, num_rows, n_out, k_dim, a_row_div, up_offset, k_per_split, group_size,
    stride_am, stride_bn, stride_bk, stride_sn, stride_sk, stride_zn, stride_zk, stride_cs, stride_cm,
    stride_bias_e, alpha, limit,
    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, SUB_K: tl.constexpr,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, TILE_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_PER_BLOCK: tl.constexpr,
):
    """The first TILE_M slots of row block ``i_m`` against output tile ``i_n``, split ``i_s``; ``p_b``, ``p_s``
    and ``p_z`` point at expert ``i_e``'s codes, scales and zero points."""
    OUT_N: tl.constexpr = BLOCK_N // 2 if GATED else BLOCK_N
    PACK: tl.constexpr = 2 if BITS == 4 else 1  # codes a byte
    SUB_B: tl.constexpr = SUB_K // PACK  # bytes of a weight row in one sub-tile
    b_rows, m_rows, o_bn = _rows_and_columns(p_sorted_ids, i_m, i_n, num_rows, n_out, up_offset, GATED, BLOCK_M,
                                             TILE_M, BLOCK_N, EVEN_N, ROW_PER_BLOCK)
    o_a_rows = (b_rows // a_row_div).to(tl.int64) * stride_am
    o_bn64 = o_bn.to(tl.int64)
    k_start = i_s * k_per_split
    k_end = min(k_start + k_per_split, k_dim)
    o_sk = tl.arange(0, SUB_K)
    o_sb = tl.arange(0, SUB_B)
    # k_per_split is a multiple of BLOCK_K (even), so a split starts on a whole byte.
    p_a_sub = p_a + o_a_rows[:, None] + (k_start + o_sk)[None, :]
    p_b_sub = p_b + o_bn64[None, :] * stride_bn + (k_start // PACK + o_sb)[:, None] * stride_bk
    p_s_cols = p_s + o_bn64 * stride_sn
    p_z_cols = p_z + o_bn64 * stride_zn
    b_acc = tl.zeros([TILE_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        for j in tl.static_range(BLOCK_K // SUB_K):
            k_sub = k + j * SUB_K
            if EVEN_K:
                i_g = k_sub // group_size
                b_a = tl.load(p_a_sub + j * SUB_K, mask=m_rows[:, None], other=0.0)
                b_q = tl.load(p_b_sub + j * SUB_B * stride_bk)
                b_s = tl.load(p_s_cols + i_g * stride_sk)
                if HAS_ZEROS:
                    b_z = tl.load(p_z_cols + i_g * stride_zk).to(tl.int32)
            else:
                m_k = (k_sub + o_sk) < k_end
                # A byte is read while its first column is in range; columns past k_end meet zeros of A.
                m_b = (k_sub // PACK + o_sb) < (k_end + PACK - 1) // PACK
                # A sub-tile wholly past the end (its A is all zeros) reads the last group's scale: its own
                # group may not exist.
                i_g = min(k_sub, k_end - 1) // group_size
                b_a = tl.load(p_a_sub + j * SUB_K, mask=m_rows[:, None] & m_k[None, :], other=0.0)
                b_q = tl.load(p_b_sub + j * SUB_B * stride_bk, mask=m_b[:, None], other=0)
                b_s = tl.load(p_s_cols + i_g * stride_sk)
                if HAS_ZEROS:
                    b_z = tl.load(p_z_cols + i_g * stride_zk).to(tl.int32)
            if not HAS_ZEROS:
                b_z = tl.full([BLOCK_N], 1 << (BITS - 1), tl.int32)
            b_q = b_q.to(tl.int32)
            if BITS == 4:
                b_w_even = ((b_q & 15) - b_z[None, :]).to(b_a.dtype)
                b_w_odd = ((b_q >> 4) - b_z[None, :]).to(b_a.dtype)
                b_a_even, b_a_odd = tl.split(tl.reshape(b_a, [TILE_M, SUB_B, 2]))
                b_part = tl.dot(b_a_even, b_w_even, input_precision=DOT_PRECISION)
                b_part = tl.dot(b_a_odd, b_w_odd, b_part, input_precision=DOT_PRECISION)
            else:
                b_part = tl.dot(b_a, (b_q - b_z[None, :]).to(b_a.dtype), input_precision=DOT_PRECISION)
            b_acc += b_part * b_s.to(tl.float32)[None, :]
        p_a_sub += BLOCK_K
        p_b_sub += (BLOCK_K // PACK) * stride_bk

    _epilogue(b_acc, p_bias, p_weights, p_c, i_e, i_s, i_n, b_rows, m_rows, o_bn, n_out, stride_bias_e, stride_cs,
              stride_cm, alpha, limit, ACTIVATION, GATED, HAS_BIAS, HAS_WEIGHTS, TILE_M, OUT_N)


# Row counts change with every batch: specializing on them (== 1, % 16) would recompile as T moves.
@triton.jit(do_not_specialize=["num_rows"])
def grouped_gemm_wna16_kernel(
    p_a, p_b, p_s, p_z, p_c, p_bias, p_weights,
    p_sorted_ids, p_expert_ids, p_num_padded,
    num_rows, n_out, k_dim, a_row_div, up_offset, k_per_split, group_size,
    stride_am, stride_be, stride_bn, stride_bk, stride_se, stride_sn, stride_sk, stride_ze, stride_zn, stride_zk,
    stride_cs, stride_cm, stride_bias_e,
    alpha, limit,
    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, SUB_K: tl.constexpr,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_PER_BLOCK: tl.constexpr,
    HALF_TAIL: tl.constexpr,
):
    """C[s, row, n] for one block of M slots, a tile of output columns and split s = program_id(1) (see the bf16
    ``grouped_gemm_kernel`` for the layout, the grid order, GATED, ROW_PER_BLOCK and HALF_TAIL)."""
    OUT_N: tl.constexpr = BLOCK_N // 2 if GATED else BLOCK_N
    i_s = tl.program_id(1)
    i_m, i_n, has_tile = _program_tile(tl.program_id(0), p_num_padded, num_rows, n_out, BLOCK_M, OUT_N, GROUP_M,
                                       ROW_PER_BLOCK)
    if not has_tile:
        return
    i_e = tl.load(p_expert_ids + i_m).to(tl.int64)
    p_b_e = p_b + i_e * stride_be
    p_s_e = p_s + i_e * stride_se
    p_z_e = p_z + i_e * stride_ze
    is_half = False
    if HALF_TAIL:
        is_half = tl.load(p_sorted_ids + i_m * BLOCK_M + BLOCK_M // 2) >= num_rows
    if is_half:
        _tile(
            p_a, p_b_e, p_s_e, p_z_e, p_c, p_bias, p_weights, p_sorted_ids,
            i_m, i_n, i_s, i_e, num_rows, n_out, k_dim, a_row_div, up_offset, k_per_split, group_size,
            stride_am, stride_bn, stride_bk, stride_sn, stride_sk, stride_zn, stride_zk, stride_cs, stride_cm,
            stride_bias_e, alpha, limit,
            BITS, HAS_ZEROS, SUB_K, ACTIVATION, GATED, HAS_BIAS, HAS_WEIGHTS, BLOCK_M, BLOCK_M // 2, BLOCK_N,
            BLOCK_K, EVEN_K, EVEN_N, DOT_PRECISION, ROW_PER_BLOCK,
        )
    else:
        _tile(
            p_a, p_b_e, p_s_e, p_z_e, p_c, p_bias, p_weights, p_sorted_ids,
            i_m, i_n, i_s, i_e, num_rows, n_out, k_dim, a_row_div, up_offset, k_per_split, group_size,
            stride_am, stride_bn, stride_bk, stride_sn, stride_sk, stride_zn, stride_zk, stride_cs, stride_cm,
            stride_bias_e, alpha, limit,
            BITS, HAS_ZEROS, SUB_K, ACTIVATION, GATED, HAS_BIAS, HAS_WEIGHTS, BLOCK_M, BLOCK_M, BLOCK_N,
            BLOCK_K, EVEN_K, EVEN_N, DOT_PRECISION, ROW_PER_BLOCK,
        )

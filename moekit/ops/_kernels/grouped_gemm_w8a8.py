"""Triton body of ``moekit.ops.grouped_gemm_w8a8``: the grouped GEMM on 8-bit A and B codes with their scales.

A sibling of ``grouped_gemm_kernel`` (same row layout, grid order, gate|up tile and epilogue) that leaves the
bf16 kernel's code paths untouched. Names: ``i_`` index, ``o_`` offset vector, ``m_`` mask, ``p_`` pointer,
``b_`` register block.

SCALE_MODE (compile-time), A = activation codes, B = weight codes of expert e:
    0 tensor:  acc = Σ_k dot(a, b);                    acc *= a_s[0] · b_s[e]               (after the K loop)
    1 channel: acc = Σ_k dot(a, b);                    acc *= a_s[row] · b_s[e, n]          (after the K loop)
    2 block:   acc += dot(a, b) · a_s[row, kb] · b_s[e, nb(n), kb]   per K sub-tile         (inside the K loop)
with kb = min(k, K - 1) // group_k and nb(n) the scale row of B row n (gate and up rows blocked apart: see the
wrapper). A K step of BLOCK_K runs as BLOCK_K // SUB_K sub-tiles, each loaded and dotted on its own: block mode
scales each (SUB_K = group_k when BLOCK_K spans several groups); fp8 channel/tensor add each in fp32 (SUB_K <= 128).
UNIFORM_BS (block mode, set by the wrapper when group_n is a multiple of the tile's output width, gated tiles
from 32 outputs): all B rows of a
tile (of each half, gated) share one scale row, so the scaling is one FMA an element with a per-row factor
a_s · b_s instead of an outer product and two multiplies — the per-tile scaling is what made block mode ~1.4x
slower than channel mode at prefill on an H200. A gated tile then runs as two dots, gate and up, each with its
own accumulator (one [BLOCK_M, BLOCK_N] product cannot take two per-row factors without a per-element select).
int8 dots accumulate in int32 (exact), e4m3 dots in fp32, one K sub-tile at a time (no chained fp8 accumulator). In the interpreter both are exact-product numpy
matmuls (see ``moekit.ops._kernels.quantize``), so interpreted results match the fp64 reference closely.
"""

import triton
import triton.language as tl

from moekit.ops._kernels.grouped_gemm import _activate, _epilogue, _program_tile, _store_rows


# Row counts change with every batch: specializing on them (== 1, % 16) would recompile as T moves.
@triton.jit(do_not_specialize=["num_rows"])
def grouped_gemm_w8a8_kernel(
    p_a, p_a_scale, p_b, p_b_scale, p_c, p_bias, p_weights,
    p_sorted_ids, p_expert_ids, p_num_padded,
    num_rows, n_out, k_dim, a_row_div, up_offset, up_scale_offset, k_per_split, group_n, group_k,
    stride_am, stride_be, stride_bn, stride_bk, stride_cs, stride_cm, stride_bias_e,
    stride_asm, stride_bse, stride_bsn, stride_bsk,
    alpha, limit,
    SCALE_MODE: tl.constexpr, IS_INT: tl.constexpr, UNIFORM_BS: tl.constexpr,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, ROW_PER_BLOCK: tl.constexpr,
):
    """C[s, row, n] for one block of M slots, a tile of output columns and split s = program_id(1) (see the
    bf16 ``grouped_gemm_kernel`` for the layout, GATED and ROW_PER_BLOCK)."""
    OUT_N: tl.constexpr = BLOCK_N // 2 if GATED else BLOCK_N
    i_s = tl.program_id(1)
    i_m, i_n, has_tile = _program_tile(tl.program_id(0), p_num_padded, num_rows, n_out, BLOCK_M, OUT_N, GROUP_M,
                                       ROW_PER_BLOCK)
    if not has_tile:
        return
    i_e = tl.load(p_expert_ids + i_m).to(tl.int64)

    if ROW_PER_BLOCK:
        b_rows = tl.where(tl.arange(0, BLOCK_M) == 0, i_m, num_rows)
    else:
        b_rows = tl.load(p_sorted_ids + i_m * BLOCK_M + tl.arange(0, BLOCK_M))
    m_rows = b_rows < num_rows
    o_a_rows = (b_rows // a_row_div).to(tl.int64)
    o_j = tl.arange(0, BLOCK_N)
    if EVEN_N:
        o_local = i_n * OUT_N + o_j % OUT_N
    else:
        o_local = (i_n * OUT_N + o_j % OUT_N) % n_out
    o_bn = o_local
    if GATED:
        o_bn += tl.where(o_j < OUT_N, 0, up_offset)
    k_start = i_s * k_per_split
    # A K step of BLOCK_K columns loads and scales SUB_K at a time (block mode: SUB_K = group_k when BLOCK_K
    # spans several scale groups, so a step still reads longer runs of each weight row; else SUB_K = BLOCK_K).
    o_k = k_start + tl.arange(0, SUB_K)
    p_a_tile = p_a + o_a_rows[:, None] * stride_am + o_k[None, :]
    p_b_e = p_b + i_e * stride_be
    p_bs_e = p_b_scale + i_e * stride_bse
    SPLIT: tl.constexpr = GATED and SCALE_MODE == 2 and UNIFORM_BS
    if SPLIT:
        # Gate and up halves as two [BLOCK_K, OUT_N] tiles (rows o_half and up_offset + o_half).
        if EVEN_N:
            o_half = i_n * OUT_N + tl.arange(0, OUT_N)
        else:
            o_half = (i_n * OUT_N + tl.arange(0, OUT_N)) % n_out
        p_b_tile = p_b_e + o_half[None, :].to(tl.int64) * stride_bn + o_k[:, None] * stride_bk
    else:
        p_b_tile = p_b_e + o_bn[None, :].to(tl.int64) * stride_bn + o_k[:, None] * stride_bk
    if SCALE_MODE == 2:
        p_as_rows = p_a_scale + o_a_rows * stride_asm
        if UNIFORM_BS:
            i_bs_row = (i_n * OUT_N) // group_n
            p_bs_gate = p_bs_e + i_bs_row * stride_bsn
            p_bs_up = p_bs_e + (up_scale_offset + i_bs_row) * stride_bsn
        else:
            # Scale row of each B row: gate rows n // group_n, up rows up_scale_offset + n // group_n.
            o_bs_rows = o_local // group_n
            if GATED:
                o_bs_rows += tl.where(o_j < OUT_N, 0, up_scale_offset)
            p_bs_rows = p_bs_e + o_bs_rows * stride_bsn

    ACC_DTYPE: tl.constexpr = tl.int32 if (IS_INT and SCALE_MODE != 2) else tl.float32
    if SPLIT:
        b_acc = tl.zeros([BLOCK_M, OUT_N], dtype=tl.float32)
        b_acc_up = tl.zeros([BLOCK_M, OUT_N], dtype=tl.float32)
    else:
        b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    k_end = min(k_start + k_per_split, k_dim)
    for k in range(k_start, k_end, BLOCK_K):
        for i_h in tl.static_range(BLOCK_K // SUB_K):
            k_h = k + i_h * SUB_K
            p_a_sub = p_a_tile + i_h * SUB_K
            p_b_sub = p_b_tile + i_h * SUB_K * stride_bk
            if EVEN_K:
                b_a = tl.load(p_a_sub, mask=m_rows[:, None], other=0.0)
                b_b = tl.load(p_b_sub)
                if SPLIT:
                    b_b_up = tl.load(p_b_sub + up_offset * stride_bn)
            else:
                m_k = (k_h + tl.arange(0, SUB_K)) < k_end
                b_a = tl.load(p_a_sub, mask=m_rows[:, None] & m_k[None, :], other=0.0)
                b_b = tl.load(p_b_sub, mask=m_k[:, None], other=0.0)
                if SPLIT:
                    b_b_up = tl.load(p_b_sub + up_offset * stride_bn, mask=m_k[:, None], other=0.0)
            if SCALE_MODE == 2:
                # SUB_K divides group_k (the wrapper checks), so the sub-tile lies in one scale group. A sub-tile
                # wholly past K (a ragged last step) is zeros: its scales are read from the last group instead.
                i_kb = tl.minimum(k_h, k_dim - 1) // group_k
                b_as = tl.load(p_as_rows + i_kb, mask=m_rows, other=0.0)
                if UNIFORM_BS:
                    b_part = _dot_f32(b_a, b_b, IS_INT)
                    b_acc += b_part * (b_as * tl.load(p_bs_gate + i_kb * stride_bsk))[:, None]
                    if SPLIT:
                        b_part_up = _dot_f32(b_a, b_b_up, IS_INT)
                        b_acc_up += b_part_up * (b_as * tl.load(p_bs_up + i_kb * stride_bsk))[:, None]
                else:
                    b_bs = tl.load(p_bs_rows + i_kb * stride_bsk)
                    b_acc += _dot_f32(b_a, b_b, IS_INT) * b_as[:, None] * b_bs[None, :]
            elif IS_INT:
                b_acc = tl.dot(b_a, b_b, b_acc, out_dtype=ACC_DTYPE)  # int32: exact
            else:
                # Hopper's fp8 MMA accumulates in reduced precision (~14 bits) across a chained K loop: each
                # sub-tile's product (at most 128 wide, as DeepSeek-V3 promotes) is added in fp32 instead, as block
                # mode does with its scales. On an H200 chaining put the channel/tensor outputs at 1-2% rms from
                # the torch backend.
                b_acc += tl.dot(b_a, b_b, out_dtype=tl.float32)
        p_a_tile += BLOCK_K
        p_b_tile += BLOCK_K * stride_bk

    b_acc = b_acc.to(tl.float32)
    if SCALE_MODE == 0:
        b_acc = b_acc * (tl.load(p_a_scale) * tl.load(p_bs_e))
    elif SCALE_MODE == 1:
        b_as = tl.load(p_a_scale + o_a_rows * stride_asm, mask=m_rows, other=0.0)
        b_bs = tl.load(p_bs_e + o_bn * stride_bsn)
        b_acc = b_acc * b_as[:, None] * b_bs[None, :]
    if SPLIT:
        if HAS_BIAS:
            if i_s == 0:
                p_bias_e = p_bias + i_e * stride_bias_e
                b_acc += tl.load(p_bias_e + o_half).to(tl.float32)[None, :]
                b_acc_up += tl.load(p_bias_e + up_offset + o_half).to(tl.float32)[None, :]
        b_out = _activate(b_acc, b_acc_up, alpha, limit, ACTIVATION)
        _store_rows(b_out, p_weights, p_c, b_rows, m_rows, i_s, i_n, n_out, stride_cs, stride_cm, HAS_WEIGHTS, OUT_N)
    else:
        _epilogue(b_acc, p_bias, p_weights, p_c, i_e, i_s, i_n, b_rows, m_rows, o_bn, n_out, stride_bias_e,
                  stride_cs, stride_cm, alpha, limit, ACTIVATION, GATED, HAS_BIAS, HAS_WEIGHTS, BLOCK_M, OUT_N)


@triton.jit
def _dot_f32(b_a, b_b, IS_INT: tl.constexpr):
    """One K tile's product in fp32 (int8: exact in int32 first)."""
    # One return (an if/else assigning it): Triton compiles the statement after an early return too, and an
    # int8 dot with an fp32 out_dtype there is an int32 that does not match.
    if IS_INT:
        b_p = tl.dot(b_a, b_b, out_dtype=tl.int32).to(tl.float32)
    else:
        b_p = tl.dot(b_a, b_b, out_dtype=tl.float32)
    return b_p

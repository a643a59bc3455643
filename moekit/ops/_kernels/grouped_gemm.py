"""Triton body of ``moekit.ops.grouped_gemm``: one tile of C = gather(A) @ B[e].T over a padded expert layout.

Names: ``i_`` index, ``o_`` offset vector, ``m_`` mask, ``p_`` pointer, ``b_`` register block.
"""

import triton
import triton.language as tl

# ACTIVATION codes (compile-time): 0 none, 1 silu, 2 gelu (erf), 3 gelu_tanh, 4 relu2, 5 swigluoai,
# 6 clamped silu (silu(min(gate, limit)) * clamp(up, -limit, limit)).
# The clamps and relu propagate NaN like torch's clamp/relu (the _ref twin): tl.minimum/maximum by default return
# the other operand (fmin), which turned a NaN from an upstream blow-up into the limit or 0, a finite wrong value.


@triton.jit
def _activate(b_gate, b_up, alpha, limit, ACTIVATION: tl.constexpr):
    """act(gate) * up in fp32 (``b_up`` is ignored for the non-gated codes 0 and 4)."""
    if ACTIVATION == 0:
        return b_gate
    elif ACTIVATION == 1:
        return b_gate * tl.sigmoid(b_gate) * b_up
    elif ACTIVATION == 2:
        return 0.5 * b_gate * (1.0 + tl.math.erf(b_gate * 0.7071067811865476)) * b_up
    elif ACTIVATION == 3:
        # tanh(z) = 2·sigmoid(2z) - 1: libdevice tanh is not available in the interpreter.
        b_z = 0.7978845608028654 * (b_gate + 0.044715 * b_gate * b_gate * b_gate)
        return 0.5 * b_gate * (2.0 * tl.sigmoid(2.0 * b_z)) * b_up
    elif ACTIVATION == 4:
        b_r = tl.maximum(b_gate, 0.0, propagate_nan=tl.PropagateNan.ALL)
        return b_r * b_r
    elif ACTIVATION == 6:
        b_g = tl.minimum(b_gate, limit, propagate_nan=tl.PropagateNan.ALL)
        b_u = tl.maximum(b_up, -limit, propagate_nan=tl.PropagateNan.ALL)
        b_u = tl.minimum(b_u, limit, propagate_nan=tl.PropagateNan.ALL)
        return b_g * tl.sigmoid(b_g) * b_u
    else:
        b_g = tl.minimum(b_gate, limit, propagate_nan=tl.PropagateNan.ALL)
        b_u = tl.maximum(b_up, -limit, propagate_nan=tl.PropagateNan.ALL)
        b_u = tl.minimum(b_u, limit, propagate_nan=tl.PropagateNan.ALL)
        return b_g * tl.sigmoid(alpha * b_g) * (b_u + 1.0)


@triton.jit
def _tile(
    p_a, p_b, p_c, p_bias, p_weights, p_sorted_ids,
    i_m, i_n, i_s, i_e, num_rows, n_out, k_dim, a_row_div, up_offset, k_per_split,
    stride_am, stride_bn, stride_bk, stride_cs, stride_cm, stride_bias_e,
    alpha, limit,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, TILE_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_PER_BLOCK: tl.constexpr,
):
    """The first TILE_M slots (TILE_M <= BLOCK_M) of row block ``i_m`` against output tile ``i_n``, split ``i_s``.

    ``p_b`` points at expert ``i_e``'s weights.
    """
    OUT_N: tl.constexpr = BLOCK_N // 2 if GATED else BLOCK_N
    b_rows, m_rows, o_bn = _rows_and_columns(p_sorted_ids, i_m, i_n, num_rows, n_out, up_offset, GATED, BLOCK_M,
                                             TILE_M, BLOCK_N, EVEN_N, ROW_PER_BLOCK)
    # int64 offsets: T·K·H and E·2I·H exceed 2**31 elements at real sizes.
    o_a_rows = (b_rows // a_row_div).to(tl.int64) * stride_am
    k_start = i_s * k_per_split
    o_k = k_start + tl.arange(0, BLOCK_K)
    p_a_tile = p_a + o_a_rows[:, None] + o_k[None, :]
    p_b_tile = p_b + o_bn[None, :].to(tl.int64) * stride_bn + o_k[:, None] * stride_bk

    b_acc = tl.zeros([TILE_M, BLOCK_N], dtype=tl.float32)
    k_end = min(k_start + k_per_split, k_dim)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            b_a = tl.load(p_a_tile, mask=m_rows[:, None], other=0.0)
            b_b = tl.load(p_b_tile)
        else:
            m_k = (k + tl.arange(0, BLOCK_K)) < k_end
            b_a = tl.load(p_a_tile, mask=m_rows[:, None] & m_k[None, :], other=0.0)
            b_b = tl.load(p_b_tile, mask=m_k[:, None], other=0.0)
        b_acc = tl.dot(b_a, b_b, b_acc, input_precision=DOT_PRECISION)
        p_a_tile += BLOCK_K
        p_b_tile += BLOCK_K * stride_bk

    _epilogue(b_acc, p_bias, p_weights, p_c, i_e, i_s, i_n, b_rows, m_rows, o_bn, n_out, stride_bias_e, stride_cs,
              stride_cm, alpha, limit, ACTIVATION, GATED, HAS_BIAS, HAS_WEIGHTS, TILE_M, OUT_N)


@triton.jit
def _epilogue(
    b_acc, p_bias, p_weights, p_c, i_e, i_s, i_n, b_rows, m_rows, o_bn, n_out, stride_bias_e, stride_cs, stride_cm,
    alpha, limit,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    TILE_M: tl.constexpr, OUT_N: tl.constexpr,
):
    """fp32 tile ``b_acc`` [TILE_M, BLOCK_N] (columns = weight rows ``o_bn``; gated: gate half then up half) ->
    + bias (split 0 only) -> activation -> the rows' outputs (shared with the 8-bit kernel)."""
    if HAS_BIAS:
        if i_s == 0:  # with split-K the bias belongs to exactly one partial sum
            b_acc += tl.load(p_bias + i_e * stride_bias_e + o_bn).to(tl.float32)[None, :]
    b_out = _activate_tile(b_acc, alpha, limit, ACTIVATION, GATED, TILE_M, OUT_N)
    _store_rows(b_out, p_weights, p_c, b_rows, m_rows, i_s, i_n, n_out, stride_cs, stride_cm, HAS_WEIGHTS, OUT_N)


@triton.jit
def _activate_tile(
    b_acc, alpha, limit, ACTIVATION: tl.constexpr, GATED: tl.constexpr, TILE_M: tl.constexpr, OUT_N: tl.constexpr,
):
    """The activation of an fp32 [TILE_M, BLOCK_N] tile: gated, its gate half then its up half (-> OUT_N wide)."""
    if GATED:
        b_gate, b_up = tl.split(tl.permute(tl.reshape(b_acc, [TILE_M, 2, OUT_N]), [0, 2, 1]))
        b_out = _activate(b_gate, b_up, alpha, limit, ACTIVATION)
    else:
        b_out = _activate(b_acc, b_acc, alpha, limit, ACTIVATION)
    return b_out


@triton.jit
def _store_rows(
    b_out, p_weights, p_c, b_rows, m_rows, i_s, i_n, n_out, stride_cs, stride_cm,
    HAS_WEIGHTS: tl.constexpr, OUT_N: tl.constexpr,
):
    """× routing weight of each row, then store the [rows, OUT_N] outputs of column tile ``i_n``, split ``i_s``."""
    if HAS_WEIGHTS:
        b_w = tl.load(p_weights + b_rows, mask=m_rows, other=0.0).to(tl.float32)
        b_out = b_out * b_w[:, None]
    o_n = i_n * OUT_N + tl.arange(0, OUT_N)
    p_c_tile = p_c + i_s * stride_cs + b_rows.to(tl.int64)[:, None] * stride_cm + o_n[None, :]
    tl.store(p_c_tile, b_out.to(p_c.dtype.element_ty), mask=m_rows[:, None] & (o_n < n_out)[None, :])


@triton.jit
def _rows_and_columns(
    p_sorted_ids, i_m, i_n, num_rows, n_out, up_offset,
    GATED: tl.constexpr, BLOCK_M: tl.constexpr, TILE_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
    ROW_PER_BLOCK: tl.constexpr,
):
    """(routed row of each of the TILE_M slots, which are real rows, B row of each of the BLOCK_N tile columns)
    of row block ``i_m`` and output tile ``i_n`` (shared with the quantized kernels)."""
    OUT_N: tl.constexpr = BLOCK_N // 2 if GATED else BLOCK_N
    if ROW_PER_BLOCK:
        b_rows = tl.where(tl.arange(0, TILE_M) == 0, i_m, num_rows)
    else:
        b_rows = tl.load(p_sorted_ids + i_m * BLOCK_M + tl.arange(0, TILE_M))
    o_j = tl.arange(0, BLOCK_N)
    # Out-of-range columns re-read valid rows (wrapped) instead of masking every B load; their results are never
    # stored. When n_out is a multiple of the tile (EVEN_N) nothing wraps, and leaving the wrap out keeps the
    # columns visibly contiguous: weights stored N-major (a transposed view) then load as wide vectors instead of
    # one element at a time.
    if EVEN_N:
        o_bn = i_n * OUT_N + o_j % OUT_N
    else:
        o_bn = (i_n * OUT_N + o_j % OUT_N) % n_out
    if GATED:
        o_bn += tl.where(o_j < OUT_N, 0, up_offset)
    return b_rows, b_rows < num_rows, o_bn


@triton.jit
def _program_tile(
    i_pid, p_num_padded, num_rows, n_out,
    BLOCK_M: tl.constexpr, OUT_N: tl.constexpr, GROUP_M: tl.constexpr, ROW_PER_BLOCK: tl.constexpr,
):
    """(row block, output tile, whether there is one) of program ``i_pid`` (shared with the quantized kernels).

    GROUP_M consecutive row blocks walk the N tiles together, so one expert's B tiles are reused from L2. The
    grid is sized for the worst case: programs past the padded rows in use, or in the last, partial group past
    the N tiles, have no tile.
    """
    if ROW_PER_BLOCK:
        num_pid_m = num_rows
    else:
        num_pid_m = tl.cdiv(tl.load(p_num_padded), BLOCK_M)
    num_pid_n = tl.cdiv(n_out, OUT_N)
    num_in_group = GROUP_M * num_pid_n
    first_m = (i_pid // num_in_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    group_div = max(group_m, 1)  # no division by zero for the programs without a tile
    i_m = first_m + ((i_pid % num_in_group) % group_div)
    i_n = (i_pid % num_in_group) // group_div
    return i_m, i_n, (group_m > 0) & (i_n < num_pid_n)


# Row counts change with every batch: specializing on them (== 1, % 16) would recompile as T moves.
@triton.jit(do_not_specialize=["num_rows"])
def grouped_gemm_kernel(
    p_a, p_b, p_c, p_bias, p_weights,
    p_sorted_ids, p_expert_ids, p_num_padded,
    num_rows, n_out, k_dim, a_row_div, up_offset, k_per_split,
    stride_am, stride_be, stride_bn, stride_bk, stride_cs, stride_cm, stride_bias_e,
    alpha, limit,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_PER_BLOCK: tl.constexpr,
    HALF_TAIL: tl.constexpr,
):
    """C[s, row, n] for the rows of one block of M slots, a tile of output columns and split s = program_id(1).

    GATED: the tile's BLOCK_N rows of B are BLOCK_N/2 gate rows ``n`` then the matching up rows ``up_offset + n``,
    so one wide dot computes both and the activation runs in the epilogue on the split accumulator: the
    [2I]-wide pre-activation never reaches memory. The output tile is then BLOCK_N/2 columns wide.
    ROW_PER_BLOCK: block b is routed row b alone, its expert ``p_expert_ids[b]`` (the flat top-k ids): no align.
    HALF_TAIL: a block whose second half is all padding (an expert's last block; align puts padding last) runs
    a BLOCK_M/2-row tile, which halves the tensor-core work wasted on padding (~24% of the rows at ~2 blocks an
    expert with 128-row blocks).
    """
    OUT_N: tl.constexpr = BLOCK_N // 2 if GATED else BLOCK_N
    i_s = tl.program_id(1)
    i_m, i_n, has_tile = _program_tile(tl.program_id(0), p_num_padded, num_rows, n_out, BLOCK_M, OUT_N, GROUP_M,
                                       ROW_PER_BLOCK)
    if not has_tile:
        return
    i_e = tl.load(p_expert_ids + i_m).to(tl.int64)
    p_b_e = p_b + i_e * stride_be
    is_half = False  # compile-time False unless HALF_TAIL: one tile shape only
    if HALF_TAIL:
        is_half = tl.load(p_sorted_ids + i_m * BLOCK_M + BLOCK_M // 2) >= num_rows
    if is_half:
        _tile(
            p_a, p_b_e, p_c, p_bias, p_weights, p_sorted_ids,
            i_m, i_n, i_s, i_e, num_rows, n_out, k_dim, a_row_div, up_offset, k_per_split,
            stride_am, stride_bn, stride_bk, stride_cs, stride_cm, stride_bias_e,
            alpha, limit,
            ACTIVATION, GATED, HAS_BIAS, HAS_WEIGHTS, BLOCK_M, BLOCK_M // 2, BLOCK_N, BLOCK_K,
            EVEN_K, EVEN_N, DOT_PRECISION, ROW_PER_BLOCK,
        )
    else:
        _tile(
            p_a, p_b_e, p_c, p_bias, p_weights, p_sorted_ids,
            i_m, i_n, i_s, i_e, num_rows, n_out, k_dim, a_row_div, up_offset, k_per_split,
            stride_am, stride_bn, stride_bk, stride_cs, stride_cm, stride_bias_e,
            alpha, limit,
            ACTIVATION, GATED, HAS_BIAS, HAS_WEIGHTS, BLOCK_M, BLOCK_M, BLOCK_N, BLOCK_K,
            EVEN_K, EVEN_N, DOT_PRECISION, ROW_PER_BLOCK,
        )

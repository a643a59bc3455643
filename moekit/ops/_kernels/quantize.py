"""Triton bodies of ``moekit.ops.act_quant``: 8-bit codes of activations, per group of columns of a row.

Names: ``i_`` index, ``o_`` offset vector, ``m_`` mask, ``p_`` pointer, ``b_`` register block.

What Triton's CPU interpreter (TRITON_INTERPRET=1, Triton 3.9) does with 8-bit types, and why the code below
rounds by hand:
- ``fp32.to(float8e4nv)`` is emulated bit by bit (``interpreter._convert_float``) and rounds wrongly: half-way
  cases go up instead of to even, and a mantissa carry ORs into the exponent, so a value just under a power of
  two with an odd exponent lands on the power below (31.8 -> 16, 127.4 -> 64). A value already on the e4m3 grid
  converts exactly.
- ``fp32.to(int8)`` truncates like a C cast (numpy ``astype``); round half to even must come first.
- ``tl.dot`` on e4m3 operands widens both to fp16 (exact) and multiplies with numpy in the accumulator's dtype
  (fp32): exact products, fp32 sums. On int8 operands with an int32 accumulator it is exact integer arithmetic.
- ``tl.math.div_rn`` is numpy's IEEE division (on a GPU ``/`` in fp32 need not be correctly rounded; div_rn is).
- torch evaluates ``scalar / tensor`` as ``reciprocal(tensor) * scalar`` (two roundings): ``_multiplier`` does too.

So ``_codes`` rounds to the target grid in fp32 arithmetic (round to nearest even via the add-and-subtract of a
magic constant one ulp-grid above the value) and the cast that follows is exact, in the interpreter and on a GPU
alike: the codes equal torch's ``clamp(x * m, ±QMAX).to(float8_e4m3fn)`` / ``round`` + ``to(int8)`` bit for bit.
"""

import triton
import triton.language as tl


@triton.jit
def _codes(b_y, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    """fp32 values of the 8-bit codes of ``b_y``: clamped to ±QMAX, rounded to nearest even on the format's grid."""
    # NaN stays NaN (tl.minimum/maximum return the other operand by default: a NaN became a finite ±QMAX code).
    b_y = tl.minimum(tl.maximum(b_y, -QMAX, propagate_nan=tl.PropagateNan.ALL), QMAX,
                     propagate_nan=tl.PropagateNan.ALL)
    if IS_INT:
        # 1.5·2^23: adding it leaves no fraction bits in fp32, so the sum rounds to an integer (to even). NaN -> 0
        # (int8 has no NaN; the torch reference does the same).
        b_y = tl.where(b_y == b_y, b_y, 0.0)
        return (b_y + 12582912.0) - 12582912.0
    # e4m3fn: 3 mantissa bits, normal from 2^-6, subnormal spacing 2^-9. The grid spacing at |y| is
    # u = 2^(max(e, -6) - 3) for 2^e <= |y|; (y + 1.5·2^23·u) - 1.5·2^23·u rounds y to a multiple of u (to even).
    i_exp = (b_y.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased fp32 exponent (0 for zero)
    i_ulp = tl.maximum(i_exp, 127 - 6) - 3
    b_magic = (((i_ulp + 23) << 23) | 0x400000).to(tl.float32, bitcast=True)
    return (b_y + b_magic) - b_magic


@triton.jit
def _multiplier(b_amax, QMAX: tl.constexpr):
    """(m, s) of a group: m = QMAX / max(amax, 2^-100), s = 1 / m (0 and 0 for an all-zero group; NaN and NaN
    for a NaN amax, as ``moekit.ops.quantize.multiplier``).

    As torch evaluates ``QMAX / amax`` for a tensor amax (``reciprocal(amax) * QMAX``: two roundings), so the
    multiplier is the reference's float; each reciprocal is correctly rounded.
    """
    m_zero = b_amax == 0
    b_one = tl.full(b_amax.shape, 1.0, tl.float32)
    # amax floored at 2^-100 (moekit.ops.quantize.AMAX_FLOOR): a subnormal amax made m = inf and NaN codes.
    b_amax = tl.where(m_zero, 1.0, tl.maximum(b_amax, 7.888609052210118e-31, propagate_nan=tl.PropagateNan.ALL))
    b_mult = tl.where(m_zero, 0.0, tl.math.div_rn(b_one, b_amax) * QMAX)
    b_scale = tl.where(m_zero, 0.0, tl.math.div_rn(b_one, tl.where(m_zero, 1.0, b_mult)))
    return b_mult, b_scale


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _amax(b_x):
    """max |x| of each row of ``b_x``, NaN where a row holds one (tl.max drops NaN)."""
    return tl.reduce(tl.abs(b_x), 1, _max_nan)


@triton.jit
def act_quant_kernel(
    p_x, p_q, p_s, p_mult,
    num_rows, k_dim, group,
    stride_xm, stride_qm, stride_sm,
    QMAX: tl.constexpr, IS_INT: tl.constexpr, GIVEN_MULT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
):
    """Rows [BLOCK_M·program_id(0), +BLOCK_M) and column group program_id(1) of ``group`` columns.

    GIVEN_MULT: every group uses the multiplier ``p_mult[0]`` (per-tensor and static scales; the caller holds s),
    else each row's group gets m = QMAX / max |x| and its s is stored at ``p_s[row, group index]``.
    ONE_PASS: the group fits in one BLOCK_K tile (group size <= 128, or a given multiplier's chunk), so x is read
    once.
    """
    i_m = tl.program_id(0)
    i_g = tl.program_id(1)
    o_rows = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_rows = o_rows < num_rows
    o_rows = o_rows.to(tl.int64)
    k_start = i_g * group
    k_end = tl.minimum(k_start + group, k_dim)
    o_k = tl.arange(0, BLOCK_K)
    p_x_rows = p_x + o_rows[:, None] * stride_xm
    p_q_rows = p_q + o_rows[:, None] * stride_qm
    if ONE_PASS:
        m_k = (k_start + o_k) < k_end
        b_x = tl.load(p_x_rows + k_start + o_k[None, :], mask=m_rows[:, None] & m_k[None, :], other=0.0)
        b_x = b_x.to(tl.float32)
        if GIVEN_MULT:
            b_mult = tl.load(p_mult) + tl.zeros([BLOCK_M], dtype=tl.float32)
        else:
            b_mult, b_scale = _multiplier(_amax(b_x), QMAX)
            tl.store(p_s + o_rows * stride_sm + i_g, b_scale, mask=m_rows)
        b_q = _codes(b_x * b_mult[:, None], QMAX, IS_INT)
        tl.store(p_q_rows + k_start + o_k[None, :], b_q.to(p_q.dtype.element_ty),
                 mask=m_rows[:, None] & m_k[None, :])
    else:
        # Two passes (amax, then codes) for a per-token group wider than one tile; a given multiplier never comes
        # here (its groups are independent one-pass chunks: see the wrapper).
        tl.static_assert(not GIVEN_MULT, "act_quant_kernel: GIVEN_MULT runs one-pass chunks")
        b_amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            m_k = (k + o_k) < k_end
            b_x = tl.load(p_x_rows + k + o_k[None, :], mask=m_rows[:, None] & m_k[None, :], other=0.0)
            b_amax = _max_nan(b_amax, _amax(b_x.to(tl.float32)))
        b_mult, b_scale = _multiplier(b_amax, QMAX)
        tl.store(p_s + o_rows * stride_sm + i_g, b_scale, mask=m_rows)
        for k in range(k_start, k_end, BLOCK_K):
            m_k = (k + o_k) < k_end
            b_x = tl.load(p_x_rows + k + o_k[None, :], mask=m_rows[:, None] & m_k[None, :], other=0.0)
            b_q = _codes(b_x.to(tl.float32) * b_mult[:, None], QMAX, IS_INT)
            tl.store(p_q_rows + k + o_k[None, :], b_q.to(p_q.dtype.element_ty), mask=m_rows[:, None] & m_k[None, :])

"""Triton body of ``moekit.ops.activation_backward``: the activation's backward, one block of rows per program.

Names: ``i_`` index, ``o_`` offset vector, ``m_`` mask, ``p_`` pointer, ``b_`` register block.
ACTIVATION codes are those of ``_kernels/grouped_gemm.py`` (1 silu, 2 gelu, 3 gelu_tanh, 4 relu2, 5 swigluoai,
6 clamped silu). A clamp passes the gradient where its input lies within the bounds, as torch's clamp does.
"""

import triton
import triton.language as tl


@triton.jit
def _forward_and_slopes(b_gate, b_up, alpha, limit, ACTIVATION: tl.constexpr):
    """(a, da/dgate, da/dup) in fp32 for one tile; for the non-gated relu2 ``b_up`` is ignored."""
    if ACTIVATION == 4:
        b_r = tl.maximum(b_gate, 0.0, propagate_nan=tl.PropagateNan.ALL)
        return b_r * b_r, 2.0 * b_r, b_r
    if ACTIVATION == 5 or ACTIVATION == 6:
        m_gate = b_gate <= limit
        m_up = (b_up >= -limit) & (b_up <= limit)
        b_gate = tl.minimum(b_gate, limit, propagate_nan=tl.PropagateNan.ALL)
        b_up = tl.minimum(tl.maximum(b_up, -limit, propagate_nan=tl.PropagateNan.ALL), limit,
                          propagate_nan=tl.PropagateNan.ALL)
    if ACTIVATION == 5:
        b_s = tl.sigmoid(alpha * b_gate)
        b_glu = b_gate * b_s
        b_a = b_glu * (b_up + 1.0)
        b_dgate = (b_up + 1.0) * (b_s + alpha * b_glu * (1.0 - b_s))
        b_dup = b_glu
    else:
        if ACTIVATION == 2:
            b_cdf = 0.5 * (1.0 + tl.math.erf(b_gate * 0.7071067811865476))
            b_f = b_gate * b_cdf
            b_df = b_cdf + b_gate * tl.exp(-0.5 * b_gate * b_gate) * 0.3989422804014327
        elif ACTIVATION == 3:
            b_z = 0.7978845608028654 * (b_gate + 0.044715 * b_gate * b_gate * b_gate)
            b_t = 2.0 * tl.sigmoid(2.0 * b_z) - 1.0  # tanh: libdevice tanh is not in the interpreter
            b_f = 0.5 * b_gate * (1.0 + b_t)
            b_df = 0.5 * (1.0 + b_t) + 0.5 * b_gate * (1.0 - b_t * b_t) * 0.7978845608028654 * (
                1.0 + 0.134145 * b_gate * b_gate)
        else:  # silu, clamped or not
            b_s = tl.sigmoid(b_gate)
            b_f = b_gate * b_s
            b_df = b_s * (1.0 + b_gate * (1.0 - b_s))
        b_a = b_f * b_up
        b_dgate = b_up * b_df
        b_dup = b_f
    if ACTIVATION == 5 or ACTIVATION == 6:
        b_dgate = tl.where(m_gate, b_dgate, 0.0)
        b_dup = tl.where(m_up, b_dup, 0.0)
    return b_a, b_dgate, b_dup


@triton.jit(do_not_specialize=["num_rows"])
def activation_backward_kernel(
    p_h, p_g, p_weights, p_a, p_dh, p_dw,
    num_rows, inter, stride_h, stride_g, stride_a, stride_dh, alpha, limit,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """Rows [i·BLOCK_R, (i+1)·BLOCK_R): a = act(h); dh = act'(h) ⊙ (weights[r] · g); dw[r] = sum_i g · a.

    ``a`` is rounded to its output dtype before the sum, as the forward's second GEMM read it.
    """
    i_r = tl.program_id(0)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < num_rows
    o_r64 = o_r.to(tl.int64)
    b_w = tl.load(p_weights + o_r, mask=m_r, other=0.0).to(tl.float32)
    b_dw = tl.zeros([BLOCK_R], dtype=tl.float32)
    for i0 in range(0, inter, BLOCK_I):
        o_i = i0 + tl.arange(0, BLOCK_I)
        m = m_r[:, None] & (o_i < inter)[None, :]
        p_h_tile = p_h + o_r64[:, None] * stride_h + o_i[None, :]
        b_gate = tl.load(p_h_tile, mask=m, other=0.0).to(tl.float32)
        b_up = b_gate
        if GATED:
            b_up = tl.load(p_h_tile + inter, mask=m, other=0.0).to(tl.float32)
        b_g = tl.load(p_g + o_r64[:, None] * stride_g + o_i[None, :], mask=m, other=0.0).to(tl.float32)
        b_a, b_dgate, b_dup = _forward_and_slopes(b_gate, b_up, alpha, limit, ACTIVATION)
        b_a_q = b_a.to(p_a.dtype.element_ty)
        tl.store(p_a + o_r64[:, None] * stride_a + o_i[None, :], b_a_q, mask=m)
        b_dw += tl.sum(b_g * b_a_q.to(tl.float32), axis=1)
        b_da = b_g * b_w[:, None]
        p_dh_tile = p_dh + o_r64[:, None] * stride_dh + o_i[None, :]
        tl.store(p_dh_tile, (b_da * b_dgate).to(p_dh.dtype.element_ty), mask=m)
        if GATED:
            tl.store(p_dh_tile + inter, (b_da * b_dup).to(p_dh.dtype.element_ty), mask=m)
    tl.store(p_dw + o_r, b_dw, mask=m_r)

"""Triton body of ``moekit.ops.reduce``: sum the per-row outputs of each token over top-k (and split-K).

Names: ``i_`` index, ``o_`` offset vector, ``m_`` mask, ``p_`` pointer, ``b_`` register block.
"""

import triton
import triton.language as tl


@triton.jit
def topk_reduce_kernel(
    p_y, p_out, p_topk_ids, p_expert_map,
    hidden, top_k, num_splits, num_experts, stride_ys, stride_yn, stride_ot,
    HAS_MAP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t, h-tile] = sum over s, k of y[s, t·K + k, h-tile] in fp32, in a fixed order (deterministic).

    BLOCK_S partials are loaded at once: the fused decode writes tens of them per row, and one dependent load
    after another would leave the reduction waiting on latency."""
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    o_k = tl.arange(0, BLOCK_K)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < hidden
    o_n = i_t.to(tl.int64) * top_k + o_k
    m_k = o_k < top_k
    if HAS_MAP:
        # Rows whose expert lives on another rank were never written: they must not be read.
        b_ids = tl.load(p_topk_ids + o_n, mask=m_k, other=0)
        b_local = tl.load(p_expert_map + b_ids, mask=m_k, other=-1)
        m_k = m_k & (b_local >= 0) & (b_local < num_experts)
    o_s = tl.arange(0, BLOCK_S).to(tl.int64)  # int64 offsets: S·N·H may pass 2**31 elements
    p_rows = p_y + o_n[None, :, None] * stride_yn + o_h[None, None, :]
    m_tile = m_k[None, :, None] & m_h[None, None, :]
    b_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for i_s in range(0, num_splits, BLOCK_S):
        o_ss = i_s + o_s
        m_sk = (o_ss < num_splits)[:, None, None] & m_tile
        b_part = tl.load(p_rows + o_ss[:, None, None] * stride_ys, mask=m_sk, other=0.0).to(tl.float32)
        b_acc += tl.sum(tl.sum(b_part, axis=0), axis=0)
    tl.store(p_out + i_t.to(tl.int64) * stride_ot + o_h, b_acc.to(p_out.dtype.element_ty), mask=m_h)

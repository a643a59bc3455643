"""Triton body of ``moekit.ops.gluon_wna16.gather_pieces``: the routed rows of A, per slot of the padded layout, with
each 128-column group's columns in piece order, as [⌈K / 128⌉ · 4, P, 32] (zeros past K).

Names: ``i_`` index, ``o_`` offset vector, ``m_`` mask, ``p_`` pointer, ``b_`` register block.
"""

import triton
import triton.language as tl


@triton.jit
def gather_pieces_kernel(
    p_a, p_out, p_sorted_ids, num_rows, a_row_div, stride_am, num_slots, k_dim,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, ROW_PER_BLOCK: tl.constexpr,
):
    """Grid (⌈P / BLOCK_P⌉, ⌈K / 128⌉). Column 32r + 2w + h of group g in the output is column 8w + r + 4h of the
    group in A (nibbles r and r + 4 of code word w: ``gluon_wna16_kernel``'s piece r); padding slots and columns
    past K get zeros."""
    i_g = tl.program_id(1)
    o_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < num_slots
    if ROW_PER_BLOCK:  # block b holds routed row b in its slot 0
        b_rows = tl.where(o_p % BLOCK_M == 0, o_p // BLOCK_M, num_rows)
    else:
        b_rows = tl.load(p_sorted_ids + o_p, mask=m_p, other=num_rows)
    m_rows = b_rows < num_rows
    o_j = tl.arange(0, 128)
    o_src = 8 * ((o_j % 32) // 2) + o_j // 32 + 4 * (o_j % 2)
    p_src = p_a + (b_rows // a_row_div).to(tl.int64)[:, None] * stride_am + i_g * 128 + o_src[None, :]
    b_a = tl.load(p_src, mask=m_rows[:, None] & (i_g * 128 + o_src < k_dim)[None, :], other=0.0)
    # out[4g + j // 32, p, j % 32]
    o_dst = (4 * i_g + o_j // 32).to(tl.int64)[None, :] * (num_slots * 32) + o_p.to(tl.int64)[:, None] * 32 + o_j % 32
    tl.store(p_out + o_dst, b_a, mask=m_p[:, None])

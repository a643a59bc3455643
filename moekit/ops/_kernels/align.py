"""Triton bodies of ``moekit.ops.align``: group routed rows by expert into a BLOCK_M-padded layout.

Names: ``i_`` index, ``o_`` offset vector, ``m_`` mask, ``p_`` pointer, ``b_`` register block.

Per expert, rows are counted with a one-hot ``[BLOCK_R, BLOCK_E]`` tile (no atomics, so the output is
deterministic), and a row's rank among the rows of its expert in its chunk is the column-wise cumsum of that tile.
"""

import triton
import triton.language as tl


@triton.jit
def _local_ids(p_topk_ids, p_expert_map, o_r, m_r, num_experts, HAS_MAP: tl.constexpr):
    """Local expert id of each routed row, -1 where the row is masked out or its expert is not local."""
    # Masked rows become -1 after the cast: an `other=-1` load of uint8 ids would read 255, a real expert at E = 256.
    b_ids = tl.where(m_r, tl.load(p_topk_ids + o_r, mask=m_r, other=0).to(tl.int32), -1)
    if HAS_MAP:
        b_ids = tl.load(p_expert_map + b_ids, mask=m_r & (b_ids >= 0), other=-1).to(tl.int32)
    return tl.where((b_ids >= 0) & (b_ids < num_experts), b_ids, -1)


# Row and block counts change with every batch: no specialization on them (== 1, % 16), so no recompiles.
@triton.jit(do_not_specialize=["num_rows", "num_chunks"])
def align_count_kernel(
    p_topk_ids, p_expert_map, p_counts,
    num_rows, num_experts, num_chunks,
    HAS_MAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """counts[e, chunk] = rows of chunk ``program_id`` routed to local expert e."""
    i_c = tl.program_id(0)
    o_r = i_c * BLOCK_R + tl.arange(0, BLOCK_R)
    o_e = tl.arange(0, BLOCK_E)
    b_ids = _local_ids(p_topk_ids, p_expert_map, o_r, o_r < num_rows, num_experts, HAS_MAP)
    b_cnt = tl.sum((b_ids[:, None] == o_e[None, :]).to(tl.int32), axis=0)
    tl.store(p_counts + o_e * num_chunks + i_c, b_cnt, mask=o_e < num_experts)


@triton.jit
def _scatter_chunk(
    p_topk_ids, p_expert_map, p_sorted_ids, i_c, b_first, num_rows, num_experts,
    HAS_MAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Write the rows of chunk ``i_c`` to their slots; ``b_first[e]`` = slot of the chunk's first row of e.

    Returns the chunk's per-expert row counts.
    """
    o_r = i_c * BLOCK_R + tl.arange(0, BLOCK_R)
    o_e = tl.arange(0, BLOCK_E)
    b_ids = _local_ids(p_topk_ids, p_expert_map, o_r, o_r < num_rows, num_experts, HAS_MAP)
    b_hot = (b_ids[:, None] == o_e[None, :]).to(tl.int32)
    # Inclusive count of same-expert rows up to and including this one: its rank (+1) inside the chunk.
    b_rank = tl.sum(tl.cumsum(b_hot, axis=0) * b_hot, axis=1) - 1
    b_slot = tl.sum(b_hot * b_first[None, :], axis=1) + b_rank
    tl.store(p_sorted_ids + b_slot, o_r, mask=b_ids >= 0)
    return tl.sum(b_hot, axis=0)


@triton.jit(do_not_specialize=["num_rows", "num_chunks", "num_blocks"])
def align_scatter_kernel(
    p_topk_ids, p_expert_map, p_counts, p_cumsum,
    p_sorted_ids, p_expert_ids, p_num_padded,
    num_rows, num_experts, num_chunks, num_blocks,
    HAS_MAP: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Fill ``sorted_ids`` [num_blocks·BLOCK_M], ``expert_ids`` [num_blocks] and ``num_padded`` [1].

    SINGLE: one program counts every chunk itself (no count kernel, no cumsum: one launch for decode sizes).
    Otherwise program c scatters chunk c, reading its offsets from the inclusive cumsum over chunks of the count
    kernel's ``counts`` [E, chunks]; every program also fills a strided share of the per-block metadata.
    """
    i_p = tl.program_id(0)
    num_progs = tl.num_programs(0)
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < num_experts
    if SINGLE:
        b_total = tl.zeros([BLOCK_E], dtype=tl.int32)
        for i_c in range(0, num_chunks):
            o_r = i_c * BLOCK_R + tl.arange(0, BLOCK_R)
            b_ids = _local_ids(p_topk_ids, p_expert_map, o_r, o_r < num_rows, num_experts, HAS_MAP)
            b_total += tl.sum((b_ids[:, None] == o_e[None, :]).to(tl.int32), axis=0)
    else:
        b_total = tl.load(p_cumsum + o_e * num_chunks + num_chunks - 1, mask=m_e, other=0)
    b_padded = (b_total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    b_end = tl.cumsum(b_padded, axis=0)
    b_start = b_end - b_padded

    if SINGLE:
        b_first = b_start
        for i_c in range(0, num_chunks):
            b_first += _scatter_chunk(
                p_topk_ids, p_expert_map, p_sorted_ids, i_c, b_first, num_rows, num_experts,
                HAS_MAP, BLOCK_R, BLOCK_E,
            )
    else:
        b_before = tl.load(p_cumsum + o_e * num_chunks + i_p, mask=m_e, other=0)
        b_before -= tl.load(p_counts + o_e * num_chunks + i_p, mask=m_e, other=0)
        _scatter_chunk(
            p_topk_ids, p_expert_map, p_sorted_ids, i_p, b_start + b_before, num_rows, num_experts,
            HAS_MAP, BLOCK_R, BLOCK_E,
        )

    # Per block: its expert (= number of experts whose padded range ends at or before the block) and the
    # sentinel ``num_rows`` in every slot past that expert's last row. Blocks past the end get expert -1.
    b_valid_end = b_start + b_total
    o_m = tl.arange(0, BLOCK_M)
    for i_b0 in range(i_p * BLOCK_B, num_blocks, num_progs * BLOCK_B):
        o_b = i_b0 + tl.arange(0, BLOCK_B)
        m_b = o_b < num_blocks
        o_pos = o_b * BLOCK_M
        b_e = tl.sum(((b_end[None, :] <= o_pos[:, None]) & m_e[None, :]).to(tl.int32), axis=1)
        b_hot = (b_e[:, None] == o_e[None, :]).to(tl.int32)
        b_last = tl.sum(b_hot * b_valid_end[None, :], axis=1)  # 0 for blocks past the end: all padding
        tl.store(p_expert_ids + o_b, tl.where(b_e < num_experts, b_e, -1), mask=m_b)
        o_slot = o_pos[:, None] + o_m[None, :]
        m_pad = (o_slot >= b_last[:, None]) & m_b[:, None]
        tl.store(p_sorted_ids + o_slot, tl.full([BLOCK_B, BLOCK_M], 0, tl.int32) + num_rows, mask=m_pad)
    if i_p == 0:
        tl.store(p_num_padded, tl.sum(b_padded, axis=0))

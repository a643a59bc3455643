"""Group the N = T·K routed rows by local expert into a BLOCK_M-padded layout, with no host sync.

Shapes: T tokens, K top-k, N = T·K routed rows (row n = t·K + k), E local experts, M = BLOCK_M.

    for e in local experts (in order):
        rows_e = [n for n in range(N) if local(topk_ids.flat[n]) == e]        # ascending n
        append rows_e to sorted_ids, then pad with the sentinel N up to a multiple of M
        expert_ids gets e once per M slots appended
    num_padded = len(sorted_ids);  sorted_ids / expert_ids are then filled up to their fixed size with N / -1

``local(g) = expert_map[g]`` (or g without a map); rows whose local id is -1 are dropped. Every output has a
size that depends only on (N, E, M) — at most min(N, E) experts get rows, so padding adds at most
min(N, E)·(M - 1) slots — which is what makes the whole MoE capturable in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit._checks import (
    check_dtype,
    check_int_dtype,
    check_ndim,
    check_positive,
    check_shape,
    check_signed_int_dtype,
    check_tensor,
)
from moekit.ops._kernels.align import align_count_kernel, align_scatter_kernel

# A one-hot [BLOCK_R, BLOCK_E] int32 tile (and its cumsum) stays in registers up to about this many elements.
_ONEHOT_ELEMS = 8192
# Up to this many chunks one program does the whole job in a single launch (decode sizes); more, and a count
# kernel + cumsum + scatter kernel spread it over one program per chunk (one program looping over 8 chunks of
# 1024 rows measured 56 us on an H100, against ~3 us for a tiny one).
_SINGLE_MAX_CHUNKS = 2


@dataclass(frozen=True, kw_only=True)
class AlignResult:
    """The padded layout the grouped GEMMs consume.

    Attributes:
        sorted_ids: [num_blocks·M] int32 routed-row index per slot; N marks padding.
        expert_ids: [num_blocks] int32 local expert of each block of M slots; -1 past ``num_padded``.
        num_padded: [1] int32 (on device) slots in use, a multiple of M.
        block_m: M.
        row_per_block: block b holds routed row b alone (slot 0; the other slots are padding) and
            ``expert_ids`` is the flat ``topk_ids``; ``sorted_ids`` and ``num_padded`` are unused. Built by
            ``row_per_block`` with no kernel launch.
    """

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_padded: torch.Tensor
    block_m: int
    row_per_block: bool = False


def row_per_block(topk_ids_TK: torch.Tensor, block_m: int) -> AlignResult:
    """The layout with one routed row per block, read straight from ``topk_ids`` (no launch, no map).

    Valid for any ids in [0, E); it streams an expert's weights once per row routed to it, so it pays only when
    no two rows share an expert — a single token (T = 1), where it saves the align launch.
    """
    ids_N = topk_ids_TK.reshape(-1)
    return AlignResult(sorted_ids=ids_N, expert_ids=ids_N, num_padded=ids_N, block_m=block_m, row_per_block=True)


def align_num_blocks(num_rows: int, num_experts: int, block_m: int) -> int:
    """Fixed block count of the padded layout for N rows over E experts."""
    return -(-(num_rows + min(num_rows, num_experts) * (block_m - 1)) // block_m)


def align_workspace_elems(num_rows: int, num_experts: int, block_m: int) -> int:
    """int32 elements of scratch ``align`` needs (its outputs excluded)."""
    return 2 * _num_chunks(num_rows, num_experts) * num_experts


def align(
    topk_ids_TK: torch.Tensor,
    num_experts: int,
    block_m: int,
    *,
    expert_map: torch.Tensor | None = None,
    out: AlignResult | None = None,
    scratch: torch.Tensor | None = None,
) -> AlignResult:
    """Group routed rows by local expert (see the module docstring).

    Args:
        topk_ids_TK: [T, K] int expert ids (global ids when ``expert_map`` is given).
        num_experts: E, local expert count.
        block_m: M, a power of two >= 16.
        expert_map: optional [E_global] int map global -> local id (-1: not on this rank).
        out: preallocated outputs (sizes from ``align_num_blocks``); allocated when None.
        scratch: int32 buffer of at least ``align_workspace_elems`` elements; allocated when None.
    """
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m: expected a power of two >= 16, got {block_m}")
    check_positive("num_experts", num_experts)
    check_tensor("topk_ids_TK", topk_ids_TK)
    check_int_dtype("topk_ids_TK", topk_ids_TK)  # the kernel casts to int32: float ids would be truncated
    if expert_map is not None:
        check_ndim("expert_map", expert_map, 1, "[E_global]")
        check_signed_int_dtype("expert_map", expert_map)
        expert_map = expert_map.contiguous()  # indexed as a dense array by the kernels
    ids_N = topk_ids_TK.reshape(-1)
    num_rows = ids_N.numel()
    device = ids_N.device
    num_blocks = align_num_blocks(num_rows, num_experts, block_m)
    if out is None:
        out = AlignResult(
            sorted_ids=torch.empty(num_blocks * block_m, dtype=torch.int32, device=device),
            expert_ids=torch.empty(num_blocks, dtype=torch.int32, device=device),
            num_padded=torch.empty(1, dtype=torch.int32, device=device),
            block_m=block_m,
        )
    else:
        # The kernels fill exactly these sizes: a smaller buffer is written out of bounds, another block_m would
        # describe a different layout to the GEMMs.
        if out.block_m != block_m:
            raise ValueError(f"out.block_m: expected {block_m} (block_m), got {out.block_m}")
        for name, t, size in (("out.sorted_ids", out.sorted_ids, num_blocks * block_m),
                              ("out.expert_ids", out.expert_ids, num_blocks), ("out.num_padded", out.num_padded, 1)):
            check_shape(name, t, (size,), f"(align_num_blocks(N={num_rows}, E={num_experts}, M={block_m}))")
            check_dtype(name, t, (torch.int32,))
            if size > 1 and t.stride(0) != 1:
                raise ValueError(f"{name}: expected a contiguous tensor, got stride {t.stride()}")
    if num_rows == 0:
        out.num_padded.zero_()
        return out
    block_e = _block_e(num_experts)
    block_r = _block_r(num_rows, num_experts)
    num_chunks = _num_chunks(num_rows, num_experts)
    # A block-metadata tile of [BLOCK_B, BLOCK_E] compares and [BLOCK_B, M] sentinel slots.
    block_b = max(1, min(64, _ONEHOT_ELEMS // max(block_e, block_m), _pow2(num_blocks)))
    single = num_chunks <= _SINGLE_MAX_CHUNKS
    expert_map_arg = expert_map if expert_map is not None else ids_N
    counts = cumsum = ids_N  # unused placeholders when single
    if not single:
        if scratch is None:
            scratch = torch.empty(2 * num_chunks * num_experts, dtype=torch.int32, device=device)
        elif (scratch.dtype != torch.int32 or scratch.dim() != 1 or scratch.numel() < 2 * num_chunks * num_experts
              or (scratch.numel() > 1 and scratch.stride(0) != 1)):
            raise ValueError(
                f"scratch: expected an int32 tensor of at least {2 * num_chunks * num_experts} contiguous elements "
                f"(align_workspace_elems), got {scratch.dtype} of shape {tuple(scratch.shape)}"
            )
        # Expert-major [E, chunks]: the scan over chunks runs along the contiguous dim (a cumsum over dim 0 of
        # [chunks, E] is a sequential loop per column: ~100 us at 1000 chunks).
        counts = scratch[: num_chunks * num_experts].view(num_experts, num_chunks)
        cumsum = scratch[num_chunks * num_experts : 2 * num_chunks * num_experts].view(num_experts, num_chunks)
        align_count_kernel[(num_chunks,)](
            ids_N, expert_map_arg, counts, num_rows, num_experts, num_chunks,
            HAS_MAP=expert_map is not None, BLOCK_R=block_r, BLOCK_E=block_e, num_warps=4,
        )
        torch.cumsum(counts, dim=1, out=cumsum)
    align_scatter_kernel[(1 if single else num_chunks,)](
        ids_N, expert_map_arg, counts, cumsum,
        out.sorted_ids, out.expert_ids, out.num_padded,
        num_rows, num_experts, num_chunks, num_blocks,
        HAS_MAP=expert_map is not None, SINGLE=single,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_E=block_e, BLOCK_B=block_b, num_warps=_scatter_warps(single, block_e),
    )
    return out


def align_ref(
    topk_ids_TK: torch.Tensor,
    num_experts: int,
    block_m: int,
    *,
    expert_map: torch.Tensor | None = None,
) -> AlignResult:
    """Pure-torch twin of ``align`` (same outputs, bit for bit)."""
    ids_N = topk_ids_TK.reshape(-1).long()
    num_rows = ids_N.numel()
    device = ids_N.device
    if expert_map is not None:
        ids_N = expert_map.long()[ids_N]
    ids_N = torch.where((ids_N >= 0) & (ids_N < num_experts), ids_N, -1)
    num_blocks = align_num_blocks(num_rows, num_experts, block_m)
    sorted_ids = torch.full((num_blocks * block_m,), num_rows, dtype=torch.int32, device=device)
    expert_ids = torch.full((num_blocks,), -1, dtype=torch.int32, device=device)
    pos = 0
    for e in range(num_experts):
        rows = torch.nonzero(ids_N == e).flatten()
        if rows.numel() == 0:
            continue
        padded = -(-rows.numel() // block_m) * block_m
        sorted_ids[pos : pos + rows.numel()] = rows.to(torch.int32)
        expert_ids[pos // block_m : (pos + padded) // block_m] = e
        pos += padded
    num_padded = torch.tensor([pos], dtype=torch.int32, device=device)
    return AlignResult(sorted_ids=sorted_ids, expert_ids=expert_ids, num_padded=num_padded, block_m=block_m)


def _scatter_warps(single: bool, block_e: int) -> int:
    """Warps of the scatter kernel (a seam for benchmarks/probes/align_timing.py)."""
    return 4


def _block_e(num_experts: int) -> int:
    return max(2, _pow2(num_experts))


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _block_r(num_rows: int, num_experts: int) -> int:
    # From 128 experts on, half-size one-hot tiles: decode-sized calls then take the count + scatter programs
    # instead of one program looping over [64, 128] tiles (H200, benchmarks/probes/align_timing.py, N = 128 /
    # 512 rows: E = 128 13.2 / 11.2 -> 7.4 / 8.8 µs, E = 256 10.2 / 10.6 -> 8.1 / 9.0 µs; E = 64: 8.8 -> 10.0,
    # so not below 128).
    elems = _ONEHOT_ELEMS // 2 if num_experts >= 128 else _ONEHOT_ELEMS
    return max(16, min(1024, elems // _block_e(num_experts), _pow2(num_rows)))


def _num_chunks(num_rows: int, num_experts: int) -> int:
    return max(1, -(-num_rows // _block_r(num_rows, num_experts)))

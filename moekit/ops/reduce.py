"""Deterministic reduction of per-routed-row outputs over top-k (and over split-K partial sums).

Shapes: T tokens, K top-k, N = T·K routed rows (row n = t·K + k), S split-K partials, H hidden.

    out[t] = sum_{s < S} sum_{k < K, row t·K + k routed to a local expert} y[s, t·K + k]     # fp32, fixed order

Rows whose expert maps to -1 under ``expert_map`` were never written by the GEMMs and are skipped (not read), so
a token with no local expert gets zeros. No atomics: the same inputs give the same bits every run.
"""

from __future__ import annotations

import torch

from moekit._checks import check_ndim, check_shape
from moekit.ops._kernels.reduce import topk_reduce_kernel


def topk_reduce(
    y_SNH: torch.Tensor,
    top_k: int,
    out_TH: torch.Tensor,
    *,
    topk_ids_TK: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None,
    num_experts: int = 0,
) -> torch.Tensor:
    """Sum ``y_SNH`` [S, N, H] (or [N, H]) over S and top-k into ``out_TH`` [T, H] and return it.

    ``topk_ids_TK`` and ``num_experts`` are needed only with ``expert_map`` (to skip rows of other ranks).
    """
    y = y_SNH if y_SNH.dim() == 3 else y_SNH.unsqueeze(0)
    check_ndim("out_TH", out_TH, 2, "[T, H]")
    num_tokens, hidden = out_TH.shape
    if out_TH.stride(-1) != 1:
        raise ValueError(f"out_TH: expected a contiguous last dim, got strides {out_TH.stride()}")
    if y.shape[1] != num_tokens * top_k or y.shape[2] != hidden or y.stride(-1) != 1:
        raise ValueError(f"y_SNH: expected [S, {num_tokens * top_k}, {hidden}] with a contiguous last dim, got "
                         f"{tuple(y_SNH.shape)}")
    if expert_map is not None:
        if topk_ids_TK is None:
            raise ValueError("topk_reduce: expert_map needs topk_ids_TK")
        # The kernel reads topk_ids_TK as a dense [T·K] array: another shape is read out of bounds.
        check_shape("topk_ids_TK", topk_ids_TK, (num_tokens, top_k), "[T, K]")
        check_ndim("expert_map", expert_map, 1, "[E_global]")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
            # The default 0 made every local id out of range: every row skipped, an all-zero output.
            raise ValueError(f"num_experts: expected a positive int with expert_map, got {num_experts!r}")
        topk_ids_TK = topk_ids_TK.contiguous()
        expert_map = expert_map.contiguous()
    if num_tokens == 0:
        return out_TH
    # 16-byte accesses per thread across 4 warps in one pass for H up to 1024; larger H takes more programs,
    # which decode sizes (few tokens) need anyway to spread the work over the SMs. Many partials (the fused
    # decode's slices of I): up to 32 of them in one load, and narrower tiles so that a program holds ~8K values
    # and the grid still spreads over the SMs.
    block_k = max(2, 1 << (top_k - 1).bit_length())
    block_s = min(32, 1 << (y.shape[0] - 1).bit_length())
    block_h = min(1024, max(16, 1 << (hidden - 1).bit_length()), max(16, 8192 // (block_s * block_k)))
    grid = (num_tokens, -(-hidden // block_h))
    has_map = expert_map is not None
    topk_reduce_kernel[grid](
        y, out_TH,
        topk_ids_TK.reshape(-1) if has_map else y, expert_map if has_map else y,
        hidden, top_k, y.shape[0], num_experts, y.stride(0), y.stride(1), out_TH.stride(0),
        HAS_MAP=has_map, BLOCK_S=block_s, BLOCK_K=block_k, BLOCK_H=block_h, num_warps=4,
    )
    return out_TH


def topk_reduce_ref(
    y_SNH: torch.Tensor,
    top_k: int,
    out_TH: torch.Tensor,
    *,
    topk_ids_TK: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None,
    num_experts: int = 0,
) -> torch.Tensor:
    """Pure-torch twin of ``topk_reduce``."""
    y = (y_SNH if y_SNH.dim() == 3 else y_SNH.unsqueeze(0)).float()
    num_tokens, hidden = out_TH.shape
    y = y.view(y.shape[0], num_tokens, top_k, hidden)
    if expert_map is not None:
        local = expert_map.long()[topk_ids_TK.long()]
        valid = (local >= 0) & (local < num_experts)
        y = torch.where(valid[None, :, :, None], y, 0.0)
    out_TH.copy_(y.sum(dim=(0, 2)).to(out_TH.dtype))
    return out_TH

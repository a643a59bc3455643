"""Baselines every benchmark shows beside moekit (MEASURING.md).

- ``grouped_mm_experts``: sort rows by expert -> ``torch._grouped_mm`` (gate_up) -> activation ->
  ``torch._grouped_mm`` (down) -> weight -> unsort -> sum over K (transformers' ``grouped_mm`` experts).
- ``eager_experts``: a per-expert Python loop with ``index_add_`` (transformers' ``eager``).
"""

from __future__ import annotations

import torch

from moekit.ops.activation import Activation, activation_ref


def grouped_mm_experts(x_TH, w13_E2IH, w2_EHI, topk_weights_TK, topk_ids_TK, *, activation: Activation,
                       w13_bias_E2I=None, w2_bias_EH=None) -> torch.Tensor:
    num_tokens, top_k = topk_ids_TK.shape
    num_experts = w13_E2IH.shape[0]
    ids_N = topk_ids_TK.reshape(-1)
    order_N = torch.argsort(ids_N, stable=True)
    # Counts by scatter_add_ (bincount syncs with the host), so the baseline captures in a CUDA graph too.
    counts_E = torch.zeros(num_experts, dtype=torch.int32, device=ids_N.device)
    counts_E.scatter_add_(0, ids_N.long(), torch.ones_like(ids_N, dtype=torch.int32))
    offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    x_NH = x_TH[order_N // top_k]
    h = torch._grouped_mm(x_NH, w13_E2IH.transpose(1, 2), offs=offsets_E)
    if w13_bias_E2I is not None:
        h = h + w13_bias_E2I[ids_N[order_N]]
    a = activation_ref(h, activation).to(x_TH.dtype)
    y = torch._grouped_mm(a, w2_EHI.transpose(1, 2), offs=offsets_E)
    if w2_bias_EH is not None:
        y = y + w2_bias_EH[ids_N[order_N]]
    y = y * topk_weights_TK.reshape(-1)[order_N].unsqueeze(-1).to(y.dtype)
    out_NH = torch.empty_like(y).index_copy_(0, order_N, y)
    return out_NH.view(num_tokens, top_k, w2_EHI.shape[1]).sum(dim=1)


def eager_experts(x_TH, w13_E2IH, w2_EHI, topk_weights_TK, topk_ids_TK, *, activation: Activation,
                  w13_bias_E2I=None, w2_bias_EH=None) -> torch.Tensor:
    out = torch.zeros_like(x_TH)
    num_experts = w13_E2IH.shape[0]
    mask_ETK = torch.nn.functional.one_hot(topk_ids_TK.long(), num_experts).permute(2, 0, 1)
    hit = torch.nonzero(mask_ETK.sum(dim=(1, 2))).flatten().tolist()
    for e in hit:
        tok, pos = torch.where(mask_ETK[e])
        h = x_TH[tok] @ w13_E2IH[e].t()
        if w13_bias_E2I is not None:
            h = h + w13_bias_E2I[e]
        y = activation_ref(h, activation).to(x_TH.dtype) @ w2_EHI[e].t()
        if w2_bias_EH is not None:
            y = y + w2_bias_EH[e]
        out.index_add_(0, tok, (y * topk_weights_TK[tok, pos, None]).to(out.dtype))
    return out

"""Pure-torch experts backend: the CPU path and the reference every fast backend is checked against.

It groups the N = T·K routed rows by expert with one stable sort and runs one pair of GEMMs per expert that
received tokens (no dense all-experts compute, no per-token loop). GEMMs run in the weight dtype (fp32
accumulation inside torch's matmul); activation, biases, routing weights and the top-k sum run in fp32.
"""

from __future__ import annotations

import torch

from moekit.kernel.experts import Experts
from moekit.ops.activation import Activation, activation_ref
from moekit.quant.params import QuantParams


class TorchExperts(Experts):
    name = "torch"

    def apply(
        self,
        hidden_states_TH: torch.Tensor,
        w13_E2IH: torch.Tensor,
        w2_EHI: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        *,
        activation: Activation,
        w13_bias_E2I: torch.Tensor | None,
        w2_bias_EH: torch.Tensor | None,
        expert_map_E: torch.Tensor | None,
        quant: QuantParams,
        hidden_scale: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        self.check_supported(hidden_states_TH, quant)
        num_tokens, hidden = hidden_states_TH.shape
        top_k = topk_ids_TK.shape[1]
        num_local = w13_E2IH.shape[0]
        ids_N = topk_ids_TK.reshape(-1).long()
        if expert_map_E is not None:
            ids_N = expert_map_E.long()[ids_N]
        # Rows for other ranks (-1) sort last under the sentinel id E and are never computed.
        ids_N = torch.where(ids_N < 0, num_local, ids_N)
        order_N = torch.argsort(ids_N, stable=True)
        counts = torch.bincount(ids_N, minlength=num_local + 1)[:num_local].tolist()
        rows_N = order_N // top_k

        y_NH = torch.zeros(num_tokens * top_k, hidden, dtype=torch.float32, device=hidden_states_TH.device)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            sel = order_N[start : start + count]
            x_mH = hidden_states_TH[rows_N[start : start + count]]
            h = x_mH @ w13_E2IH[e].t()
            if w13_bias_E2I is not None:
                h = h.float() + w13_bias_E2I[e].float()
            a = activation_ref(h, activation).to(w2_EHI.dtype)
            y = (a @ w2_EHI[e].t()).float()
            if w2_bias_EH is not None:
                y = y + w2_bias_EH[e].float()
            y_NH[sel] = y
            start += count
        # Summing over K in a fixed order (not index_add_) keeps the result deterministic.
        out_TH = (y_NH.view(num_tokens, top_k, hidden) * topk_weights_TK.float().unsqueeze(-1)).sum(dim=1)
        return out_TH.to(out_dtype)

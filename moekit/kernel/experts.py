"""The experts half of a modular kernel: the grouped GEMMs.

Contract of ``Experts.apply`` (N = T·K routed rows, E = local experts):

    for t in tokens, k in top-k with e = local(topk_ids[t, k]) valid:
        h = x[t] @ w13[e].T + b13[e]                   # [2I]  (I for non-gated activations)
        a = act(h)                                      # [I]
        y = a @ w2[e].T + b2[e]                         # [H]
        out[t] += topk_weights[t, k] * y                # fp32 accumulation, cast to out dtype at the end

``local(g) = expert_map[g]`` when an expert map is given (-1 = expert lives on another rank: skipped), else g.
A backend reduces over top-k itself and writes every row of ``out`` (rows with no valid expert are zero).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from moekit.ops.activation import Activation
from moekit.quant.params import QuantParams


class Experts(ABC):
    """Base class of expert backends; stateless, so one instance serves every layer."""

    name: ClassVar[str]

    def check_supported(self, hidden_states: torch.Tensor, quant: QuantParams) -> None:
        """Raise ``ValueError`` if this backend cannot run these inputs; the default accepts unquantized ones."""
        if quant.is_quantized:
            raise ValueError(f"backend {self.name!r}: quantized weights ({quant.weight_dtype}) are not supported")

    @abstractmethod
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
        """Return ``out`` [T, H] in ``out_dtype`` as the module docstring defines it."""

"""Unquantized experts: weights in the activation dtype, nothing to repack."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from moekit.quant.base import MoEQuantMethod, random_init
from moekit.quant.params import UNQUANTIZED, QuantParams

if TYPE_CHECKING:
    from moekit.routed_experts import RoutedExperts


class UnquantizedMoEMethod(MoEQuantMethod):
    name = "unquantized"
    supports_eplb = True  # w13, w2 and their biases, all [E, ...]

    def create_weights(
        self,
        layer: RoutedExperts,
        *,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        params_dtype: torch.dtype,
        device: torch.device | None,
    ) -> None:
        rows = layer.activation.w13_rows(intermediate_size)
        kw = {"dtype": params_dtype, "device": device}
        layer.register_parameter("w13", _param(torch.empty(num_experts, rows, hidden_size, **kw), layer))
        layer.register_parameter("w2", _param(torch.empty(num_experts, hidden_size, intermediate_size, **kw), layer))
        if layer.has_bias:
            layer.register_parameter("w13_bias", _param(torch.empty(num_experts, rows, **kw), layer))
            layer.register_parameter("w2_bias", _param(torch.empty(num_experts, hidden_size, **kw), layer))
        else:
            layer.w13_bias = None
            layer.w2_bias = None
        # nn.Linear's default init, per expert: random weights so an unloaded layer still computes real numbers
        # (not for a layer a strict load fills next: ``weights_from_checkpoint``).
        if not random_init():
            return
        with torch.no_grad():
            for name, fan_in in (("w13", hidden_size), ("w2", intermediate_size)):
                bound = 1.0 / math.sqrt(fan_in)
                getattr(layer, name).uniform_(-bound, bound)
                if layer.has_bias:
                    getattr(layer, f"{name}_bias").uniform_(-bound, bound)

    def check_tp_split(self, intermediate_size: int, tp_size: int) -> None:
        """Float weights (and biases) slice along I anywhere."""

    def quant_params(self, layer: RoutedExperts) -> QuantParams:
        return UNQUANTIZED


def _param(data: torch.Tensor, layer: RoutedExperts) -> nn.Parameter:
    p = nn.Parameter(data)  # trainable like nn.Linear's; engines freeze with requires_grad_(False)
    # vLLM-style engines find the loader on the parameter itself.
    p.weight_loader = layer.weight_loader
    return p

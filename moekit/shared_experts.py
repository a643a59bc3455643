"""SharedExperts: the always-on MLP some MoE models add beside the routed experts.

    y = down_proj(act(gate_up_proj(x)))          gate_up_proj: [2Is, H], gate rows then up rows
    y = sigmoid(gate(x)) * y                      with the optional per-token gate (Qwen2-MoE)

It is an ordinary module that the MoE layer passes to the modular kernel on every call; the kernel decides
when it runs (e.g. overlapped with the routed experts on another stream).
"""

from __future__ import annotations

import torch
from torch import nn

from moekit._checks import check_bool, check_positive, check_tensor
from moekit.ops.activation import Activation, activation_ref, resolve_activation


class SharedExperts(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        activation: str | Activation = "silu",
        gate: bool = False,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_positive("hidden_size", hidden_size)
        check_positive("intermediate_size", intermediate_size)
        check_bool("gate", gate)
        check_bool("bias", bias)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = resolve_activation(activation)
        kw = {"dtype": dtype, "device": device}
        self.gate_up_proj = nn.Linear(hidden_size, self.activation.w13_rows(intermediate_size), bias=bias, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, **kw)
        self.gate = nn.Linear(hidden_size, 1, bias=False, **kw) if gate else None

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x_TH)
        weight = self.gate_up_proj.weight
        if x_TH.dtype != weight.dtype and not torch.is_autocast_enabled(x_TH.device.type):  # autocast casts
            raise TypeError(f"x: expected dtype {str(weight.dtype).removeprefix('torch.')} (the shared experts' "
                            f"weights), got {str(x_TH.dtype).removeprefix('torch.')}")
        if x_TH.shape[-1] != self.hidden_size:
            raise ValueError(
                f"x: expected last dim H = {self.hidden_size}, got shape {tuple(x_TH.shape)}"
            )
        a = activation_ref(self.gate_up_proj(x_TH), self.activation).to(x_TH.dtype)
        y = self.down_proj(a)
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x_TH)) * y
        return y

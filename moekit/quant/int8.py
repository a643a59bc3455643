"""int8 routed experts: symmetric per-output-row weight scales (s = amax / 127), activations per token
(compressed-tensors W8A8). The math lives in ``moekit.ops.quantize``; parameters and loading in ``w8a8``."""

from __future__ import annotations

from moekit.quant.w8a8 import W8A8MoEMethod


class Int8ChannelMoEMethod(W8A8MoEMethod):
    name = "int8_channel"
    qdtype = "int8"
    granularity = "channel"

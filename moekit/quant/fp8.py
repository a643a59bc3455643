"""fp8 e4m3 routed experts: the three weight granularities of the checkpoints in the wild.

    Fp8BlockMoEMethod    128x128 weight blocks, activations per token per 128 columns
                         (DeepSeek-V3/R1 ``weight_scale_inv``, Qwen3-FP8, compressed-tensors FP8_BLOCK)
    Fp8ChannelMoEMethod  a scale per output row, activations per token  (compressed-tensors FP8_DYNAMIC)
    Fp8TensorMoEMethod   a scale per expert, activations per tensor, dynamic  (compressed-tensors FP8, ModelOpt)

The math lives in ``moekit.ops.quantize``; the parameters and loading in ``moekit.quant.w8a8``.
"""

from __future__ import annotations

from moekit.quant.w8a8 import W8A8MoEMethod


class Fp8BlockMoEMethod(W8A8MoEMethod):
    name = "fp8_block"
    qdtype = "fp8_e4m3"
    granularity = "block"
    block_shape = (128, 128)


class Fp8ChannelMoEMethod(W8A8MoEMethod):
    name = "fp8_channel"
    qdtype = "fp8_e4m3"
    granularity = "channel"


class Fp8TensorMoEMethod(W8A8MoEMethod):
    name = "fp8_tensor"
    qdtype = "fp8_e4m3"
    granularity = "tensor"

"""``moekit.quantize``: quantize a loaded layer's routed experts in place (online quantization).

    moe = moekit.quantize(moe, "fp8_block")     # fp8_block | fp8_channel | fp8_tensor | int8_channel
    moe = moekit.quantize(moe, "w4a16_g128")    # w4a16_g128 | w4a16_g128_asym | w8a16_g128 (weight-only)
    moe = moekit.quantize(moe, "mxfp4")         # e2m1 codes, an e8m0 scale per 32 columns (H, I multiples of 32)

Only the routed experts change (w13/w2 become 8-bit codes with float32 scales, or packed 4/8-bit codes with group
scales in the layer's dtype and optional zero points, or MXFP4 codes with uint8 e8m0 scales, see
``moekit.quant``); the router
gate and shared experts keep their dtype, and the layer still takes and returns activations in its dtype.
"""

from __future__ import annotations

import torch

from moekit._checks import ACT_DTYPES, check_choice
from moekit.distributed import TensorParallel
from moekit.layer import MoE
from moekit.quant import MXFP4_SCHEMES, QUANT_SCHEMES, WNA16_SCHEMES, UnquantizedMoEMethod
from moekit.routed_experts import RoutedExperts


def quantize(moe: MoE | RoutedExperts, scheme: str) -> MoE | RoutedExperts:
    """Quantize the routed experts of ``moe`` (a ``moekit.MoE`` or ``RoutedExperts``) in place; returns ``moe``.

    The float weights are dropped expert by expert: no dequantized copy stays on the layer. The layer's backend
    ``auto`` then runs the Triton backend on CUDA (fp8 needs compute capability 8.9+) and the torch backend
    elsewhere (the quant method's ``kernel_for``).

    A tensor-parallel layer quantizes its slice of I: block scales then need each rank's I to be whole blocks (a
    ValueError otherwise) and are the full layer's, sliced, as w13's per-row scales are; a scale whose maximum
    runs over I (w2's per row, per tensor) is the slice's own, as in vLLM (no collective here).
    """
    if not isinstance(moe, (MoE, RoutedExperts)):
        raise TypeError(f"moe: expected a moekit.MoE or RoutedExperts, got {type(moe).__name__}")
    schemes = {**QUANT_SCHEMES, **WNA16_SCHEMES, **MXFP4_SCHEMES}
    check_choice("scheme", scheme, tuple(schemes))
    layer = moe.routed_experts if isinstance(moe, MoE) else moe
    if type(layer.quant_method) is not UnquantizedMoEMethod:
        raise ValueError(f"moe: expected unquantized routed experts, got quant method {layer.quant_method.name!r}")
    if layer.w13.dtype not in ACT_DTYPES or layer.w13.device.type == "meta":
        raise ValueError(f"moe: expected loaded weights in one of {[str(d) for d in ACT_DTYPES]}, got w13 "
                         f"{layer.w13.dtype} on {layer.w13.device}")
    method = schemes[scheme]()
    if isinstance(layer.prepare_finalize, TensorParallel):
        # A tensor-parallel slice: its blocks must be the full layer's blocks, sliced (what a checkpoint holds).
        tp_size = layer.prepare_finalize.tp_size
        method.check_tp_split(layer.intermediate_size * tp_size, tp_size)
    with torch.no_grad():
        method.quantize_layer(layer)
    return moe

"""Quant methods for routed experts: one module per weight format."""

import functools
from collections.abc import Callable

from moekit.quant.base import MoEQuantMethod
from moekit.quant.config import UnsupportedQuantization, get_quant_method
from moekit.quant.fp8 import Fp8BlockMoEMethod, Fp8ChannelMoEMethod, Fp8TensorMoEMethod
from moekit.quant.int8 import Int8ChannelMoEMethod
from moekit.quant.mxfp4 import MXFP4MoEMethod
from moekit.quant.params import UNQUANTIZED, QuantParams
from moekit.quant.unquantized import UnquantizedMoEMethod
from moekit.quant.w8a8 import W8A8MoEMethod
from moekit.quant.wna16 import WNA16MoEMethod

# The schemes ``moekit.quantize`` offers, by name.
QUANT_SCHEMES: dict[str, type[W8A8MoEMethod]] = {
    m.name: m for m in (Fp8BlockMoEMethod, Fp8ChannelMoEMethod, Fp8TensorMoEMethod, Int8ChannelMoEMethod)
}
# Weight-only integer groups ``moekit.quantize`` offers (round to nearest); the torch backend runs them.
WNA16_SCHEMES: dict[str, Callable[[], WNA16MoEMethod]] = {
    "w4a16_g128": functools.partial(WNA16MoEMethod, bits=4, group_size=128),
    "w4a16_g128_asym": functools.partial(WNA16MoEMethod, bits=4, group_size=128, sym=False),
    "w8a16_g128": functools.partial(WNA16MoEMethod, bits=8, group_size=128),
}
# MXFP4 (e2m1 + e8m0 per 32, compressed-tensors' rounding) ``moekit.quantize`` offers; the torch backend runs it.
MXFP4_SCHEMES: dict[str, Callable[[], MXFP4MoEMethod]] = {"mxfp4": MXFP4MoEMethod}

__all__ = [
    "QUANT_SCHEMES",
    "UNQUANTIZED",
    "Fp8BlockMoEMethod",
    "Fp8ChannelMoEMethod",
    "Fp8TensorMoEMethod",
    "Int8ChannelMoEMethod",
    "MXFP4MoEMethod",
    "MXFP4_SCHEMES",
    "MoEQuantMethod",
    "QuantParams",
    "UnquantizedMoEMethod",
    "UnsupportedQuantization",
    "W8A8MoEMethod",
    "WNA16MoEMethod",
    "WNA16_SCHEMES",
    "get_quant_method",
]

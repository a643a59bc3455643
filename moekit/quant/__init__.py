"""Quant methods for routed experts: one module per weight format."""

from moekit.quant.base import MoEQuantMethod
from moekit.quant.config import UnsupportedQuantization, get_quant_method
from moekit.quant.fp8 import Fp8BlockMoEMethod, Fp8ChannelMoEMethod, Fp8TensorMoEMethod
from moekit.quant.int8 import Int8ChannelMoEMethod
from moekit.quant.params import UNQUANTIZED, QuantParams
from moekit.quant.unquantized import UnquantizedMoEMethod
from moekit.quant.w8a8 import W8A8MoEMethod

# The schemes ``moekit.quantize`` offers, by name.
QUANT_SCHEMES: dict[str, type[W8A8MoEMethod]] = {
    m.name: m for m in (Fp8BlockMoEMethod, Fp8ChannelMoEMethod, Fp8TensorMoEMethod, Int8ChannelMoEMethod)
}

__all__ = [
    "QUANT_SCHEMES",
    "UNQUANTIZED",
    "Fp8BlockMoEMethod",
    "Fp8ChannelMoEMethod",
    "Fp8TensorMoEMethod",
    "Int8ChannelMoEMethod",
    "MoEQuantMethod",
    "QuantParams",
    "UnquantizedMoEMethod",
    "UnsupportedQuantization",
    "W8A8MoEMethod",
    "get_quant_method",
]

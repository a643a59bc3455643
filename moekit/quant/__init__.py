"""Quant methods for routed experts: one module per weight format."""

from moekit.quant.base import MoEQuantMethod
from moekit.quant.params import UNQUANTIZED, QuantParams
from moekit.quant.unquantized import UnquantizedMoEMethod

__all__ = ["UNQUANTIZED", "MoEQuantMethod", "QuantParams", "UnquantizedMoEMethod"]

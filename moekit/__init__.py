"""moekit: a fast, readable fused Mixture-of-Experts layer for LLM inference.

    out = routed_experts(x, select_experts(gate(x))) + shared_experts(x)

See docs/ARCHITECTURE.md for the pipeline and where each kind of change belongs.
"""

from moekit.config import MoEConfig, ParallelConfig, RoutingConfig
from moekit.functional import fused_experts
from moekit.kernel import Experts, LocalPrepareFinalize, ModularKernel, PrepareFinalize, PrepareResult
from moekit.layer import MoE
from moekit.online_quant import quantize
from moekit.ops.activation import Activation
from moekit.quant import MoEQuantMethod, QuantParams, UnquantizedMoEMethod
from moekit.routed_experts import RoutedExperts
from moekit.router import select_experts
from moekit.shared_experts import SharedExperts

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "Experts",
    "LocalPrepareFinalize",
    "MoE",
    "MoEConfig",
    "MoEQuantMethod",
    "ModularKernel",
    "ParallelConfig",
    "PrepareFinalize",
    "PrepareResult",
    "QuantParams",
    "RoutedExperts",
    "RoutingConfig",
    "SharedExperts",
    "UnquantizedMoEMethod",
    "__version__",
    "fused_experts",
    "quantize",
    "select_experts",
]

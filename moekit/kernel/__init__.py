"""Modular kernels: a PrepareFinalize around an Experts backend, and the backend registry.

Adding a backend = one module under ``kernel/`` plus a factory and one line in ``_EXPERTS``.
"""

from __future__ import annotations

import importlib.util

import torch

from moekit._checks import triton_interpreting
from moekit.kernel.experts import Experts
from moekit.kernel.modular import ModularKernel, check_expert_inputs
from moekit.kernel.prepare_finalize import LocalPrepareFinalize, PrepareFinalize, PrepareResult


# Factories use plain import statements (not importlib) so torch.compile traces a cold registry without a
# graph break; the Triton module is imported on first use, so `import moekit` never needs Triton.
def _torch_experts() -> Experts:
    from moekit.kernel.torch_experts import TorchExperts

    return TorchExperts()


def _triton_experts() -> Experts:
    from moekit.kernel.triton_experts import TritonExperts

    return TritonExperts()


_EXPERTS = {"torch": _torch_experts, "triton": _triton_experts}
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INSTANCES: dict[str, Experts] = {}
_KERNELS: dict[str, ModularKernel] = {}


def triton_available() -> bool:
    return _HAS_TRITON


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: CUDA if present, else CPU)."""
    dev = torch.device(device) if device is not None else _default_device()
    names = ["torch"]
    if triton_available() and (dev.type == "cuda" or triton_interpreting()):
        names.append("triton")
    return names


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA when Triton is installed, else ``torch``."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend not in _EXPERTS:
        raise ValueError(f"backend: expected one of {['auto', *_EXPERTS]}, got {backend!r}")
    if backend == "triton" and not triton_available():
        raise ValueError("backend: 'triton' needs the triton package (pip install moekit[triton])")
    return backend


def get_experts(name: str) -> Experts:
    """The shared instance of backend ``name``."""
    experts = _INSTANCES.get(name)
    if experts is None:
        experts = _INSTANCES[name] = _EXPERTS[name]()
    return experts


def make_kernel(backend: str, device: torch.device) -> ModularKernel:
    """The (shared, stateless) single-rank kernel for ``backend`` on ``device``."""
    name = resolve_backend(backend, device)
    kernel = _KERNELS.get(name)
    if kernel is None:
        kernel = _KERNELS[name] = ModularKernel(LocalPrepareFinalize(), get_experts(name))
    return kernel


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


__all__ = [
    "Experts",
    "LocalPrepareFinalize",
    "ModularKernel",
    "PrepareFinalize",
    "PrepareResult",
    "available_backends",
    "check_expert_inputs",
    "get_experts",
    "make_kernel",
    "resolve_backend",
    "triton_available",
    "triton_interpreting",
]

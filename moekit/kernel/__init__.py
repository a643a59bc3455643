"""Modular kernels: a PrepareFinalize around an Experts backend, and the backend registry.

Adding a backend = one module under ``kernel/`` plus one line in ``_EXPERTS``.
"""

from __future__ import annotations

import functools
import importlib

import torch

from moekit.kernel.experts import Experts
from moekit.kernel.modular import ModularKernel, check_expert_inputs
from moekit.kernel.prepare_finalize import LocalPrepareFinalize, PrepareFinalize, PrepareResult

# name -> "module:Class", imported on first use so that `import moekit` never needs Triton.
_EXPERTS = {
    "torch": "moekit.kernel.torch_experts:TorchExperts",
    "triton": "moekit.kernel.triton_experts:TritonExperts",
}


def triton_available() -> bool:
    try:
        importlib.import_module("moekit.kernel.triton_experts")
    except ImportError:
        return False
    return True


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: CUDA if present, else CPU)."""
    dev = torch.device(device) if device is not None else _default_device()
    names = ["torch"]
    if triton_available() and (dev.type == "cuda" or _interpreting()):
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


@functools.cache
def get_experts(name: str) -> Experts:
    module, cls = _EXPERTS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


@functools.cache
def _local_kernel(name: str) -> ModularKernel:
    return ModularKernel(LocalPrepareFinalize(), get_experts(name))


def make_kernel(backend: str, device: torch.device) -> ModularKernel:
    """The (shared, stateless) single-rank kernel for ``backend`` on ``device``."""
    return _local_kernel(resolve_backend(backend, device))


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
]

"""The torch backend's CPU GEMMs on expert weights pre-packed into oneDNN's blocked layout.

``F.linear`` (and ``torch._grouped_mm``) on a plain [N, K] weight lets oneDNN/MKL pick a kernel for a layout it
did not choose: a one-row bf16 GEMV over many [2048, 2048] experts (too large for the cache) streamed 21 GB/s on
the 2-core CPU of docs/perf/NOTES.md, where the same weights reordered once by
``torch.ops.mkldnn._reorder_linear_weight`` streamed 61 GB/s through ``torch.ops.mkldnn._linear_pointwise``
(fp32: 22 -> 46 GB/s; 4 rows: 12 -> 32). Decode on a CPU is that GEMV, so the unquantized torch backend runs
every expert's GEMMs on packed weights where oneDNN supports the dtype on this CPU (the same ops PyTorch's own
CPU inference path uses when it freezes a model).

Only the frozen weights (``requires_grad`` False, as a serving engine holds them) of a ``RoutedExperts`` layer
are packed: the layer marks its ``w13``/``w2`` (``track``) when it runs on a CPU, and moekit knows every way it
changes them; trainable weights run the plain GEMMs (a training loop's ``.data`` writes would go unseen). A tracked weight's packs (made the first time an
expert gets a token) are dropped when
- its storage, dtype, shape or strides change (``param.data = ...``, ``module.to``/``float()``: the layer's
  ``_apply`` also drops them at once, so no old copy outlives the old weights);
- its version counter moves: every in-place write that autograd sees (under ``torch.no_grad``,
  ``load_state_dict``, EPLB's rearrangement);
- moekit writes it through ``.data`` (``RoutedExperts.weight_loader``, ``load_gguf``): they call
  ``RoutedExperts.weights_changed``;
- a ``torch.optim`` optimizer steps over it (fused steps leave the version counter as it was: a global
  optimizer-step hook drops the packs of every parameter of the optimizer). Forwards that autograd records never
  use packs (``not_packed``): trained weights change every step;
- a call finds it trainable (``requires_grad``): packs made while it was frozen go, so weights frozen again after
  training pack their new values.
A write that bypasses all three (into ``.data``, by a ``torch.distributed`` collective, through numpy or the
storage) after a forward is invisible: call ``weights_changed()`` on the layer after it, or turn the path off.
Bare ``moekit.fused_experts`` calls (tensors no layer tracks) run the plain GEMMs. Packs are a second copy of
each expert that has run (up to twice the routed weights' memory). ``MOEKIT_CPU_PREPACK=0`` turns the path off.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from moekit.ops.activation import Activation, activation_ref

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _key(w_ENK: torch.Tensor) -> tuple:
    return w_ENK.data_ptr(), w_ENK._version, w_ENK.dtype, tuple(w_ENK.shape), w_ENK.stride()


class _Packed:
    """The packed experts of one weight tensor, valid while it keeps its storage, version and layout."""

    def __init__(self, w_ENK: torch.Tensor) -> None:
        self.key = _key(w_ENK)
        self.experts: dict[int, torch.Tensor] = {}


class _Packs:
    """A tracked weight's packs (``entry``: None before its first call or after ``forget``), held as an attribute
    of the weight itself (``_ATTR``): it dies with the weight, and no weak reference is taken (``torch.utils.
    swap_tensors``, which ``module.to()`` uses under ``torch.__future__.set_swap_module_params_on_conversion``,
    refuses tensors that have one; a swap also swaps the attribute away, with the old data). A copy or a pickle
    of the weight gets no packs."""

    def __init__(self) -> None:
        self.entry: _Packed | None = None

    def __deepcopy__(self, memo: dict) -> _Packs:
        return _Packs()

    def __reduce__(self) -> tuple:
        return (_Packs, ())


_ATTR = "_moekit_cpu_packs"


def _packs(w: torch.Tensor) -> _Packs | None:
    return getattr(w, _ATTR, None)


# Whether any weight was ever tracked: until then an optimizer step (any model's, every step) has nothing to drop.
_ANY_TRACKED = False


def track(*weights: torch.Tensor) -> None:
    """Mark a layer's expert weights as packable (the layer calls it on a CPU forward; cheap when already)."""
    global _ANY_TRACKED
    for w in weights:
        if _packs(w) is None:
            setattr(w, _ATTR, _Packs())
            _ANY_TRACKED = True


def forget(*weights: torch.Tensor) -> None:
    """Drop the packs of ``weights`` (they stay tracked): the next call packs again from their values."""
    for w in weights:
        packs = _packs(w)
        if packs is not None:
            packs.entry = None


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    # A fused optimizer step (Adam/AdamW/SGD fused=True) writes the parameters without moving their version
    # counters: drop the packs of every parameter a step may have written.
    if _ANY_TRACKED:
        forget(*(p for group in optimizer.param_groups for p in group["params"]))


register_optimizer_step_post_hook(_after_optimizer_step)

_RECORDING = threading.local()


@contextlib.contextmanager
def not_packed() -> Iterator[None]:
    """Run the GEMMs of calls inside on the plain weights: a forward that autograd records (``Experts.apply``'s
    Function path) trains weights that change every step, so packing them would be wasted, and a pack made
    before a step that bypassed the version counter would be stale."""
    before = getattr(_RECORDING, "active", False)
    _RECORDING.active = True
    try:
        yield
    finally:
        _RECORDING.active = before


@functools.cache
def _dtype_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs and runs ``dtype`` weights on this CPU (bf16/fp16 need the ISA for them: without it
    oneDNN would emulate, slower than the plain path). Any op missing from this torch build: no."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        if dtype == torch.float16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
            return False
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=dtype), 1)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 16, dtype=dtype), w, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(out.shape == (2, 16) and (out == 16).all())


def usable(x_MH: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether this call's GEMMs can run on packed weights: CPU tensors of one supported dtype, no autograd,
    frozen weights a layer tracks (``track``) that count in-place writes (not made under ``torch.inference_mode``;
    running under it is fine), and the path not turned off."""
    if x_MH.device.type != "cpu" or os.environ.get("MOEKIT_CPU_PREPACK", "1") == "0":
        return False
    # Trainable weights never: a training loop may write them through .data (p.data.sub_(lr * p.grad)), which
    # moves no version counter, and a pack made at an eval between steps would then be silently stale. Frozen
    # (requires_grad_(False)) weights, as a serving engine holds them, are packed. Packs made before the weights
    # became trainable are dropped here, at their first call as trainable weights (a training loop's first
    # forward, before any .data write), so refrozen weights pack their new values.
    if any(w.requires_grad for w in weights):
        forget(*weights)
        return False
    if getattr(_RECORDING, "active", False):  # inside a forward autograd records (not_packed)
        return False
    if any(w.device.type != "cpu" or w.dtype != x_MH.dtype for w in weights):
        return False
    if torch.is_grad_enabled() and x_MH.requires_grad:
        return False
    if any(w.is_inference() for w in weights):  # made under torch.inference_mode: no version counter to check
        return False
    if not all(_packs(w) is not None for w in weights):  # bare tensors: nobody tells us when they change
        return False
    return x_MH.dtype in _DTYPES and _dtype_supported(x_MH.dtype)


def _entry(w_ENK: torch.Tensor) -> _Packed:
    """The packs of a tracked ``w_ENK``, checked once per call (stale ones dropped: module docstring)."""
    packs = _packs(w_ENK)
    entry = packs.entry
    if entry is None or entry.key != _key(w_ENK):
        entry = packs.entry = _Packed(w_ENK)
    return entry


def _pack(w_NK: torch.Tensor) -> torch.Tensor:
    # The batch-size hint 1 asks for the GEMV-friendly layout (decode); larger row counts run on it too.
    return torch.ops.mkldnn._reorder_linear_weight(w_NK.contiguous(), 1)


def _linear(a_MK: torch.Tensor, w_ENK: torch.Tensor, entry: _Packed, e: int) -> torch.Tensor:
    packed = entry.experts.get(e)
    if packed is None:
        packed = entry.experts[e] = _pack(w_ENK[e])
    return torch.ops.mkldnn._linear_pointwise(a_MK, packed, None, "none", [], "")


def experts_packed(
    x_MH: torch.Tensor,
    spans: list[tuple[int, int, int]],
    w13_E2IH: torch.Tensor,
    w2_EHI: torch.Tensor,
    w13_bias_E2I: torch.Tensor | None,
    w2_bias_EH: torch.Tensor | None,
    activation: Activation,
) -> torch.Tensor:
    """GEMM 2's fp32 output for the rows ``x_MH`` grouped by expert (``spans``: ``(e, start, end)``), each expert's
    GEMMs on its packed weights, biases and activation in fp32 as the other torch paths."""
    y_MH = torch.empty(x_MH.shape[0], w2_EHI.shape[1], dtype=torch.float32, device=x_MH.device)
    packed13, packed2 = _entry(w13_E2IH), _entry(w2_EHI)
    for e, start, end in spans:
        h = _linear(x_MH[start:end], w13_E2IH, packed13, e)
        h = h if w13_bias_E2I is None else h.float() + w13_bias_E2I[e].float()
        y = _linear(activation_ref(h, activation).to(w2_EHI.dtype), w2_EHI, packed2, e).float()
        y_MH[start:end] = y if w2_bias_EH is None else y + w2_bias_EH[e].float()
    return y_MH

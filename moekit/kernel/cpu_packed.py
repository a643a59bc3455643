"""The torch backend's CPU GEMMs on expert weights pre-packed into oneDNN's blocked layout.

``F.linear`` (and ``torch._grouped_mm``) on a plain [N, K] weight lets oneDNN/MKL pick a kernel for a layout it
did not choose: a one-row bf16 GEMV over many [2048, 2048] experts (too large for the cache) streamed 21 GB/s on
the 2-core CPU of docs/perf/NOTES.md, where the same weights reordered once by
``torch.ops.mkldnn._reorder_linear_weight`` streamed 61 GB/s through ``torch.ops.mkldnn._linear_pointwise``
(fp32: 22 -> 46 GB/s; 4 rows: 12 -> 32). Decode on a CPU is that GEMV, so the unquantized torch backend runs
every expert's GEMMs on packed weights where oneDNN supports the dtype on this CPU (the same ops PyTorch's own
CPU inference path uses when it freezes a model).

The packed weights are a second copy, made the first time an expert receives a token and kept while the weight
tensor lives unchanged: a weak dictionary keyed by the weight tensor, checked on every call against the tensor's
storage address, version counter, dtype, shape, strides and 64 sampled values. An in-place write (under
``torch.no_grad``, or ``load_state_dict``) bumps the version and drops the packed experts; writes through
``.data`` do not, so moekit's own loaders (``RoutedExperts.weight_loader``, ``load_gguf``) bump it themselves
(``torch.autograd.graph.increment_version``), and code of a caller's that writes expert weights through ``.data``
after a forward must do the same. A CPU layer's memory grows by the experts that have run, up to twice the
routed weights. ``MOEKIT_CPU_PREPACK=0`` turns the path off (the plain GEMMs, no copy).
"""

from __future__ import annotations

import functools
import os

import torch
from torch.utils.weak import WeakIdKeyDictionary

from moekit.ops.activation import Activation, activation_ref

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_SAMPLES = 64  # elements of a weight compared on every call (the fingerprint below)


def _key(w_ENK: torch.Tensor) -> tuple:
    return w_ENK.data_ptr(), w_ENK._version, w_ENK.dtype, tuple(w_ENK.shape), w_ENK.stride()


def _fingerprint(w_ENK: torch.Tensor) -> torch.Tensor:
    """A few elements spread over the whole tensor. With the key (storage address, version, dtype, shape,
    strides) it catches a replacement that the version misses: ``param.data = new`` whose storage landed at the
    freed address of the old one."""
    flat = w_ENK.reshape(-1) if w_ENK.is_contiguous() else w_ENK.flatten()
    idx = _sample_indices(flat.numel())
    return flat[idx].clone()


def _sample_indices(numel: int) -> torch.Tensor:
    """``_SAMPLES`` indices spread evenly over [0, numel), first and last included (integer arithmetic: a float
    linspace rounds the last index past the end for 2^28-element weights)."""
    steps = min(_SAMPLES, numel)
    return torch.arange(steps, dtype=torch.int64) * (numel - 1) // max(steps - 1, 1)


class _Packed:
    """The packed experts of one weight tensor, valid while it keeps its storage, version and values."""

    def __init__(self, w_ENK: torch.Tensor) -> None:
        self.key = _key(w_ENK)
        self.fingerprint = _fingerprint(w_ENK)
        self.experts: dict[int, torch.Tensor] = {}

    def valid_for(self, w_ENK: torch.Tensor) -> bool:
        return self.key == _key(w_ENK) and torch.equal(self.fingerprint, _fingerprint(w_ENK))


# Keyed by identity: a WeakKeyDictionary would compare tensors with ==, which is elementwise.
_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


@functools.cache
def _dtype_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs and runs ``dtype`` weights on this CPU (bf16/fp16 need the ISA for them: without it
    oneDNN would emulate, slower than the plain path)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if dtype == torch.float16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return False
    try:  # the ops exist in every build with oneDNN, but a build may still refuse a dtype
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=dtype), 1)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 16, dtype=dtype), w, None, "none", [], "")
    except (RuntimeError, NotImplementedError):
        return False
    return bool(out.shape == (2, 16) and (out == 16).all())


def usable(x_MH: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether this call's GEMMs can run on packed weights: CPU tensors of one supported dtype, no autograd,
    weights that track in-place writes (not made under ``torch.inference_mode``; running under it is fine), and
    the path not turned off."""
    if x_MH.device.type != "cpu" or os.environ.get("MOEKIT_CPU_PREPACK", "1") == "0":
        return False
    if any(w.device.type != "cpu" or w.dtype != x_MH.dtype for w in weights):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x_MH, *weights)):
        return False
    if any(w.is_inference() for w in weights):  # made under torch.inference_mode: no version counter to check
        return False
    return x_MH.dtype in _DTYPES and _dtype_supported(x_MH.dtype)


def _entry(w_ENK: torch.Tensor) -> _Packed:
    """The packed experts of ``w_ENK``, checked once per call (a stale entry is dropped, see the module docstring)."""
    entry = _CACHE.get(w_ENK)
    if entry is None or not entry.valid_for(w_ENK):
        entry = _CACHE[w_ENK] = _Packed(w_ENK)
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

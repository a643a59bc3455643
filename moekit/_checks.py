"""Input validation shared by every public entry point.

Each helper raises ``ValueError``/``TypeError`` whose message names the argument and states the expected and
actual shape, dtype or device, so a caller can fix the call without reading moekit's source.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import torch

# The activation dtypes every backend computes in.
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Expert ids (topk_ids) may be any of these integer dtypes; maps that hold -1 (expert_map) are int32 or int64.
_ID_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_INDEX_DTYPES = (torch.int32, torch.int64)
_NUMPY_BOOLS = ("numpy.bool_", "numpy.bool")


_MINMAX_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def finite_extremes(t: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether every value of the float tensor ``t`` is finite (also once cast to ``dtype``, if given). One
    reduction pass with no temporary the size of ``t``: min and max carry any NaN or inf (and, rounding being
    monotonic, the values that overflow ``dtype``) into the result. ``torch.isfinite(t).all()`` allocates a bool
    tensor the size of ``t`` and ran ~20x slower on a 2-core CPU (1.8 against 40 GB/s of bf16 weights)."""
    if t.is_complex():
        raise TypeError(f"finite_extremes: expected a real tensor, got {t.dtype}")
    if t.numel() == 0:
        return True
    if t.is_floating_point() and t.dtype not in _MINMAX_FLOATS:
        t = t.float()  # 8-bit floats (no aminmax kernel): exact in fp32
    lo, hi = torch.aminmax(t)
    if dtype is not None and dtype != t.dtype:
        lo, hi = lo.to(dtype), hi.to(dtype)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    check_tensor(name, t)
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor {layout}, got shape {tuple(t.shape)}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], layout: str) -> None:
    """``expected`` may hold -1 for "any size" in a dimension."""
    check_ndim(name, t, len(expected), layout)
    if any(e != -1 and e != a for e, a in zip(expected, t.shape)):
        shown = tuple("*" if e == -1 else e for e in expected)
        raise ValueError(f"{name}: expected shape {shown} {layout}, got {tuple(t.shape)}")


def check_dtype(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    # No silent casting: a bf16 activation against fp32 weights is almost always a loading bug.
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{name}: expected dtype {str(ref.dtype).removeprefix('torch.')} (the dtype of {ref_name}), "
            f"got {str(t.dtype).removeprefix('torch.')}"
        )


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}")


def check_int_dtype(name: str, t: torch.Tensor) -> None:
    """Expert ids: any integer dtype every consumer reads as numbers (int8/16/32/64, uint8). Each one converts
    before it indexes (a raw uint8 index would be a boolean mask) and the kernels load the ids as they are."""
    if t.dtype not in _ID_DTYPES:
        raise TypeError(f"{name}: expected an integer dtype (int8, int16, int32, int64 or uint8), "
                        f"got {str(t.dtype).removeprefix('torch.')}")


def check_signed_int_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name}: expected int32 or int64 (it holds -1), got {str(t.dtype).removeprefix('torch.')}")


def values_checkable() -> bool:
    """Whether a value check (a device-to-host sync) is allowed: not while compiling or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def triton_interpreting() -> bool:
    """Triton runs kernels in its CPU interpreter: ``TRITON_INTERPRET`` read as Triton reads a boolean (1, true,
    yes, on, y; any case). The CPU test suite runs the kernels this way."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def check_dot_operand(name: str, t: torch.Tensor) -> None:
    """Refuse a bf16 ``tl.dot`` operand where Triton's interpreter runs the kernel (CPU tensors, or
    ``TRITON_INTERPRET``): it computes bf16 dots wrongly (outputs ~1e10, no error). fp16/fp32 are right there."""
    if t.dtype == torch.bfloat16 and (t.device.type != "cuda" or triton_interpreting()):
        raise ValueError(f"{name}: bfloat16 on {t.device} runs in Triton's CPU interpreter, which computes bf16 dots "
                         "wrongly; pass float16/float32 there, or use the op's torch reference (<op>_ref)")


def check_expert_map_values(expert_map: torch.Tensor, num_local: int) -> None:
    """Entries in [-1, num_local), each local expert named at most once."""
    if not values_checkable() or expert_map.numel() == 0:
        return
    lo, hi = int(expert_map.min()), int(expert_map.max())
    if lo < -1 or hi >= num_local:
        raise ValueError(f"expert_map: expected values in [-1, {num_local}) (-1 = remote), got values in [{lo}, {hi}]")
    local = expert_map[expert_map >= 0]
    if local.unique().numel() != local.numel():
        raise ValueError("expert_map: each local expert id may appear once, got duplicates")


def check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")


def check_real(name: str, value: object, *, positive: bool = False) -> float:
    """A finite real number (a Python or NumPy int/float, or a 0-d real tensor; not a bool or a str), > 0 when
    ``positive``. Returns it as a Python float, which is what configs store and custom-op schemas take."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_complex and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (positive and not value > 0):
        raise ValueError(f"{name}: expected a finite value{' > 0' if positive else ''}, got {value}")
    return value


def check_bool(name: str, value: object) -> None:
    # A flag given as a string ("no"), an int or None would silently count as its truth value. NumPy's bool is a
    # bool (what a flag read from an array or a NumPy config gives).
    if not isinstance(value, bool) and type(value).__module__ + "." + type(value).__name__ not in _NUMPY_BOOLS:
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """``value`` is one of ``choices``; where those are ints, it must be an int too (not a bool, a float or a str)."""
    # ``in`` compares with ==: 8.0 == 8 and True == 1, so a plain membership test would let a float or a bool
    # through to code that needs an int (a shift, a range, a kernel's compile-time constant).
    if (choices and all(type(c) is int for c in choices)
            and (isinstance(value, bool) or not isinstance(value, int))):
        raise TypeError(f"{name}: expected an int (one of {list(choices)}), got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_layer_dtype(dtype: object) -> None:
    """A layer's ``dtype=`` argument: None (torch's default) or an activation dtype."""
    # The dtype is the activations' (experts' weights are stored in it unquantized): a layer built in any other
    # would reject every input at its first call.
    if dtype is None:
        dtype = torch.get_default_dtype()
        where = " (torch's default dtype; pass dtype=)"
    elif not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__} {dtype!r}")
    else:
        where = ""
    if dtype not in ACT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in ACT_DTYPES)
        hint = ""
        if dtype.itemsize < 2:  # fp8/int8/fp4: a storage format, not an activation dtype
            hint = "; quantized weights come from a quant_method, the layer's dtype is the activations'"
        raise ValueError(f"dtype: expected one of ({names}), got {str(dtype).removeprefix('torch.')}{where}{hint}")

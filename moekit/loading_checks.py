"""The checks ``load_moe`` and ``load_gguf`` run on a layer and on checkpoint tensors: what the headers say (dtypes),
what small tensors hold (scales, the correction bias; read before anything is copied) and what each float weight
holds once cast into the layer's dtype (checked as it is copied)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from moekit._checks import finite_extremes
from moekit.checkpoint import CODE_DTYPES
from moekit.quant.w8a8 import INPUT_SCALES, NO_INPUT_SCALE, WEIGHT_SCALES, check_input_scale_normal, check_scales

if TYPE_CHECKING:
    from moekit.layer import MoE


def check_materialized(moe: MoE) -> None:
    """Refuse a layer with meta tensors: copying into one is a no-op, so a load would report success and leave
    nothing loaded."""
    for name, t in (*moe.named_parameters(), *moe.named_buffers()):
        if t.is_meta:
            raise ValueError(f"moe: {name} is on the meta device (no storage to load into); materialize it first "
                             "(moe.to_empty(device=...))")


def check_correction_bias(key: str, bias: torch.Tensor) -> None:
    # A NaN/+inf entry would win every token's expert choice: a corrupted checkpoint, refused at load (routing on a
    # GPU only marks the affected tokens NaN, since checking there would sync with the device on every call).
    bad = torch.isnan(bias) | (bias == float("inf"))
    if bool(bad.any()):
        experts = bad.nonzero().flatten().tolist()
        raise ValueError(f"checkpoint key {key!r}: expected a finite correction bias (or -inf: never pick the expert), "
                         f"got NaN/+inf at experts {experts[:16]}{' ...' if len(experts) > 16 else ''}")


def check_weight_scale(key: str, scale: torch.Tensor) -> None:
    check_scales(f"checkpoint key {key!r}", scale, WEIGHT_SCALES)


def check_input_scales(name: str, scales: dict[str, torch.Tensor]) -> None:
    # One static activation scale per layer, the max over its experts (process_weights_after_loading): a 0 (an
    # expert calibration never routed to) is harmless under the max, but all zeros leave no usable scale.
    for key, scale in scales.items():
        check_scales(f"checkpoint key {key!r}", scale, INPUT_SCALES)
    if not any(bool((s.float() > 0).any()) for s in scales.values()):
        keys = list(scales)
        raise ValueError(f"{name}: every static activation scale is 0 ({keys[0]!r} ... {keys[-1]!r}, {len(keys)} "
                         f"keys): {NO_INPUT_SCALE}")
    check_input_scale_normal(name, max(float(s.float().max()) for s in scales.values()))


def check_codes(key: str, stored: str, dest: torch.dtype) -> None:
    # copy_ would turn codes into values (or values into codes): a checkpoint read with the wrong quant method
    # would load silently wrong weights.
    code = CODE_DTYPES.get(stored)
    if code is None and dest not in CODE_DTYPES.values():
        if dest.is_floating_point and stored.startswith("C"):
            # copy_ keeps the real part (with a warning only): a silently wrong weight.
            raise ValueError(f"checkpoint key {key!r}: holds {stored} complex numbers, expected "
                             f"{str(dest).removeprefix('torch.')} values")
        if dest.is_floating_point and (stored.startswith(("I", "U")) or stored == "BOOL"):
            # e.g. e8m0 exponent bytes or integer scales: copy_ casts the integer (a U8 127 scale becomes 127.0,
            # not 2^0), a silently wrong value.
            raise ValueError(f"checkpoint key {key!r}: holds {stored} integers, expected "
                             f"{str(dest).removeprefix('torch.')} values")
        return
    if code is not dest:
        what = f"8-bit codes ({stored})" if code is not None else f"{stored} values"
        hint = (" (a quantized checkpoint: build the layer with the quant method its quantization_config names, as "
                "MoE.from_pretrained does)" if code is not None else "")
        raise ValueError(f"checkpoint key {key!r}: holds {what}, expected {str(dest).removeprefix('torch.')}{hint}")


def no_nan_codes(key: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``t`` (fp8 e4m3 codes) itself, once no code is NaN (bytes 0x7F / 0xFF, e4m3fn's only NaNs): a NaN weight
    makes every token routed there NaN, like a NaN scale."""

    def check(t: torch.Tensor) -> torch.Tensor:
        if bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any()):
            raise ValueError(f"checkpoint key {key!r}: holds NaN fp8 codes (a corrupted checkpoint)")
        return t

    return check


def finite_in(key: str, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """``t`` itself, once every value is checked finite in ``dtype``: a NaN/inf weight, or one beyond the range
    of a narrower layer dtype (a bf16/fp32 1e5 in an fp16 layer), makes every token routed there NaN/inf."""

    def check(t: torch.Tensor) -> torch.Tensor:
        if not finite_extremes(t, dtype):
            what = ("holds NaN or inf (a corrupted checkpoint)" if not finite_extremes(t) else
                    f"holds values beyond the range of the layer's dtype (max |x| {float(t.abs().max()):g})")
            raise ValueError(f"checkpoint key {key!r}: {what}; the layer is {str(dtype).removeprefix('torch.')}")
        return t

    return check

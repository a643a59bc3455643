"""What a quant method tells the kernel about the weights it stores: dtypes and scales.

``QuantParams()`` (all ``None``) means unquantized: weights and activations in the activation dtype. A
quantized method (fp8, int8, int4, mxfp4) fills in ``weight_dtype`` and the scales; a backend that cannot run a
given ``QuantParams`` says so in ``Experts.check_supported``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHT_DTYPES = ("fp8_e4m3", "int8", "int4", "mxfp4")


@dataclass(frozen=True, kw_only=True)
class QuantParams:
    weight_dtype: str | None = None
    act_dtype: str | None = None
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    a13_scale: torch.Tensor | None = None
    a2_scale: torch.Tensor | None = None
    block_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name in ("weight_dtype", "act_dtype"):
            value = getattr(self, name)
            if value is not None and value not in WEIGHT_DTYPES:
                raise ValueError(f"quant.{name}: expected None or one of {list(WEIGHT_DTYPES)}, got {value!r}")

    @property
    def is_quantized(self) -> bool:
        return self.weight_dtype is not None or self.act_dtype is not None


UNQUANTIZED = QuantParams()

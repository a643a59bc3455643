"""What a quant method tells the kernel about the weights it stores: dtypes and scales.

``QuantParams()`` (all ``None``) means unquantized: weights and activations in the activation dtype. A
quantized method (fp8, int8, int4, mxfp4) fills in ``weight_dtype``, ``granularity`` and the scales; a backend
that cannot run a given ``QuantParams`` says so in ``Experts.check_supported``.

8-bit weights (``moekit.ops.quantize`` defines the math; E experts, R = 2I rows of w13 for gated activations):

    granularity  w13_scale                      w2_scale                 activations (act_dtype set)
    tensor       [E]                            [E]                      one dynamic scale per call, or a13_scale/a2_scale (static, 1 element)
    channel      [E, R, 1]                      [E, H, 1]                per token: [T, 1]
    block        [E, 2·⌈I/bn⌉, ⌈H/bk⌉]          [E, ⌈H/bn⌉, ⌈I/bk⌉]      per token, per bk columns: [T, ⌈H/bk⌉]

Block scales of w13 keep gate and up apart (``⌈I/bn⌉`` scale rows each), so I need not be a multiple of bn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHT_DTYPES = ("fp8_e4m3", "int8", "int4", "mxfp4")
GRANULARITIES = ("tensor", "channel", "block")
# The activation granularity that goes with each weight granularity (vLLM's and DeepSeek's pairings).
ACT_GRANULARITY = {"tensor": "tensor", "channel": "token", "block": "group"}


@dataclass(frozen=True, kw_only=True)
class QuantParams:
    weight_dtype: str | None = None
    act_dtype: str | None = None
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None
    a13_scale: torch.Tensor | None = None
    a2_scale: torch.Tensor | None = None
    block_shape: tuple[int, int] | None = None
    granularity: str | None = None

    def __post_init__(self) -> None:
        for name in ("weight_dtype", "act_dtype"):
            value = getattr(self, name)
            if value is not None and value not in WEIGHT_DTYPES:
                raise ValueError(f"quant.{name}: expected None or one of {list(WEIGHT_DTYPES)}, got {value!r}")
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise ValueError(f"quant.granularity: expected None or one of {list(GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity is not None and self.weight_dtype is None:
            raise ValueError(f"quant.granularity: {self.granularity!r} needs quant.weight_dtype, got None")
        if self.act_dtype is not None and self.granularity is None:
            # The activation scales' layout follows the weights' granularity.
            raise ValueError(f"quant.act_dtype: {self.act_dtype!r} needs quant.granularity, got None")
        if self.block_shape is not None:
            bs = self.block_shape
            if (not isinstance(bs, tuple) or len(bs) != 2
                    or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in bs)):
                raise ValueError(f"quant.block_shape: expected a tuple of two positive ints, got {bs!r}")
        if (self.granularity == "block") != (self.block_shape is not None) and self.granularity is not None:
            raise ValueError(f"quant.block_shape: expected a shape with granularity 'block' and None otherwise, got "
                             f"{self.block_shape!r} with {self.granularity!r}")
        for name in ("w13_scale", "w2_scale", "a13_scale", "a2_scale"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"quant.{name}: expected a torch.Tensor or None, got {type(value).__name__}")
        if self.granularity is not None and (self.w13_scale is None or self.w2_scale is None):
            raise ValueError("quant.w13_scale/w2_scale: quantized weights need both scales, got None")
        for name in ("a13_scale", "a2_scale"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.act_dtype is None or self.granularity != "tensor" or value.numel() != 1:
                raise ValueError(f"quant.{name}: a static activation scale needs act_dtype and granularity 'tensor' "
                                 f"and one element, got shape {tuple(value.shape)} with act_dtype={self.act_dtype!r}, "
                                 f"granularity={self.granularity!r}")

    @property
    def is_quantized(self) -> bool:
        return self.weight_dtype is not None or self.act_dtype is not None

    @property
    def act_granularity(self) -> str | None:
        """How activations are quantized (``tensor``, ``token`` or ``group``), or None when they are not."""
        return None if self.act_dtype is None or self.granularity is None else ACT_GRANULARITY[self.granularity]

    @property
    def act_group_size(self) -> int | None:
        """Columns per activation scale with ``group`` granularity (the weights' block K)."""
        return self.block_shape[1] if self.act_granularity == "group" else None

    @property
    def scheme(self) -> str | None:
        """The format as ``moekit.quantize`` names it (``fp8_block``, ``int8_channel``; tuned tables are keyed by
        it), with ``_a16`` when activations stay float; None when unquantized."""
        if self.weight_dtype is None:
            return None
        name = f"{self.weight_dtype.split('_')[0]}_{self.granularity}"
        return name if self.act_dtype is not None else f"{name}_a16"

    def describe(self) -> str:
        """A short name of the scheme for messages: ``fp8_e4m3 block 128x128 (activations fp8_e4m3 per group)``."""
        if not self.is_quantized:
            return "unquantized"
        text = f"{self.weight_dtype}"
        if self.granularity is not None:
            text += f" {self.granularity}"
            if self.block_shape is not None:
                text += f" {self.block_shape[0]}x{self.block_shape[1]}"
        act = "unquantized" if self.act_dtype is None else f"{self.act_dtype} per {self.act_granularity}"
        return f"{text} (activations {act})"


UNQUANTIZED = QuantParams()
"""Unquantized experts: weights in the activation dtype, nothing to repack."""

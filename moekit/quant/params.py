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

Weight-only integer groups (``weight_dtype`` int4/int8, granularity ``group``, ``act_dtype`` None; the layout is
``moekit.ops.quantize_wna16``'s, g = ``group_size``, -1: one group per row):

    w13             uint8 [E, R, ⌈H/2⌉] (int4: two codes a byte, even k low) or [E, R, H] (int8)
    w2              uint8 [E, H, ⌈I/2⌉] or [E, H, I]
    w13_scale       float [E, R, ⌈H/g⌉]        w2_scale  float [E, H, ⌈I/g⌉]
    w13_zp, w2_zp   uint8, the scales' shapes (unsigned zero points), or None: symmetric (zero 8 / 128)

MXFP4 weights (``weight_dtype`` mxfp4, granularity ``group``, ``group_size`` 32, no zero points; the layout is
``moekit.ops.quantize_mxfp4``'s: e2m1 codes, e8m0 scales, H and I multiples of 32):

    w13             uint8 [E, R, H/2]          w13_scale  uint8 [E, R, H/32]    (2^(s − 127))
    w2              uint8 [E, H, I/2]          w2_scale   uint8 [E, H, I/32]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHT_DTYPES = ("fp8_e4m3", "int8", "int4", "mxfp4")
GRANULARITIES = ("tensor", "channel", "block", "group")
# Integer weights that run weight-only with group scales (``granularity`` "group").
GROUP_DTYPES = {"int4": 4, "int8": 8}
# Microscaling weights (``granularity`` "group"): their one group size, e8m0 uint8 scales.
MX_DTYPES = {"mxfp4": 32}
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
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
    group_size: int | None = None
    w13_zp: torch.Tensor | None = None
    w2_zp: torch.Tensor | None = None

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
        for name in ("w13_scale", "w2_scale", "a13_scale", "a2_scale", "w13_zp", "w2_zp"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"quant.{name}: expected a torch.Tensor or None, got {type(value).__name__}")
        self._check_group()
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

    def _check_group(self) -> None:
        """Weight-only integer groups: the dtype, the group size, no activation dtype, zero points paired."""
        group = self.granularity == "group"
        if group and self.weight_dtype not in (*GROUP_DTYPES, *MX_DTYPES):
            raise ValueError(f"quant.weight_dtype: granularity 'group' needs one of "
                             f"{[*GROUP_DTYPES, *MX_DTYPES]}, got {self.weight_dtype!r}")
        if not group and self.weight_dtype in ("int4", *MX_DTYPES):
            raise ValueError(f"quant.granularity: {self.weight_dtype} weights need granularity 'group', got "
                             f"{self.granularity!r}")
        mx = self.weight_dtype in MX_DTYPES
        if group and self.act_dtype is not None:
            raise ValueError(f"quant.act_dtype: group-scaled {self.weight_dtype} weights keep activations "
                             f"unquantized (None), got {self.act_dtype!r}")
        gs = self.group_size
        if group:
            if isinstance(gs, bool) or not isinstance(gs, int) or (gs <= 0 and gs != -1):
                raise ValueError(f"quant.group_size: expected a positive int or -1 (one group per row) with "
                                 f"granularity 'group', got {gs!r}")
        elif gs is not None:
            raise ValueError(f"quant.group_size: expected None without granularity 'group', got {gs!r} with "
                             f"{self.granularity!r}")
        if mx and group and gs != MX_DTYPES[self.weight_dtype]:
            raise ValueError(f"quant.group_size: {self.weight_dtype} scales one group of "
                             f"{MX_DTYPES[self.weight_dtype]} columns, got {gs!r}")
        if mx and (self.w13_zp is not None or self.w2_zp is not None):
            raise ValueError(f"quant.w13_zp/w2_zp: {self.weight_dtype} weights have no zero points, got a tensor")
        if (self.w13_zp is None) != (self.w2_zp is None):
            raise ValueError("quant.w13_zp/w2_zp: zero points come for both weights or neither, got one of them")
        if self.w13_zp is not None and not group:
            raise ValueError(f"quant.w13_zp: zero points need granularity 'group', got {self.granularity!r}")
        if not group:
            return
        for w in ("w13", "w2"):
            scale, zp = getattr(self, f"{w}_scale"), getattr(self, f"{w}_zp")
            kind, dtypes = ("uint8 (e8m0)", (torch.uint8,)) if mx else ("float", _SCALE_DTYPES)
            if scale is not None and (scale.dim() != 3 or scale.dtype not in dtypes):
                raise ValueError(f"quant.{w}_scale: expected a {kind} [E, N, ⌈K/g⌉] tensor for group scales, got "
                                 f"{scale.dtype} of shape {tuple(scale.shape)}")
            if zp is not None and (zp.dtype != torch.uint8 or scale is None or zp.shape != scale.shape):
                raise ValueError(f"quant.{w}_zp: expected uint8 zero points of {w}_scale's shape "
                                 f"{None if scale is None else tuple(scale.shape)}, got {zp.dtype} of shape "
                                 f"{tuple(zp.shape)}")

    @property
    def bits(self) -> int | None:
        """Bits per weight code of group-scaled integer weights (4 or 8), else None (mxfp4 included)."""
        return GROUP_DTYPES.get(self.weight_dtype) if self.granularity == "group" else None

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
        it), with ``_a16`` when activations stay float; ``w4a16_g128`` / ``w4a16_g128_asym`` / ``w8a16_g128`` for
        weight-only integer groups (``channel`` for one group per row); None when unquantized."""
        if self.weight_dtype is None:
            return None
        if self.weight_dtype in MX_DTYPES:
            return self.weight_dtype
        if self.granularity == "group":
            g = "channel" if self.group_size == -1 else f"g{self.group_size}"
            return f"w{self.bits}a16_{g}" + ("_asym" if self.w13_zp is not None else "")
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
            if self.granularity == "group":
                text += f" {self.group_size}"
                if self.weight_dtype not in MX_DTYPES:
                    text += f" {'asym' if self.w13_zp is not None else 'sym'}"
        act = "unquantized" if self.act_dtype is None else f"{self.act_dtype} per {self.act_granularity}"
        return f"{text} (activations {act})"


UNQUANTIZED = QuantParams()
"""Unquantized experts: weights in the activation dtype, nothing to repack."""


def check_group_weights(quant: QuantParams, w13: torch.Tensor, w2: torch.Tensor, hidden_states: torch.Tensor, *,
                        gated: bool) -> None:
    """Group-scaled integer or MXFP4 weights: the codes' dtype and packed shapes, the scales' and zero points'
    shapes and devices, against ``hidden_states`` [T, H] (the tables in the module docstring)."""
    hidden = hidden_states.shape[1]
    num_local, rows = w13.shape[0], w13.shape[1]
    if gated and rows % 2:
        raise ValueError(f"w13: a gated activation needs an even row count 2I, got shape {tuple(w13.shape)}")
    inter = rows // 2 if gated else rows
    mx = MX_DTYPES.get(quant.weight_dtype)
    if mx is not None and (hidden % mx or inter % mx):
        raise ValueError(f"hidden_states: {quant.weight_dtype} weights need H and I multiples of {mx}, got H = "
                         f"{hidden} (hidden_states {tuple(hidden_states.shape)}) and I = {inter} (w13 "
                         f"{tuple(w13.shape)})")

    def width(k: int) -> int:
        return (k + 1) // 2 if quant.bits == 4 or mx is not None else k

    def groups(k: int) -> int:
        return 1 if quant.group_size == -1 else -(-k // quant.group_size)

    for name, t, shape, k in (("w13", w13, (num_local, rows, width(hidden)), hidden),
                              ("w2", w2, (num_local, hidden, width(inter)), inter)):
        if t.dtype != torch.uint8 or tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected uint8 codes of shape {shape} for {quant.describe()} with "
                             f"hidden_states {tuple(hidden_states.shape)}, got {t.dtype} {tuple(t.shape)}")
        scale_shape = (*shape[:2], groups(k))
        for part in ("scale", "zp"):
            value = getattr(quant, f"{name}_{part}")
            if value is None:
                continue
            if tuple(value.shape) != scale_shape:
                raise ValueError(f"quant.{name}_{part}: expected shape {scale_shape} for {quant.describe()} with "
                                 f"{name} {tuple(t.shape)}, got {tuple(value.shape)}")
            if value.device != hidden_states.device:
                raise ValueError(f"quant.{name}_{part}: expected device {hidden_states.device} (hidden_states'), "
                                 f"got {value.device}")

"""8-bit quantization in pure torch: the reference every quantized backend is checked against.

One rule covers every granularity. The last two dims [N, K] of a tensor are cut into blocks of ``(bn, bk)``
(the last block row/column may be short: it behaves as if zero-padded to full size, as DeepSeek-V3's README
says for weights that are not multiples of 128), and per block

    amax = max(max |x|, 2^-100);   m = QMAX / amax;   q = codes(x · m);   s = 1 / m   (max |x| = 0: q = 0, s = 0)
    x ≈ q · s[n // bn, k // bk]                                              (s is the dequant multiplier)

QMAX = 448 with ``codes = clamp(·, ±448) -> float8_e4m3fn`` (round to nearest even), or 127 with
``codes = round half to even, clamp(·, ±127) -> int8``. ``s`` is the exact reciprocal of the multiplier the codes
were made with, which is ``amax / QMAX`` to within one fp32 ulp; this is transformers' ``Fp8Quantize`` bit for bit
(DeepSeek-V3 ``weight_scale_inv``, vLLM ``w13_weight_scale_inv`` semantics). An all-zero block gets s = 0 and
dequantizes to exact zeros, never NaN. The floor ``AMAX_FLOOR`` (as vLLM's eps, far smaller) keeps m finite: a
block whose largest value is subnormal (below ~3e-39, 1/amax overflows fp32) made m = inf, so its zeros became
0 · inf = NaN codes and s = 0, and the whole block dequantized to NaN.

Granularities (``(bn, bk)`` for an [N, K] tensor):

    weights      block   (128, 128)   s [⌈N/128⌉, ⌈K/128⌉]     DeepSeek-V3, Qwen3-FP8
                 channel (1, K)       s [N, 1]                 compressed-tensors FP8_DYNAMIC, W8A8
                 tensor  (N, K)       s []                     one scale per expert
    activations  group   (1, 128)     s [M, ⌈K/128⌉]           per token, per 128 columns (with block weights)
                 token   (1, K)       s [M, 1]                 (with channel weights)
                 tensor  (M, K)       s []                     dynamic, or a given static scale
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moekit._checks import check_choice, check_dtype, check_tensor, finite_extremes

# Storage dtype and largest code of each 8-bit format (QuantParams.weight_dtype names).
QDTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}
QMAX = {"fp8_e4m3": 448.0, "int8": 127.0}
AMAX_FLOOR = 2.0**-100  # the smallest amax a multiplier is made from (module docstring); a power of two: exact
WEIGHT_GRANULARITIES = ("tensor", "channel", "block")
ACT_GRANULARITIES = ("tensor", "token", "group")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def native_8bit_dots(qdtype: str, device: torch.device) -> bool:
    """Whether ``device`` runs ``qdtype`` dots in its tensor cores (int8: every CUDA GPU Triton supports; fp8 e4m3:
    compute capability 8.9+, Ada and Hopper). Where not, ``backend='auto'`` runs 8-bit layers on the torch backend
    and the Triton backend refuses fp8."""
    if device.type != "cuda":
        return False
    return qdtype == "int8" or torch.cuda.get_device_capability(device) >= (8, 9)


def _codes(y: torch.Tensor, qdtype: str) -> torch.Tensor:
    qmax = QMAX[qdtype]
    if qdtype == "int8":
        # Half to even, like vLLM's float_to_int8_rn. int8 has no NaN: a NaN becomes code 0 (a float -> int cast of
        # NaN is undefined), and its group's NaN scale (dynamic scales) carries it; a static scale cannot.
        y = torch.round(torch.nan_to_num(y, nan=0.0, posinf=qmax, neginf=-qmax))
    return y.clamp(-qmax, qmax).to(QDTYPES[qdtype])


def quantize_blocks(x: torch.Tensor, block_shape: tuple[int, int], qdtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` [..., N, K] per ``block_shape`` (bn, bk) block of its last two dims.

    Returns ``(q, s)``: ``q`` [..., N, K] in ``QDTYPES[qdtype]``, ``s`` float32 [..., ⌈N/bn⌉, ⌈K/bk⌉].
    """
    check_tensor("x", x)
    check_dtype("x", x, _FLOAT_DTYPES)
    check_choice("qdtype", qdtype, tuple(QDTYPES))
    if x.dim() < 2:
        raise ValueError(f"x: expected at least 2 dims [..., N, K], got shape {tuple(x.shape)}")
    bn, bk = _check_block_shape(block_shape)
    n, k = x.shape[-2:]
    nb, kb = math.ceil(n / bn) if n else 0, math.ceil(k / bk) if k else 0
    # Zero-padding to whole blocks changes no amax, so short edge blocks get the scale the format defines.
    xp = F.pad(x.float(), (0, kb * bk - k, 0, nb * bn - n))
    blocks = xp.reshape(*x.shape[:-2], nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(-3, -1)) if blocks.numel() else blocks.new_zeros(*x.shape[:-2], nb, kb)
    mult, scale = multiplier(amax, qdtype)
    q = _codes(blocks * mult[..., :, None, :, None], qdtype)
    q = q.reshape(xp.shape)[..., :n, :k]
    return q.contiguous(), scale


def multiplier(amax: torch.Tensor, qdtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, s)`` of groups with float32 maxima ``amax`` (module docstring): m = QMAX / max(amax, AMAX_FLOOR),
    s = 1 / m, both 0 where amax = 0. The one place the reference and ``act_quant``'s torch side make them.

    A NaN amax (a NaN in the group) gives NaN m and s, so the group dequantizes to NaN: a test of ``amax > 0``
    sent it down the all-zero branch (s = 0, every code 0), and one NaN token zeroed a per-tensor batch."""
    zero = amax == 0
    mult = QMAX[qdtype] / torch.where(zero, torch.ones_like(amax), amax.clamp_min(AMAX_FLOOR))  # clamp keeps NaN
    mult = torch.where(zero, torch.zeros_like(mult), mult)
    scale = torch.where(zero, torch.zeros_like(mult), 1.0 / torch.where(zero, torch.ones_like(mult), mult))
    return mult, scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor:
    """``q`` [..., N, K] times its block scales ``scale`` [..., ⌈N/bn⌉, ⌈K/bk⌉], in float32."""
    check_tensor("q", q)
    check_tensor("scale", scale)
    bn, bk = _check_block_shape(block_shape)
    n, k = q.shape[-2:]
    expected = (*q.shape[:-2], math.ceil(n / bn), math.ceil(k / bk))
    if tuple(scale.shape) != expected:
        raise ValueError(f"scale: expected shape {expected} for q {tuple(q.shape)} in blocks {(bn, bk)}, "
                         f"got {tuple(scale.shape)}")
    s = scale.float().repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return q.float() * s


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, qdtype: str) -> torch.Tensor:
    """Codes of ``x`` for a given (static) dequant multiplier ``scale`` (broadcast against ``x``; 0 gives codes 0)."""
    check_choice("qdtype", qdtype, tuple(QDTYPES))
    s = scale.float()
    mult = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    return _codes(x.float() * mult, qdtype)


def weight_block(granularity: str, block_shape: tuple[int, int] | None, n: int, k: int) -> tuple[int, int]:
    """The (bn, bk) block of an [N, K] weight under ``granularity``."""
    check_choice("granularity", granularity, WEIGHT_GRANULARITIES)
    if granularity == "block":
        return _check_block_shape(block_shape)
    return (1, max(k, 1)) if granularity == "channel" else (max(n, 1), max(k, 1))


def quantize_weight(
    w_NK: torch.Tensor,
    qdtype: str,
    granularity: str,
    block_shape: tuple[int, int] | None = None,
    *,
    gate_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize weights ``w_NK`` [..., N, K]; scales as in the module docstring (tensor: [...], no block dims).

    ``gate_rows`` (block granularity, fused gate/up weights): rows [0, gate_rows) and the rest are blocked
    separately, so no block straddles gate and up when I is not a multiple of bn; the scale rows are then
    ``[⌈I/bn⌉ gate rows, ⌈I/bn⌉ up rows]`` (vLLM's ``2·⌈I/bn⌉``), the same as plain blocking when bn divides I.

    Raises on non-finite values: an inf makes its block's amax inf (multiplier 0, scale inf) and a NaN spreads
    through amax, so every value of that block would dequantize to NaN.
    """
    check_tensor("w_NK", w_NK)
    check_dtype("w_NK", w_NK, _FLOAT_DTYPES)
    if w_NK.dim() < 2:
        raise ValueError(f"w_NK: expected at least 2 dims [..., N, K], got shape {tuple(w_NK.shape)}")
    if not finite_extremes(w_NK):
        raise ValueError("w_NK: expected finite values (an inf or NaN makes its whole block's scale, and so every "
                         "value of the block, NaN), got inf or NaN")
    n, k = w_NK.shape[-2:]
    if granularity == "block" and gate_rows is not None:
        _check_gate_rows(gate_rows, n)
        (qg, sg), (qu, su) = (quantize_weight(half, qdtype, "block", block_shape)
                              for half in (w_NK[..., :gate_rows, :], w_NK[..., gate_rows:, :]))
        return torch.cat((qg, qu), dim=-2), torch.cat((sg, su), dim=-2)
    q, s = quantize_blocks(w_NK, weight_block(granularity, block_shape, n, k), qdtype)
    return q, (s.reshape(s.shape[:-2]) if granularity == "tensor" else s)


def dequantize_weight(
    q_NK: torch.Tensor,
    scale: torch.Tensor,
    granularity: str,
    block_shape: tuple[int, int] | None = None,
    *,
    gate_rows: int | None = None,
) -> torch.Tensor:
    """Float32 weights from ``quantize_weight``'s ``(q, scale)``; same arguments."""
    n, k = q_NK.shape[-2:]
    if granularity == "block" and gate_rows is not None:
        _check_gate_rows(gate_rows, n)
        split = math.ceil(gate_rows / _check_block_shape(block_shape)[0])
        return torch.cat((dequantize_weight(q_NK[..., :gate_rows, :], scale[..., :split, :], "block", block_shape),
                          dequantize_weight(q_NK[..., gate_rows:, :], scale[..., split:, :], "block", block_shape)),
                         dim=-2)
    if granularity == "tensor":
        scale = scale.reshape(*scale.shape, 1, 1)
    return dequantize_blocks(q_NK, scale, weight_block(granularity, block_shape, n, k))


def act_block(granularity: str, group_size: int | None, m: int, k: int) -> tuple[int, int]:
    """The (bm, bk) block of an [M, K] activation under ``granularity``."""
    check_choice("granularity", granularity, ACT_GRANULARITIES)
    if granularity == "group":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size: expected a positive int for group granularity, got {group_size!r}")
        return (1, group_size)
    return (1, max(k, 1)) if granularity == "token" else (max(m, 1), max(k, 1))


def quantize_activation(
    x_MK: torch.Tensor,
    qdtype: str,
    granularity: str,
    group_size: int | None = None,
    *,
    static_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization of ``x_MK`` [M, K]: ``(q, s)`` with s [M, ⌈K/g⌉] (group), [M, 1]
    (token) or [] (tensor). ``static_scale`` (tensor granularity only, one element): use it instead of amax."""
    if x_MK.dim() != 2:
        raise ValueError(f"x_MK: expected a 2-d tensor [M, K], got shape {tuple(x_MK.shape)}")
    if static_scale is not None:
        s = static_act_scale(static_scale, granularity)
        return quantize_with_scale(x_MK, s, qdtype), s
    m, k = x_MK.shape
    q, s = quantize_blocks(x_MK, act_block(granularity, group_size, m, k), qdtype)
    return q, (s.reshape(()) if granularity == "tensor" else s)


def static_act_scale(static_scale: torch.Tensor, granularity: str) -> torch.Tensor:
    """A given activation scale as the float32 0-d tensor ``quantize_activation`` returns (checked: one element,
    tensor granularity).

    A scale that is not a positive normal float32 (0, negative, subnormal: its reciprocal overflows, NaN, inf)
    becomes NaN, so every output it scales is NaN: it quantized every activation to 0 (a silently all-zero
    layer). Its value is not refused here (a device sync on every call); the loaders refuse such scales."""
    check_tensor("static_scale", static_scale)
    if granularity != "tensor" or static_scale.numel() != 1:
        raise ValueError(f"static_scale: expected one element with tensor granularity, got shape "
                         f"{tuple(static_scale.shape)} with {granularity!r}")
    s = static_scale.float().reshape(())
    usable = (s >= torch.finfo(torch.float32).tiny) & torch.isfinite(s)
    return torch.where(usable, s, torch.full_like(s, float("nan")))


def dequantize_activation(
    q_MK: torch.Tensor, scale: torch.Tensor, granularity: str, group_size: int | None = None
) -> torch.Tensor:
    """Float32 activations from ``quantize_activation``'s ``(q, scale)``."""
    m, k = q_MK.shape
    if granularity == "tensor":
        return q_MK.float() * scale.float().reshape(())
    return dequantize_blocks(q_MK, scale, act_block(granularity, group_size, m, k))


def expert_scale_shapes(
    granularity: str,
    block_shape: tuple[int, int] | None,
    *,
    num_experts: int,
    hidden: int,
    inter: int,
    gated: bool,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (w13_scale, w2_scale) for w13 [E, R, H] (R = 2I gated, else I) and w2 [E, H, I]."""
    check_choice("granularity", granularity, WEIGHT_GRANULARITIES)
    rows = 2 * inter if gated else inter
    if granularity == "tensor":
        return (num_experts,), (num_experts,)
    if granularity == "channel":
        return (num_experts, rows, 1), (num_experts, hidden, 1)
    bn, bk = _check_block_shape(block_shape)
    w13_rows = (2 if gated else 1) * math.ceil(inter / bn)  # gate and up blocked apart
    return (num_experts, w13_rows, math.ceil(hidden / bk)), (num_experts, math.ceil(hidden / bn), math.ceil(inter / bk))


def _check_block_shape(block_shape: object) -> tuple[int, int]:
    if (not isinstance(block_shape, (tuple, list)) or len(block_shape) != 2
            or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in block_shape)):
        raise ValueError(f"block_shape: expected two positive ints (bn, bk), got {block_shape!r}")
    return int(block_shape[0]), int(block_shape[1])


def _check_gate_rows(gate_rows: int, n: int) -> None:
    if not 0 < gate_rows < n:
        raise ValueError(f"gate_rows: expected in (0, N={n}), got {gate_rows}")

"""4-bit and 8-bit integer weights with group scales (weight-only, "WNA16"), in pure torch: the one internal layout
every GPTQ / AWQ / compressed-tensors checkpoint is converted into, and the reference every WNA16 kernel is checked
against.

Internal layout (vLLM's ``moe_wna16`` / compressed-tensors layout, N-first, K contiguous), for a weight [N, K]:

    qweight  uint8 [..., N, ⌈K/2⌉]  bits 4: byte j holds k = 2j in its low nibble and k = 2j+1 in its high one
             uint8 [..., N, K]      bits 8
    scales   [..., N, ⌈K/g⌉]        the checkpoint's float dtype (model dtype or fp32), never rounded again
    zeros    uint8 [..., N, ⌈K/g⌉]  unsigned zero points, or None: symmetric, zero = 2^(bits-1) (8 or 128)

    W[n, k] = (q[n, k] − z[n, k // g]) · s[n, k // g]                         (q, z unsigned codes in [0, 2^bits))

A short last group (K not a multiple of g) is allowed; ``k`` (K) is kept beside the tensors because an odd K leaves
a padding nibble. The zero points stay unpacked here (the kernels may pack them along N, as vLLM does).

Each converter is a pure function of the checkpoint tensors (formulas in their docstrings; see also
docs/QUANT.md). None copies more than the format forces: compressed-tensors' ``weight_packed`` is reinterpreted as
bytes in place.
"""

from __future__ import annotations

import math
import sys
from typing import NamedTuple

import torch

from moekit._checks import (
    check_bool, check_choice, check_dtype, check_ndim, check_shape, check_tensor, finite_extremes,
)

BITS = (4, 8)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Nibble j of an AWQ word holds column 8w + AWQ_ORDER[j]; column c sits in nibble _AWQ_NIBBLE[c % 8].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)
DESC_ACT_MESSAGE = ("GPTQ group activation ordering (desc_act=True) is no longer supported: g_idx is not "
                    "k // group_size. Dequantize such a checkpoint instead (dequantize_gptq).")


class WNA16Weight(NamedTuple):
    """One weight in the internal layout (module docstring); ``k`` is K, the unpacked reduction size."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    k: int


def quantize_wna16(w_NK: torch.Tensor, bits: int, group_size: int, sym: bool) -> WNA16Weight:
    """Round-to-nearest quantization of ``w_NK`` [..., N, K] per group of ``group_size`` columns (-1: one group).

    With Q = 2^bits − 1, per group (compressed-tensors' ``calculate_qparams`` rule):

        sym:  s = max|w| / (Q / 2);                 z = 2^(bits-1)            (int4: s = amax / 7.5, z = 8)
        asym: lo = min(w, 0), hi = max(w, 0);  s = (hi − lo) / Q;  z = clamp(round(−lo / s), 0, Q)
        q = clamp(round(w / s) + z, 0, Q)          (round half to even; s = 0: q = z, dequantizes to 0)

    ``s`` is rounded to ``w``'s dtype first and the codes are made with that stored scale, so dequantizing gives
    exactly what the codes mean. Returns the internal layout with ``scales`` in ``w``'s dtype. Raises on non-finite
    values (an inf or NaN would make its whole group's scale, and so every value of the group, NaN).
    """
    check_tensor("w_NK", w_NK)
    check_dtype("w_NK", w_NK, _FLOAT_DTYPES)
    if w_NK.dim() < 2:
        raise ValueError(f"w_NK: expected at least 2 dims [..., N, K], got shape {tuple(w_NK.shape)}")
    if not finite_extremes(w_NK):
        raise ValueError("w_NK: expected finite values (an integer code cannot hold inf/NaN), got inf or NaN")
    check_choice("bits", bits, BITS)
    check_bool("sym", sym)
    k = w_NK.shape[-1]
    g = _group_size(group_size, k)
    qmax = (1 << bits) - 1
    groups = _to_groups(w_NK.float(), g)                      # [..., N, G, g], zero-padded
    if sym:
        scale = groups.abs().amax(-1) / (qmax / 2)
    else:
        lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
    scale = scale.to(w_NK.dtype)
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    if sym:
        zero = torch.full_like(s, 1 << (bits - 1))
    else:
        zero = torch.where(s > 0, torch.round(-lo / safe), torch.zeros_like(s)).clamp(0, qmax)
    q = torch.where(s[..., None] > 0, torch.round(groups / safe[..., None]), torch.zeros_like(groups))
    q = (q + zero[..., None]).clamp(0, qmax).to(torch.uint8).flatten(-2)[..., :k]
    zeros = None if sym else zero.to(torch.uint8)
    return WNA16Weight(_pack_k(q, bits), scale, zeros, bits, g, k)


def dequantize_wna16(weight: WNA16Weight) -> torch.Tensor:
    """Float32 [..., N, K] of a weight in the internal layout: ``(q − z[k // g]) · s[k // g]``."""
    qweight, scales, zeros, bits, g, k = _check_wna16(weight)
    q = _unpack_k(qweight, bits, k).float()
    z = zeros.float() if zeros is not None else torch.full_like(scales, 1 << (bits - 1), dtype=torch.float32)
    return (q - _expand_groups(z, g, k)) * _expand_groups(scales.float(), g, k)


def gptq_to_wna16(
    qweight: torch.Tensor,
    qzeros: torch.Tensor | None,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    sym: bool,
) -> WNA16Weight:
    """GPTQ v1 (``checkpoint_format: gptq``) tensors of one linear into the internal layout.

    ``qweight`` int32 [K·bits/32, N] (K-packed: element k at bits ``bits·(k % (32/bits))`` of word k // (32/bits)),
    ``qzeros`` int32 [⌈K/g⌉, ⌈N·bits/32⌉] (N-packed the same way), ``scales`` [⌈K/g⌉, N], ``g_idx`` int [K]:

        W[n, k] = scales[g(k), n] · (q[k, n] − z[g(k), n]),   z = unpack((qzeros + 0x11…1) mod 2^32)   (4 bits: + 0x11111111)

    Sym (``sym=True``): every stored zero must read 2^(bits-1) − 1 (checked; ``qzeros`` may be None) and the result
    has ``zeros=None``. The "minus one" is taken off each packed word as a whole, as GPTQModel writes it (a zero
    point of 0 borrows from the field above: ``_gptq_zeros``), so every zero point 0 .. 2^bits − 1 reads exactly.
    ``g_idx`` must be ``k // group_size`` (or None): act-order checkpoints (``desc_act=True``) are refused with
    vLLM's message; dequantize them with ``dequantize_gptq``.
    """
    k, n, g = _check_gptq(qweight, qzeros, scales, g_idx, bits, group_size, sym)
    if g_idx is not None and not torch.equal(g_idx.long().cpu(), torch.arange(k) // g):
        raise ValueError(f"g_idx: {DESC_ACT_MESSAGE}")
    _check_little_endian()
    # On a little-endian host, the K-packed int32 columns read as bytes *are* N-first, low nibble = even k.
    q = qweight.t().contiguous().view(torch.uint8)
    zeros = None
    if qzeros is not None:
        z = _gptq_zeros(qzeros, bits, n)
        if sym:
            _check_sym_zeros(z, bits)
        else:
            zeros = z.t().contiguous().to(torch.uint8)
    return WNA16Weight(q, scales.t().contiguous(), zeros, bits, g, k)


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor | None,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    sym: bool,
) -> torch.Tensor:
    """Float32 W [N, K] of GPTQ v1 tensors for any ``g_idx`` (act order included); formula of ``gptq_to_wna16``.
    ``qzeros`` None (sym only) means the zero 2^(bits-1)."""
    k, n, g = _check_gptq(qweight, qzeros, scales, g_idx, bits, group_size, sym)
    group = g_idx.long() if g_idx is not None else torch.arange(k, device=qweight.device) // g
    if group.numel() and (int(group.min()) < 0 or int(group.max()) >= scales.shape[0]):
        raise ValueError(f"g_idx: expected group indices in [0, {scales.shape[0]}), "
                         f"got [{int(group.min())}, {int(group.max())}]")
    q = _unpack_int32(qweight, bits, dim=0, size=k).float()  # [K, N]
    if qzeros is None:
        z = torch.full((scales.shape[0], n), float(1 << (bits - 1)), device=qweight.device)
    else:
        z = _gptq_zeros(qzeros, bits, n)
        if sym:
            _check_sym_zeros(z, bits)
        z = z.float()
    return ((q - z[group]) * scales.float()[group]).t().contiguous()


def awq_to_wna16(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, group_size: int) -> WNA16Weight:
    """AutoAWQ GEMM (``version: gemm``, 4 bits, zero points) tensors of one linear into the internal layout.

    ``qweight`` int32 [K, N/8] and ``qzeros`` int32 [⌈K/g⌉, N/8] are packed along N: nibble j (bits 4j) of word w
    holds column ``8w + AWQ_ORDER[j]`` with AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]; ``scales`` [⌈K/g⌉, N]:

        W[n, k] = scales[k // g, n] · (q[k, n] − z[k // g, n])                 (zero points unsigned, as stored)
    """
    check_ndim("qweight", qweight, 2, "[K, N/8]")
    check_dtype("qweight", qweight, (torch.int32,))
    k, n = qweight.shape[0], qweight.shape[1] * 8
    g = _group_size(group_size, k)
    groups = math.ceil(k / g)
    check_shape("qzeros", qzeros, (groups, n // 8), f"[⌈K/g⌉, N/8] for K={k}, N={n}, g={g}")
    check_dtype("qzeros", qzeros, (torch.int32,))
    check_shape("scales", scales, (groups, n), f"[⌈K/g⌉, N] for K={k}, N={n}, g={g}")
    check_dtype("scales", scales, _FLOAT_DTYPES)
    q = _unpack_awq(qweight).to(torch.uint8)                   # [K, N]
    z = _unpack_awq(qzeros).to(torch.uint8)                    # [G, N]
    return WNA16Weight(_pack_k(q.t(), 4), scales.t().contiguous(), z.t().contiguous(), 4, g, k)


def compressed_tensors_to_wna16(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None = None,
    *,
    bits: int,
    group_size: int,
    k: int | None = None,
) -> WNA16Weight:
    """compressed-tensors ``pack-quantized`` (W4A16, W4A16_ASYM, W8A16, group strategy) tensors into the layout.

    ``weight_packed`` int32 [N, ⌈K·bits/32⌉]: signed q stored as ``q + 2^(bits-1)``, element k at bits
    ``bits·(k % (32/bits))`` of word k // (32/bits) (zero-padded past K); ``weight_scale`` [N, ⌈K/g⌉];
    ``weight_zero_point`` int32 [⌈N·bits/32⌉, ⌈K/g⌉] packed along N the same way (asym only; None: sym):

        W[n, k] = weight_scale[n, k // g] · (q[n, k] − zp[n, k // g])         (q, zp signed)

    Stored nibbles/bytes are exactly the internal unsigned codes, so on a little-endian host ``qweight`` is
    ``weight_packed.view(torch.uint8)`` (sliced to ⌈K/2⌉ or K columns): the same storage, no copy. ``k`` is
    ``weight_shape[1]`` (default: all packed columns).
    """
    check_ndim("weight_packed", weight_packed, 2, "[N, ⌈K·bits/32⌉]")
    check_dtype("weight_packed", weight_packed, (torch.int32,))
    check_choice("bits", bits, BITS)
    per_word = 32 // bits
    n, words = weight_packed.shape
    if k is None:
        k = words * per_word
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0 or math.ceil(k / per_word) != words:
        raise ValueError(f"k: expected a positive int with ⌈k/{per_word}⌉ = {words} (weight_packed columns), "
                         f"got {k!r}")
    g = _group_size(group_size, k)
    groups = math.ceil(k / g)
    check_shape("weight_scale", weight_scale, (n, groups), f"[N, ⌈K/g⌉] for N={n}, K={k}, g={g}")
    check_dtype("weight_scale", weight_scale, _FLOAT_DTYPES)
    zeros = None
    if weight_zero_point is not None:
        check_shape("weight_zero_point", weight_zero_point, (math.ceil(n / per_word), groups),
                    f"[⌈N·bits/32⌉, ⌈K/g⌉] for N={n}, K={k}, g={g}")
        check_dtype("weight_zero_point", weight_zero_point, (torch.int32,))
        zeros = _unpack_int32(weight_zero_point, bits, dim=0, size=n).to(torch.uint8)
    _check_little_endian()
    qweight = weight_packed.view(torch.uint8)[:, : _packed_width(k, bits)]
    return WNA16Weight(qweight, weight_scale, zeros, bits, g, k)


# ----------------------------------------------------------------------------------------------------- helpers


def _check_wna16(weight: object) -> WNA16Weight:
    if not isinstance(weight, WNA16Weight):
        raise TypeError(f"weight: expected a WNA16Weight, got {type(weight).__name__}")
    qweight, scales, zeros, bits, g, k = weight
    check_choice("bits", bits, BITS)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k: expected a non-negative int, got {k!r}")
    g = _group_size(g, k)
    check_tensor("qweight", qweight)
    check_dtype("qweight", qweight, (torch.uint8,))
    if qweight.dim() < 2 or qweight.shape[-1] != _packed_width(k, bits):
        raise ValueError(f"qweight: expected shape [..., N, {_packed_width(k, bits)}] for K={k}, bits={bits}, "
                         f"got {tuple(qweight.shape)}")
    expected = (*qweight.shape[:-1], math.ceil(k / g))
    check_shape("scales", scales, expected, f"[..., N, ⌈K/g⌉] for K={k}, g={g}")
    check_dtype("scales", scales, _FLOAT_DTYPES)
    if zeros is not None:
        check_shape("zeros", zeros, expected, f"[..., N, ⌈K/g⌉] for K={k}, g={g}")
        check_dtype("zeros", zeros, (torch.uint8,))
    return WNA16Weight(qweight, scales, zeros, bits, g, k)


def _check_gptq(qweight, qzeros, scales, g_idx, bits, group_size, sym) -> tuple[int, int, int]:
    check_choice("bits", bits, BITS)
    check_bool("sym", sym)
    per_word = 32 // bits
    check_ndim("qweight", qweight, 2, f"[K/{per_word}, N]")
    check_dtype("qweight", qweight, (torch.int32,))
    k, n = qweight.shape[0] * per_word, qweight.shape[1]
    g = _group_size(group_size, k)
    groups = math.ceil(k / g)
    if g_idx is not None:
        check_shape("g_idx", g_idx, (k,), f"[K] for K={k}")
        check_dtype("g_idx", g_idx, (torch.int32, torch.int64))
    check_shape("scales", scales, (groups, n), f"[⌈K/g⌉, N] for K={k}, N={n}, g={g}")
    check_dtype("scales", scales, _FLOAT_DTYPES)
    if qzeros is None:
        if not sym:
            raise ValueError("qzeros: expected an int32 tensor for sym=False, got None")
    else:
        check_shape("qzeros", qzeros, (groups, math.ceil(n / per_word)), f"[⌈K/g⌉, ⌈N/{per_word}⌉] for N={n}")
        check_dtype("qzeros", qzeros, (torch.int32,))
    return k, n, g


def _check_sym_zeros(z: torch.Tensor, bits: int) -> None:
    """A symmetric checkpoint's zeros (``_gptq_zeros``) must all be 2^(bits-1): else its ``sym`` flag is wrong."""
    mid = 1 << (bits - 1)
    if not bool((z == mid).all()):
        raise ValueError(f"qzeros: expected every zero to be {mid} (stored {mid - 1}) for sym=True, "
                         f"got values {z.unique().tolist()[:8]}")


def _gptq_zeros(qzeros: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """[G, N] int32 zeros of v1 storage. GPTQModel writes v1 by subtracting one from every field of each packed
    *word* at once (a word minus 0x11111111 at 4 bits), so a zero point of 0 borrows from the field above it; its
    reader adds the word back. Doing the same here gives every zero exactly, 0 included (adding one to each field
    after unpacking would read 2^bits for that 0 and one less for its neighbour)."""
    ones = sum(1 << (bits * i) for i in range(32 // bits))
    words = (qzeros.to(torch.int64) + ones) & 0xFFFFFFFF
    return _unpack_int32(words, bits, dim=1, size=n).to(torch.int32)


def _group_size(group_size: object, k: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise ValueError(f"group_size: expected a positive int or -1 (one group over K), got {group_size!r}")
    return max(k, 1) if group_size == -1 else group_size


def _packed_width(k: int, bits: int) -> int:
    return (k + 1) // 2 if bits == 4 else k


def _check_little_endian() -> None:
    # The byte views below read int32 words as their four bytes, low byte first.
    if sys.byteorder != "little":
        raise RuntimeError("WNA16 conversion reinterprets int32 words as bytes and needs a little-endian host")


def _unpack_int32(x: torch.Tensor, bits: int, *, dim: int, size: int) -> torch.Tensor:
    """Unsigned codes of ``x`` int32 packed along ``dim`` (element i at bits ``bits·(i % per_word)`` of word
    i // per_word), trimmed to ``size`` along ``dim``; int32."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=x.device, dtype=torch.int32) * bits
    xd = x.movedim(dim, -1)
    codes = (xd[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)[..., :size].movedim(-1, dim)


def _unpack_awq(x: torch.Tensor) -> torch.Tensor:
    """[R, 8W] int32 codes of an AWQ-packed [R, W] int32 tensor."""
    shifts = torch.tensor(_AWQ_NIBBLE, device=x.device, dtype=torch.int32) * 4
    return ((x[..., None] >> shifts) & 15).flatten(-2)


def _pack_k(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., N, K] into the internal ``qweight`` (4 bits: two per byte, even k low)."""
    if bits == 8:
        return q.contiguous()
    if q.shape[-1] % 2:
        q = torch.cat((q, q.new_zeros(*q.shape[:-1], 1)), dim=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def _unpack_k(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    if bits == 8:
        return qweight
    return torch.stack((qweight & 15, qweight >> 4), dim=-1).flatten(-2)[..., :k]


def _to_groups(x: torch.Tensor, g: int) -> torch.Tensor:
    k = x.shape[-1]
    groups = math.ceil(k / g) if k else 0
    x = torch.nn.functional.pad(x, (0, groups * g - k))
    return x.reshape(*x.shape[:-1], groups, g)


def _expand_groups(x: torch.Tensor, g: int, k: int) -> torch.Tensor:
    return x.repeat_interleave(g, dim=-1)[..., :k]

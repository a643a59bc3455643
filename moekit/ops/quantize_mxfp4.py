"""MXFP4 (OCP microscaling, e2m1 elements with one e8m0 scale per 32) weights in pure torch: the internal layout of
gpt-oss and compressed-tensors MXFP4A16 checkpoints, and the reference every MXFP4 kernel is checked against.

Internal layout (N-first, K contiguous; the bytes gpt-oss and compressed-tensors store), for a weight [N, K]:

    codes   uint8 [..., N, K/2]    byte j holds k = 2j in its low nibble and k = 2j+1 in its high one
    scales  uint8 [..., N, K/32]   e8m0: the biased exponent of a power of two, 2^(s − 127)

    W[n, k] = E2M1[code(n, k)] · 2^(scales[n, k // 32] − 127)

    E2M1 = [0, .5, 1, 1.5, 2, 3, 4, 6, −0, −.5, −1, −1.5, −2, −3, −4, −6]       (bit 3 is the sign)

K must be a multiple of 32 (every producer's block). e8m0 255 is NaN in the OCP spec: it dequantizes to NaN here
(loaders refuse it); 254 times 6 overflows float32 to inf, as the format says.
"""

from __future__ import annotations

import functools

import torch

from moekit._checks import check_dtype, check_tensor, finite_extremes

GROUP = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_NAN = 255
_EMAX = 2  # e2m1's largest value 6 = 1.5 · 2^2
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dequantize_mxfp4(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Float32 [..., N, K] of MXFP4 ``codes`` uint8 [..., N, K/2] and e8m0 ``scales`` uint8 [..., N, K/32]: every
    value exact (a product of an e2m1 value and a power of two; 6 · 2^127 overflows to inf).

    One lookup per code byte: a table of every (scale, byte) pair's two values (``_pair_table``) indexed by
    ``scale << 8 | byte``. This is the torch backend's per-expert dequantization, so it is built for memory
    traffic: one int32 index per byte, then one gather that writes the output (no int64 indices, no per-nibble
    intermediates, no multiply pass over the output).
    """
    k = check_mxfp4(codes, scales)
    table = _pair_table(codes.device)
    idx = (scales.to(torch.int32).unsqueeze(-1) << 8) | codes.unflatten(-1, (k // GROUP, GROUP // 2))
    return table.index_select(0, idx.flatten()).view(torch.float32).view(*codes.shape[:-1], k)


def _build_pair_table(device: torch.device) -> torch.Tensor:
    """int64 [256 · 256]: entry ``s << 8 | b`` holds the float32 pair (E2M1[b & 15], E2M1[b >> 4]) · 2^(s − 127)
    (k = 2j, then 2j + 1) as raw bytes, each value the product the format defines, computed once in float32 on
    ``device`` (exact, so as the per-element product would be; 255's NaN scale gives NaN). A gather of 8-byte
    scalars: one of [256·256, 2] float rows ran 2x slower on CPU (a row copy per index)."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    pairs = torch.stack((lut.repeat(16), lut.repeat_interleave(16)), dim=-1)  # byte b -> (low nibble, high nibble)
    scale = e8m0_to_float(torch.arange(256, dtype=torch.int32, device=device))
    return (scale.view(256, 1, 1) * pairs).contiguous().view(torch.int64).flatten()


@functools.lru_cache(maxsize=None)
def _cached_pair_table(device: torch.device) -> torch.Tensor:
    return _build_pair_table(device)


def _pair_table(device: torch.device) -> torch.Tensor:
    """``_build_pair_table`` once per device (512 KiB), except while a CUDA graph is being captured: a table made
    then would be filled only by the graph's replays."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _build_pair_table(device)
    return _cached_pair_table(device)


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """Float32 2^(s − 127) of e8m0 bytes, built from its bit pattern (exact for every s, 2^-127 subnormal); NaN
    for 255."""
    s = scales.to(torch.int32)
    bits = torch.where(s > 0, s << 23, torch.full_like(s, 1 << 22))  # s = 0: the subnormal 2^-127
    bits = torch.where(s == E8M0_NAN, torch.full_like(s, 0x7FC00000), bits)
    return bits.view(torch.float32)


def quantize_mxfp4(w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 ``(codes, scales)`` of ``w_NK`` [..., N, K] (K a multiple of 32), as compressed-tensors' MXFP4
    producer makes them (``generate_mx_scales`` + ``cast_to_fp4``), per group of 32 columns:

        amax = max |w| = m · 2^e with m in [1, 2);  e += 1 when m ≥ 1.75 (amax/2^(e−2) would round past 6)
        s = clamp(127 + e − 2, 0, 254)             (OCP: shared exponent floor(log2 amax) − emax(e2m1) = 2)
        code = round-to-nearest-even of w / 2^(s − 127) onto ±E2M1, magnitudes past 6 clamped to 6;
               the sign bit is w's (a negative that rounds to 0 keeps it: −0)

    An all-zero group gets s = 0 and zero codes. Raises on non-finite values (they have no code).
    """
    check_tensor("w_NK", w_NK)
    check_dtype("w_NK", w_NK, _FLOAT_DTYPES)
    if w_NK.dim() < 2 or w_NK.shape[-1] % GROUP:
        raise ValueError(f"w_NK: expected shape [..., N, K] with K a multiple of {GROUP}, got {tuple(w_NK.shape)}")
    w = w_NK.float().contiguous()  # exact for every input dtype: amax and the power-of-two division below are exact too
    if not finite_extremes(w):
        raise ValueError("w_NK: expected finite values (MXFP4 has no inf/NaN codes), got inf or NaN")
    groups = w.unflatten(-1, (w.shape[-1] // GROUP, GROUP))
    amax = groups.abs().amax(-1)
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa · 2^exponent, mantissa in [0.5, 1)
    e = exponent.to(torch.int32) - 1 + (mantissa >= 0.875).to(torch.int32)
    s = torch.where(amax > 0, (127 + e - _EMAX).clamp(0, 254), torch.zeros_like(e)).to(torch.uint8)
    y = (groups / e8m0_to_float(s).unsqueeze(-1)).flatten(-2)
    a = y.abs().clamp_(max=6.0)
    # E2M1's magnitudes are three uniform grids: step 0.5 on [0, 2) (codes 0-4), 1 on [2, 4) (codes 4-6), 2 on
    # [4, 6] (codes 6-7), each code even where its mantissa bit is 0. torch.round is round-half-to-even on each
    # grid, and a tie on a grid is a tie between codes whose even one is the grid's even step: round-to-nearest-
    # even onto E2M1, with no search (a bucketize over the midpoints and a pass per upward tie ran 4x slower on CPU).
    code = torch.where(a < 2.0, torch.round(a * 2.0), torch.where(a < 4.0, torch.round(a) + 2.0,
                                                                  torch.round(a * 0.5) + 4.0))
    code = code.to(torch.uint8) | (torch.signbit(w).to(torch.uint8) << 3)
    return code[..., 0::2] | (code[..., 1::2] << 4), s


def check_mxfp4(codes: torch.Tensor, scales: torch.Tensor) -> int:
    """Validate an MXFP4 pair (module docstring); returns K."""
    check_tensor("codes", codes)
    check_tensor("scales", scales)
    check_dtype("codes", codes, (torch.uint8,))
    check_dtype("scales", scales, (torch.uint8,))
    if codes.dim() < 2 or codes.shape[-1] % (GROUP // 2):
        raise ValueError(f"codes: expected shape [..., N, K/2] with K a multiple of {GROUP}, got "
                         f"{tuple(codes.shape)}")
    k = codes.shape[-1] * 2
    expected = (*codes.shape[:-1], k // GROUP)
    if tuple(scales.shape) != expected:
        raise ValueError(f"scales: expected shape {expected} [..., N, K/32] for codes {tuple(codes.shape)}, got "
                         f"{tuple(scales.shape)}")
    if scales.device != codes.device:
        raise ValueError(f"scales: expected device {codes.device} (codes'), got {scales.device}")
    return k
